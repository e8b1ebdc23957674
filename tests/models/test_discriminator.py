"""StyleGAN discriminator: shapes, minibatch stddev, blur, validation, gradients; logits and
input gradients against a numpy (float64) re-implementation written from the design."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.models.discriminator import DownBlock, StyleGANDiscriminator, blur, minibatch_stddev
from mage_jax.sharding import LOGICAL_AXIS_RULES

_NAMES = {name for name, _ in LOGICAL_AXIS_RULES}


def _init(module, x, seed=0):
    """Plain params with lecun-scaled numpy values: flax's jax.random init compiles a
    threefry kernel per parameter shape (seconds each on a CPU), too slow for unit tests."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), x))

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
        scale = 1.0 / np.sqrt(fan_in) if leaf.ndim > 1 else 0.1
        return jnp.asarray(rng.normal(size=leaf.shape) * scale, leaf.dtype)
    return jax.tree.map(draw, shapes)


def _images(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


# A numpy re-implementation of StyleGANDiscriminator, from the design in its docstring, in
# float64. Arrays are NHWC with any leading axes before the batch (so that many batches,
# e.g. finite-difference perturbations, go through at once); the batch axis is -4.

def _np_lrelu(x):
    return np.where(x >= 0, x, 0.2 * x)


def _np_conv(x, kernel, bias=None, *, stride=1, pad=0):
    """Cross-correlation with an HWIO kernel after ``pad`` zeros on each side of both
    spatial axes, keeping every ``stride``-th output (0, stride, ...)."""
    x = np.pad(x, [(0, 0)] * (x.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)])
    kh, kw = kernel.shape[:2]
    oh, ow = x.shape[-3] - kh + 1, x.shape[-2] - kw + 1
    out = sum(x[..., i:i + oh, j:j + ow, :] @ kernel[i, j]
              for i in range(kh) for j in range(kw))[..., ::stride, ::stride, :]
    return out if bias is None else out + bias


def _np_blur(x, pad):
    """Per-channel 4x4 filter outer((1,3,3,1), (1,3,3,1)) / 64 after ``pad`` zeros."""
    taps = np.array([1.0, 3.0, 3.0, 1.0])
    kernel = np.outer(taps, taps) / taps.sum() ** 2
    x = np.pad(x, [(0, 0)] * (x.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)])
    oh, ow = x.shape[-3] - 3, x.shape[-2] - 3
    return sum(kernel[i, j] * x[..., i:i + oh, j:j + ow, :] for i in range(4) for j in range(4))


def _np_minibatch_stddev(x, group_size):
    b = x.shape[-4]
    g = math.gcd(min(group_size, b), b)
    feature = np.empty(x.shape[:-1] + (1,))
    for start in range(0, b, g):
        std = np.sqrt(x[..., start:start + g, :, :, :].var(axis=-4) + 1e-8).mean(axis=(-3, -2, -1))
        feature[..., start:start + g, :, :, 0] = std[..., None, None, None]
    return np.concatenate([x, feature], axis=-1)


