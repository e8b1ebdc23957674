"""`python -m mage_jax.convert` on files shaped like the released ones.

The official fixture's state dict is saved the way the releases store it: a MAGE ``.pth``
holding ``{'model': state_dict}`` (tokenizer under ``vqgan.``) and a Lightning-style VQGAN
``.ckpt`` holding ``{'state_dict': ...}``. The command's outputs must restore to params
that reproduce the official outputs, and a converted MAGE's tokenizer must be usable as
``tokenizer_workdir`` of a pretraining run. Every size comes from the fixture's meta.

The official trainer's ``checkpoint-*.pth`` (with optimizer, scaler, epoch and args; also
with a DDP ``module.`` prefix) must convert to exactly the params of the release-style
file; extra keys (a MAGE-C head) are named and dropped only on request; a file that pickles
anything else is refused before anything is written.
"""
import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the conversion command reads PyTorch files: pip install 'mage_jax[torch]'")

from convert.test_torch_tokenizer import (_Forbidden, fixture_state_dict,
                                          official_training_checkpoint)
from mage_jax import checkpointing, metrics
from mage_jax.convert import files as convert_files
from mage_jax.models.mage import MAGE
from mage_jax.models.vqgan import VQGAN
from mage_jax.train import stages
from tiny_configs import tiny_pretrain_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def _run_convert(*args):
    env = dict(os.environ, XLA_FLAGS="")  # conversion needs one device
    return subprocess.run([sys.executable, "-m", "mage_jax.convert", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def _checkpoint_steps(workdir) -> list[int]:
    root = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit())


def _images(fixture):
    return jnp.asarray(np.transpose(fixture["inputs/images"], (0, 2, 3, 1)))


def _assert_tokenizer_output(directory, fixture):
    """The converted tokenizer in ``directory`` reproduces the official token indices."""
    params, step = checkpointing.restore_params(str(directory))
    description = json.loads((pathlib.Path(directory) / "config.json").read_text())
    assert step == 0 and description["stage"] == "tokenizer"
    sizes = dict(description["tokenizer"], ch_mult=tuple(description["tokenizer"]["ch_mult"]))
    model = VQGAN(**sizes)
    assert model.codebook_size == fixture["meta"]["codebook_size"]
    ids = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VQGAN.encode))(
        params, _images(fixture))
    np.testing.assert_array_equal(np.asarray(ids), fixture["tokenizer/token_indices"])


@pytest.fixture(scope="module")
def torch_files(mage_torch_fixture, tmp_path_factory):
    root = tmp_path_factory.mktemp("torch_files")
    state_dict = fixture_state_dict(mage_torch_fixture, torch)
    mage_path, vqgan_path = root / "mage-tiny.pth", root / "vqgan-tiny.ckpt"
    torch.save({"model": state_dict, "epoch": 1599}, mage_path)
    vqgan_sd = {k[len("vqgan."):]: v for k, v in state_dict.items() if k.startswith("vqgan.")}
    assert vqgan_sd, "the fixture holds its tokenizer under vqgan."
    torch.save({"state_dict": vqgan_sd, "global_step": 0}, vqgan_path)
    return mage_path, vqgan_path


@pytest.fixture(scope="module")
def pretrain_config_file(mage_torch_fixture, tmp_path_factory):
    """A pretrain config file: the vit_b preset with the fixture's sizes."""
    meta = mage_torch_fixture["meta"]
    vq = meta["vqgan"]
    model = {k: meta[k] for k in ("embed_dim", "depth", "num_heads", "decoder_embed_dim",
                                  "decoder_depth", "decoder_num_heads", "mlp_ratio",
                                  "layer_norm_eps", "mlm_layer_norm_eps")}
    model["mlp_ratio"] = float(model["mlp_ratio"])
    tokenizer = dict(ch=vq["ch"], ch_mult=tuple(vq["ch_mult"]), num_res_blocks=vq["num_res_blocks"],
                     z_channels=vq["z_channels"], embed_dim=vq["embed_dim"],
                     codebook_size=meta["codebook_size"])
    path = tmp_path_factory.mktemp("configs") / "fixture_sizes.py"
    path.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from tiny_configs import load_config\n\n"
        "def get_config():\n"
        "    config = load_config('pretrain', 'vit_b')\n"
        f"    config.model.update({model!r})\n"
        f"    config.tokenizer.update({tokenizer!r})\n"
        f"    config.data.image_size = {int(meta['image_size'])}\n"
        "    return config\n")
    return path


