"""MAGE's variable masking: ratio distribution, exact counts, drop within mask."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from mage_jax.masking import ratio_groups, sample_mask_ratio, sample_masks, sample_step_masks


def _check_masks(drop, masked, num_tokens, num_masked):
    drop, masked = np.asarray(drop), np.asarray(masked)
    assert drop.dtype == bool and masked.dtype == bool
    assert drop.shape == masked.shape == (len(num_masked), num_tokens + 1)
    assert not drop[:, 0].any() and not masked[:, 0].any()  # [C0] is never masked
    assert np.all(drop.sum(axis=1) == int(np.ceil(num_tokens * 0.5)))
    np.testing.assert_array_equal(masked.sum(axis=1), num_masked)
    assert not np.any(drop & ~masked)  # dropped is a subset of masked


@pytest.mark.parametrize("num_tokens,ratio", [(16, 0.5), (16, 0.55), (15, 0.8), (256, 1.0)])
def test_exact_counts_for_one_ratio(num_tokens, ratio):
    drop, masked = sample_masks(jax.random.key(0), 6, num_tokens, ratio)
    _check_masks(drop, masked, num_tokens, [int(np.ceil(num_tokens * ratio))] * 6)
    # One random ranking per example: rows differ from each other.
    assert len({tuple(row) for row in np.asarray(drop)}) > 1


def test_per_example_ratio_and_nested_sets():
    ratios = jnp.array([0.5, 0.6, 0.9, 1.0])
    key = jax.random.key(1)
    drop, masked = sample_masks(key, 4, 20, ratios)
    _check_masks(drop, masked, 20, [10, 12, 18, 20])
    # Same key, larger ratio: the same ranking, so the masked set only grows.
    _, more = sample_masks(key, 4, 20, 0.95)
    assert not np.any(np.asarray(masked[:3]) & ~np.asarray(more[:3]))


def test_traced_ratio_under_jit():
    fn = jax.jit(lambda k, r: sample_masks(k, 3, 16, r))
    for r in (0.5, 0.61, 0.99):
        drop, masked = fn(jax.random.key(2), jnp.float32(r))
        _check_masks(drop, masked, 16, [int(np.ceil(16 * r))] * 3)
    # A traced ratio below the drop ratio is clamped: masked still covers dropped.
    drop, masked = fn(jax.random.key(2), jnp.float32(0.1))
    _check_masks(drop, masked, 16, [8] * 3)


def test_concrete_ratio_below_drop_ratio_is_rejected():
    with pytest.raises(ValueError, match="mask_ratio"):
        sample_masks(jax.random.key(0), 2, 16, 0.3)
    with pytest.raises(ValueError, match="min_ratio"):
        sample_step_masks(jax.random.key(0), 2, 16, min_ratio=0.4)


def test_determinism():
    a = sample_step_masks(jax.random.key(3), 4, 16)
    b = sample_step_masks(jax.random.key(3), 4, 16)
    c = sample_step_masks(jax.random.key(4), 4, 16)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[1], c[1])


def test_ratio_distribution_matches_the_truncated_normal():
    lo, hi, mu, sd = 0.5, 1.0, 0.55, 0.25
    ratios = np.asarray(sample_mask_ratio(jax.random.key(5), lo, hi, mu, sd, shape=(40000,)))
    assert ratios.min() >= lo and ratios.max() <= hi
    ref = stats.truncnorm((lo - mu) / sd, (hi - mu) / sd, loc=mu, scale=sd)
    # Standard error of the mean is ~0.0007 here; 0.004 is > 5 sigma.
    assert abs(ratios.mean() - ref.mean()) < 0.004
    assert abs(ratios.std() - ref.std()) < 0.004
    assert abs(np.median(ratios) - ref.median()) < 0.006
    assert np.asarray(sample_mask_ratio(jax.random.key(6))).shape == ()


def test_step_masks_one_ratio_per_group_of_examples():
    # Official: one ratio per GPU of 64 examples. 130 examples: groups 0..63, 64..127, 128..129.
    drop, masked, ratio = sample_step_masks(jax.random.key(7), 130, 16)
    ratio = np.asarray(ratio)
    assert ratio.shape == (130,)
    for group in (slice(0, 64), slice(64, 128), slice(128, 130)):
        assert len(set(ratio[group].tolist())) == 1
    assert len({ratio[0], ratio[64], ratio[128]}) == 3
    _check_masks(drop, masked, 16, np.ceil(16 * ratio.astype(np.float32)).astype(int))
    # The group's ratios are drawn from the step's key as one vector: the same for any batch
    # split, so a larger batch extends rather than redraws them.
    _, _, more = sample_step_masks(jax.random.key(7), 130, 16, examples_per_ratio=64)
    np.testing.assert_array_equal(np.asarray(more), ratio)


@pytest.mark.parametrize("examples_per_ratio, distinct", [(1, 5), (0, 1), (2, 3)])
def test_step_masks_per_example_and_per_step(examples_per_ratio, distinct):
    drop, masked, ratios = jax.jit(lambda k: sample_step_masks(
        k, 5, 16, examples_per_ratio=examples_per_ratio))(jax.random.key(8))
    assert ratios.shape == (5,) and len(set(np.asarray(ratios).tolist())) == distinct
    _check_masks(drop, masked, 16, np.ceil(16 * np.asarray(ratios, np.float32)).astype(int))


def test_ratio_groups():
    np.testing.assert_array_equal(ratio_groups(5, 2), [0, 0, 1, 1, 2])
    np.testing.assert_array_equal(ratio_groups(3, 0), [0, 0, 0])
    with pytest.raises(ValueError, match="examples_per_ratio=-1"):
        ratio_groups(3, -1)
