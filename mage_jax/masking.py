"""MAGE's variable masking: a ratio from a truncated Gaussian, and drop/mask sets.

Per example, one random ranking of the L image tokens decides both sets (official
``forward_encoder``): the lowest ``ceil(L * drop_ratio)`` ranks are *dropped* (removed
from the encoder input) and the lowest ``ceil(L * r)`` ranks are *masked* (replaced by
[MASK] and predicted), so dropped is a subset of masked. Position 0 ([C0]) is never
dropped or masked. The counts are exact; the official loop that re-draws noise on ties
is unnecessary because ranks come from a sort.

Which examples share a ratio: the official trainer draws one ``r`` per forward call on
each GPU (numpy seeded with seed + rank, ``mask_ratio_generator.rvs(1)``), so a step of
64 GPUs x 64 examples mixes 64 ratios. Here ``examples_per_ratio`` (default 64) gives each
group of that many consecutive examples of the *global* batch one ratio, drawn from the
step's key whatever the mesh, so a 1-device run and a pod run see the same ratios; 1 is
one ratio per example, 0 one ratio for the whole batch. The loss that goes with it, the
mean over groups of each group's mean over its masked tokens (the official per-GPU mean,
averaged by DDP), is ``mage_jax.models.mage.mage_loss`` with ``ratio_groups``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sample_mask_ratio(rng: jax.Array, min_ratio: float = 0.5, max_ratio: float = 1.0,
                      mean: float = 0.55, std: float = 0.25, shape: tuple = ()) -> jax.Array:
    """Masking ratio(s) from N(mean, std) truncated to [min_ratio, max_ratio] (float32)."""
    if not (std > 0 and min_ratio < max_ratio):
        raise ValueError(f"mask ratio distribution needs std > 0 and min < max; got std={std}, "
                         f"min={min_ratio}, max={max_ratio}.")
    lower, upper = (min_ratio - mean) / std, (max_ratio - mean) / std
    z = jax.random.truncated_normal(rng, lower, upper, shape, jnp.float32)
    return jnp.clip(mean + std * z, min_ratio, max_ratio)


def num_dropped_tokens(num_tokens: int, drop_ratio: float = 0.5) -> int:
    """Static count of dropped positions, ``ceil(L * drop_ratio)``, as the official code."""
    return int(np.ceil(num_tokens * drop_ratio))


def sample_masks(rng: jax.Array, batch: int, num_tokens: int, mask_ratio,
                 drop_ratio: float = 0.5) -> tuple[jax.Array, jax.Array]:
    """Returns ``(token_drop_mask, token_all_mask)``, both bool ``(batch, L+1)``.

    ``mask_ratio``: a scalar (one ratio for the batch, official) or a ``(batch,)`` array
    (one per example); it may be traced. Exactly ``ceil(L * drop_ratio)`` positions are
    dropped and ``max(ceil(L * r), num_dropped)`` masked in every row.
    """
    num_dropped = num_dropped_tokens(num_tokens, drop_ratio)
    if not 0 < num_dropped < num_tokens:
        raise ValueError(f"drop_ratio={drop_ratio} drops {num_dropped} of {num_tokens} tokens; "
                         f"it must keep at least one and drop at least one (0 < ratio < 1).")
    try:  # concrete ratios can be checked here; traced ones are clamped below
        concrete = np.asarray(mask_ratio, dtype=np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        concrete = None
    if concrete is not None and np.any((concrete < drop_ratio) | (concrete > 1)):
        raise ValueError(f"mask_ratio {concrete} must lie in [drop_ratio={drop_ratio}, 1]: dropped "
                         f"tokens are a subset of masked ones. Raise masking min_ratio.")
    ratio = jnp.asarray(mask_ratio, jnp.float32)
    if ratio.ndim not in (0, 1) or (ratio.ndim == 1 and ratio.shape[0] != batch):
        raise ValueError(f"mask_ratio has shape {ratio.shape}; expected () or ({batch},).")
    num_masked = jnp.ceil(num_tokens * ratio).astype(jnp.int32)
    # Guard (traced ratios): masked must cover dropped, and at most every token.
    num_masked = jnp.clip(num_masked, num_dropped, num_tokens)
    noise = jax.random.uniform(rng, (batch, num_tokens))
    rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)  # 0 = lowest noise
    drop = rank < num_dropped
    masked = rank < jnp.reshape(num_masked, (-1, 1))
    c0 = jnp.zeros((batch, 1), bool)
    return jnp.concatenate([c0, drop], axis=1), jnp.concatenate([c0, masked], axis=1)


def ratio_groups(batch: int, examples_per_ratio: int) -> np.ndarray:
    """Static group id of each example: ``i // examples_per_ratio`` (0: one group)."""
    if examples_per_ratio < 0:
        raise ValueError(f"masking.examples_per_ratio={examples_per_ratio} must be >= 0: 64 "
                         f"(official: one ratio per GPU of 64), 1 (per example) or 0 (per step).")
    if examples_per_ratio == 0:
        return np.zeros(batch, np.int32)
    return (np.arange(batch) // examples_per_ratio).astype(np.int32)


def sample_step_masks(rng: jax.Array, batch: int, num_tokens: int, *, min_ratio: float = 0.5,
                      max_ratio: float = 1.0, mean: float = 0.55, std: float = 0.25,
                      drop_ratio: float = 0.5, examples_per_ratio: int = 64):
    """One training step's masking: ``(token_drop_mask, token_all_mask, mask_ratio)``, the
    ratio ``(batch,)``, shared by each group of ``examples_per_ratio`` examples."""
    if min_ratio < drop_ratio:
        raise ValueError(f"masking min_ratio={min_ratio} is below drop_ratio={drop_ratio}: "
                         f"every dropped token must also be masked; set min_ratio >= drop_ratio.")
    groups = ratio_groups(batch, examples_per_ratio)
    ratio_rng, mask_rng = jax.random.split(rng)
    group_ratio = sample_mask_ratio(ratio_rng, min_ratio, max_ratio, mean, std,
                                    (int(groups[-1]) + 1,))
    ratio = group_ratio[groups]
    drop, masked = sample_masks(mask_rng, batch, num_tokens, ratio, drop_ratio)
    return drop, masked, ratio
