"""Parity with the official PyTorch MAGE code on the reference fixture (shared/reference).

Every size is read from the fixture (meta / state-dict shapes), so any fixture file of the
same format must pass.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.convert.torch_mage import check_mage_params, convert_mage
from mage_jax.convert.torch_tokenizer import check_tokenizer_params, convert_tokenizer
from mage_jax.models.mage import MAGE, mage_loss
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


# ----------------------------------------------------------------------------- MAGE

def _close(actual, expected):
    expected = np.asarray(expected)
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(np.asarray(actual, np.float32), expected, rtol=1e-4,
                               atol=1e-4 * max(1.0, scale))


def _build(fx, scan_layers=False):
    meta = fx["meta"]
    params, kwargs = convert_mage(_state_dict(fx), num_heads=meta["num_heads"],
                                  decoder_num_heads=meta["decoder_num_heads"],
                                  scan_layers=scan_layers)
    model = MAGE(**kwargs, layer_norm_eps=meta["layer_norm_eps"],
                 mlm_layer_norm_eps=meta["mlm_layer_norm_eps"])
    return model, params


def _pretrain_inputs(fx):
    drop = fx["pretrain/token_drop_mask"] > 0
    counts = drop.sum(axis=1)
    assert np.all(counts == counts[0]), "the fixture drops the same number per row"
    return (jnp.asarray(fx["pretrain/target_tokens"]), jnp.asarray(drop),
            jnp.asarray(fx["pretrain/token_all_mask"] > 0), int(counts[0]))


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "scan_layers"])
def built(request, mage_torch_fixture):
    model, params = _build(mage_torch_fixture, scan_layers=request.param)
    tokens, drop, masked, num_dropped = _pretrain_inputs(mage_torch_fixture)
    apply = jax.jit(lambda p, t, d, a: model.apply({"params": p}, t, d, a,
                                                   num_dropped=num_dropped))
    return model, params, apply(params, tokens, drop, masked)


def test_converted_sizes_match_meta(mage_torch_fixture):
    meta = mage_torch_fixture["meta"]
    model, params = _build(mage_torch_fixture)
    assert model.codebook_size == meta["codebook_size"]
    assert model.num_tokens == meta["token_grid"] ** 2
    assert (model.embed_dim, model.depth) == (meta["embed_dim"], meta["depth"])
    assert (model.decoder_embed_dim, model.decoder_depth) == (
        meta["decoder_embed_dim"], meta["decoder_depth"])
    assert model.mlp_ratio == meta["mlp_ratio"]
    assert model.vocab_size == meta["vocab_size"]
    assert model.fake_class_id == meta["fake_class_label"]
    assert model.mask_token_id == meta["mask_token_label"]
    tokens, drop, masked, _ = _pretrain_inputs(mage_torch_fixture)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens, drop, masked)["params"]
    check_mage_params(params, abstract)  # every parameter present with its shape


def test_pretrain_encoder_output(built, mage_torch_fixture):
    _close(built[2]["encoder_output"], mage_torch_fixture["pretrain/encoder_output"])


def test_pretrain_logits(built, mage_torch_fixture):
    _close(built[2]["logits"], mage_torch_fixture["pretrain/logits"])


def test_pretrain_loss(built, mage_torch_fixture):
    meta = mage_torch_fixture["meta"]
    tokens, _, masked, _ = _pretrain_inputs(mage_torch_fixture)
    loss, metrics = mage_loss(built[2]["logits"], tokens, masked, meta["codebook_size"],
                              meta["label_smoothing"])
    _close(loss, mage_torch_fixture["pretrain/loss"])
    assert 0.0 <= float(metrics["masked_accuracy"]) <= 1.0


def test_decode_step_logits(built, mage_torch_fixture):
    model, params, _ = built
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t, method=MAGE.decode_step_logits))(
        params, jnp.asarray(mage_torch_fixture["decode_step/input_tokens"]))
    _close(logits, mage_torch_fixture["decode_step/logits"])


def test_probe_pooled_features(built, mage_torch_fixture):
    model, params, _ = built
    tokens = jnp.asarray(mage_torch_fixture["pretrain/target_tokens"])
    feats = jax.jit(lambda p, t: model.apply({"params": p}, t, method=MAGE.pooled_features))(
        params, tokens)
    _close(feats, mage_torch_fixture["probe/pooled_features"])


def test_wrong_head_count_is_caught(mage_torch_fixture):
    meta = mage_torch_fixture["meta"]
    model, _ = _build(mage_torch_fixture)
    tokens, drop, masked, _ = _pretrain_inputs(mage_torch_fixture)
    abstract = jax.eval_shape(model.init, jax.random.key(0), tokens, drop, masked)["params"]
    heads = meta["num_heads"]
    # Another divisor of the width: same tensors, different (embed, 3, heads, head_dim) layout.
    other = next(h for h in (1, 2, 4, 8, 16) if h != heads and meta["embed_dim"] % h == 0)
    params, _ = convert_mage(_state_dict(mage_torch_fixture), num_heads=other,
                             decoder_num_heads=meta["decoder_num_heads"])
    with pytest.raises(ValueError, match=r"\['encoder'\]\['block_0'\]\['attn'\]"):
        check_mage_params(params, abstract)
    # The scan layout is a different tree: caught too.
    scanned, _ = convert_mage(_state_dict(mage_torch_fixture), num_heads=heads,
                              decoder_num_heads=meta["decoder_num_heads"], scan_layers=True)
    with pytest.raises(ValueError, match=r"\['decoder'\]\['block_0'\].* is missing"):
        check_mage_params(scanned, abstract)


def test_unknown_key_is_rejected(mage_torch_fixture):
    meta = mage_torch_fixture["meta"]
    sd = {"module." + k: v for k, v in _state_dict(mage_torch_fixture).items()}
    with pytest.raises(ValueError, match="module."):
        convert_mage(sd, num_heads=meta["num_heads"], decoder_num_heads=meta["decoder_num_heads"])


def test_probe_features_from_images(built, tokenizer, images, mage_torch_fixture):
    """The probe's whole feature path (tokenizer -> encoder -> mean -> fc_norm) against the
    official pooled features put through torch's LayerNorm without affine (the fresh,
    frozen fc_norm of main_linprobe.py)."""
    import torch
    from mage_jax.probe.features import FeatureExtractor
    model, params, _ = built
    tok_model, tok_params = tokenizer
    extractor = FeatureExtractor("encoder", model, tok_model, images.shape[1])
    feats = jax.jit(extractor.features)({"mage": params, "tokenizer": tok_params["params"]},
                                      images)
    pooled = torch.from_numpy(mage_torch_fixture["probe/pooled_features"])
    expected = torch.nn.functional.layer_norm(pooled, pooled.shape[-1:], eps=1e-6).numpy()
    _close(feats, expected)