@pytest.fixture(scope="module")
def converted_tokenizer(torch_files, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "vqgan"
    result = _run_convert("tokenizer", f"--torch_checkpoint={torch_files[1]}",
                          f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def converted_mage(torch_files, pretrain_config_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "mage"
    result = _run_convert("mage", f"--torch_checkpoint={torch_files[0]}",
                          f"--config={pretrain_config_file}", f"--output={output}")
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def test_tokenizer_command_reproduces_official_tokens(converted_tokenizer, mage_torch_fixture):
    _assert_tokenizer_output(converted_tokenizer, mage_torch_fixture)


def test_mage_command_reproduces_official_logits(converted_mage, mage_torch_fixture):
    meta = mage_torch_fixture["meta"]
    params, step = checkpointing.restore_params(str(converted_mage))
    description = json.loads((converted_mage / "config.json").read_text())
    assert step == 0 and description["stage"] == "pretrain" and set(params) == {"mage"}
    model = MAGE(**description["model"], layer_norm_eps=meta["layer_norm_eps"],
                 mlm_layer_norm_eps=meta["mlm_layer_norm_eps"])
    assert (model.embed_dim, model.depth) == (meta["embed_dim"], meta["depth"])
    assert model.num_tokens == meta["token_grid"] ** 2
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t, method=MAGE.decode_step_logits))(
        params["mage"], jnp.asarray(mage_torch_fixture["decode_step/input_tokens"]))
    reference = mage_torch_fixture["decode_step/logits"]
    scale = max(1.0, float(np.abs(reference).max()))
    np.testing.assert_allclose(np.asarray(logits), reference, rtol=1e-4, atol=1e-4 * scale)


def test_mage_command_writes_its_tokenizer(converted_mage, mage_torch_fixture):
    _assert_tokenizer_output(converted_mage / "tokenizer", mage_torch_fixture)


@pytest.mark.parametrize("kind", ["tokenizer", "mage"])
def test_existing_output_is_refused(kind, converted_tokenizer, converted_mage, torch_files,
                                    pretrain_config_file):
    output = converted_tokenizer if kind == "tokenizer" else converted_mage
    before = (output / "config.json").read_text()
    args = ([kind, f"--torch_checkpoint={torch_files[1 if kind == 'tokenizer' else 0]}"]
            + ([f"--config={pretrain_config_file}"] if kind == "mage" else [])
            + [f"--output={output}"])
    result = _run_convert(*args)
    assert result.returncode != 0
    assert f"--output={output} already holds a checkpoint; choose a new directory" in result.stderr
    assert _checkpoint_steps(output) == [0] and (output / "config.json").read_text() == before


def test_converted_tokenizer_serves_pretraining(converted_mage, mage_torch_fixture, tmp_path):
    meta = mage_torch_fixture["meta"]
    vq = meta["vqgan"]
    config = tiny_pretrain_config(total_steps=2)
    config.tokenizer.update(ch=vq["ch"], ch_mult=tuple(vq["ch_mult"]),
                            num_res_blocks=vq["num_res_blocks"], z_channels=vq["z_channels"],
                            embed_dim=vq["embed_dim"], codebook_size=meta["codebook_size"])
    config.data.image_size = meta["image_size"]
    config.tokenizer_workdir = str(converted_mage / "tokenizer")
    config.train_tokenizer_if_missing = False
    config.batch_size = 4
    config.image_summary_every = 0
    stages.run(config, str(tmp_path), jax.devices()[:1])
    assert _checkpoint_steps(tmp_path) == [2]
    logged = metrics.read_metrics(str(tmp_path))
    assert [r["step"] for r in logged] == [1, 2]
    # The loss is over the fixture tokenizer's codebook: near log(codebook_size) at start.
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert 0.5 * math.log(meta["codebook_size"]) < logged[0]["nll"] < 2 * math.log(
        meta["vocab_size"])


# --------------------------------------------- training checkpoints, MAGE-C, refused files

def _config_from_file(path):
    spec = importlib.util.spec_from_file_location("fixture_sizes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _assert_same_conversion(output, reference):
    """Both outputs hold the same params (tree and values), sizes and tokenizer."""
    for sub in ("", "tokenizer"):
        got, got_step = checkpointing.restore_params(str(output / sub))
        want, want_step = checkpointing.restore_params(str(reference / sub))
        assert got_step == want_step == 0
        assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
        jax.tree.map(np.testing.assert_array_equal, got, want)
        got_desc = json.loads((output / sub / "config.json").read_text())
        want_desc = json.loads((reference / sub / "config.json").read_text())
        key = "tokenizer" if sub else "model"
        assert got_desc[key] == want_desc[key]


@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "ddp"])
def test_official_training_checkpoint_converts_like_the_release(
        ddp, converted_mage, mage_torch_fixture, pretrain_config_file, tmp_path):
    path = tmp_path / "checkpoint-1599.pth"
    torch.save(official_training_checkpoint(
        fixture_state_dict(mage_torch_fixture, torch, prefix="module." if ddp else ""), torch,
        epoch=1599), path)
    output = tmp_path / "converted"
    sizes = convert_files.convert_mage_file(str(path), _config_from_file(pretrain_config_file),
                                          str(output))
    assert sizes == json.loads((converted_mage / "config.json").read_text())["model"]
    _assert_same_conversion(output, converted_mage)


