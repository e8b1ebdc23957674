"""Dropout whose masks can cost a quarter of the random numbers (``packed``, for CPUs).

``flax.linen.Dropout`` draws one uniform float per element, and with the partitionable
threefry (JAX's default) each element costs a full threefry2x32 hash of which only 32 of
the 64 output bits survive. On a CPU that hash, not the matmuls, is what dropout costs: a
ViT-B training step at batch 8 draws about 220 million decisions, which took 1.9 s of its
10.5 s (benchmarks/README.md). Packed, one hash gives four decisions: its 64 bits are cut into
four 16-bit fields, and an element is kept when its field is below
``round(keep_prob * 65536)``. The kept values are scaled by ``1 / (that threshold / 65536)``,
the keep probability actually used, so the expected output is still exactly the input;
for the paper's rate 0.1 it is 0.8999939 instead of 0.9.

The counters are the element's position (row index over all leading axes, column index
over the last axis / 4), so the mask is an elementwise function of the key and the
position: the same on one device or sharded over a mesh, with no communication.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend.random import threefry2x32_p

FIELD_BITS = 16
FIELDS_PER_HASH = 64 // FIELD_BITS
_UINT32_RANGE = 2 ** 32


def keep_threshold(keep_prob: float) -> int:
    """The 16-bit threshold for ``keep_prob``: a field below it keeps its element."""
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob={keep_prob} must be in (0, 1]: a dropout rate in [0, 1).")
    return round(keep_prob * 2 ** FIELD_BITS)


def keep_mask(key: jax.Array, shape: tuple[int, ...], keep_prob: float) -> jax.Array:
    """Boolean mask of ``shape``, True with probability ``keep_threshold(keep_prob) / 65536``
    independently per element, from any typed or raw PRNG key."""
    shape = tuple(int(d) for d in shape)
    dims = shape or (1,)  # a scalar is one row of one column
    rows = math.prod(dims[:-1])
    cols = -(-dims[-1] // FIELDS_PER_HASH)
    if rows >= _UINT32_RANGE or cols >= _UINT32_RANGE:
        raise ValueError(f"dropout over shape {shape}: {rows} rows x {cols} hashed columns "
                         f"exceed the 32-bit counters; split the array.")
    # Two 32-bit key words whatever the key's PRNG implementation (threefry, rbg, ...).
    k1, k2 = jax.random.bits(key, (2,), jnp.uint32)
    hashed = dims[:-1] + (cols,)
    row = jnp.zeros(hashed, jnp.uint32)  # flat index over the leading axes
    stride = 1
    for axis in range(len(hashed) - 2, -1, -1):
        row = row + jax.lax.broadcasted_iota(jnp.uint32, hashed, axis) * jnp.uint32(stride)
        stride *= hashed[axis]
    col = jax.lax.broadcasted_iota(jnp.uint32, hashed, len(hashed) - 1)
    hi, lo = threefry2x32_p.bind(k1, k2, row, col)
    mask16 = jnp.uint32(2 ** FIELD_BITS - 1)
    fields = jnp.stack([hi & mask16, hi >> FIELD_BITS, lo & mask16, lo >> FIELD_BITS], -1)
    fields = fields.reshape(dims[:-1] + (cols * FIELDS_PER_HASH,))[..., :dims[-1]]
    return (fields < jnp.uint32(keep_threshold(keep_prob))).reshape(shape)


class Dropout(nn.Module):
    """``nn.Dropout(rate)(x, deterministic)``; reads the ``dropout`` RNG stream as flax's
    does. ``packed``: ``keep_mask``'s masks (four decisions per hash); otherwise flax's own
    (one uniform per element), which XLA fuses into the masks' consumers: on TPU that keeps
    ViT-L's bfloat16 plan at 323 GB of HBM traffic per step where the packed masks, which
    are materialised, take 374 GB (benchmarks/README.md). So packed is for XLA:CPU, where
    drawing the random numbers is what costs."""
    rate: float
    packed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"dropout rate {self.rate} must be in [0, 1).")
        if deterministic or self.rate == 0.0:
            return x
        if not self.packed:
            return nn.Dropout(self.rate)(x, deterministic=False)
        threshold = keep_threshold(1.0 - self.rate)
        keep = keep_mask(self.make_rng("dropout"), x.shape, 1.0 - self.rate)
        scale = jnp.asarray(2 ** FIELD_BITS / threshold, x.dtype)
        return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))
