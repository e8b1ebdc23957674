"""RandAugment ('rand-m9-mstd0.5-inc1') ops against hand-computed results, its sampling, and
random erasing's box and noise."""
import numpy as np
import pytest

from mage_jax.data import randaugment as ra


def _pattern(height=12, width=20):
    """Distinct 8-bit values as float: v = (37*row + 11*col + 80*channel) mod 256, / 255."""
    rows, cols, chans = np.meshgrid(np.arange(height), np.arange(width), np.arange(3),
                                    indexing="ij")
    return (((37 * rows + 11 * cols + 80 * chans) % 256) / 255.0).astype(np.float32)


def _u8(image):
    return np.round(image * 255).astype(np.int32)


def _op(image, name, magnitude, seed=0):
    return ra.apply_op(image, name, magnitude, np.random.default_rng(seed))


def test_invert_is_one_minus_x():
    x = _pattern()
    np.testing.assert_allclose(_op(x, "Invert", 9), 1.0 - x, atol=1e-6)


@pytest.mark.parametrize("magnitude,bits", [(0, 4), (5, 2), (9, 1), (10, 0)])
def test_posterize_keeps_4_down_to_0_bits(magnitude, bits):
    x = _pattern()
    mask = (0xFF << (8 - bits)) & 0xFF
    np.testing.assert_array_equal(_u8(_op(x, "PosterizeIncreasing", magnitude)), _u8(x) & mask)


@pytest.mark.parametrize("magnitude,threshold", [(0, 256), (5, 128), (9, 26)])
def test_solarize_inverts_at_or_above_the_threshold(magnitude, threshold):
    v = _u8(_pattern())
    expected = np.where(v >= threshold, 255 - v, v)
    np.testing.assert_array_equal(_u8(_op(_pattern(), "SolarizeIncreasing", magnitude)), expected)


def test_solarize_add_adds_below_128():
    v = _u8(_pattern())
    expected = np.where(v < 128, np.minimum(255, v + 99), v)  # int(110 * 0.9) = 99.
    np.testing.assert_array_equal(_u8(_op(_pattern(), "SolarizeAdd", 9)), expected)


def test_translate_shifts_by_045_of_the_side_and_fills_with_the_imagenet_mean():
    x = _pattern(12, 20)  # At M10 the shift is 0.45 * 20 = 9 columns, one way or the other.
    fill = np.asarray(ra.FILL) / 255.0
    outs = {seed: _op(x, "TranslateXRel", 10, seed) for seed in range(8)}
    directions = set()
    for out in outs.values():
        if np.allclose(out[:, :11], x[:, 9:], atol=1e-6):  # Content moved left.
            np.testing.assert_allclose(out[:, 11:], np.broadcast_to(fill, (12, 9, 3)), atol=1e-6)
            directions.add("left")
        else:
            np.testing.assert_allclose(out[:, 9:], x[:, :11], atol=1e-6)
            np.testing.assert_allclose(out[:, :9], np.broadcast_to(fill, (12, 9, 3)), atol=1e-6)
            directions.add("right")
    assert directions == {"left", "right"}  # The sign is random.
    assert ra.FILL == (124, 116, 104)


