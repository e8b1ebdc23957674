"""Converting official (taming-named) tokenizer weights: size inference, errors, file loading.

File loading also covers the official MAGE trainer's ``checkpoint-*.pth`` layout, a DDP
``module.`` prefix and files that pickle anything else (refused, nothing constructed).
"""
import argparse
import pathlib
import re

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from mage_jax.convert.torch_tokenizer import (check_tokenizer_params, convert_tokenizer,
                                              export_tokenizer, infer_tokenizer_kwargs,
                                              load_torch_state_dict)
from mage_jax.models.vqgan import VQGAN


def _vqgan_state_dict(fixture, prefix="vqgan."):
    """The tokenizer entries of the fixture's MAGE state dict, keys still prefixed."""
    head = "state_dict/" + prefix
    return {k[len("state_dict/"):]: v for k, v in fixture.items() if k.startswith(head)}


def _synthetic_state_dict(kwargs, seed=0):
    """Taming-named random weights for a VQGAN of the given sizes, without flax."""
    model = VQGAN(**kwargs)
    f = model.downsample_factor
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              jax.ShapeDtypeStruct((1, f, f, model.in_channels), np.float32))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                          nn.unbox(abstract))
    return export_tokenizer(params), params


def test_conversion_infers_sizes_from_the_fixture(mage_torch_fixture):
    vq = mage_torch_fixture["meta"]["vqgan"]
    params, kwargs = convert_tokenizer(_vqgan_state_dict(mage_torch_fixture), prefix="vqgan.")
    assert kwargs["ch"] == vq["ch"] and kwargs["ch_mult"] == tuple(vq["ch_mult"])
    assert kwargs["num_res_blocks"] == vq["num_res_blocks"]
    assert kwargs["z_channels"] == vq["z_channels"] and kwargs["embed_dim"] == vq["embed_dim"]
    assert kwargs["codebook_size"] == vq["n_embed"]
    assert (kwargs["in_channels"], kwargs["out_channels"]) == (vq["in_channels"], vq["out_ch"])
    # Layout: OIHW -> HWIO for kernels; the codebook is (codes, dim) in both.
    sd = _vqgan_state_dict(mage_torch_fixture)
    w = sd["vqgan.encoder.down.0.block.1.conv2.weight"]
    np.testing.assert_array_equal(
        params["params"]["encoder"]["down_0"]["block_1"]["conv2"]["kernel"],
        w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["params"]["quantizer"]["codebook"],
                                  sd["vqgan.quantize.embedding.weight"])
    np.testing.assert_array_equal(params["params"]["decoder"]["up_1"]["upsample"]["conv"]["bias"],
                                  sd["vqgan.decoder.up.1.upsample.conv.bias"])
    assert isinstance(check_tokenizer_params(params, kwargs), VQGAN)


@pytest.mark.parametrize("kwargs", [
    dict(ch=32, ch_mult=(1, 2, 3), num_res_blocks=3, z_channels=16, embed_dim=16,
         codebook_size=40),
    dict(ch=64, ch_mult=(2,), num_res_blocks=1, z_channels=8, embed_dim=8, codebook_size=5,
         out_channels=1),
])
def test_conversion_infers_any_size_and_round_trips(kwargs):
    sd, params = _synthetic_state_dict(kwargs)
    sd["loss.discriminator.main.0.weight"] = np.zeros((4, 3, 4, 4), np.float32)  # ignored
    converted, inferred = convert_tokenizer(sd)
    assert inferred == {"in_channels": 3, "out_channels": 3, **kwargs}
    jax.tree.map(np.testing.assert_array_equal, converted["params"], params["params"])


def test_wrong_shaped_tensor_raises_naming_the_key(mage_torch_fixture):
    sd = dict(_vqgan_state_dict(mage_torch_fixture))
    key = "vqgan.decoder.up.2.block.1.conv1.weight"
    sd[key] = sd[key][:, :-1]
    with pytest.raises(ValueError, match=key.replace(".", r"\.") + ".*has shape"):
        convert_tokenizer(sd, prefix="vqgan.")


def test_missing_and_unknown_keys_raise_naming_the_key(mage_torch_fixture):
    sd = dict(_vqgan_state_dict(mage_torch_fixture))
    del sd["vqgan.decoder.mid.block_2.norm1.bias"]
    with pytest.raises(ValueError, match=r"missing tokenizer key 'vqgan\.decoder\.mid\.block_2"
                                         r"\.norm1\.bias'"):
        convert_tokenizer(sd, prefix="vqgan.")
    sd = dict(_vqgan_state_dict(mage_torch_fixture))
    sd["vqgan.loss.logvar"] = np.zeros((1,), np.float32)  # not the tokenizer: ignored
    sd["vqgan.encoder.down.0.attn.0.q.weight"] = np.zeros((1,), np.float32)  # another model
    with pytest.raises(ValueError, match=r"encoder\.down\.0\.attn\.0\.q\.weight.*no attention"):
        convert_tokenizer(sd, prefix="vqgan.")
    del sd["vqgan.encoder.down.0.attn.0.q.weight"]
    sd["vqgan.post_quant_conv.weight"] = np.zeros((1,), np.float32)  # stock taming VQModel
    with pytest.raises(ValueError, match=r"post_quant_conv\.weight.*different architecture"):
        convert_tokenizer(sd, prefix="vqgan.")
    with pytest.raises(ValueError, match=r"pass prefix='vqgan\.'"):
        convert_tokenizer(_vqgan_state_dict(mage_torch_fixture))


