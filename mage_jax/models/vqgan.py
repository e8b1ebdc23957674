"""The VQGAN tokenizer: images -> discrete tokens -> images.

This is the MaskGIT tokenizer exactly as MAGE's official code runs it (the taming-style
PyTorch port in ``taming/modules/diffusionmodules/model.py`` and ``VectorQuantizer2`` in
``taming/modules/vqvae/quantize.py``), so the released weights convert one to one
(``mage_jax.convert.torch_tokenizer``). Where that code differs from the stock taming VQGAN
it is said below; the differences matter for parity:

* no attention anywhere, although ``config/vqgan.yaml`` lists ``attn_resolutions: [16]``
  (the MAGE port never builds attention blocks);
* the encoder downsamples by 2x2 average pooling (``resamp_with_conv=False``); the decoder
  upsamples by nearest-neighbour x2 followed by a 3x3 conv;
* the 1x1 ``nin_shortcut`` of a channel-changing ResnetBlock is applied to the residual
  branch, not to the input (see ``ResnetBlock``);
* no ``quant_conv`` / ``post_quant_conv``: the encoder output *is* the latent;
* each decoder level has ``num_res_blocks`` blocks (stock taming has one more).

Layout: images NHWC float32 in [0, 1] (the official code feeds [0, 1] images, not [-1, 1]);
the decoder output is not clipped (callers clip to [0, 1] for display or FID).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mage_jax.models import arg_extremes

Dtype = Any

# Logical axis names (mage_jax/sharding.py): conv kernels are HWIO.
_CONV_AXES = ("height", "width", "conv_in", "conv_out")


def _conv(features: int, kernel: int, *, use_bias: bool, dtype: Dtype, param_dtype: Dtype,
          name: str) -> nn.Conv:
    pad = kernel // 2  # PyTorch padding=1 for 3x3, 0 for 1x1: symmetric, so spell it out.
    return nn.Conv(
        features, (kernel, kernel), padding=((pad, pad), (pad, pad)), use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


def _group_norm(groups: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.GroupNorm:
    # torch.nn.GroupNorm(32, C, eps=1e-6). The two-pass variance matches PyTorch more closely
    # than flax's default E[x^2]-E[x]^2, which matters for the 1e-4 parity with randomised
    # (large-mean) activations.
    return nn.GroupNorm(
        num_groups=groups, epsilon=1e-6, dtype=dtype, param_dtype=param_dtype,
        use_fast_variance=False, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> 3x3 conv (no bias), twice, plus a skip connection."""
    out_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.swish(_group_norm(self.norm_groups, name="norm1", **kw)(x))
        h = _conv(self.out_channels, 3, use_bias=False, name="conv1", **kw)(h)
        h = nn.swish(_group_norm(self.norm_groups, name="norm2", **kw)(h))
        h = _conv(self.out_channels, 3, use_bias=False, name="conv2", **kw)(h)
        if x.shape[-1] == self.out_channels:
            return x + h
        # Quirk of the official code, reproduced for weight compatibility: when the width
        # changes, the 1x1 shortcut (out -> out channels) is applied to the residual branch
        # `h`, not to the input `x`, and the block returns nin_shortcut(h) + h. The input
        # then reaches the output only through the branch (no identity path across a width
        # change); the released weights were trained this way, so "fixing" it breaks them.
        return _conv(self.out_channels, 1, use_bias=False, name="nin_shortcut", **kw)(h) + h


class _Level(nn.Module):
    """One resolution level: ``num_blocks`` ResnetBlocks, then optional resampling.

    resample: 'avg_pool' (encoder: 2x2 average pooling, no conv), 'upsample' (decoder:
    nearest x2 then a 3x3 conv with bias) or None (the last level of either tower).
    """
    out_channels: int
    num_blocks: int
    resample: str | None
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        for i in range(self.num_blocks):
            x = ResnetBlock(self.out_channels, name=f"block_{i}", **kw)(x)
        if self.resample == "avg_pool":
            x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        elif self.resample == "upsample":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            x = _Upsample(self.out_channels, dtype=self.dtype, param_dtype=self.param_dtype,
                          name="upsample")(x)
        return x


class _Upsample(nn.Module):
    """Holds the post-upsampling 3x3 conv, so its path mirrors taming's ``upsample.conv``."""
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return _conv(self.channels, 3, use_bias=True, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="conv")(x)


class _Mid(nn.Module):
    """The two same-width ResnetBlocks at the lowest resolution (taming's ``mid``)."""
    channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        x = ResnetBlock(self.channels, name="block_1", **kw)(x)
        return ResnetBlock(self.channels, name="block_2", **kw)(x)


