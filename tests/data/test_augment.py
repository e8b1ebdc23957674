"""Augmentations: torchvision's RandomResizedCrop sampling, flip, eval crop, colour."""

import numpy as np
import pytest
from PIL import Image

from mage_jax.data import augment


def _pattern(height, width, channels=3):
    """Distinct, known pixel values: v = (7*row + 3*col + 50*channel) mod 256."""
    rows, cols, chans = np.meshgrid(np.arange(height), np.arange(width), np.arange(channels),
                                    indexing="ij")
    return ((7 * rows + 3 * cols + 50 * chans) % 256).astype(np.uint8)


def test_random_resized_crop_shape_dtype_range():
    rng = np.random.default_rng(0)
    for image in (_pattern(40, 30), _pattern(28, 28, 1)):
        out = augment.random_resized_crop(image, rng, 16)
        assert out.shape == (16, 16, 3) and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.1


def test_crop_area_and_ratio_within_bounds():
    rng = np.random.default_rng(1)
    height, width, scale, ratio = 200, 300, (0.2, 0.6), (3 / 4, 4 / 3)
    fractions, ratios = [], []
    for _ in range(300):
        top, left, h, w = augment.crop_params(height, width, rng, scale, ratio)
        assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
        fractions.append(h * w / (height * width))
        ratios.append(w / h)
    # Rounding of h and w to integers moves the area by at most about a pixel row/column.
    assert min(fractions) >= scale[0] - 0.01 and max(fractions) <= scale[1] + 0.01
    assert min(ratios) >= ratio[0] - 0.02 and max(ratios) <= ratio[1] + 0.02
    assert np.std(fractions) > 0.05  # Really random, not one fixed crop.


def test_crop_falls_back_to_a_central_crop():
    # Aspect ratio 10 never fits an area >= half of a square image: all 10 tries fail.
    top, left, h, w = augment.crop_params(50, 50, np.random.default_rng(0), (0.5, 1.0),
                                          (10.0, 10.0))
    assert (top, left, h, w) == ((50 - 5) // 2, 0, 5, 50)


def test_random_resized_crop_is_resize_of_the_sampled_crop():
    image = _pattern(40, 30)
    params = augment.crop_params(40, 30, np.random.default_rng(7), (0.2, 1.0), (3 / 4, 4 / 3))
    out = augment.random_resized_crop(image, np.random.default_rng(7), 12,
                                      interpolation="bicubic")
    top, left, h, w = params
    expected = Image.fromarray(image[top:top + h, left:left + w]).resize((12, 12), Image.BICUBIC)
    np.testing.assert_array_equal(out, np.asarray(expected, np.float32) / 255.0)


def test_horizontal_flip():
    image = augment.to_float_rgb(_pattern(5, 4))
    np.testing.assert_array_equal(augment.horizontal_flip(image, np.random.default_rng(0), 1.0),
                                  image[:, ::-1])
    np.testing.assert_array_equal(augment.horizontal_flip(image, np.random.default_rng(0), 0.0),
                                  image)
    flipped = [augment.horizontal_flip(image, np.random.default_rng(s))[0, 0, 0] != image[0, 0, 0]
               for s in range(200)]
    assert 0.35 < np.mean(flipped) < 0.65


def test_resize_center_crop_known_pixels():
    # Shorter side already int(42 / 0.875) = 48: no resize, only the central 42 x 42 crop.
    image = _pattern(64, 48)
    out = augment.resize_center_crop(image, 42)
    top, left = round((64 - 42) / 2), round((48 - 42) / 2)
    np.testing.assert_array_equal(out, image[top:top + 42, left:left + 42] / np.float32(255))


def test_resize_center_crop_resizes_the_shorter_side():
    image = _pattern(40, 80, 1)  # Landscape, grayscale.
    out = augment.resize_center_crop(image, 14, crop_fraction=0.875)  # short side -> 16
    assert out.shape == (14, 14, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    resized = Image.fromarray(image[..., 0]).resize((32, 16), Image.BICUBIC)
    np.testing.assert_array_equal(out[..., 0], np.asarray(resized)[1:15, 9:23] / np.float32(255))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="interpolation='lanczos3'"):
        augment.random_resized_crop(_pattern(8, 8), np.random.default_rng(0), 4,
                                    interpolation="lanczos3")
    with pytest.raises(TypeError, match="float32"):
        augment.resize_center_crop(np.zeros((8, 8, 3), np.float32), 4)


def test_hsv_round_trip_and_known_values():
    rgb = np.random.default_rng(0).uniform(size=(50, 3)).astype(np.float32)
    np.testing.assert_allclose(augment.hsv_to_rgb(augment.rgb_to_hsv(rgb)), rgb, atol=1e-6)
    np.testing.assert_allclose(augment.rgb_to_hsv(np.array([[1.0, 0, 0], [0, 1.0, 0]])),
                               [[0, 1, 1], [1 / 3, 1, 1]], atol=1e-6)
    np.testing.assert_allclose(augment.hsv_to_rgb(np.array([[2 / 3, 1.0, 0.5]])),
                               [[0, 0, 0.5]], atol=1e-6)


def test_color_jitter():
    image = augment.to_float_rgb(_pattern(6, 6))
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(augment.color_jitter(image, rng, 0, 0, 0, 0), image)
    out = augment.color_jitter(image, rng, 0.4, 0.4, 0.4, 0.1)
    assert out.shape == image.shape and out.dtype == np.float32
    assert 0 <= out.min() and out.max() <= 1 and not np.allclose(out, image)
    gray = augment.grayscale(image)  # Hue and saturation leave a gray image unchanged.
    np.testing.assert_allclose(augment.color_jitter(gray, rng, 0, 0, 0.4, 0.5), gray, atol=1e-6)
    # Brightness alone scales by one factor in [0.6, 1.4] (then clips).
    dark = image * 0.5
    factor = augment.color_jitter(dark, rng, 0.4, 0, 0, 0) / np.maximum(dark, 1e-6)
    mask = dark > 0.05
    assert np.ptp(factor[mask]) < 1e-5 and 0.6 <= factor[mask].mean() <= 1.4


def test_grayscale_and_contrastive_color():
    red = np.zeros((2, 2, 3), np.float32)
    red[..., 0] = 1.0
    np.testing.assert_allclose(augment.grayscale(red), np.full((2, 2, 3), 0.299), atol=1e-6)
    image = augment.to_float_rgb(_pattern(6, 6))
    out = augment.contrastive_color(image, np.random.default_rng(0), jitter_prob=0.0,
                                    grayscale_prob=1.0)
    np.testing.assert_allclose(out, augment.grayscale(image), atol=1e-6)
    same = augment.contrastive_color(image, np.random.default_rng(0), jitter_prob=0.0,
                                     grayscale_prob=0.0)
    np.testing.assert_array_equal(same, image)