def test_check_tokenizer_params_names_path_shapes_and_setting(mage_torch_fixture):
    params, kwargs = convert_tokenizer(_vqgan_state_dict(mage_torch_fixture), prefix="vqgan.")
    config = ml_collections.ConfigDict()
    config.tokenizer = dict(kwargs, codebook_size=kwargs["codebook_size"] + 3,
                            entropy_temperature=0.01, checkpoint="ignored.pth")
    config.tokenizer.ch_mult = list(kwargs["ch_mult"])
    expected = (rf"quantizer/codebook has shape \({kwargs['codebook_size']}, "
                rf"{kwargs['embed_dim']}\) but the config expects "
                rf"\({kwargs['codebook_size'] + 3}, {kwargs['embed_dim']}\); "
                rf"set config\.tokenizer\.codebook_size={kwargs['codebook_size']}")
    with pytest.raises(ValueError, match=expected):
        check_tokenizer_params(params, config)
    config.tokenizer.codebook_size = kwargs["codebook_size"]
    assert check_tokenizer_params(params, config).codebook_size == kwargs["codebook_size"]
    # One level fewer: a param disappears from the expected tree and the hint says ch_mult.
    shallow = dict(kwargs, ch_mult=kwargs["ch_mult"][:-1])
    with pytest.raises(ValueError, match=r"set model_kwargs ch_mult="):
        check_tokenizer_params(params, shallow)


def test_infer_tokenizer_kwargs_rejects_non_vqgan_shapes():
    with pytest.raises(ValueError, match="not a multiple of ch=32"):
        infer_tokenizer_kwargs({"encoder.conv_in.weight": (32, 3, 3, 3),
                                "encoder.down.0.block.0.conv1.weight": (48, 32, 3, 3)})


def test_load_torch_state_dict_round_trips_a_lightning_checkpoint(mage_torch_fixture, tmp_path):
    sd = _vqgan_state_dict(mage_torch_fixture, prefix="vqgan.")
    torch = pytest.importorskip("torch", reason="reading .pth files needs torch")
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v.copy()) for k, v in sd.items()},
                "global_step": 7}, path)
    loaded = load_torch_state_dict(path)
    assert sorted(loaded) == sorted(sd)
    for key, value in sd.items():
        assert loaded[key].dtype == np.float32
        np.testing.assert_array_equal(loaded[key], value)
    # A MAGE .pth stores its weights under "model"; bfloat16 tensors come back as float32.
    path = tmp_path / "mage.pth"
    torch.save({"model": {"w": torch.ones(2, dtype=torch.bfloat16)}, "epoch": 3}, path)
    np.testing.assert_array_equal(load_torch_state_dict(path)["w"], np.ones(2, np.float32))


# ------------------------------------------------------------------ what torch files hold

class _Forbidden:
    """No checkpoint loader may construct this: pickling an instance names it as a global."""

    def __init__(self):
        self.payload = "anything"


def _write_marker(path):
    pathlib.Path(path).write_text("pickled code ran")


