"""Converting official (taming-named) tokenizer weights: size inference, errors, file loading."""
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
    torch = pytest.importorskip("torch")
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
