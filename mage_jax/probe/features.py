"""What the representation stages read from a frozen MAGE: one feature vector per image.

The linear probe of the official code (``models_vit_mage.py`` with ``global_pool``, as
``main_linprobe.py`` builds it): the tokenizer turns the image into tokens, [C0] goes in
front, the encoder blocks see every position (nothing dropped or masked), the output is
averaged over the L image tokens *before* the pretrained final norm, and a LayerNorm
(eps 1e-6) is applied whose scale and offset are the fresh, frozen 1 and 0 (``fc_norm`` is
created new for the probe and never trained): a LayerNorm without learned parameters.

Three feature sources share this interface, so a probe compares them under one recipe:
``encoder`` (the pretrained MAGE), ``random_init`` (the same MAGE, randomly initialised:
what the architecture alone gives) and ``pixels`` (the image itself, flattened).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mage_jax import sharding
from mage_jax.models import mage as mage_lib
from mage_jax.models import vqgan

FEATURE_SOURCES = ("encoder", "random_init", "pixels")
FC_NORM_EPS = 1e-6


def fc_norm(x: jax.Array, eps: float = FC_NORM_EPS) -> jax.Array:
    """LayerNorm over the last axis with scale 1 and offset 0 (the probe's frozen fc_norm)."""
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


@dataclasses.dataclass(frozen=True)
class FeatureExtractor:
    """``features(params, images) -> (B, dim)`` float32 for images ``(B, H, W, 3)`` in [0, 1].

    ``params`` is ``{"mage": ..., "tokenizer": ...}`` (empty for ``pixels``); the caller
    holds them frozen (``stop_gradient`` is applied here too, so no gradient reaches them).
    """
    source: str
    model: mage_lib.MAGE | None
    tokenizer: vqgan.VQGAN | None
    image_size: int

    @property
    def dim(self) -> int:
        if self.source == "pixels":
            return self.image_size * self.image_size * 3
        return self.model.embed_dim

    def features(self, params, images: jax.Array) -> jax.Array:
        if self.source == "pixels":
            return images.reshape(images.shape[0], -1).astype(jnp.float32)
        params = jax.lax.stop_gradient(params)
        ids = self.tokenizer.apply({"params": params["tokenizer"]}, images,
                                   method=self.tokenizer.encode)
        pooled = self.model.apply({"params": params["mage"]}, ids,
                                  method=mage_lib.MAGE.pooled_features)
        return fc_norm(pooled)

    def abstract_mage(self, rng=None):
        """The boxed (logically partitioned) abstract MAGE parameters: their shardings are
        those of pretraining (FSDP / tensor rules), so a frozen ViT-L is split the same way."""
        rng = jax.random.key(0) if rng is None else rng
        return jax.eval_shape(self._init_mage, rng)

    def _init_mage(self, rng):
        tokens = jnp.zeros((1, self.model.num_tokens), jnp.int32)
        return self.model.init({"params": rng}, tokens, method=mage_lib.MAGE.pooled_features)[
            "params"]

    def random_mage(self, rng) -> dict:
        """Randomly initialised MAGE parameters (the ``random_init`` baseline)."""
        return nn.unbox(self._init_mage(rng))

    def place(self, params, mesh):
        """Puts frozen params on ``mesh``: MAGE by the sharding rules, the tokenizer
        replicated (it is small beside the encoder)."""
        if self.source == "pixels":
            return {}
        mage_shardings = sharding.logical_shardings(self.abstract_mage(), mesh)
        return {"mage": jax.device_put(params["mage"], mage_shardings),
                "tokenizer": jax.device_put(params["tokenizer"], sharding.replicated(mesh))}
