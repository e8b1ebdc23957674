"""A trained MAGE in a notebook or a script: reconstruct, sample, edit, pool features.

The functions the notebooks (``notebooks/``) call, each a thin layer over the pieces the
stages use, so a notebook shows what the command line computes:

* ``load``: a pretraining run, converted weights, or a released ``.pth`` file or URL
  (converted once into a cache directory) -> ``pretrained.Pretrained``;
* ``images_from_dataset``: evaluation views of a TFDS dataset (the run's own by default);
* ``reconstruct``: the tokenizer's encode then decode;
* ``sample``: the generate stage's sampler (``generate/sampler.py``), all devices found;
* ``edit``: inpainting or outpainting of a box (``generate/edit.py``);
* ``pooled_features`` and ``fewshot``: the probe's features (``probe/features.py``) and
  big_vision's few-shot regression (``eval/fewshot.py``).

Images go in and come out as uint8 ``(B, H, W, 3)``; batches are padded to the number of
devices and cut back, so any count works on any mesh.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import urllib.parse
import urllib.request

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mage_jax import config_defaults, config_files, paths, pretrained, sharding
from mage_jax.data import pipeline
from mage_jax.eval import fewshot as lsr
from mage_jax.generate import edit as edit_lib
from mage_jax.generate import editing
from mage_jax.generate import sampler as sampler_lib
from mage_jax.probe import features as features_lib

# The official MAGE presets by encoder width (the released ViT-B and ViT-L checkpoints).
_PRESET_BY_WIDTH = {768: "vit_b", 1024: "vit_l"}


def mesh(devices=None):
    """A data-parallel mesh over every device found (or ``devices``): CPU, GPU or TPU."""
    return sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1), devices)


def describe_devices() -> str:
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"{jax.default_backend()}: {len(devices)} device(s) ({', '.join(kinds)})"


def _download(url: str, cache_dir: pathlib.Path) -> pathlib.Path:
    name = os.path.basename(urllib.parse.urlparse(url).path) or "weights.pth"
    target = cache_dir / "downloads" / name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(target.suffix + ".partial")
        urllib.request.urlretrieve(url, partial)  # a cut download never becomes `target`
        partial.rename(target)
    return target


def _preset_for(state_dict, path: pathlib.Path) -> str:
    """The preset a released ``.pth``'s state dict (read from ``path``) fits, by width."""
    key = "token_emb.word_embeddings.weight"
    width = int(state_dict[key].shape[1]) if key in state_dict else None
    if width not in _PRESET_BY_WIDTH:
        raise ValueError(
            f"{path} is not a released MAGE ViT-B or ViT-L checkpoint ({key} width {width}; "
            f"expected one of {sorted(_PRESET_BY_WIDTH)}): pass config= the pretrain config "
            f"it fits, or convert it with `python -m mage_jax.convert mage --config=...` and "
            f"load the output directory.")
    return _PRESET_BY_WIDTH[width]


def _local_file(source: str, cache: pathlib.Path, what: str) -> pathlib.Path:
    """A path as it is; an http(s) or file:// URL fetched into the cache once."""
    if urllib.parse.urlparse(source).scheme in ("http", "https", "file"):
        return _download(source, cache)
    if os.path.isfile(source):
        return pathlib.Path(source)
    raise FileNotFoundError(f"{source} is neither a directory (a run or converted weights), a "
                            f"file nor a URL: give {what}.")


