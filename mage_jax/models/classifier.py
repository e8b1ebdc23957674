"""MAGE's encoder with a classification head, for fine-tuning (``models_vit_mage.py``).

As the official ``VisionTransformerMage`` with ``global_pool``: tokens with [C0] in front,
the word + position embedding (dropout 0.1), the encoder blocks (no dropout, drop-path
rising linearly to ``drop_path_rate``), the mean over the L image tokens, a trainable
``fc_norm`` (LayerNorm, eps 1e-6, fresh), and a linear head whose weight starts at std
2e-5 (MAE's ``main_finetune.py``; its truncation at +-2 in absolute terms never bites).
``token_emb`` and ``encoder`` have MAGE's parameter names, so the pretrained encoder is
copied in by name; the decoder is never built.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mage_jax.models import mage as mage_lib
from mage_jax.models.layer_norm import layer_norm
from mage_jax.models.transformer import Transformer

Dtype = Any


class MageClassifier(nn.Module):
    codebook_size: int
    num_tokens: int
    num_classes: int
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    embedding_dropout_rate: float = 0.1
    drop_path_rate: float = 0.1
    head_init_std: float = 2e-5
    layer_norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def setup(self):
        vocab = self.codebook_size + mage_lib.NUM_LEGACY_CLASS_IDS + 1
        self.token_emb = mage_lib.TokenEmbedding(
            vocab, self.num_tokens + 1, self.embed_dim, self.embedding_dropout_rate,
            self.layer_norm_eps, False, self.dtype, self.param_dtype)
        self.encoder = Transformer(
            depth=self.depth, num_heads=self.num_heads,
            mlp_dim=int(self.embed_dim * self.mlp_ratio), dropout_rate=0.0,
            attention_dropout_rate=0.0, layer_norm_eps=self.layer_norm_eps, remat=self.remat,
            dtype=self.dtype, param_dtype=self.param_dtype,
            drop_path_rate=self.drop_path_rate, name="encoder")
        self.fc_norm = layer_norm(self.layer_norm_eps, jnp.float32, self.param_dtype, "fc_norm",
                                  False)
        self.head = nn.Dense(self.num_classes,
                             kernel_init=nn.initializers.normal(self.head_init_std),
                             name="head")

    def __call__(self, token_ids: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(B, num_classes)`` float32 for tokens ``(B, L)``."""
        c0 = jnp.full((token_ids.shape[0], 1), self.codebook_size + mage_lib.FAKE_CLASS_OFFSET,
                      token_ids.dtype)
        x = self.token_emb(jnp.concatenate([c0, token_ids], axis=1), not train)
        x = self.encoder(x, not train)
        pooled = self.fc_norm(jnp.mean(x[:, 1:].astype(jnp.float32), axis=1))
        return self.head(pooled).astype(jnp.float32)
