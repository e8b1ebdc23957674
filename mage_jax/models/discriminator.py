"""StyleGAN-style discriminators for training the VQGAN tokenizer adversarially.

MaskGIT trains its VQGAN tokenizer (the one MAGE uses) against a StyleGAN2-like residual
discriminator. This module has two (``config.discriminator.kind`` picks one):

* :class:`MaskGITDiscriminator` (kind ``"maskgit"``, the ``paper`` default): MaskGIT's own
  architecture (maskgit/nets/discriminator.py of google-research/maskgit), its widths,
  block count, BlurPool-then-stride-1-conv downsampling and Xavier-uniform initialisation.
  See that class.
* :class:`StyleGANDiscriminator` (kind ``"stylegan2_mbstd"``, the ``demo`` one): a variant
  with configurable widths and StyleGAN2's minibatch-stddev layer, described here:

    conv3x3 + lrelu                                          (from RGB)
    per ``ch_mult`` entry, a residual down block:
        main: conv3x3 + lrelu -> blur -> conv3x3 stride 2 + lrelu
        skip: blur -> 1x1 conv stride 2 (no bias)             (= downsample, then 1x1 conv)
        out = (main + skip) / sqrt(2)
    minibatch standard deviation (+1 channel) -> conv3x3 + lrelu
    flatten -> dense + lrelu -> dense -> logit

Choices, and where they differ from StyleGAN2 / MaskGIT:

* No equalized learning rate and plain ``leaky_relu(0.2)`` (no sqrt(2) gain): standard
  initialisers, as MaskGIT's flax discriminator does. With Adam (betas (0, 0.99)) the
  per-parameter step size already adapts to each layer's scale, which is most of what
  equalized LR buys.
* The input is a 3x3 conv, as in MaskGIT (StyleGAN2's "fromRGB" is 1x1).
* The minibatch-stddev groups are *contiguous* samples (StyleGAN2 groups strided ones).
  With the batch sharded over data-parallel devices, contiguous groups of size G stay on
  one device whenever G divides the per-device batch, so the layer needs no
  communication. See :func:`minibatch_stddev`.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

_CONV_AXES = ("height", "width", "conv_in", "conv_out")


def _leaky_relu(x):
    return nn.leaky_relu(x, negative_slope=0.2)


def _conv(features: int, kernel: int, *, stride: int = 1, padding="SAME", use_bias=True,
          dtype=jnp.float32, param_dtype=jnp.float32, name=None,
          kernel_init=None) -> nn.Conv:
    """A conv with logically named axes; ``kernel_init`` defaults to LeCun normal."""
    kernel_init = nn.initializers.lecun_normal() if kernel_init is None else kernel_init
    return nn.Conv(
        features, (kernel, kernel), strides=(stride, stride), padding=padding,
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(kernel_init, _CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


def blur(x: jax.Array, kernel_1d: Sequence[float], pad: tuple[int, int]) -> jax.Array:
    """Low-pass filters NHWC ``x`` per channel with the separable, sum-normalised kernel.

    ``pad`` is (before, after) zero padding on both spatial axes. Filtering before a stride-2
    layer is the anti-aliasing of StyleGAN2's downsampling (the kernel (1,3,3,1) is symmetric,
    so correlation and convolution agree).
    """
    # Separable, as shifted weighted sums: a depthwise conv (feature_group_count=C) computes
    # the same thing but is ~10x slower on XLA:CPU, and its double backward (R1) more so.
    k = np.asarray(kernel_1d, np.float64)
    k = (k / k.sum()).astype(np.float32)
    x = jnp.pad(x, ((0, 0), tuple(pad), tuple(pad), (0, 0)))
    n = len(k)
    height = x.shape[1] - n + 1
    x = sum(float(k[i]) * x[:, i:i + height] for i in range(n))
    width = x.shape[2] - n + 1
    return sum(float(k[i]) * x[:, :, i:i + width] for i in range(n))


def _down_pads(blur_taps: int, conv_kernel: int) -> tuple[int, int]:
    """Blur padding so that blur + stride-2 'VALID' conv maps a size H (even) to H / 2."""
    p = (blur_taps - 2) + (conv_kernel - 1)
    return ((p + 1) // 2, p // 2)


def minibatch_stddev(x: jax.Array, group_size: int, eps: float = 1e-8) -> jax.Array:
    """Appends StyleGAN's minibatch standard-deviation feature as one extra channel.

    Samples are split into groups of ``G = gcd(min(group_size, B), B)`` *contiguous* samples:
    as in StyleGAN2 a batch smaller than ``group_size`` is one group, and a batch size that
    the group size does not divide falls back to the largest divisor of both (StyleGAN2
    would fail there), so any batch size works. Within a group, each feature's standard deviation
    over the group (population variance, + ``eps``, square root) is averaged over channels
    and pixels; that scalar is broadcast as a new channel to every sample of the group.
    A group of identical samples thus gets ``sqrt(eps)`` (essentially 0), which lets the
    discriminator detect a generator that collapses to low batch diversity.
    """
    b, h, w, c = x.shape
    g = math.gcd(min(int(group_size), b), b)
    groups = x.astype(jnp.float32).reshape(b // g, g, h, w, c)
    var = jnp.mean(jnp.square(groups - groups.mean(axis=1, keepdims=True)), axis=1)
    std = jnp.sqrt(var + eps).mean(axis=(1, 2, 3))  # (B / G,)
    feature = jnp.broadcast_to(jnp.repeat(std, g)[:, None, None, None], (b, h, w, 1))
    return jnp.concatenate([x, feature.astype(x.dtype)], axis=-1)


class DownBlock(nn.Module):
    """Residual block that halves the resolution: (main + skip) / sqrt(2)."""
    features: int
    blur_kernel: Sequence[float] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        taps = len(self.blur_kernel)
        h = _leaky_relu(_conv(x.shape[-1], 3, name="conv1", **kw)(x))
        h = blur(h, self.blur_kernel, _down_pads(taps, 3))
        h = _leaky_relu(_conv(self.features, 3, stride=2, padding="VALID", name="conv2", **kw)(h))
        s = blur(x, self.blur_kernel, _down_pads(taps, 1))
        s = _conv(self.features, 1, stride=2, padding="VALID", use_bias=False, name="skip", **kw)(s)
        return (h + s) * (1.0 / math.sqrt(2.0))


def _check_nhwc(images, name: str) -> None:
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{name} expects NHWC images (B, H, W, C); got shape {images.shape}. "
            f"Transpose NCHW inputs with x.transpose(0, 2, 3, 1).")


class StyleGANDiscriminator(nn.Module):
    """Real/fake logits (B,) for NHWC images in [0, 1].

    Attributes:
      ch: base channel count; block i outputs ``ch * ch_mult[i]`` channels.
      ch_mult: one residual down block per entry; image sides must be divisible by
        ``2 ** len(ch_mult)``. The final dense layer's size depends on the image size, so
        parameters initialised at one resolution only fit that resolution.
      blur_kernel: 1-D anti-aliasing filter taps before each stride-2 layer.
      mbstd_group_size: group size of the minibatch-stddev layer (0 disables it).
    """
    ch: int = 64
    ch_mult: Sequence[int] = (2, 4, 4, 4, 4)
    blur_kernel: Sequence[float] = (1, 3, 3, 1)
    mbstd_group_size: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        _check_nhwc(images, "StyleGANDiscriminator")
        factor = 2 ** len(self.ch_mult)
        _, height, width, _ = images.shape
        if height % factor or width % factor:
            raise ValueError(
                f"StyleGANDiscriminator with ch_mult={tuple(self.ch_mult)} downsamples by {factor}, "
                f"but the image size {height}x{width} is not divisible by {factor}. Resize/crop the "
                f"images to a multiple of {factor} or use fewer ch_mult entries.")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        x = images.astype(self.dtype) * 2.0 - 1.0  # [0, 1] -> [-1, 1]
        x = _leaky_relu(_conv(self.ch, 3, name="conv_in", **kw)(x))
        for i, mult in enumerate(self.ch_mult):
            x = DownBlock(self.ch * mult, self.blur_kernel, name=f"down_{i}", **kw)(x)
        if self.mbstd_group_size > 0:
            x = minibatch_stddev(x, self.mbstd_group_size)
        channels = self.ch * (self.ch_mult[-1] if self.ch_mult else 1)
        x = _leaky_relu(_conv(channels, 3, name="conv_out", **kw)(x))
        x = x.reshape(x.shape[0], -1)
        x = _leaky_relu(nn.Dense(
            channels, dtype=self.dtype, param_dtype=self.param_dtype, name="dense",
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)))(x))
        # One output unit: its axis is left unnamed (replicated).
        logits = nn.Dense(
            1, dtype=self.dtype, param_dtype=self.param_dtype, name="logit",
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("mlp", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))(x)
        return logits[:, 0].astype(jnp.float32)


# ----------------------------------------------------------------------------------------
# MaskGIT's discriminator.


def blur_pool(x: jax.Array, kernel_1d: Sequence[float] = (1, 3, 3, 1),
              stride: int = 2) -> jax.Array:
    """MaskGIT's ``BlurPool2D``: a per-channel low-pass filter sampled every ``stride`` pixels.

    The filter is the outer product of ``kernel_1d`` with itself, normalised to sum 1, so a
    constant image stays that constant away from the border. Padding is 'SAME' in XLA's
    sense (as MaskGIT's depthwise ``lax.conv_general_dilated``): ``ceil(H / stride)``
    outputs, the zero padding split evenly with any extra pixel after. For the 4-tap filter
    and an even size that is one zero pixel each side and H / 2 outputs.
    """
    k = np.asarray(kernel_1d, np.float64)
    k = (k / k.sum()).astype(np.float32)
    n = len(k)

    def along(x, axis):
        size = x.shape[axis]
        out = -(-size // stride)
        total = max((out - 1) * stride + n - size, 0)
        pads = [(0, 0)] * x.ndim
        pads[axis] = (total // 2, total - total // 2)
        x = jnp.pad(x, pads)
        span = (out - 1) * stride + 1

        def tap(i):
            index = [slice(None)] * x.ndim
            index[axis] = slice(i, i + span, stride)
            return x[tuple(index)]
        # Shifted, strided weighted sums rather than a depthwise conv: the same numbers, but
        # much cheaper on XLA:CPU, also in the double backward of the R1 penalty.
        return sum(float(k[i]) * tap(i) for i in range(n))

    return along(along(x, 1), 2)


def maskgit_filters(size: int, filters: int = 512, channel_multiplier: int = 1) -> int:
    """Channels of MaskGIT's discriminator at feature-map side ``size``.

    MaskGIT's table is {4..32: 512, 64: 256 m, 128: 128 m, 256: 64 m, 512: 32 m,
    1024: 16 m} (m = ``channel_multiplier``): ``filters`` up to 32 px, then halving with every
    doubling of the side. ``filters`` (512 in MaskGIT) scales the whole table, for small
    test or demo models.
    """
    width = filters if size <= 32 else channel_multiplier * filters * 32 // size
    if width < 1:
        raise ValueError(f"MaskGITDiscriminator with filters={filters}, channel_multiplier="
                         f"{channel_multiplier} has no channels left at {size} px.")
    return width


class MaskGITResBlock(nn.Module):
    """MaskGIT's residual down block (after rosinality's stylegan2-pytorch ``ResBlock``).

    main: conv3x3 (input width) + lrelu -> downsample -> conv3x3 (``features``) + lrelu
    skip: downsample -> conv1x1 (``features``, no bias)
    out = (main + skip) / sqrt(2)

    The downsampling is :func:`blur_pool` (``blur_resample``, MaskGIT's setting) or 2x2
    average pooling; the convolutions after it have stride 1.
    """
    features: int
    blur_resample: bool = True
    blur_kernel: Sequence[float] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                  kernel_init=nn.initializers.xavier_uniform())
        if self.blur_resample:
            down = lambda t: blur_pool(t, self.blur_kernel, 2)
        else:  # MaskGIT's layers.dsample: TF-style 'SAME' 2x2 average pooling (even sizes)
            down = lambda t: nn.avg_pool(t, (2, 2), strides=(2, 2))
        h = _leaky_relu(_conv(x.shape[-1], 3, name="conv1", **kw)(x))
        h = _leaky_relu(_conv(self.features, 3, name="conv2", **kw)(down(h)))
        s = _conv(self.features, 1, use_bias=False, name="skip", **kw)(down(x))
        return (h + s) * (1.0 / math.sqrt(2.0))


class MaskGITDiscriminator(nn.Module):
    """MaskGIT's VQGAN discriminator: real/fake logits (B,) for square NHWC images.

    For an image of side S (a power of two, at least 4), with widths from
    :func:`maskgit_filters`:

        conv3x3 (width at S) + lrelu
        log2(S) - 2 x MaskGITResBlock, block j: S / 2^j -> S / 2^(j+1) px, width at the output
        conv3x3 (width at 4 px) + lrelu                       (at 4x4)
        flatten -> dense (width at 4 px) + lrelu -> dense 1 -> logit

    Every kernel is initialised Xavier-uniform, every bias zero, as MaskGIT's flax module.
    At 256 px and MaskGIT's settings (filters 512, channel_multiplier 1) the block widths are
    128, 256, 512, 512, 512, 512.

    Differences from MaskGIT's module, none of which changes the function it computes:
    the logits come out as (B,) float32 (MaskGIT: (B, 1)), which is what the tokenizer
    losses take; the image size is read from the input (MaskGIT: ``config.image_size``);
    the layers have names (``conv_in``, ``block_<j>``, ``conv_out``, ``dense``, ``logit``)
    and logical partitioning annotations; ``filters`` scales the width table (MaskGIT fixes
    512). The images go in as they are, without rescaling: MaskGIT's tokenizer works on
    [0, 1] images (its public inference code), and its discriminator rescales nothing.
    """
    filters: int = 512
    channel_multiplier: int = 1
    blur_resample: bool = True
    blur_kernel: Sequence[float] = (1, 3, 3, 1)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array) -> jax.Array:
        _check_nhwc(images, "MaskGITDiscriminator")
        _, height, width, _ = images.shape
        if height != width or height < 4 or height & (height - 1):
            raise ValueError(
                f"MaskGITDiscriminator needs square images whose side is a power of two, at "
                f"least 4 (it halves the side down to 4x4); got {height}x{width}.")
        width_at = lambda s: maskgit_filters(s, self.filters, self.channel_multiplier)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        xavier = nn.initializers.xavier_uniform()

        x = images.astype(self.dtype)
        x = _leaky_relu(_conv(width_at(height), 3, name="conv_in", kernel_init=xavier, **kw)(x))
        for j in range(int(math.log2(height)) - 2):
            x = MaskGITResBlock(width_at(height >> (j + 1)), self.blur_resample,
                                self.blur_kernel, name=f"block_{j}", **kw)(x)
        x = _leaky_relu(_conv(width_at(4), 3, name="conv_out", kernel_init=xavier, **kw)(x))
        x = x.reshape(x.shape[0], -1)
        x = _leaky_relu(nn.Dense(
            width_at(4), name="dense", **kw,
            kernel_init=nn.with_logical_partitioning(xavier, ("embed", "mlp")),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)))(x))
        # One output unit: its axis is left unnamed (replicated).
        logits = nn.Dense(
            1, name="logit", **kw,
            kernel_init=nn.with_logical_partitioning(xavier, ("mlp", None)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (None,)))(x)
        return logits[:, 0].astype(jnp.float32)
