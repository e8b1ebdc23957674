"""Iterative decoding: MAGE's ``gen_image`` (MaskGIT's schedule) as one jitted loop.

Each of ``num_steps`` steps (official ``gen_img_uncond.py``):

1. the model sees every position (nothing dropped): [C0] (or a class id) at position 0,
   the known tokens, and [MASK] where a token is still unknown;
2. a token is sampled at every position from the codebook logits
   ``logits[:, 1:, :codebook_size]`` (temperature 1); known positions keep their token;
3. ``n = floor(N0 * cos(pi/2 * (t+1)/T))`` positions are masked again, clamped to
   ``[1, unknown - 1]`` (N0: the number unknown at the start; L when sampling from scratch):
   those of lowest confidence ``log p(sampled) + choice_temperature * (1 - (t+1)/T) * g``,
   g ~ Gumbel(0, 1), known tokens at +inf (never masked again).

The result is the last step's sampled tokens (the official code decodes ``sampled_ids``,
not the re-masked ones; the last step's re-masking of one token is therefore moot).

Randomness is per example: example ``i`` draws from ``fold_in(key, i)`` whatever the
batch size, the mesh or the host that runs it, so sample ``i`` of a seed is one image.
Per-row re-masking counts (the official code uses the first row's for all; they are equal
there) let one batch hold canvases with different unknown regions (``editing.py``).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mage_jax.models import mage

_KNOWN_CONFIDENCE = jnp.inf


def mask_schedule(num_steps: int, max_unknown: int) -> np.ndarray:
    """``table[t, n0] = floor(n0 * cos(pi/2 * (t+1)/num_steps))``, computed in float64.

    On the host, as the official code does with numpy: at t+1 = 2T/3 the cosine is 0.5 and
    a float32 product falls just below the integer (127.99999 -> 127 for 256 tokens) where float64 gives
    the official count.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps={num_steps}; iterative decoding needs at least 1 step.")
    ratios = np.cos(math.pi / 2.0 * (np.arange(num_steps, dtype=np.float64) + 1) / num_steps)
    counts = np.arange(max_unknown + 1, dtype=np.float64)
    return np.floor(ratios[:, None] * counts[None, :]).astype(np.int32)


def num_to_mask(table: jax.Array, step, initial_unknown: jax.Array,
                unknown: jax.Array) -> jax.Array:
    """Per row: how many positions to mask again after ``step``, clamped to [1, unknown-1]."""
    scheduled = table[step, initial_unknown]
    return jnp.maximum(1, jnp.minimum(unknown - 1, scheduled))


def remask(noise_key: jax.Array, sampled_log_prob: jax.Array, unknown: jax.Array,
           mask_len: jax.Array, temperature) -> jax.Array:
    """Official ``mask_by_random_topk`` for one row: True where the token is masked again.

    ``sampled_log_prob (L,)``: log p of the token sampled there; ``unknown (L,)``: positions
    that were [MASK] at this step's input (known ones are never re-masked).
    """
    gumbel = jax.random.gumbel(noise_key, sampled_log_prob.shape, jnp.float32)
    confidence = jnp.where(unknown, sampled_log_prob + temperature * gumbel, _KNOWN_CONFIDENCE)
    cut_off = jnp.sort(confidence)[mask_len - 1]
    # `& unknown` only matters for a row with nothing unknown (cut-off +inf), which the
    # official code never meets; an editing canvas may.
    return (confidence <= cut_off) & unknown


def step_update(keys: jax.Array, logits: jax.Array, ids: jax.Array, step, table: jax.Array,
                initial_unknown: jax.Array, *, num_steps: int, choice_temperature: float,
                codebook_size: int, mask_token_id: int):
    """One decoding step after the model: ``(next_ids, sampled_ids)``.

    ``keys (B,)``: this step's per-example keys; ``logits (B, L+1, vocab)`` for the input
    ``[C0] + ids``, or only their image positions over the codebook ``(B, L,
    codebook_size)``; ``ids (B, L)``: the current tokens, ``mask_token_id`` where unknown.
    ``next_ids`` is ``sampled_ids`` with the re-masked positions set back to [MASK].
    """
    unknown = ids == mask_token_id
    logits = mage.image_token_logits(logits, ids.shape[1], codebook_size)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    sample_keys, noise_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    sampled = jax.vmap(lambda k, lp: jax.random.categorical(k, lp, axis=-1))(sample_keys, logp)
    sampled = jnp.where(unknown, sampled.astype(ids.dtype), ids)
    sampled_logp = jnp.take_along_axis(logp, sampled[..., None].astype(jnp.int32), -1)[..., 0]
    mask_len = num_to_mask(table, step, initial_unknown, jnp.sum(unknown, axis=-1))
    temperature = choice_temperature * (1.0 - (step + 1) / num_steps)
    masking = jax.vmap(remask, in_axes=(0, 0, 0, 0, None))(
        noise_keys, sampled_logp, unknown, mask_len, temperature)
    return jnp.where(masking, mask_token_id, sampled), sampled


def iterative_decode(logits_fn: Callable[[jax.Array], jax.Array], key: jax.Array,
                     example_index: jax.Array, ids: jax.Array, *, num_steps: int,
                     choice_temperature: float, codebook_size: int,
                     mask_token_id: int) -> jax.Array:
    """Fills every [MASK] of ``ids (B, L)``; returns the final tokens ``(B, L)``.

    ``logits_fn(ids (B, L)) -> (B, L+1, vocab)`` (or ``(B, L, codebook_size)``) runs the
    model with whatever goes at position 0 ([C0], a class id, classifier-free guidance).
    ``example_index (B,)``: the global index of each row, which alone picks its random
    numbers. A row without unknown tokens comes back unchanged. Jittable; the loop is a
    ``lax.fori_loop``.
    """
    length = ids.shape[1]
    table = jnp.asarray(mask_schedule(num_steps, length))
    initial_unknown = jnp.sum(ids == mask_token_id, axis=-1)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(example_index)

    def body(step, carry):
        current, _ = carry
        keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(row_keys)
        return step_update(keys, logits_fn(current), current, step, table, initial_unknown,
                           num_steps=num_steps, choice_temperature=choice_temperature,
                           codebook_size=codebook_size, mask_token_id=mask_token_id)

    _, sampled = jax.lax.fori_loop(0, num_steps, body, (ids, ids))
    return sampled
