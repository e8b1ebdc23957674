"""The exact GELU, ``x * P(X <= x)`` for X ~ N(0, 1), written as torch writes it.

``0.5 * x * (1 + erf(x / sqrt(2)))`` is the formula of torch's ``nn.GELU()``, which the
official MAGE code uses. flax's ``nn.gelu(approximate=False)`` computes the same function
through ``erfc``, which XLA evaluates as two polynomial branches and an exponential, all
computed and selected per element; ``erf`` is one rational polynomial. With it the
float32 TPU plans move a quarter less HBM traffic per step and the demo MAGE's step on a
2-core CPU is 4-6% faster (benchmarks/README.md, "The exact GELU through erf"). The price:
where erf(x / sqrt 2) nears -1 (x below about -3), ``1 + erf`` loses digits in float32, so
those small values (under 1e-3 in size) carry absolute errors up to about 1e-6, which
torch's kernel and flax's erfc form avoid; the values and gradients are torch's within
1.5e-6 everywhere (tested).
"""
from __future__ import annotations

import math

import jax


def gelu(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU, in ``x``'s dtype."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))
