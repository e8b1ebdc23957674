"""LayerNorm as ``torch.nn.LayerNorm`` computes it, with an optional hand-written backward.

``layer_norm(...)`` builds flax's ``nn.LayerNorm`` (biased two-pass variance, as torch) or,
with ``explicit_grad=True``, ``LayerNorm`` below: the same function, the same parameters
(``scale``, ``bias``), and a custom VJP. Why: XLA:CPU differentiates flax's LayerNorm into a
fusion that recomputes the row statistics for every element of a transposed output; in the
demo MAGE step that fusion alone took 15% of the time, and the explicit backward (the
textbook formula, with the scale and bias gradients as matrix-vector products) makes the
whole step 1.35x faster on a 2-core CPU (benchmarks/README.md). It is off by default: on
accelerators XLA's own backward is not known to be slow, and the large presets keep it.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _forward(x, scale, bias, eps):
    xf = x.astype(jnp.float32)
    centred = xf - xf.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + eps)
    normed = centred * rstd
    y = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    # The empty array carries x's dtype: the cotangent of x must have it (bf16 compute).
    return y, (normed, rstd, scale, jnp.zeros((0,), x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_explicit_grad(x: jax.Array, scale: jax.Array, bias: jax.Array,
                             eps: float) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis, in float32."""
    return _forward(x, scale, bias, eps)[0]


def _backward(eps, residuals, g):
    del eps
    normed, rstd, scale, x_dtype = residuals
    g = g.astype(jnp.float32)
    width = normed.shape[-1]
    rows_g, rows_normed = g.reshape(-1, width), normed.reshape(-1, width)
    # Column sums as ones @ M: a matrix-vector product, not a strided reduction.
    ones = jnp.ones((rows_g.shape[0],), jnp.float32)
    d_bias = ones @ rows_g
    d_scale = ones @ (rows_g * rows_normed)
    g_normed = g * scale.astype(jnp.float32)
    d_x = rstd * (g_normed - g_normed.mean(-1, keepdims=True)
                  - normed * (g_normed * normed).mean(-1, keepdims=True))
    return d_x.astype(x_dtype.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


layer_norm_explicit_grad.defvjp(lambda x, s, b, eps: _forward(x, s, b, eps), _backward)


class LayerNorm(nn.Module):
    """``nn.LayerNorm(use_fast_variance=False)`` with ``layer_norm_explicit_grad``'s VJP."""
    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    scale_init: Any = nn.initializers.ones
    bias_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        scale = self.param("scale", self.scale_init, (width,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (width,), self.param_dtype)
        return layer_norm_explicit_grad(x, scale, bias, self.epsilon).astype(self.dtype)


def layer_norm(eps: float, dtype: Dtype, param_dtype: Dtype, name: str,
               explicit_grad: bool = False) -> nn.Module:
    """A LayerNorm that matches ``torch.nn.LayerNorm``; see the module docstring."""
    kwargs = dict(
        epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))
    if explicit_grad:
        return LayerNorm(**kwargs)
    return nn.LayerNorm(use_fast_variance=False, **kwargs)
