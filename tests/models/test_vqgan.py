"""The VQGAN tokenizer on tiny configurations: structure, quirks, losses, errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mage_jax import sharding
from mage_jax.models.vqgan import (VQGAN, ResnetBlock, VectorQuantizer, entropy_terms,
                                   token_grid, vqgan_from_config)

TINY = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, embed_dim=32,
            codebook_size=16)


def _images(batch, size, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(batch, size, size, 3)),
                       jnp.float32)


def _random_params(model, images, seed=0):
    """Random, well-scaled params in the model's own tree, without compiling ``init``.

    (XLA compiles every initialiser separately; on 2 CPU cores that alone costs tens of
    seconds. ``test_init_*`` below exercises the real ``init`` on a one-level model.)
    """
    rng = np.random.default_rng(seed)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images))

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        elif name == "scale":
            value = 1.0 + 0.1 * rng.normal(size=leaf.shape)
        else:  # biases, codebook
            value = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def tiny():
    model = VQGAN(**TINY)
    return model, _random_params(model, _images(1, 8))


@pytest.mark.parametrize("ch_mult,image_size,grid", [((1, 2), 8, 4), ((1, 1, 2), 16, 4),
                                                     ((1,), 6, 6)])
def test_shapes_and_token_grid(ch_mult, image_size, grid):
    model = VQGAN(**{**TINY, "ch_mult": ch_mult})
    images = _images(2, image_size)
    variables = _random_params(model, images, seed=1)
    reconstructions, aux = model.apply(variables, images)
    assert reconstructions.shape == images.shape
    assert token_grid(model, image_size) == grid
    assert aux["token_ids"].shape == (2, grid * grid) and aux["token_ids"].dtype == jnp.int32
    assert int(aux["token_ids"].min()) >= 0 and int(aux["token_ids"].max()) < 16
    z = model.apply(variables, images, method=VQGAN.encode_continuous)
    assert z.shape == (2, grid, grid, TINY["z_channels"])


def test_default_is_mage_config_factor_16():
    model = VQGAN()
    assert (model.ch, tuple(model.ch_mult), model.num_res_blocks) == (128, (1, 1, 2, 2, 4), 2)
    assert (model.z_channels, model.codebook_size) == (256, 1024)
    assert token_grid(model, 256) == 16


def test_init_boxes_every_param_with_logical_names_from_the_vocabulary():
    model = VQGAN(**{**TINY, "ch_mult": (1,)})  # one level: few shapes, quick to compile
    variables = jax.jit(model.init)(jax.random.key(0), _images(1, 4))
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(nn.unbox(variables)))
    vocabulary = {name for name, _ in sharding.LOGICAL_AXIS_RULES}
    leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert leaves
    for leaf in leaves:
        assert isinstance(leaf, nn.LogicallyPartitioned), type(leaf)
        assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= vocabulary, leaf.names


def test_nin_shortcut_is_applied_to_the_residual_branch():
    """The official block returns nin_shortcut(h) + h, not nin_shortcut(x) + h."""
    x = jax.random.normal(jax.random.key(2), (2, 4, 4, 32))
    block = ResnetBlock(64)
    params = _random_params(block, x, seed=3)["params"]
    assert params["nin_shortcut"]["kernel"].shape == (1, 1, 64, 64)  # out -> out channels
    zero = jax.tree.map(lambda a: a, params)
    zero["nin_shortcut"] = {"kernel": jnp.zeros((1, 1, 64, 64))}
    h = block.apply({"params": zero}, x)  # zero shortcut leaves the residual branch alone
    y = block.apply({"params": params}, x)
    expected = h + jnp.einsum("bhwi,io->bhwo", h, params["nin_shortcut"]["kernel"][0, 0],
                              precision="highest")
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_same_width_block_has_identity_skip():
    x = jax.random.normal(jax.random.key(4), (1, 4, 4, 32))
    block = ResnetBlock(32)
    params = _random_params(block, x, seed=5)["params"]
    assert "nin_shortcut" not in params
    params["conv2"] = {"kernel": jnp.zeros_like(params["conv2"]["kernel"])}
    np.testing.assert_array_equal(block.apply({"params": params}, x), x)


def test_straight_through_gradient_reaches_encoder():
    model = VQGAN(**{**TINY, "ch_mult": (1,)})  # one level keeps the backward pass small
    images = _images(2, 4, seed=6)
    params = _random_params(model, images, seed=6)

    def loss(p):
        reconstructions, _ = model.apply(p, images)
        return jnp.mean((reconstructions - images) ** 2)

    grads = jax.jit(jax.grad(loss))(params)["params"]
    assert float(jnp.abs(grads["encoder"]["conv_in"]["kernel"]).sum()) > 0
    # The estimator is the identity from quantized to z: d<w, quantized>/dz = w.
    z = model.apply(params, images, method=VQGAN.encode_continuous)
    w = jax.random.normal(jax.random.key(7), z.shape)
    dz = jax.grad(lambda z: jnp.sum(model.apply(params, z, method=VQGAN.quantize)[0] * w))(z)
    np.testing.assert_allclose(dz, w, rtol=1e-6)


def _numpy_entropy(p):
    p = p[p > 0]
    return float(-np.sum(p * np.log(p)))


def test_quantizer_losses_and_stats_match_numpy():
    rng = np.random.default_rng(8)
    codebook = rng.normal(size=(6, 4)).astype(np.float32)
    z = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    quantizer = VectorQuantizer(codebook_size=6, embed_dim=4, entropy_temperature=0.5)
    variables = {"params": {"codebook": jnp.asarray(codebook)}}
    quantized, stats = quantizer.apply(variables, jnp.asarray(z))

    d = ((z.reshape(-1, 1, 4) - codebook[None]) ** 2).sum(-1)
    ids = d.argmin(-1)
    e = codebook[ids].reshape(z.shape)
    np.testing.assert_array_equal(stats["token_ids"], ids.reshape(2, 9))
    np.testing.assert_allclose(quantized, e, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(stats["codebook_loss"], np.mean((z - e) ** 2), rtol=1e-5)
    np.testing.assert_allclose(stats["commitment_loss"], np.mean((z - e) ** 2), rtol=1e-5)
    counts = np.bincount(ids, minlength=6)
    np.testing.assert_allclose(stats["codebook_usage"], np.mean(counts > 0))
    np.testing.assert_allclose(stats["perplexity"], np.exp(_numpy_entropy(counts / ids.size)),
                               rtol=1e-5)
    logits = -d / 0.5
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    sample = np.mean([_numpy_entropy(p) for p in probs])
    np.testing.assert_allclose(stats["entropy_loss"], sample - _numpy_entropy(probs.mean(0)),
                               rtol=1e-4, atol=1e-5)

    # Each loss moves only its own side: codes for the codebook loss, z for commitment.
    def loss_grads(name):
        f = lambda cb, zz: quantizer.apply({"params": {"codebook": cb}}, zz)[1][name]
        return jax.grad(f, argnums=(0, 1))(jnp.asarray(codebook), jnp.asarray(z))
    d_codes, d_z = loss_grads("codebook_loss")
    assert float(jnp.abs(d_codes).sum()) > 0 and float(jnp.abs(d_z).sum()) == 0
    d_codes, d_z = loss_grads("commitment_loss")
    assert float(jnp.abs(d_codes).sum()) == 0 and float(jnp.abs(d_z).sum()) > 0


def test_entropy_terms_limits():
    k = 8
    far = 10.0
    spread = jnp.where(jnp.eye(k, dtype=bool), 0.0, far)     # latent i confidently on code i
    collapsed = jnp.full((k, k), far).at[:, 0].set(0.0)      # every latent on code 0
    uniform = jnp.ones((k, k))                                # no preference at all
    loss, sample, average = entropy_terms(spread, 0.01)
    assert abs(float(sample)) < 1e-6 and np.isclose(float(average), np.log(k), atol=1e-5)
    np.testing.assert_allclose(loss, -np.log(k), atol=1e-5)  # the minimum
    loss, sample, average = entropy_terms(collapsed, 0.01)
    assert abs(float(sample)) < 1e-6 and abs(float(average)) < 1e-6 and abs(float(loss)) < 1e-6
    loss, sample, average = entropy_terms(uniform, 0.01)
    np.testing.assert_allclose([sample, average, loss], [np.log(k), np.log(k), 0.0], atol=1e-5)
    # Finite gradients even where some codes get exactly zero probability.
    g = jax.grad(lambda d: entropy_terms(d, 0.01)[0])(collapsed * 1e3)
    assert bool(jnp.all(jnp.isfinite(g)))


def test_encode_decode_round_trip(tiny):
    model, variables = tiny
    images = _images(2, 8, seed=9)
    ids = model.apply(variables, images, method=VQGAN.encode)
    assert ids.shape == (2, 16) and ids.dtype == jnp.int32
    decoded = model.apply(variables, ids, method=VQGAN.decode)
    reconstructions, aux = model.apply(variables, images)
    np.testing.assert_array_equal(aux["token_ids"], ids)
    assert decoded.shape == images.shape
    np.testing.assert_allclose(decoded, reconstructions, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params():
    images = _images(1, 4)
    variables = _random_params(VQGAN(**{**TINY, "ch_mult": (1,)}), images)
    bf16 = VQGAN(**{**TINY, "ch_mult": (1,)}, dtype=jnp.bfloat16)
    reconstructions, aux = bf16.apply(variables, images)
    assert reconstructions.dtype == jnp.bfloat16 and aux["token_ids"].dtype == jnp.int32
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nn.unbox(variables)))


def test_vqgan_from_config_reads_tokenizer_fields():
    config = ml_collections.ConfigDict()
    config.tokenizer = dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=3, z_channels=64,
                            embed_dim=64, codebook_size=128, entropy_temperature=0.05)
    model = vqgan_from_config(config)
    assert (model.ch, model.ch_mult, model.num_res_blocks) == (32, (1, 1, 2), 3)
    assert (model.z_channels, model.codebook_size, model.entropy_temperature) == (64, 128, 0.05)
    assert token_grid(config, 64) == 16
    assert model.dtype == jnp.float32  # no dtype key: float32


def test_tokenizer_dtype_from_config_reaches_the_encoder_not_the_code_search():
    config = ml_collections.ConfigDict()
    config.tokenizer = dict(**{**TINY, "ch_mult": (1,)}, entropy_temperature=0.01,
                            dtype="bfloat16")
    model = vqgan_from_config(config)
    images = _images(1, 4)
    variables = _random_params(model.clone(dtype=jnp.float32), images)
    z = model.apply(variables, images, method=VQGAN.encode_continuous)
    assert z.dtype == jnp.bfloat16
    quantized, _ = model.apply(variables, z, method=lambda m, z: m.quantizer(z))
    assert quantized.dtype == jnp.float32
    config.tokenizer.dtype = "float16"
    with pytest.raises(ValueError, match="config.tokenizer.dtype='float16'"):
        vqgan_from_config(config)


def test_bad_configs_and_inputs_raise_clear_errors(tiny):
    with pytest.raises(ValueError, match="embed_dim=16 must equal z_channels=32"):
        VQGAN(**{**TINY, "embed_dim": 16})
    with pytest.raises(ValueError, match="width ch\\*ch_mult=20"):
        VQGAN(**{**TINY, "ch": 20})
    with pytest.raises(ValueError, match="ch_mult"):
        VQGAN(**{**TINY, "ch_mult": ()})
    with pytest.raises(ValueError, match="image_size=30 is not divisible .* factor 4"):
        token_grid(VQGAN(**{**TINY, "ch_mult": (1, 1, 2)}), 30)
    config = ml_collections.ConfigDict({"tokenizer": {"ch": 32}})
    with pytest.raises(ValueError, match="ch_mult"):
        vqgan_from_config(config)
    model, variables = tiny
    with pytest.raises(ValueError, match="perfect square"):
        model.apply(variables, jnp.zeros((1, 15), jnp.int32), method=VQGAN.decode)
    with pytest.raises(ValueError, match="3 channels"):
        model.apply(variables, jnp.zeros((1, 8, 8, 1)), method=VQGAN.encode)
    with pytest.raises(ValueError, match="not divisible"):
        model.apply(variables, jnp.zeros((1, 9, 9, 3)), method=VQGAN.encode)
