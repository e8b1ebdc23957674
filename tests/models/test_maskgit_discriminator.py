"""MaskGIT's discriminator: shapes, BlurPool, parameter count, initialisation, and the
choice of discriminator in the tokenizer stage."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.models.discriminator import (MaskGITDiscriminator, StyleGANDiscriminator,
                                           blur_pool, maskgit_filters)
from mage_jax.sharding import LOGICAL_AXIS_RULES
from mage_jax.train import tokenizer
from tests.tiny_configs import load_config, tiny_tokenizer_config

_NAMES = {name for name, _ in LOGICAL_AXIS_RULES}


def _images(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _shapes(module, x):
    """Boxed abstract params: shapes and logical names, nothing computed."""
    return jax.eval_shape(module.init, jax.random.key(0), x)["params"]


def _init(module, x, seed=0):
    """Plain params drawn in numpy (flax's jax.random init compiles per shape: slow here)."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
        scale = 1.0 / np.sqrt(fan_in) if leaf.ndim > 1 else 0.1
        return jnp.asarray(rng.normal(size=leaf.shape) * scale, leaf.dtype)
    return {"params": jax.tree.map(draw, nn.unbox(_shapes(module, x)))}


def _count(tree):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(nn.unbox(tree)))


# ------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("size, blocks", [(32, 3), (64, 4)])
def test_logits_per_image_at_32_and_64_px(size, blocks):
    disc = MaskGITDiscriminator(filters=16)
    x = _images(size, (2, size, size, 3))
    variables = _init(disc, x)
    params = variables["params"]
    # log2(size) - 2 residual blocks take the image down to 4x4.
    assert sorted(k for k in params if k.startswith("block_")) == [
        f"block_{j}" for j in range(blocks)]
    assert params["dense"]["kernel"].shape == (4 * 4 * 16, 16)
    logits = jax.jit(disc.apply)(variables, x)
    # (B,): MaskGIT's (B, 1) with its unit axis dropped, as the tokenizer losses take it.
    assert logits.shape == (2,) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    # Samples are independent (no minibatch-stddev): one image alone gives its own logit.
    np.testing.assert_allclose(jax.jit(disc.apply)(variables, x[1:]), logits[1:], rtol=1e-5)


def test_width_table_is_maskgits():
    # MaskGIT: {4..32: 512, 64: 256 m, 128: 128 m, 256: 64 m, 512: 32 m, 1024: 16 m}.
    for m in (1, 2):
        table = {s: maskgit_filters(s, 512, m) for s in (4, 8, 16, 32, 64, 128, 256, 512, 1024)}
        assert table == {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * m, 128: 128 * m,
                         256: 64 * m, 512: 32 * m, 1024: 16 * m}


def test_rejects_sizes_that_are_not_square_powers_of_two():
    disc = MaskGITDiscriminator(filters=8)
    for shape in ((1, 48, 48, 3), (1, 32, 16, 3), (1, 2, 2, 3)):
        with pytest.raises(ValueError, match="power of two"):
            _shapes(disc, jnp.zeros(shape))


# ----------------------------------------------------------------------- BlurPool


def test_blur_pool_keeps_a_constant_and_its_filter_sums_to_one():
    x = jnp.full((1, 8, 8, 2), 3.0)
    y = blur_pool(x)
    assert y.shape == (1, 4, 4, 2)
    # Output o reads input rows 2o - 1 .. 2o + 2 (one zero row of padding each side): the
    # interior outputs see only the constant, the border ones some zero padding.
    np.testing.assert_allclose(y[:, 1:3, 1:3], 3.0, rtol=1e-6)
    assert float(y[0, 0, 0, 0]) < 3.0 and float(y[0, 3, 3, 0]) < 3.0
    # The impulse response at stride 1 is the 2-D filter itself: (1,3,3,1)^T (1,3,3,1) / 64.
    delta = jnp.zeros((1, 9, 9, 1)).at[0, 4, 4, 0].set(1.0)
    response = np.asarray(blur_pool(delta, stride=1))[0, :, :, 0]
    assert response.sum() == pytest.approx(1.0, abs=1e-6)
    taps = np.array([1.0, 3.0, 3.0, 1.0])
    rows, cols = np.flatnonzero(response.any(axis=1)), np.flatnonzero(response.any(axis=0))
    np.testing.assert_allclose(response[np.ix_(rows, cols)], np.outer(taps, taps) / 64.0,
                               rtol=1e-6)