class Encoder(nn.Module):
    """Images (B, H, W, in) -> latents (B, H/f, W/f, z_channels), f = 2**(len(ch_mult)-1)."""
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    z_channels: int
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(self.ch, 3, use_bias=False, name="conv_in", **kw)(x)
        last = len(self.ch_mult) - 1
        for level, mult in enumerate(self.ch_mult):
            x = _Level(self.ch * mult, self.num_res_blocks,
                       resample=None if level == last else "avg_pool",
                       norm_groups=self.norm_groups, name=f"down_{level}", **kw)(x)
        x = _Mid(x.shape[-1], norm_groups=self.norm_groups, name="mid", **kw)(x)
        x = nn.swish(_group_norm(self.norm_groups, name="norm_out", **kw)(x))
        return _conv(self.z_channels, 1, use_bias=True, name="conv_out", **kw)(x)


class Decoder(nn.Module):
    """Latents (B, h, w, z_channels) -> images (B, h*f, w*f, out_channels)."""
    ch: int
    ch_mult: Sequence[int]
    num_res_blocks: int
    out_channels: int = 3
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = _conv(self.ch * self.ch_mult[-1], 3, use_bias=True, name="conv_in", **kw)(z)
        x = _Mid(x.shape[-1], norm_groups=self.norm_groups, name="mid", **kw)(x)
        # Top (coarsest) level first; names keep taming's level index so up_0 is the finest.
        for level in reversed(range(len(self.ch_mult))):
            x = _Level(self.ch * self.ch_mult[level], self.num_res_blocks,
                       resample=None if level == 0 else "upsample",
                       norm_groups=self.norm_groups, name=f"up_{level}", **kw)(x)
        x = nn.swish(_group_norm(self.norm_groups, name="norm_out", **kw)(x))
        return _conv(self.out_channels, 3, use_bias=True, name="conv_out", **kw)(x)


def _entropy(p, axis=-1):
    """-sum p log p with 0 log 0 = 0 and finite gradients at p = 0 (double-where trick)."""
    positive = p > 0
    return -jnp.sum(jnp.where(positive, p * jnp.log(jnp.where(positive, p, 1.0)), 0.0), axis=axis)


def entropy_terms(distances, temperature: float):
    """MaskGIT's entropy regulariser on soft assignments softmax(-distance / temperature).

    distances: (N, K) squared distances from N latents to K codes. Returns
    (loss, sample_entropy, codebook_entropy): ``sample_entropy`` is the mean entropy of each
    latent's soft assignment (low = confident), ``codebook_entropy`` the entropy of the
    assignment averaged over the batch (high = codes used evenly), and
    ``loss = sample_entropy - codebook_entropy``, minimal (-log K) for confident, evenly
    spread assignments. MaskGIT adds 1e-5 inside its logs; we use exact 0 log 0 = 0 instead.
    """
    logits = -distances.astype(jnp.float32) / temperature
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    probs = jnp.exp(log_probs)
    sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
    codebook_entropy = _entropy(jnp.mean(probs, axis=0))
    return sample_entropy - codebook_entropy, sample_entropy, codebook_entropy


