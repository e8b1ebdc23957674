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


# ----------------------------------------------------------------- encoded (jpeg_draft)

def _smooth_jpeg(height, width, seed=0):
    """A smooth photo-like JPEG (a small random field enlarged), and its full decode."""
    import io
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (height // 64 + 2, width // 64 + 2, 3),
                                         dtype=np.uint8))
    buf = io.BytesIO()
    small.resize((width, height), Image.BICUBIC).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_draft_scale():
    assert augment.draft_scale(300, 400, 256) == 1     # under twice the size: full decode
    assert augment.draft_scale(600, 520, 256) == 2
    assert augment.draft_scale(1100, 1030, 256) == 4   # 1030 // 256 = 4
    assert augment.draft_scale(5000, 4000, 256) == 8   # libjpeg's smallest scale
    assert augment.draft_scale(100, 3000, 256) == 1    # the short side decides


def test_encoded_crop_without_reduction_is_the_decoded_crop():
    """Where the crop is under twice the output size the encoded path decodes in full and
    gives random_resized_crop's pixels and draws: same output, same generator state after."""
    data = _smooth_jpeg(375, 500)
    decoded = augment.decode(data)
    for seed in range(5):
        rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
        want = augment.random_resized_crop(decoded, rng_a, 256, scale=(0.2, 1.0))
        got = augment.random_resized_crop_encoded(data, rng_b, 256, scale=(0.2, 1.0))
        np.testing.assert_array_equal(got, want)
        assert rng_a.uniform() == rng_b.uniform()


@pytest.mark.parametrize("crop_scale, factor", [((0.9, 1.0), 4), ((0.25, 0.3), 2)])
def test_encoded_crop_decodes_large_jpegs_at_reduced_size(crop_scale, factor):
    """A 1600 x 1200 JPEG: the crop is drawn from the header, the JPEG decoded at 1/factor
    and the same region resampled. Against a full decode of the same crop: a few grey levels
    apart, where a box off by a few reduced pixels (or the wrong scale) is not."""
    data = _smooth_jpeg(1200, 1600, seed=factor)
    decoded = augment.decode(data)
    top, left, h, w = augment.crop_params(1200, 1600, np.random.default_rng(3), crop_scale)
    assert augment.draft_scale(h, w, 256) == factor
    want = augment.random_resized_crop(decoded, np.random.default_rng(3), 256, scale=crop_scale)
    got = augment.random_resized_crop_encoded(data, np.random.default_rng(3), 256,
                                              scale=crop_scale)
    assert got.shape == want.shape == (256, 256, 3) and got.dtype == np.float32
    error = np.abs(got - want)
    assert error.mean() < 1.5 / 255 and np.percentile(error, 99) < 8 / 255
    shifted = augment.random_resized_crop(np.roll(decoded, 3 * factor, axis=1),
                                          np.random.default_rng(3), 256, scale=crop_scale)
    assert np.abs(shifted - want).mean() > 2 * error.mean()


def test_decode_grey_and_png():
    """decode keeps grey images 1-channel as the sources do; a PNG crop is never reduced."""
    import io
    grey = _pattern(40, 30, 1)[..., 0]
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")
    np.testing.assert_array_equal(augment.decode(buf.getvalue()), grey[..., None])
    got = augment.random_resized_crop_encoded(buf.getvalue(), np.random.default_rng(0), 16)
    want = augment.random_resized_crop(grey[..., None], np.random.default_rng(0), 16)
    np.testing.assert_array_equal(got, want)
