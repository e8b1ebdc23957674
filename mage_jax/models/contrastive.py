"""MAGE-C: a projection MLP on the pooled encoder output and an InfoNCE loss.

The loss is SimCLR's NT-Xent over the *global* batch: under jit the batch is one global
array sharded over the data axes, so every example meets every other example of every
device as a negative (XLA inserts the all-gather that a per-device implementation would
write by hand).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mage_jax.models.gelu import gelu


class ProjectionMLP(nn.Module):
    """``num_layers`` Dense layers; BatchNorm-free (LayerNorm + GELU between them)."""
    hidden_dim: int = 2048
    out_dim: int = 256
    num_layers: int = 2
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers - 1):
            x = nn.Dense(self.hidden_dim, dtype=self.dtype, name=f"fc{i}",
                         kernel_init=nn.with_logical_partitioning(
                             nn.initializers.xavier_uniform(), ("embed", "mlp")))(x)
            x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name=f"norm{i}")(x)
            x = gelu(x)
        return nn.Dense(self.out_dim, dtype=self.dtype, name=f"fc{self.num_layers - 1}",
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.xavier_uniform(), ("mlp", "embed")))(x)


def info_nce(z1: jax.Array, z2: jax.Array, temperature: float) -> tuple[jax.Array, jax.Array]:
    """NT-Xent between two views: (loss, accuracy of finding the positive).

    z1, z2: (B, D) projections of the two views of the same B images. Each of the 2B
    embeddings has one positive (its other view) and 2B - 2 negatives.
    """
    z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
    z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)  # never yourself
    positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(0, n)])
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(log_probs, positives[:, None], axis=-1))
    accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == positives)
    return loss, accuracy