class _Payload:
    """Unpickles by calling ``_write_marker``: an arbitrary-code pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return _write_marker, (self.marker,)


def fixture_state_dict(fixture, torch, prefix=""):
    """The official MAGE state dict of the reference fixture as torch tensors (keys with
    ``prefix`` prepended, e.g. ``module.`` for a DDP-wrapped model)."""
    head = "state_dict/"
    return {prefix + k[len(head):]: torch.from_numpy(np.array(v))
            for k, v in fixture.items() if k.startswith(head)}


def official_training_checkpoint(state_dict, torch, epoch=39, **args):
    """What the official trainer's util/misc.py save_model writes to checkpoint-<epoch>.pth:
    model, optimizer (AdamW after one step), epoch, scaler (GradScaler) and args (the
    argparse.Namespace of main_pretrain.py after init_distributed_mode and the lr rule)."""
    params = [torch.nn.Parameter(v.detach().float().clone())
              for k, v in state_dict.items() if k.endswith("norm.weight")][:2]
    optimizer = torch.optim.AdamW(params, lr=2.4e-3, betas=(0.9, 0.95), weight_decay=0.05)
    sum((p * p).sum() for p in params).backward()
    optimizer.step()
    namespace = argparse.Namespace(
        batch_size=64, epochs=1600, accum_iter=1, model="mage_vit_base_patch16", input_size=256,
        weight_decay=0.05, lr=2.4e-3, blr=1.5e-4, min_lr=0.0, warmup_epochs=40,
        mask_ratio_min=0.5, mask_ratio_max=1.0, mask_ratio_mu=0.55, mask_ratio_std=0.25,
        grad_clip=3.0, data_path="/data/imagenet", output_dir="./output_dir",
        log_dir="./output_dir", device="cuda", seed=0, resume="", start_epoch=0, num_workers=10,
        pin_mem=True, world_size=64, local_rank=-1, dist_on_itp=False, dist_url="env://",
        rank=0, gpu=0, distributed=True, dist_backend="nccl")
    for key, value in args.items():
        setattr(namespace, key, value)
    return {"model": state_dict, "optimizer": optimizer.state_dict(), "epoch": epoch,
            "scaler": torch.amp.GradScaler("cpu").state_dict(), "args": namespace}


def _assert_same_arrays(got, want):
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].dtype == want[key].dtype, key
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "ddp"])
def test_official_training_checkpoint_loads_like_the_release(mage_torch_fixture, tmp_path,
                                                              caplog, ddp):
    torch = pytest.importorskip("torch", reason="reading .pth files needs torch")
    release, trainer = tmp_path / "release.pth", tmp_path / "checkpoint-39.pth"
    torch.save({"model": fixture_state_dict(mage_torch_fixture, torch)}, release)
    saved = official_training_checkpoint(
        fixture_state_dict(mage_torch_fixture, torch, prefix="module." if ddp else ""), torch)
    assert isinstance(saved["optimizer"]["state"][0]["exp_avg"], torch.Tensor)
    torch.save(saved, trainer)
    # Plain torch refuses the file (argparse.Namespace is not allowed by default) ...
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(trainer, weights_only=True)
    # A set: torch restores the list on leaving its context manager in another order.
    allowed_before = set(torch.serialization.get_safe_globals())
    want = load_torch_state_dict(release)
    with caplog.at_level("INFO"):
        got = load_torch_state_dict(trainer)
    # ... the loader reads it, with the same arrays as the release-style file, ...
    assert "token_emb.word_embeddings.weight" in got and "vqgan.quantize.embedding.weight" in got
    _assert_same_arrays(got, want)
    # ... and the allowance was scoped to that one call.
    assert set(torch.serialization.get_safe_globals()) == allowed_before
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{trainer} is a training checkpoint (epoch 39)" in m for m in messages)
    stripped = [m for m in messages if "stripped the 'module.' prefix" in m]
    assert len(stripped) == (1 if ddp else 0)
    if ddp:
        assert str(trainer) in stripped[0] and f"all {len(want)} keys" in stripped[0]


def test_module_prefix_on_some_keys_only_is_kept(tmp_path):
    torch = pytest.importorskip("torch", reason="reading .pth files needs torch")
    path = tmp_path / "mixed.pth"
    torch.save({"model": {"module.a": torch.zeros(1), "b": torch.ones(1)}}, path)
    assert sorted(load_torch_state_dict(path)) == ["b", "module.a"]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_format"])
def test_forbidden_class_is_refused_naming_it(mage_torch_fixture, tmp_path, legacy):
    """An official-layout file whose args smuggle in another class: still refused, even
    inside the allowed argparse.Namespace, naming the file, the class and the fix."""
    torch = pytest.importorskip("torch", reason="reading .pth files needs torch")
    path = tmp_path / "checkpoint-39.pth"
    saved = official_training_checkpoint(fixture_state_dict(mage_torch_fixture, torch), torch,
                                         hook=_Forbidden())
    torch.save(saved, path, _use_new_zipfile_serialization=not legacy)
    name = f"{_Forbidden.__module__}._Forbidden"
    with pytest.raises(ValueError) as error:
        load_torch_state_dict(path)
    message = str(error.value)
    assert message.startswith(f"{path} holds pickled Python objects that a weights-only load "
                              f"refuses: {name}.")
    assert f"torch.load('{path}', weights_only=False)['model']" in message  # the fix
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


def test_code_running_pickle_is_refused_before_it_runs(tmp_path):
    torch = pytest.importorskip("torch", reason="reading .pth files needs torch")
    marker, path = tmp_path / "marker.txt", tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _Payload(marker)}, path)
    name = f"{_write_marker.__module__}._write_marker"
    with pytest.raises(ValueError, match=re.escape(f"{path} holds pickled Python objects that "
                                                   f"a weights-only load refuses: {name}.")):
        load_torch_state_dict(path)
    assert not marker.exists()


def test_non_checkpoint_file_is_named(tmp_path):
    pytest.importorskip("torch", reason="reading .pth files needs torch")
    path = tmp_path / "notes.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a PyTorch checkpoint that "
                                                   f"torch.load(weights_only=True) can read")):
        load_torch_state_dict(path)