class VectorQuantizer(nn.Module):
    """Nearest-code quantisation with a straight-through gradient (VectorQuantizer2, legacy)."""
    codebook_size: int
    embed_dim: int
    entropy_temperature: float = 0.01
    param_dtype: Dtype = jnp.float32

    def setup(self):
        # MaskGIT initialises its codebook with variance_scaling(1, fan_in, uniform); taming's
        # uniform(-1/K, 1/K) puts every code near 0 and invites collapse when training anew.
        # Released weights overwrite this anyway.
        init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
        self.codebook = self.param(
            "codebook", nn.with_logical_partitioning(init, ("codebook", "embed")),
            (self.codebook_size, self.embed_dim), self.param_dtype)

    def distances(self, z):
        """(..., D) -> (..., K) squared distances, as ||z||^2 + ||e||^2 - 2 z.e.

        Computed in this (non-minimal) form because the official code does, so that ties and
        near-ties round the same way; HIGHEST precision keeps TPUs from using bf16 passes.
        """
        z = z.astype(jnp.float32)
        e = jnp.asarray(self.codebook, jnp.float32)
        return (jnp.sum(z ** 2, axis=-1, keepdims=True) + jnp.sum(e ** 2, axis=-1)
                - 2.0 * jnp.einsum("...d,kd->...k", z, e, precision=jax.lax.Precision.HIGHEST))

    def lookup(self, token_ids):
        return jnp.take(jnp.asarray(self.codebook, jnp.float32), token_ids, axis=0)

    def __call__(self, z):
        """z (B, h, w, D) -> (quantized (B, h, w, D) float32, stats dict)."""
        z = z.astype(jnp.float32)
        d = self.distances(z)
        ids = arg_extremes.argmin(d)
        e = self.lookup(ids)
        sg = jax.lax.stop_gradient
        codebook_loss = jnp.mean((sg(z) - e) ** 2)    # moves codes towards the latents
        commitment_loss = jnp.mean((z - sg(e)) ** 2)  # keeps the encoder near its codes
        entropy_loss, _, _ = entropy_terms(d.reshape(-1, self.codebook_size),
                                           self.entropy_temperature)
        counts = jnp.zeros((self.codebook_size,), jnp.float32).at[ids.reshape(-1)].add(1.0)
        stats = dict(
            codebook_loss=codebook_loss, commitment_loss=commitment_loss,
            entropy_loss=entropy_loss, token_ids=ids.reshape(ids.shape[0], -1),
            codebook_usage=jnp.mean((counts > 0).astype(jnp.float32)),
            perplexity=jnp.exp(_entropy(counts / ids.size)))
        return z + sg(e - z), stats  # straight-through: forward = e, gradient to z = identity


class VQGAN(nn.Module):
    """The tokenizer. Defaults are MAGE's ``config/vqgan.yaml`` (factor 16: 256 px -> 16x16)."""
    ch: int = 128
    ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    embed_dim: int = 256
    codebook_size: int = 1024
    in_channels: int = 3
    out_channels: int = 3
    entropy_temperature: float = 0.01
    norm_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _validate(self)
        super().__post_init__()

    def setup(self):
        kw = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                  norm_groups=self.norm_groups, dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(z_channels=self.z_channels, **kw)
        self.quantizer = VectorQuantizer(self.codebook_size, self.embed_dim,
                                         self.entropy_temperature, param_dtype=self.param_dtype)
        self.decoder = Decoder(out_channels=self.out_channels, **kw)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def _check_images(self, images):
        f = self.downsample_factor
        if images.ndim != 4 or images.shape[-1] != self.in_channels:
            raise ValueError(f"VQGAN expects NHWC images with {self.in_channels} channels, got "
                             f"shape {images.shape}; transpose NCHW inputs with "
                             f"x.transpose(0, 2, 3, 1).")
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} is not divisible "
                             f"by the tokenizer's downsampling factor {f} "
                             f"(len(ch_mult)={len(self.ch_mult)}); resize or crop the images.")

    def encode_continuous(self, images):
        """Images (B, H, W, 3) in [0, 1] -> encoder latents (B, H/f, W/f, z_channels)."""
        self._check_images(images)
        return self.encoder(images)

    def quantize(self, z):
        """Latents (B, h, w, D) -> (quantized (B, h, w, D), token_ids (B, h*w) int32)."""
        quantized, stats = self.quantizer(z)
        return quantized, stats["token_ids"]

    def encode(self, images):
        """Images (B, H, W, 3) in [0, 1] -> token ids (B, h*w) int32, row-major over the grid."""
        return self.quantize(self.encode_continuous(images))[1]

    def decode_latents(self, quantized):
        """Quantized latents (B, h, w, D) -> images (B, h*f, w*f, 3) (not clipped)."""
        return self.decoder(quantized)

    def decode(self, token_ids):
        """Token ids (B, L) on a square sqrt(L) x sqrt(L) grid -> images (B, H, W, 3)."""
        if token_ids.ndim != 2:
            raise ValueError(f"decode expects token ids of shape (batch, length), got "
                             f"{token_ids.shape}.")
        side = math.isqrt(token_ids.shape[1])
        if side * side != token_ids.shape[1]:
            raise ValueError(f"decode needs a square token grid, but length {token_ids.shape[1]} "
                             f"is not a perfect square; reshape to (B, h, w) and call "
                             f"decode_latents with the looked-up codes instead.")
        codes = self.quantizer.lookup(token_ids).reshape(token_ids.shape[0], side, side, -1)
        return self.decode_latents(codes)

    def __call__(self, images, train: bool = False):
        """Reconstruct images; aux holds the quantiser's losses, tokens and usage statistics.

        ``train`` is accepted for the trainer's uniform call signature; the tokenizer has no
        dropout or batch statistics (dropout is 0.0 in the official config), so it is unused.
        """
        del train
        z = self.encode_continuous(images)
        quantized, aux = self.quantizer(z)
        return self.decode_latents(quantized), aux