def load(source: str, step: int | None = None, *, tokenizer: str | None = None, config=None,
         cache_dir: str | None = None, ignore_keys=()) -> pretrained.Pretrained:
    """A trained MAGE and its tokenizer from ``source``: a pretraining run's workdir, the
    output of ``python -m mage_jax.convert mage``, or a released ``.pth`` file (a path or a
    URL: http(s), or file://), converted once into ``cache_dir`` (default
    ``paths.cache_dir()``). ``tokenizer``: the released VQGAN ``.ckpt`` (path or URL), for a
    ``.pth`` that does not carry its tokenizer (no ``vqgan.*`` keys). ``config``: the pretrain
    config the weights must fit, as the converter's ``--config`` (default: the preset their
    width implies, 768 vit_b, 1024 vit_l)."""
    source = str(source)
    if os.path.isdir(source):
        return pretrained.load(source, step)
    cache = pathlib.Path(cache_dir) if cache_dir else paths.cache_dir()
    path = _local_file(source, cache, "a released MAGE .pth (path or URL) or a pretraining "
                                      "workdir")
    output = cache / "converted" / path.stem
    from mage_jax.convert import files as convert_files
    if not (output / "config.json").exists():  # written last: a cut conversion is redone
        shutil.rmtree(output, ignore_errors=True)
        from mage_jax.convert import torch_tokenizer
        state_dict = torch_tokenizer.load_torch_state_dict(str(path))  # read once (1-2 GB)
        config = config or config_files.load(f"pretrain:{_preset_for(state_dict, path)}")
        convert_files.convert_mage_file(str(path), config, str(output), ignore_keys,
                                        state_dict=state_dict)
    tok_dir = output / "tokenizer"
    if not (tok_dir / "config.json").exists():
        if tokenizer is None:
            raise FileNotFoundError(
                f"{source} carries no tokenizer (no vqgan.* keys): give tokenizer= the released "
                f"VQGAN checkpoint (vqgan_jax_strongaug.ckpt, a path or URL).")
        shutil.rmtree(tok_dir, ignore_errors=True)
        convert_files.convert_tokenizer_file(
            str(_local_file(str(tokenizer), cache, "the released VQGAN .ckpt (path or URL)")),
            str(tok_dir))
    return pretrained.load(str(output), step)


