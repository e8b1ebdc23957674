"""Official PyTorch VQGAN tokenizer weights <-> this project's flax params.

The released tokenizer (``vqgan_jax_strongaug.ckpt``, a Lightning checkpoint) and every
MAGE checkpoint (``.pth``, under its ``model`` key, with a ``vqgan.`` prefix) store the
taming-style key names ``encoder.down.0.block.1.conv2.weight``, ``quantize.embedding.weight``,
``decoder.up.4.upsample.conv.weight``... The architecture is *inferred* from the tensor shapes
so that a tokenizer of any size converts; layouts change only here (OIHW -> HWIO).

Typical use::

    sd = load_torch_state_dict("mage-vitb-1600.pth")
    params, kwargs = convert_tokenizer(sd, prefix="vqgan.")
    model = VQGAN(**kwargs)
    tokens = model.apply(params, images, method=VQGAN.encode)
"""
from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from absl import logging
from flax import traverse_util

from mage_jax.models.vqgan import VQGAN, _tokenizer_section

# Sub-trees of the official VQModel that this port reproduces. A key under them that the
# port does not know (attention blocks, quant_conv, ...) means another architecture, so it
# is an error rather than silently ignored; anything else (loss.*, MAGE's own weights) is.
_TOKENIZER_ROOTS = ("encoder.", "decoder.", "quantize.", "quant_conv.", "post_quant_conv.")


def _torch_key(path: tuple[str, ...]) -> str:
    """Flax param path (without 'params') -> taming key name."""
    if path == ("quantizer", "codebook"):
        return "quantize.embedding.weight"
    parts = []
    for i, name in enumerate(path[:-1]):
        level = re.fullmatch(r"(down|up)_(\d+)", name)
        block = re.fullmatch(r"block_(\d+)", name)
        if level:
            parts += [level.group(1), level.group(2)]          # down_2 -> down.2
        elif block and path[i - 1] != "mid":
            parts += ["block", block.group(1)]                  # block_1 -> block.1 ...
        else:
            parts.append(name)                                  # ... but mid.block_1 stays
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    return ".".join(parts + [leaf])