def _validate(m: VQGAN) -> None:
    if m.embed_dim != m.z_channels:
        raise ValueError(f"tokenizer embed_dim={m.embed_dim} must equal z_channels="
                         f"{m.z_channels}: the MAGE VQGAN has no quant_conv between encoder "
                         f"and codebook. Set embed_dim={m.z_channels} (or z_channels="
                         f"{m.embed_dim}).")
    ints = dict(ch=m.ch, num_res_blocks=m.num_res_blocks, z_channels=m.z_channels,
                codebook_size=m.codebook_size, in_channels=m.in_channels,
                out_channels=m.out_channels, norm_groups=m.norm_groups)
    for name, value in ints.items():
        if int(value) != value or value < 1:
            raise ValueError(f"tokenizer {name}={value!r} must be a positive integer.")
    if not m.ch_mult or any(int(c) != c or c < 1 for c in m.ch_mult):
        raise ValueError(f"tokenizer ch_mult={m.ch_mult!r} must be a non-empty sequence of "
                         f"positive integers, e.g. (1, 1, 2, 2, 4).")
    for width in sorted({m.ch * c for c in m.ch_mult}):
        if width % m.norm_groups:
            raise ValueError(f"tokenizer width ch*ch_mult={width} is not divisible by the "
                             f"{m.norm_groups} GroupNorm groups; choose ch (now {m.ch}) so "
                             f"that every ch*ch_mult[i] is a multiple of {m.norm_groups}.")
    if not m.entropy_temperature > 0:
        raise ValueError(f"tokenizer entropy_temperature={m.entropy_temperature!r} must be > 0 "
                         f"(MaskGIT uses 0.01).")


_CONFIG_FIELDS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "embed_dim",
                  "codebook_size", "entropy_temperature")


def _tokenizer_section(cfg):
    """Accepts a full config (with ``.tokenizer``), the tokenizer section, or a plain dict."""
    if isinstance(cfg, Mapping) or hasattr(cfg, "keys"):
        return cfg["tokenizer"] if "tokenizer" in cfg else cfg
    raise TypeError(f"expected an ml_collections.ConfigDict or a dict, got {type(cfg)}.")


def vqgan_from_config(cfg, **overrides) -> VQGAN:
    """Builds the VQGAN from ``config.tokenizer.{ch, ch_mult, ...}``; overrides win."""
    section = _tokenizer_section(cfg)
    missing = [k for k in _CONFIG_FIELDS if k not in section and k not in overrides]
    if missing:
        raise ValueError(f"config.tokenizer lacks {missing}; add them (MAGE's values: ch=128, "
                         f"ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, "
                         f"embed_dim=256, codebook_size=1024, entropy_temperature=0.01).")
    kwargs = {k: section[k] for k in _CONFIG_FIELDS if k in section}
    for optional in ("in_channels", "out_channels", "norm_groups", "dtype"):
        if optional in section:
            kwargs[optional] = section[optional]
    kwargs.update(overrides)
    kwargs["ch_mult"] = tuple(int(c) for c in kwargs["ch_mult"])
    if "dtype" in kwargs:
        # Compute dtype of the convolutions and norms; the nearest-code search stays in
        # float32 (VectorQuantizer). bfloat16 changes some token ids: benchmarks/README.md.
        if str(kwargs["dtype"]) not in ("float32", "bfloat16"):
            raise ValueError(f"config.tokenizer.dtype={kwargs['dtype']!r} must be 'float32' or "
                             f"'bfloat16'.")
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    return VQGAN(**kwargs)


def token_grid(model_or_cfg, image_size: int) -> int:
    """Side of the token grid for square images: image_size // 2**(len(ch_mult) - 1)."""
    if isinstance(model_or_cfg, VQGAN):
        ch_mult = model_or_cfg.ch_mult
    else:
        ch_mult = _tokenizer_section(model_or_cfg)["ch_mult"]
    factor = 2 ** (len(ch_mult) - 1)
    if image_size % factor:
        nearest = max(factor, image_size // factor * factor)
        raise ValueError(f"image_size={image_size} is not divisible by the tokenizer's "
                         f"downsampling factor {factor} (len(ch_mult)={len(ch_mult)}); use a "
                         f"multiple of {factor}, e.g. {nearest}.")
    return image_size // factor