_MAGE_C_EXTRA = {"proj_head.0.weight": (32, 16), "proj_head.0.bias": (32,),
                 "proj_head.2.weight": (8, 32), "proj_head.2.bias": (8,), "temperature": ()}


@pytest.fixture(scope="module")
def mage_c_file(mage_torch_fixture, tmp_path_factory):
    """A release-style file with extra keys as a MAGE-C checkpoint may carry (the official
    repository has no MAGE-C code, so the names here are made up; any names are handled)."""
    state_dict = fixture_state_dict(mage_torch_fixture, torch)
    state_dict.update({k: torch.ones(shape) for k, shape in _MAGE_C_EXTRA.items()})
    path = tmp_path_factory.mktemp("mage_c") / "mage-c-tiny.pth"
    torch.save({"model": state_dict}, path)
    return path


def test_mage_c_extra_keys_are_named_with_the_fix(mage_c_file, pretrain_config_file, tmp_path):
    config = _config_from_file(pretrain_config_file)
    output = tmp_path / "converted"
    with pytest.raises(ValueError) as error:
        convert_files.convert_mage_file(str(mage_c_file), config, str(output))
    message = str(error.value)
    assert message.startswith(f"{mage_c_file} has 5 key(s) that the official "
                              f"MaskedGenerativeEncoderViT does not have: ")
    for key in _MAGE_C_EXTRA:
        assert repr(key) in message
    assert "MAGE-C" in message and "--ignore_keys=proj_head.,temperature " in message
    assert "ignore_prefixes=('proj_head.', 'temperature')" in message
    # A prefix that would drop the model's own weights is refused, naming the weight.
    with pytest.raises(ValueError, match=r"ignore prefix 'blocks\.' matches 'blocks\.0\.attn"
                                         r"\.proj\.bias' \(\d+ keys\), a weight of the MAGE"):
        convert_files.convert_mage_file(str(mage_c_file), config, str(output),
                                      ignore_keys=["blocks.", "proj_head.", "temperature"])
    assert not output.exists()