def images_from_dataset(pre: pretrained.Pretrained, count: int, split: str | None = None,
                        data: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` evaluation views (uint8) and labels of ``split``, at the model's
    image size, from ``data`` (a data config) or the run's own dataset (the embedded
    Fashion-MNIST for converted weights, whose files name no dataset)."""
    section = data or pre.run_config.get("data") or config_defaults.demo_data_config().to_dict()
    data_cfg = ml_collections.ConfigDict(dict(section))
    data_cfg.image_size = pre.image_size
    images, labels = [], []
    for batch in pipeline.eval_dataset(data_cfg, batch_size=min(count, 256), process_index=0,
                                       process_count=1, split=split):
        keep = batch["mask"]
        images.append(np.asarray(sampler_lib.to_uint8(jnp.asarray(batch["image"][keep]))))
        labels.append(np.asarray(batch["label"])[keep])
        if sum(len(x) for x in images) >= count:
            break
    return np.concatenate(images)[:count], np.concatenate(labels)[:count]


def _padded(mesh_, *arrays):
    """Pads the leading axis to a multiple of the mesh's data size (for the sharded jit)."""
    size = sharding.data_parallel_size(mesh_)
    n = len(arrays[0])
    pad = -n % size
    return n, [np.concatenate([a, np.repeat(a[-1:], pad, 0)]) if pad else a for a in arrays]


def reconstruct(pre: pretrained.Pretrained, images: np.ndarray):
    """``(tokens (B, L), reconstructions uint8)`` of uint8 ``images`` through the tokenizer."""
    tok = pre.tokenizer

    @jax.jit
    def run(params, x):
        ids = tok.apply({"params": params}, x.astype(jnp.float32) / 255.0, method=tok.encode)
        return ids, sampler_lib.to_uint8(pretrained.decode_tokens(pre, params, ids))
    ids, out = run(pre.tokenizer_params, jnp.asarray(images))
    return np.asarray(ids), np.asarray(out)


def is_class_conditional(pre: pretrained.Pretrained) -> bool:
    return bool(pre.run_config.get("class_conditional", {}).get("enabled", False))


def sample(pre: pretrained.Pretrained, num_samples: int, *, num_steps: int = 12,
           choice_temperature: float = 4.5, seed: int = 0, labels=None,
           guidance_scale: float = 0.0, mesh_=None) -> np.ndarray:
    """``num_samples`` images by iterative decoding, as the generate stage draws them:
    sample i depends only on (seed, i). ``labels``: one class per sample for a
    class-conditional MAGE (-1: unconditional); default all unconditional."""
    if labels is not None and not is_class_conditional(pre) and np.any(np.asarray(labels) >= 0):
        raise ValueError(f"{pre.workdir} is not a class-conditional MAGE: sample it with "
                         f"labels=None (train one with configs/pretrain.py:class_conditional).")
    mesh_ = mesh_ or mesh()
    labels = np.full((num_samples,), -1, np.int32) if labels is None else np.asarray(labels)
    ids = np.full((num_samples, pre.model.num_tokens), pre.model.mask_token_id, np.int32)
    n, (ids, index, labels) = _padded(mesh_, ids, np.arange(num_samples, dtype=np.int32),
                                      labels.astype(np.int32))
    run = sampler_lib.make_sampler(
        pre.model, lambda tp, i: pretrained.decode_tokens(pre, tp, i), mesh_,
        num_steps=num_steps, choice_temperature=choice_temperature,
        guidance_scale=guidance_scale)
    with jax.set_mesh(mesh_):  # whatever mesh a stage run earlier left set
        _, images = run(pre.params, pre.tokenizer_params, ids, index, labels,
                        jax.random.key(seed))
    return np.asarray(images)[:n]


def edit(pre: pretrained.Pretrained, images: np.ndarray, box: tuple[int, int, int, int], *,
         outpaint: bool = False, num_steps: int = 12, choice_temperature: float = 4.5,
         seed: int = 0) -> np.ndarray:
    """Regenerates ``box`` (left, top, right, bottom, in pixels) of each uint8 image, or
    everything outside it with ``outpaint``; the rest of the image is kept exactly."""
    region = editing.box_mask(pre.image_size, tuple(box), outpaint)
    regions = np.repeat(region[None], len(images), 0)
    one_device = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    with jax.set_mesh(one_device):  # whatever mesh a stage run earlier left set
        return edit_lib.edit_images(pre, np.asarray(images, np.uint8), regions, seed=seed,
                                    num_steps=num_steps, choice_temperature=choice_temperature,
                                    mesh=one_device)


def pooled_features(pre: pretrained.Pretrained, images: np.ndarray,
                    batch_size: int = 256) -> np.ndarray:
    """The linear probe's features (``probe/features.py``) of uint8 images: (B, embed_dim)."""
    extractor = features_lib.FeatureExtractor("encoder", pre.model, pre.tokenizer,
                                              pre.image_size)
    params = {"mage": pre.params, "tokenizer": pre.tokenizer_params}
    run = jax.jit(lambda p, x: extractor.features(p, x.astype(jnp.float32) / 255.0))
    return np.concatenate([np.asarray(run(params, jnp.asarray(images[i:i + batch_size])))
                           for i in range(0, len(images), batch_size)])


def fewshot(pre: pretrained.Pretrained, train: tuple[np.ndarray, np.ndarray],
            test: tuple[np.ndarray, np.ndarray], *, shots=(1, 5, 10), seeds=(0, 1, 2)) -> dict:
    """Few-shot accuracy of the pooled features (closed-form least squares, big_vision's
    protocol): ``{"<k>shot": mean accuracy over seeds}``; ``train``/``test`` are
    ``(uint8 images, labels)``, the shots drawn from ``train``."""
    (train_x, train_y), (test_x, test_y) = train, test
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return lsr.fewshot_results(pooled_features(pre, train_x), train_y,
                               pooled_features(pre, test_x), test_y,
                               num_classes=num_classes, shots=shots, seeds=seeds)


def grid(images: np.ndarray, columns: int) -> np.ndarray:
    """Images ``(B, H, W, 3)`` side by side in rows of ``columns`` (the last row padded
    black), for ``matplotlib.pyplot.imshow``."""
    images = np.asarray(images)
    rows = -(-len(images) // columns)
    pad = rows * columns - len(images)
    if pad:
        images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    h, w = images.shape[1:3]
    return images.reshape(rows, columns, h, w, -1).transpose(0, 2, 1, 3, 4).reshape(
        rows * h, columns * w, -1)