def test_rotate_keeps_the_centre_and_fills_the_corners():
    x = np.ones((21, 21, 3), np.float32)
    out = _op(x, "Rotate", 10)  # 30 degrees: the corners come from outside the image.
    np.testing.assert_allclose(out[10, 10], 1.0, atol=1e-6)
    for corner in (out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]):
        np.testing.assert_allclose(corner, np.asarray(ra.FILL) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(_op(_pattern(), "Rotate", 0), _pattern())  # 0 degrees.


def test_brightness_scales_by_01_or_19_at_m10():
    v = _u8(_pattern()).astype(np.float64)
    seen = set()
    for seed in range(8):
        out = _u8(_op(_pattern(), "BrightnessIncreasing", 10, seed))
        if np.abs(out - v * 0.1).max() <= 1:
            seen.add(0.1)
        else:
            assert np.abs(out - np.minimum(255, v * 1.9)).max() <= 1
            seen.add(1.9)
    assert seen == {0.1, 1.9}


def test_autocontrast_stretches_each_channel_to_the_full_range():
    x = 0.2 + 0.3 * _pattern()
    out = _op(x, "AutoContrast", 9)
    np.testing.assert_array_equal(out.min((0, 1)), 0.0)
    np.testing.assert_array_equal(out.max((0, 1)), 1.0)


@pytest.mark.parametrize("name", ra.OP_NAMES)
def test_every_op_keeps_shape_dtype_and_range(name):
    out = _op(_pattern(12, 20), name, 9.7)
    assert out.shape == (12, 20, 3) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_op_set_is_timms_inc1():
    assert len(ra.OP_NAMES) == 15 and "PosterizeIncreasing" in ra.OP_NAMES
    assert "Posterize" not in ra.OP_NAMES and "Cutout" not in ra.OP_NAMES


def test_rand_augment_is_deterministic_per_seed_and_identity_at_zero_ops():
    x = _pattern()
    a = ra.rand_augment(x, np.random.default_rng(3))
    b = ra.rand_augment(x, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a.shape == x.shape and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    outs = [ra.rand_augment(x, np.random.default_rng(s)) for s in range(10)]
    assert len({o.tobytes() for o in outs}) > 3
    np.testing.assert_array_equal(ra.rand_augment(x, np.random.default_rng(0), num_ops=0), x)
    gray = ra.rand_augment(x[..., :1], np.random.default_rng(1))
    assert gray.shape == (12, 20, 3)


def test_rand_augment_sampling(monkeypatch):
    """Ops uniform with replacement, each applied with p = 0.5, magnitude ~ N(9, 0.5)."""
    calls = []
    for name in ra.OP_NAMES:
        monkeypatch.setitem(ra.OPS, name,
                            lambda img, m, rng, fill, name=name: calls.append((name, m)) or img)
    for seed in range(1000):
        ra.rand_augment(_pattern(4, 4), np.random.default_rng(seed))
    assert 850 < len(calls) < 1150  # 2000 draws * 0.5.
    names, levels = zip(*calls)
    counts = np.array([names.count(n) for n in ra.OP_NAMES])
    assert counts.min() > 35 and counts.max() < 100  # About 67 each.
    levels = np.array(levels)
    assert levels.max() <= 1.0 and abs(levels.mean() - 0.9) < 0.01
    assert 0.04 < levels.std() < 0.055  # 0.05 (clipping at 10 trims a little).
    calls.clear()
    ra.rand_augment(_pattern(4, 4), np.random.default_rng(0), num_ops=3, magnitude=4,
                    magnitude_std=0, prob=1.0)
    assert [m for _, m in calls] == [0.4] * 3


def test_erase_box_area_and_aspect():
    rng = np.random.default_rng(0)
    fractions, aspects = [], []
    for _ in range(2000):
        top, left, h, w = ra.erase_box(64, 48, rng)
        assert 0 <= top and top + h <= 64 and 0 <= left and left + w <= 48
        fractions.append(h * w / (64 * 48))
        aspects.append(h / w)
    assert 0.015 < min(fractions) < 0.03 and 0.3 < max(fractions) < 0.36
    assert min(aspects) > 0.25 and max(aspects) < 3.6


def test_random_erasing_fills_one_box_and_leaves_the_rest():
    x = np.full((40, 32, 3), 0.123, np.float32)
    for seed in range(50):
        out = ra.random_erasing(x, np.random.default_rng(seed), probability=1.0)
        changed = np.any(out != x, axis=-1)
        rows, cols = np.nonzero(changed)
        assert changed.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)  # A full rectangle.
        assert 0.015 < changed.mean() < 0.36
        assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
    big = ra.random_erasing(np.zeros((400, 400, 3), np.float32), np.random.default_rng(1),
                            probability=1.0, min_area=0.3, max_area=0.3)
    noise = big[np.any(big != 0, axis=-1)]  # Clipping at 0 biases the means up slightly.
    np.testing.assert_allclose(noise.mean(0), ra.IMAGENET_MEAN, atol=0.02)
    np.testing.assert_allclose(noise.std(0), ra.IMAGENET_STD, atol=0.03)


def test_random_erasing_probability():
    x = _pattern()
    np.testing.assert_array_equal(ra.random_erasing(x, np.random.default_rng(0), 0.0), x)
    hits = sum(np.any(ra.random_erasing(x, np.random.default_rng(s)) != x) for s in range(400))
    assert 70 < hits < 130  # p = 0.25.


def test_the_training_view_applies_rand_augment_only_when_configured():
    """pipeline.TrainAugment: the same (seed, example) gives the plain crop + flip with
    rand_augment_ops=0, and a different, deterministic view with it on."""
    from mage_jax.config_defaults import data_config
    from mage_jax.data import pipeline
    cfg = data_config("fashion_mnist", image_size=16)
    image = (np.arange(20 * 20 * 3) % 251).reshape(20, 20, 3).astype(np.uint8)
    plain = pipeline.TrainAugment.from_config(cfg)
    cfg.update(rand_augment_ops=2, rand_augment_magnitude=9.0, rand_augment_std=0.5)
    augmented = pipeline.TrainAugment.from_config(cfg)
    assert plain.rand_augment_ops == 0 and augmented.rand_augment_ops == 2
    views = [augmented.view(image, np.random.default_rng(s), contrastive=False)
             for s in (3, 3)]
    np.testing.assert_array_equal(views[0], views[1])
    changed = [not np.array_equal(
        plain.view(image, np.random.default_rng(s), contrastive=False),
        augmented.view(image, np.random.default_rng(s), contrastive=False)) for s in range(8)]
    assert any(changed)