@pytest.mark.parametrize("size", [8, 7])
def test_blur_pool_equals_a_depthwise_same_conv_with_stride_two(size):
    """MaskGIT computes BlurPool2D as a depthwise conv with XLA's 'SAME' padding."""
    x = _images(1, (2, size, size + 2, 3))
    taps = np.array([1.0, 3.0, 3.0, 1.0])
    kernel = np.outer(taps, taps) / 64.0
    kernel = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, 3)), jnp.float32)
    expected = jax.lax.conv_general_dilated(
        x, kernel, (2, 2), "SAME", feature_group_count=3,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(blur_pool(x), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------ parameter counts


def test_parameter_count_by_hand_small():
    """64 px, filters 16, channel_multiplier 1: widths 64 px -> 8, 32..4 px -> 16."""
    disc = MaskGITDiscriminator(filters=16, channel_multiplier=1)
    conv = lambda k, i, o, bias=True: k * k * i * o + (o if bias else 0)
    block = lambda i, o: conv(3, i, i) + conv(1, i, o, bias=False) + conv(3, i, o)
    expected = (conv(3, 3, 8)                        # conv_in: 224
                + block(8, 16)                       # 64 -> 32 px: 584 + 128 + 1168
                + 3 * block(16, 16)                  # 32 -> 16 -> 8 -> 4 px: 3 x 4896
                + conv(3, 16, 16)                    # conv_out at 4x4: 2320
                + (4 * 4 * 16 * 16 + 16)             # dense: 4112
                + (16 + 1))                          # logit: 17
    assert expected == 23241
    assert _count(_shapes(disc, jnp.zeros((1, 64, 64, 3)))) == expected


def test_parameter_count_and_widths_of_maskgits_256px_discriminator():
    disc = MaskGITDiscriminator()  # MaskGIT's: filters 512, channel_multiplier 1, blur
    shapes = nn.unbox(_shapes(disc, jnp.zeros((1, 256, 256, 3))))
    widths = [shapes[f"block_{j}"]["conv2"]["kernel"].shape[-1] for j in range(6)]
    assert widths == [128, 256, 512, 512, 512, 512]
    assert shapes["conv_in"]["kernel"].shape == (3, 3, 3, 64)
    conv = lambda k, i, o, bias=True: k * k * i * o + (o if bias else 0)
    block = lambda i, o: conv(3, i, i) + conv(1, i, o, bias=False) + conv(3, i, o)
    ins = [64, 128, 256, 512, 512, 512]
    expected = (conv(3, 3, 64) + sum(block(i, o) for i, o in zip(ins, widths))
                + conv(3, 512, 512) + (4 * 4 * 512 * 512 + 512) + (512 + 1))
    assert _count(shapes) == expected == 23_998_017


def test_every_parameter_has_known_logical_axis_names():
    boxed = _shapes(MaskGITDiscriminator(filters=8), jnp.zeros((1, 16, 16, 3)))
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    for v in leaves:
        assert len(v.names) == v.value.ndim
        assert all(n is None or n in _NAMES for n in v.names), v.names


# ---------------------------------------------------------------- initialisation


def test_kernels_are_xavier_uniform_and_biases_zero():
    disc = MaskGITDiscriminator(filters=64)
    params = nn.unbox(jax.jit(disc.init)(jax.random.key(3), jnp.zeros((1, 8, 8, 3))))["params"]
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    checked = 0
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        leaf = np.asarray(leaf, np.float64)
        if name.endswith("['bias']"):
            assert not leaf.any(), name
            continue
        receptive = int(np.prod(leaf.shape[:-2])) if leaf.ndim > 2 else 1
        fan_in, fan_out = leaf.shape[-2] * receptive, leaf.shape[-1] * receptive
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        assert np.abs(leaf).max() <= limit * (1 + 1e-6), name
        if leaf.size >= 4096:  # enough draws for a 5% check of the variance
            assert leaf.var() == pytest.approx(2.0 / (fan_in + fan_out), rel=0.05), name
            checked += 1
    assert checked >= 4  # conv_in is too small; the 64-channel 3x3 convs and dense are not


# ----------------------------------------------------------------- gradients


@pytest.mark.parametrize("blur_resample", [True, False])
def test_input_gradient_is_finite_and_nonzero(blur_resample):
    disc = MaskGITDiscriminator(filters=8, blur_resample=blur_resample)
    x = _images(6, (2, 16, 16, 3))
    variables = _init(disc, x)
    g = jax.jit(jax.grad(lambda im: disc.apply(variables, im).sum()))(x)
    assert g.shape == x.shape and np.all(np.isfinite(g)) and float(jnp.abs(g).max()) > 0


# ------------------------------------------------------ choice in the tokenizer stage


def test_presets_choose_their_discriminator():
    assert isinstance(tokenizer.build_models(load_config("tokenizer", "paper"))[1],
                      MaskGITDiscriminator)
    for config in (load_config("tokenizer", "demo"), tiny_tokenizer_config()):
        assert isinstance(tokenizer.build_models(config)[1], StyleGANDiscriminator)
    cfg = load_config("tokenizer", "paper").discriminator
    disc = tokenizer.build_discriminator(cfg)
    assert (disc.filters, disc.channel_multiplier, disc.blur_resample) == (512, 1, True)
    # A config written before `kind` existed meant the minibatch-stddev variant.
    old = tiny_tokenizer_config().discriminator
    del old["kind"]
    assert isinstance(tokenizer.build_discriminator(old), StyleGANDiscriminator)


def test_unknown_kind_is_a_value_error_before_anything_compiles():
    config = tiny_tokenizer_config()
    config.discriminator.kind = "stylegan3"
    with pytest.raises(ValueError, match=r"kind='stylegan3'.*'maskgit', 'stylegan2_mbstd'"):
        tokenizer.build_stage(config)


def test_maskgit_kind_passes_the_stage_check():
    config = tiny_tokenizer_config()
    config.discriminator.update(kind="maskgit", filters=8)
    stage = tokenizer.build_stage(config)
    stage.check()  # shape-checks the discriminator at the configured image size
    config.data.image_size = 24  # not a power of two: refused by check(), before compiling
    with pytest.raises(ValueError, match="power of two"):
        tokenizer.build_stage(config).check()


def test_maskgits_schedule_trains_the_discriminator_from_the_first_step():
    """The `paper` schedule on the tiny model: GAN from step 0, R1 at every step."""
    config = tiny_tokenizer_config()
    config.discriminator.update(kind="maskgit", filters=8)
    config.loss.update(adversarial_warmup_steps=0, r1_every=1)
    config.data.image_size = 16
    stage = tokenizer.build_stage(config)
    state = jax.jit(lambda r: nn.unbox(stage.init_state(r)))(jax.random.key(0))
    batch = {"image": _images(9, (4, 16, 16, 3))}
    step = jax.jit(stage.train_step)
    initial = jax.device_get(state["disc_params"])
    for i in range(2):  # the learning rate warms up from 0: step 0 moves nothing yet
        state, metrics = step(state, batch, jax.random.key(i), stage.frozen)
        metrics = jax.device_get(metrics)
        assert metrics["adversarial_on"] == 1.0  # on at step 0 too
        assert metrics["r1_penalty"] > 0  # at every step
        assert np.isfinite(metrics["discriminator_loss"])
        assert np.isfinite(metrics["generator_adversarial_loss"])
    moved = jax.tree.map(lambda a, b: not np.array_equal(a, b), initial,
                         jax.device_get(state["disc_params"]))
    assert all(jax.tree.leaves(moved))
