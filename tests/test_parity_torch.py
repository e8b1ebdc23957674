"""Parity with the official PyTorch MAGE code on the reference fixture (shared/reference).

Every size is read from the fixture (meta / state-dict shapes), so any fixture file of the
same format must pass.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.convert.torch_tokenizer import check_tokenizer_params, convert_tokenizer
from mage_jax.models.vqgan import VQGAN, token_grid

_PREFIX = "state_dict/"


def _state_dict(fixture) -> dict:
    """The fixture's PyTorch ``state_dict()`` (all of MAGE, tokenizer under ``vqgan.``)."""
    return {k[len(_PREFIX):]: v for k, v in fixture.items() if k.startswith(_PREFIX)}


def _nhwc(x):
    return np.transpose(np.asarray(x), (0, 2, 3, 1))


def _assert_close(actual, reference, name):
    # 1e-4 relative to the array's scale: float32 convolutions accumulate in another order
    # than PyTorch's, so agreement is to rounding, not bitwise.
    actual, reference = np.asarray(actual), np.asarray(reference)
    assert actual.shape == reference.shape, (name, actual.shape, reference.shape)
    scale = max(1.0, float(np.max(np.abs(reference))))
    np.testing.assert_allclose(actual, reference, rtol=1e-4, atol=1e-4 * scale, err_msg=name)


@pytest.fixture(scope="module")
def tokenizer(mage_torch_fixture):
    params, kwargs = convert_tokenizer(_state_dict(mage_torch_fixture), prefix="vqgan.")
    return check_tokenizer_params(params, kwargs), params


@pytest.fixture(scope="module")
def images(mage_torch_fixture):
    return jnp.asarray(_nhwc(mage_torch_fixture["inputs/images"]))


def test_tokenizer_conversion_matches_fixture_meta(mage_torch_fixture, tokenizer):
    model, _ = tokenizer
    meta = mage_torch_fixture["meta"]
    vq = meta["vqgan"]
    assert model.ch == vq["ch"] and tuple(model.ch_mult) == tuple(vq["ch_mult"])
    assert model.num_res_blocks == vq["num_res_blocks"]
    assert model.z_channels == vq["z_channels"] and model.embed_dim == vq["embed_dim"]
    assert model.codebook_size == meta["codebook_size"] == vq["n_embed"]
    assert token_grid(model, meta["image_size"]) == meta["token_grid"]


def test_tokenizer_encoder_output(mage_torch_fixture, tokenizer, images):
    model, params = tokenizer
    z = model.apply(params, images, method=VQGAN.encode_continuous)
    _assert_close(z, _nhwc(mage_torch_fixture["tokenizer/encoder_output"]), "encoder_output")


def test_tokenizer_token_indices_exact(mage_torch_fixture, tokenizer, images):
    model, params = tokenizer
    ids = model.apply(params, images, method=VQGAN.encode)
    assert ids.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(ids), mage_torch_fixture["tokenizer/token_indices"])


def test_tokenizer_quantized(mage_torch_fixture, tokenizer):
    model, params = tokenizer
    # Quantise the reference encoder output so this test isolates the quantiser.
    z = jnp.asarray(_nhwc(mage_torch_fixture["tokenizer/encoder_output"]))
    quantized, ids = model.apply(params, z, method=VQGAN.quantize)
    _assert_close(quantized, _nhwc(mage_torch_fixture["tokenizer/quantized"]), "quantized")
    np.testing.assert_array_equal(np.asarray(ids), mage_torch_fixture["tokenizer/token_indices"])


def test_tokenizer_decoded(mage_torch_fixture, tokenizer):
    model, params = tokenizer
    reference = _nhwc(mage_torch_fixture["tokenizer/decoded"])
    quantized = jnp.asarray(_nhwc(mage_torch_fixture["tokenizer/quantized"]))
    _assert_close(model.apply(params, quantized, method=VQGAN.decode_latents), reference,
                  "decoded from latents")
    # Decoding the token ids looks the codes up in the converted codebook: same images.
    ids = jnp.asarray(mage_torch_fixture["tokenizer/token_indices"], jnp.int32)
    _assert_close(model.apply(params, ids, method=VQGAN.decode), reference, "decoded from ids")


def test_tokenizer_full_forward(mage_torch_fixture, tokenizer, images):
    model, params = tokenizer
    reconstructions, aux = model.apply(params, images)
    _assert_close(reconstructions, _nhwc(mage_torch_fixture["tokenizer/decoded"]), "forward")
    np.testing.assert_array_equal(np.asarray(aux["token_ids"]),
                                  mage_torch_fixture["tokenizer/token_indices"])
    # Legacy VectorQuantizer2 loss terms: both are mean((z_q - z)^2) in the forward pass.
    z = _nhwc(mage_torch_fixture["tokenizer/encoder_output"])
    mse = np.mean((_nhwc(mage_torch_fixture["tokenizer/quantized"]) - z) ** 2)
    np.testing.assert_allclose(float(aux["codebook_loss"]), mse, rtol=1e-4)
    np.testing.assert_allclose(float(aux["commitment_loss"]), mse, rtol=1e-4)