def test_mage_c_converts_with_ignore_keys(mage_c_file, converted_mage, pretrain_config_file,
                                          tmp_path):
    output = tmp_path / "converted"
    result = _run_convert("mage", f"--torch_checkpoint={mage_c_file}",
                          f"--config={pretrain_config_file}", f"--output={output}",
                          "--ignore_keys=proj_head.,temperature")
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_conversion(output, converted_mage)
    description = json.loads((output / "config.json").read_text())
    assert description["ignored_keys"] == ["proj_head.", "temperature"]


def test_forbidden_pickle_is_refused_before_writing(mage_torch_fixture, pretrain_config_file,
                                                    tmp_path):
    path = tmp_path / "checkpoint-39.pth"
    torch.save(official_training_checkpoint(fixture_state_dict(mage_torch_fixture, torch),
                                            torch, hook=_Forbidden()), path)
    output = tmp_path / "converted"
    name = f"{_Forbidden.__module__}._Forbidden"
    with pytest.raises(ValueError, match=rf"^{path} holds pickled Python objects that a "
                                         rf"weights-only load refuses: {name}\. .*weights.pth"):
        convert_files.convert_mage_file(str(path), _config_from_file(pretrain_config_file),
                                      str(output))
    assert not output.exists()


def test_notebook_load_converts_a_release_file_once(torch_files, pretrain_config_file,
                                                     converted_mage, tmp_path):
    """``inference.load`` (the quickstart notebook's) fetches a URL into its cache, converts
    it as the command does, and reuses the conversion the next time."""
    from mage_jax import inference
    config = _config_from_file(pretrain_config_file)
    pre = inference.load(torch_files[0].as_uri(), config=config, cache_dir=tmp_path)
    assert (tmp_path / "downloads" / "mage-tiny.pth").read_bytes() == torch_files[0].read_bytes()
    output = tmp_path / "converted" / "mage-tiny"
    _assert_same_conversion(output, converted_mage)
    assert pre.workdir == str(output) and pre.step == 0
    written = (output / "config.json").stat().st_mtime_ns
    again = inference.load(str(torch_files[0]), cache_dir=tmp_path)  # no config needed now
    assert (output / "config.json").stat().st_mtime_ns == written
    jax.tree.map(np.testing.assert_array_equal, again.params, pre.params)
    # Without a config, the width must be a released one: a clear error otherwise.
    with pytest.raises(ValueError, match=r"not a released MAGE ViT-B or ViT-L checkpoint"):
        inference.load(str(torch_files[0]), cache_dir=tmp_path / "other")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        inference.load(str(tmp_path / "nowhere.pth"))


def test_notebook_load_takes_the_tokenizer_beside_a_mage_without_one(
        torch_files, pretrain_config_file, converted_mage, tmp_path):
    """A MAGE .pth without vqgan.* keys: the released VQGAN .ckpt is given beside it
    (``tokenizer=``, a path or URL) and converted into the same cached directory."""
    from mage_jax import inference
    state = torch.load(torch_files[0], weights_only=True)["model"]
    bare = tmp_path / "mage-bare.pth"
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("vqgan.")}}, bare)
    config = _config_from_file(pretrain_config_file)
    with pytest.raises(FileNotFoundError, match="carries no tokenizer.*tokenizer="):
        inference.load(str(bare), config=config, cache_dir=tmp_path / "cache")
    pre = inference.load(str(bare), tokenizer=torch_files[1].as_uri(), cache_dir=tmp_path / "cache")
    want = inference.load(str(converted_mage))
    jax.tree.map(np.testing.assert_array_equal, pre.tokenizer_params, want.tokenizer_params)
    jax.tree.map(np.testing.assert_array_equal, pre.params, want.params)
