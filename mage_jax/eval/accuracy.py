"""Top-k classification accuracy, summed over batches (the probe and fine-tuning stages)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where ``labels`` is among the ``k`` largest logits (ties broken by index)."""
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def topk_sums(logits: jax.Array, labels: jax.Array, weight: jax.Array) -> dict:
    """Weighted counts of correct top-1 and top-5 (top-k for fewer than 5 classes)."""
    weight = weight.astype(jnp.float32)
    k = min(5, logits.shape[-1])
    return {"count": weight.sum(), "top1": (topk_correct(logits, labels, 1) * weight).sum(),
            "top5": (topk_correct(logits, labels, k) * weight).sum()}


def ratios(totals: dict) -> dict:
    """top1 / top5 from summed counts, with the number of scored examples."""
    count = max(totals.get("count", 0.0), 1.0)
    return {"top1": totals.get("top1", 0.0) / count, "top5": totals.get("top5", 0.0) / count,
            "test_examples": totals.get("count", 0.0)}


def add(totals: dict, sums: dict) -> dict:
    return {key: totals.get(key, 0.0) + float(v) for key, v in sums.items()}
