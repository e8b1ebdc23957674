"""From a trained MAGE to images: position 0, guidance, iterative decoding, the tokenizer.

``make_sampler`` returns one jitted function ``(mage_params, tokenizer_params, ids,
example_index, labels) -> uint8 images``: the decoding loop and the tokenizer's decoder
compile together, the batch sharded over the mesh's data axes, the parameters replicated.

Position 0 holds [C0] (unconditional, as the paper and the official ``gen_image``) or, for
a class-conditional MAGE (our design, ``configs/pretrain.py:class_conditional``), the class
id of the legacy vocabulary (``MAGE.class_token_id``). With ``guidance_scale`` s > 0 each
step runs the model on both and samples from ``(1 + s) * cond - s * uncond`` (classifier-
free guidance on the logits, as Muse); a label < 0 in a batch means unconditional.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mage_jax import sharding
from mage_jax.generate import decoding
from mage_jax.models import mage


def to_uint8(images: jax.Array) -> jax.Array:
    """[0, 1] floats -> uint8 as the official script writes them: ``clip(x * 255)`` truncated
    (numpy's ``astype``), not rounded."""
    return jnp.clip(images * 255.0, 0.0, 255.0).astype(jnp.uint8)


def logits_fn_for(model: mage.MAGE, params, labels: jax.Array, guidance_scale: float):
    """``ids (B, L) -> logits (B, L, codebook_size)`` (the image positions' logits over the
    codebook, all that decoding reads) with [C0] or the class id at position 0."""
    c0 = jnp.full(labels.shape, model.fake_class_id, jnp.int32)
    first = jnp.where(labels >= 0, model.class_token_id(jnp.maximum(labels, 0)), c0)

    def run(position0, ids):
        tokens = jnp.concatenate([position0[:, None].astype(ids.dtype), ids], axis=1)
        return model.apply({"params": params}, tokens, image_logits=True,
                           method=model.decode_step_logits)

    if guidance_scale == 0.0:
        return lambda ids: run(first, ids)

    def guided(ids):
        both = run(jnp.concatenate([first, c0]), jnp.concatenate([ids, ids]))
        cond, uncond = jnp.split(both, 2)
        return (1.0 + guidance_scale) * cond - guidance_scale * uncond
    return guided


def mage_shardings(model: mage.MAGE, mesh):
    """MAGE's parameters laid out by the sharding rules of pretraining (FSDP / tensor axes
    of ``mesh``; replicated on a data-only mesh), for ``make_sampler``'s ``mage_shardings``."""
    tokens = jnp.zeros((1, model.num_tokens + 1), jnp.int32)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens,
                                                 method=model.decode_step_logits))["params"]
    return sharding.logical_shardings(abstract, mesh)


def make_sampler(model: mage.MAGE, decode_tokens, mesh, *, num_steps: int,
                 choice_temperature: float, guidance_scale: float = 0.0, mage_shardings=None):
    """The jitted sampler. ``decode_tokens(tokenizer_params, ids) -> images in [0, 1]``.
    ``mage_shardings``: where MAGE's parameters live (default replicated; a ViT-L on small
    chips: ``mage_shardings(model, mesh)`` over an fsdp axis).

    ``ids (B, L)``: [MASK] where a token is to be generated (all of them for sampling from
    scratch; a canvas for editing); ``example_index (B,)``: global sample numbers (they
    alone choose the random numbers); ``labels (B,)``: class labels, -1 for none.
    Returns ``(tokens (B, L), images (B, H, W, 3) uint8)``.
    """
    batch_1d = sharding.batch_sharding(mesh, 1)
    batch_2d = sharding.batch_sharding(mesh, 2)
    replicated = sharding.replicated(mesh)

    def sample(mage_params, tokenizer_params, ids, example_index, labels, key):
        logits_fn = logits_fn_for(model, mage_params, labels, guidance_scale)
        tokens = decoding.iterative_decode(
            logits_fn, key, example_index, ids, num_steps=num_steps,
            choice_temperature=choice_temperature, codebook_size=model.codebook_size,
            mask_token_id=model.mask_token_id)
        return tokens, to_uint8(decode_tokens(tokenizer_params, tokens))

    return jax.jit(sample,
                   in_shardings=(mage_shardings or replicated, replicated, batch_2d, batch_1d,
                                 batch_1d, replicated),
                   out_shardings=(batch_2d, sharding.batch_sharding(mesh, 4)))