def _to_flax(path, array: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel":
        return np.transpose(array, (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)
    return array


def _to_torch_shape(path, shape) -> tuple[int, ...]:
    if path[-1] == "kernel":
        return (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _indices(keys, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


def infer_tokenizer_kwargs(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """Architecture (VQGAN kwargs) from taming key names -> tensor shapes (no prefix)."""
    def shape(key):
        if key not in shapes:
            raise KeyError(key)
        return shapes[key]

    ch, in_channels = shape("encoder.conv_in.weight")[:2]
    levels = _indices(shapes, r"encoder\.down\.(\d+)\.")
    blocks = _indices(shapes, r"encoder\.down\.0\.block\.(\d+)\.")
    if not levels or levels != list(range(len(levels))) or not blocks:
        raise ValueError(f"cannot infer the tokenizer's levels: found encoder.down levels "
                         f"{levels} and level-0 blocks {blocks}; is this a VQGAN state dict?")
    ch_mult = []
    for level in levels:
        width = shape(f"encoder.down.{level}.block.0.conv1.weight")[0]
        if width % ch:
            raise ValueError(f"encoder.down.{level} has width {width}, not a multiple of "
                             f"ch={ch} (encoder.conv_in); this is not a taming VQGAN.")
        ch_mult.append(width // ch)
    codebook_size, embed_dim = shape("quantize.embedding.weight")
    return dict(ch=int(ch), ch_mult=tuple(int(c) for c in ch_mult),
                num_res_blocks=len(blocks), z_channels=int(shape("encoder.conv_out.weight")[0]),
                embed_dim=int(embed_dim), codebook_size=int(codebook_size),
                in_channels=int(in_channels), out_channels=int(shape("decoder.conv_out.weight")[0]))


def _abstract_params(model: VQGAN) -> dict:
    f = model.downsample_factor
    images = jax.ShapeDtypeStruct((1, f, f, model.in_channels), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    return traverse_util.flatten_dict(nn.unbox(variables)["params"])


def convert_tokenizer(state_dict: Mapping[str, Any], prefix: str = ""
                      ) -> tuple[dict, dict[str, Any]]:
    """Taming-named arrays -> (``{'params': ...}`` unboxed flax variables, VQGAN kwargs).

    ``prefix`` is prepended to every taming key: ``"vqgan."`` for a MAGE checkpoint, ``""``
    for the tokenizer's own Lightning checkpoint. Keys outside the tokenizer are ignored.
    """
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    try:
        kwargs = infer_tokenizer_kwargs({k: tuple(np.shape(v)) for k, v in sd.items()})
    except KeyError as e:
        hint = [k[: -len(e.args[0])] for k in state_dict if k.endswith("." + e.args[0])]
        raise ValueError(
            f"state dict has no tokenizer key {prefix + e.args[0]!r}"
            + (f"; it has {hint[0] + e.args[0]!r}: pass prefix={hint[0]!r}." if hint else
               f" (prefix={prefix!r}); is this a VQGAN or MAGE checkpoint?")) from None

    expected = _abstract_params(VQGAN(**kwargs))
    wanted = {_torch_key(path): path for path in expected}
    unknown = sorted(k for k in sd if k.startswith(_TOKENIZER_ROOTS) and k not in wanted)
    if unknown:
        raise ValueError(f"tokenizer key {prefix + unknown[0]!r} (and {len(unknown) - 1} more) "
                         f"has no counterpart in mage_jax's VQGAN, which follows MAGE's "
                         f"tokenizer (no attention, no quant_conv/post_quant_conv); this "
                         f"checkpoint is a different architecture.")
    flat = {}
    for key, path in wanted.items():
        if key not in sd:
            raise ValueError(f"state dict is missing tokenizer key {prefix + key!r}, required "
                             f"by the architecture inferred from its shapes: {kwargs}.")
        array = np.asarray(sd[key], np.float32)
        want = _to_torch_shape(path, expected[path].shape)
        if array.shape != want:
            raise ValueError(f"tokenizer key {prefix + key!r} has shape {array.shape}, expected "
                             f"{want} for the architecture inferred from the other tensors "
                             f"({kwargs}); the checkpoint is inconsistent or corrupted.")
        flat[path] = _to_flax(path, array)
    return {"params": traverse_util.unflatten_dict(flat)}, kwargs


def export_tokenizer(params, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of ``convert_tokenizer``: flax params -> taming-named NCHW/OIHW arrays."""
    tree = nn.unbox(params)
    tree = tree["params"] if "params" in tree else tree
    out = {}
    for path, value in traverse_util.flatten_dict(tree).items():
        value = np.asarray(value)
        out[prefix + _torch_key(path)] = (np.transpose(value, (3, 2, 0, 1))
                                          if path[-1] == "kernel" else value)
    return out


def _build(spec) -> tuple[VQGAN, str]:
    """A VQGAN from a model, a config (``.tokenizer``), a tokenizer section or kwargs."""
    if isinstance(spec, VQGAN):
        return spec, "VQGAN field "
    where = "config.tokenizer." if "tokenizer" in spec else "model_kwargs "
    section = _tokenizer_section(spec)
    fields = {f.name for f in dataclasses.fields(VQGAN)} - {"parent", "name"}
    kwargs = {k: section[k] for k in fields if k in section}
    if "ch_mult" in kwargs:
        kwargs["ch_mult"] = tuple(int(c) for c in kwargs["ch_mult"])
    return VQGAN(**kwargs), where


def check_tokenizer_params(params, spec) -> VQGAN:
    """Checks params against the model that ``spec`` describes; returns that model.

    ``spec``: a VQGAN, a config with a ``tokenizer`` section, that section, or the kwargs
    returned by ``convert_tokenizer``. Raises ValueError naming the first mismatching
    parameter, its shape, the expected shape and which setting to change.
    """
    model, where = _build(spec)
    tree = nn.unbox(params)
    tree = tree["params"] if "params" in tree else tree
    got = {p: tuple(np.shape(v)) for p, v in traverse_util.flatten_dict(tree).items()}
    expected = {p: tuple(v.shape) for p, v in _abstract_params(model).items()}
    if got == expected:
        return model

    try:  # Say which setting to change: infer the params' own architecture and diff it.
        actual = infer_tokenizer_kwargs(
            {_torch_key(p): _to_torch_shape(p, s) for p, s in got.items()})
        diffs = [f"{where}{k}={v!r}" for k, v in actual.items()
                 if tuple(np.atleast_1d(getattr(model, k))) != tuple(np.atleast_1d(v))]
        hint = ("set " + ", ".join(diffs)) if diffs else "the params have a different layout"
    except (KeyError, ValueError):
        hint = "these params do not look like a mage_jax VQGAN"
    for path in sorted(set(got) | set(expected)):
        name = "/".join(path)
        if path not in expected:
            raise ValueError(f"tokenizer param {name} (shape {got[path]}) is not in the model "
                             f"built from the config; {hint}.")
        if path not in got:
            raise ValueError(f"tokenizer param {name} (expected shape {expected[path]}) is "
                             f"missing; {hint}.")
        if got[path] != expected[path]:
            raise ValueError(f"tokenizer param {name} has shape {got[path]} but the config "
                             f"expects {expected[path]}; {hint}.")
    raise AssertionError("unreachable")


# Besides tensors and plain containers, the official MAGE trainer's ``checkpoint-*.pth``
# (util/misc.py save_model: model, optimizer, epoch, scaler, args) pickles exactly one class:
# its ``argparse.Namespace`` of command-line arguments. The optimizer and GradScaler state
# dicts are plain dicts/lists/tuples of numbers and tensors. These types are allowed only
# inside our own ``torch.load`` call (``safe_globals`` context), never process-wide.
TRAINER_SAFE_GLOBALS = (argparse.Namespace,)
_DDP_PREFIX = "module."


def _global_name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _refusal(path, error: Exception, torch) -> str:
    """One message for a file that the weights-only unpickler refused: which types, and why."""
    allowed = {_global_name(t) for t in TRAINER_SAFE_GLOBALS}
    try:  # zip checkpoints (torch >= 1.6) can be scanned without unpickling anything
        found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
                 if g not in allowed]
    except (ValueError, RuntimeError, OSError):  # legacy/unreadable: use torch's message
        found = []
    found = found or [g for g in re.findall(r"GLOBAL ([\w.]+)", str(error)) if g not in allowed]
    if found:
        return (f"{path} holds pickled Python objects that a weights-only load refuses: "
                f"{', '.join(found)}. mage_jax reads tensors, plain containers and what the "
                f"official MAGE trainer saves (model, optimizer, epoch, scaler and args, an "
                f"argparse.Namespace) and runs no pickled code. If you trust the file, keep only "
                f"its weights with PyTorch: torch.save({{'model': torch.load('{path}', "
                f"weights_only=False)['model']}}, 'weights.pth') (['state_dict'] for a Lightning "
                f".ckpt), then convert weights.pth.")
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
    return (f"{path} is not a PyTorch checkpoint that torch.load(weights_only=True) can read"
            + (f" ({detail.group(1).strip()})" if detail else "")
            + "; pass a .pth/.ckpt file written by torch.save.")


def load_torch_state_dict(path) -> dict[str, np.ndarray]:
    """Reads a PyTorch checkpoint into numpy arrays (``weights_only``: no code is run).

    Takes the ``state_dict`` entry of a Lightning checkpoint or the ``model`` entry of a MAGE
    ``.pth`` (a release, or a ``checkpoint-*.pth`` of the official trainer, whose optimizer,
    scaler, epoch and args are read but not used) when present, else the file's top-level
    dict. Non-tensor entries are dropped. A ``module.`` prefix on every key (the state dict of
    a DistributedDataParallel-wrapped model) is stripped, with a logged message.

    Raises ValueError naming the file and the refused types if it pickles anything else.
    """
    try:
        import torch
    except ImportError as e:
        raise ImportError("reading PyTorch checkpoints needs torch: "
                          "pip install 'mage_jax[torch]'") from e
    try:
        with torch.serialization.safe_globals(list(TRAINER_SAFE_GLOBALS)), \
                epath.Path(path).open("rb") as f:  # a local file or gs://...
            data = torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(_refusal(path, e, torch)) from None
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a state dict.")
    if isinstance(data.get("model"), Mapping) and "optimizer" in data:
        logging.info("%s is a training checkpoint (epoch %s): converting its 'model' entry; its "
                     "optimizer, scaler and args are not used.", path, data.get("epoch", "?"))
    for entry in ("state_dict", "model"):
        if isinstance(data.get(entry), Mapping):
            data = data[entry]
            break
    out = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if value.dtype == torch.bfloat16:  # numpy has no bfloat16
                value = value.float()
            out[key] = value.numpy()
    if out and all(k.startswith(_DDP_PREFIX) for k in out):
        logging.warning("%s: stripped the %r prefix from all %d keys (the state dict of a "
                        "DistributedDataParallel-wrapped model).", path, _DDP_PREFIX, len(out))
        out = {k[len(_DDP_PREFIX):]: v for k, v in out.items()}
    return out