def _numpy_discriminator(params, images, num_blocks, mbstd_group_size):
    """Logits (..., B) of StyleGANDiscriminator with ``params`` for ``images`` in [0, 1]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    x = np.asarray(images, np.float64) * 2 - 1
    x = _np_lrelu(_np_conv(x, p["conv_in"]["kernel"], p["conv_in"]["bias"], pad=1))
    for i in range(num_blocks):
        q = p[f"down_{i}"]
        h = _np_lrelu(_np_conv(x, q["conv1"]["kernel"], q["conv1"]["bias"], pad=1))
        # StyleGAN2's padding: blur + 3x3 stride-2 conv, and blur + 1x1 stride-2 conv, halve.
        h = _np_lrelu(_np_conv(_np_blur(h, 2), q["conv2"]["kernel"], q["conv2"]["bias"],
                               stride=2))
        s = _np_conv(_np_blur(x, 1), q["skip"]["kernel"], stride=2)
        x = (h + s) / np.sqrt(2)
    if mbstd_group_size:
        x = _np_minibatch_stddev(x, mbstd_group_size)
    x = _np_lrelu(_np_conv(x, p["conv_out"]["kernel"], p["conv_out"]["bias"], pad=1))
    x = x.reshape(x.shape[:-3] + (-1,))
    x = _np_lrelu(x @ p["dense"]["kernel"] + p["dense"]["bias"])
    return (x @ p["logit"]["kernel"] + p["logit"]["bias"])[..., 0]


@pytest.mark.parametrize("height,width", [(16, 16), (32, 24)])
def test_logits_shape_and_size_dependent_dense(height, width):
    disc = StyleGANDiscriminator(ch=4, ch_mult=(1, 2), mbstd_group_size=2)
    x = _images(0, (4, height, width, 3))
    params = _init(disc, x)
    logits = jax.jit(disc.apply)(params, x)
    assert logits.shape == (4,) and logits.dtype == jnp.float32
    expected = _numpy_discriminator(params, x, num_blocks=2, mbstd_group_size=2)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())
    assert np.unique(np.asarray(logits)).size == 4  # per-sample, not broadcast
    # Two down blocks: the flattened features are (H/4)*(W/4)*(ch*ch_mult[-1]).
    assert params["params"]["dense"]["kernel"].shape == ((height // 4) * (width // 4) * 8, 8)


def test_params_are_logically_partitioned_with_project_names():
    disc = StyleGANDiscriminator(ch=4, ch_mult=(1, 2))
    boxed = jax.eval_shape(disc.init, jax.random.key(0), _images(0, (2, 16, 16, 3)))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
    for v in leaves:
        assert len(v.names) == v.value.ndim
        assert all(n is None or n in _NAMES for n in v.names), v.names
    assert boxed["down_0"]["conv1"]["kernel"].names == ("height", "width", "conv_in", "conv_out")


def test_minibatch_stddev_identical_group_is_zero():
    x = jnp.tile(_images(2, (1, 4, 4, 5)), (4, 1, 1, 1))
    out = minibatch_stddev(x, group_size=4)
    assert out.shape == (4, 4, 4, 6)
    np.testing.assert_array_equal(out[..., :5], x)
    np.testing.assert_allclose(out[..., 5], np.sqrt(1e-8), rtol=1e-5)  # std 0 (+ eps)


@pytest.mark.parametrize("batch,group,effective", [(8, 4, 4), (6, 4, 2), (3, 4, 3), (5, 4, 1)])
def test_minibatch_stddev_matches_numpy_per_group(batch, group, effective):
    x = np.asarray(_images(3, (batch, 3, 2, 4))) * np.arange(1, batch + 1)[:, None, None, None]
    out = np.asarray(jax.jit(minibatch_stddev, static_argnums=1)(jnp.asarray(x), group))
    for start in range(0, batch, effective):  # contiguous groups of gcd(min(group, B), B)
        members = x[start:start + effective].astype(np.float64)
        expected = np.sqrt(members.var(axis=0) + 1e-8).mean()
        np.testing.assert_allclose(out[start:start + effective, :, :, -1], expected, rtol=1e-5)


def test_mbstd_couples_samples_only_within_a_group():
    x = _images(4, (4, 16, 16, 3))
    x_changed = x.at[1].set(1.0 - x[1])
    for group, coupled in ((2, True), (0, False)):
        disc = StyleGANDiscriminator(ch=4, ch_mult=(1, 2), mbstd_group_size=group)
        params = _init(disc, x)
        apply = jax.jit(disc.apply)
        a, b = apply(params, x), apply(params, x_changed)
        assert not np.allclose(a[1], b[1])
        # Sample 0 shares a group with sample 1; samples 2, 3 form another group.
        assert (not np.allclose(a[0], b[0], rtol=0, atol=1e-7)) == coupled
        np.testing.assert_allclose(a[2:], b[2:], rtol=1e-6)


def test_blur_preserves_constants_and_down_block_halves():
    x = jnp.full((1, 8, 8, 2), 3.0)
    y = blur(x, (1, 3, 3, 1), (2, 2))
    assert y.shape == (1, 9, 9, 2)
    np.testing.assert_allclose(y[:, 2:-2, 2:-2], 3.0, rtol=1e-6)  # normalised kernel
    block = DownBlock(features=6)
    z = _images(5, (2, 8, 12, 4))
    out = jax.eval_shape(block.apply, jax.eval_shape(block.init, jax.random.key(0), z), z)
    assert out.shape == (2, 4, 6, 6)


def test_rejects_indivisible_image_size():
    disc = StyleGANDiscriminator(ch=4, ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match=r"20x16 is not divisible by 8"):
        jax.eval_shape(disc.init, jax.random.key(0), _images(0, (2, 20, 16, 3)))


def test_input_gradient_matches_finite_differences_of_the_numpy_discriminator():
    """<grad_x sum_b D(x)_b, v> against central differences of the float64 re-implementation
    along random directions v (the minibatch-stddev layer couples the two samples)."""
    disc = StyleGANDiscriminator(ch=4, ch_mult=(1, 2), mbstd_group_size=2)
    x = _images(6, (2, 16, 16, 3))
    params = _init(disc, x)
    g = np.asarray(jax.jit(jax.grad(lambda im: disc.apply(params, im).sum()))(x), np.float64)
    assert g.shape == x.shape
    directions = np.random.default_rng(6).normal(size=(6,) + x.shape)
    eps = 1e-7  # small enough that no leaky-ReLU kink lies within reach (1e-5 crosses some)
    x64 = np.asarray(x, np.float64)
    forward = lambda images: _numpy_discriminator(params, images, 2, 2).sum(axis=-1)
    numeric = (forward(x64 + eps * directions) - forward(x64 - eps * directions)) / (2 * eps)
    analytic = np.einsum("dbhwc,bhwc->d", directions, g)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-5, atol=1e-6 * np.abs(numeric).max())
    assert np.abs(numeric).min() > 1e-3 * np.abs(numeric).max()  # no direction is trivial


def test_bfloat16_compute_gives_float32_logits_close_to_float32():
    x = _images(7, (2, 16, 16, 3))
    d32 = StyleGANDiscriminator(ch=4, ch_mult=(1, 2))
    d16 = StyleGANDiscriminator(ch=4, ch_mult=(1, 2), dtype=jnp.bfloat16)
    params = _init(d32, x)
    a, b = jax.jit(d32.apply)(params, x), jax.jit(d16.apply)(params, x)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=0.05 * float(jnp.abs(a).max()) + 1e-3)
