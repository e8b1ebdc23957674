"""Mixup/CutMix in timm's 'batch' mode: what the pixels say against what the targets say,
the switch and lambda distributions, label smoothing and the soft cross-entropy."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mage_jax.finetune import mixup

B, H, W, C, K = 4, 16, 12, 3, 10


def _batch(seed=0):
    images = jax.random.uniform(jax.random.key(100 + seed), (B, H, W, C))
    return images, jnp.array([1, 4, 7, 9])


def test_jitted_equals_eager_and_targets_sum_to_one():
    images, labels = _batch()
    fn = functools.partial(mixup.mixup_cutmix, num_classes=K)
    for seed in range(4):
        eager = fn(jax.random.key(seed), images, labels)
        jitted = jax.jit(fn)(jax.random.key(seed), images, labels)
        np.testing.assert_allclose(jitted[0], eager[0], atol=1e-6)
        np.testing.assert_allclose(jitted[1], eager[1], atol=1e-6)
        np.testing.assert_allclose(eager[1].sum(-1), 1.0, atol=1e-6)
        assert eager[0].shape == images.shape and eager[0].dtype == images.dtype


def test_cutmix_box_comes_from_the_flipped_batch_and_weighs_its_area():
    images, labels = _batch(1)
    for seed in range(8):
        out, targets = mixup.mixup_cutmix(jax.random.key(seed), images, labels, K,
                                          mixup_alpha=0.0, label_smoothing=0.0)
        from_flip = np.all(np.asarray(out) == np.asarray(images[::-1]), axis=-1)
        from_own = np.all(np.asarray(out) == np.asarray(images), axis=-1)
        np.testing.assert_array_equal(from_flip[0] | from_own[0], True)
        np.testing.assert_array_equal(from_flip[0], from_flip[B - 1])  # One box per batch.
        box = from_flip[0]
        if box.any():
            rows, cols = np.nonzero(box)
            assert box.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        area = box.mean()
        for i in range(B):
            np.testing.assert_allclose(targets[i, labels[i]], 1.0 - area, atol=1e-6)
            np.testing.assert_allclose(targets[i, labels[B - 1 - i]], area, atol=1e-6)


def test_mixup_lambda_from_the_pixels_is_the_target_weight():
    images, labels = _batch(2)
    flipped = images[::-1]
    for seed in range(8):
        out, targets = mixup.mixup_cutmix(jax.random.key(seed), images, labels, K,
                                          cutmix_alpha=0.0, label_smoothing=0.0)
        # out = lam * x + (1 - lam) * flipped: least squares for lam over every pixel.
        d = np.asarray(images - flipped).ravel()
        lam = float(np.dot(np.asarray(out - flipped).ravel(), d) / np.dot(d, d))
        np.testing.assert_allclose(out, lam * images + (1 - lam) * flipped, atol=1e-5)
        np.testing.assert_allclose(targets[0, labels[0]], lam, atol=1e-5)
        np.testing.assert_allclose(targets[0, labels[-1]], 1 - lam, atol=1e-5)


def test_switch_probability_and_mixup_lambda_distribution():
    """Two images 0 and 1: CutMix leaves only 0s and 1s, Mixup gives lam everywhere."""
    own = jnp.zeros((2, 8, 8, 1)).at[1].set(1.0)
    keys = jax.random.split(jax.random.key(0), 400)
    outs, _ = jax.vmap(lambda k: mixup.mixup_cutmix(k, own, jnp.array([0, 1]), 2))(keys)
    first = np.asarray(outs[:, 0, :, :, 0]).reshape(len(keys), -1)
    is_cut = np.all((first == 0) | (first == 1), axis=1)
    assert 0.4 < is_cut.mean() < 0.6  # switch_prob 0.5.
    lam = 1.0 - first[~is_cut, 0]  # Image 0's own content weight: 1 - pixel value.
    # Beta(0.8, 0.8): mean 0.5, std sqrt(0.64 / (2.56 * 2.6)) = 0.31.
    assert abs(lam.mean() - 0.5) < 0.06 and 0.26 < lam.std() < 0.36


def test_prob_zero_and_no_alphas_give_smoothed_labels_only():
    images, labels = _batch(3)
    out, targets = mixup.mixup_cutmix(jax.random.key(0), images, labels, K, prob=0.0)
    np.testing.assert_array_equal(out, images)
    expected = np.full((B, K), 0.01)
    expected[np.arange(B), np.asarray(labels)] = 0.91  # on = 1 - 0.1 + 0.1 / 10.
    np.testing.assert_allclose(targets, expected, rtol=1e-6)
    out, targets = mixup.mixup_cutmix(jax.random.key(0), images, labels, K,
                                      mixup_alpha=0.0, cutmix_alpha=0.0)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_allclose(targets, expected, rtol=1e-6)


def test_soft_cross_entropy_by_hand():
    logits = jnp.array([[0.0, np.log(3.0)], [2.0, 2.0]])
    targets = jnp.array([[1.0, 0.0], [0.25, 0.75]])
    # Row 0: -log(1/4); row 1: -log(1/2).
    expected = (np.log(4.0) + np.log(2.0)) / 2
    np.testing.assert_allclose(mixup.soft_cross_entropy(logits, targets), expected, rtol=1e-6)
