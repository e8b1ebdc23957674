"""RandAugment and random erasing of MAGE's fine-tuning views, per example, numpy + PIL.

The official fine-tuning (github.com/LTH14/mage ``main_finetune.py`` with ``util/datasets.py``,
i.e. MAE's) builds its training view with timm 0.3.2's ``create_transform(is_training=True,
scale=(0.2, 1.0), auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic',
re_prob=0.25, re_mode='pixel', re_count=1)`` and the ImageNet mean/std: a bicubic
RandomResizedCrop and a flip (``augment.py``), then ``rand_augment`` below on the 8-bit
image, then Normalize and ``random_erasing``. MAGE's README passes ``--reprob 0``: random
erasing is off in the published runs, but its default (0.25) is kept here as the recipe's.

``rand_augment`` is timm's 'rand-m9-mstd0.5-inc1': ``num_ops`` ops drawn uniformly with
replacement from the 15 'increasing' ops, each applied with probability 0.5 at a magnitude
drawn from N(magnitude, magnitude_std) clipped to [0, 10]; signed ops (rotate, shear,
translate, the enhancements) flip their sign with probability 0.5. The arguments at level
``m / 10`` are timm's: rotate 30 m deg, shear 0.3 m, translate 0.45 m of the side, posterize
to 4 - int(4 m) bits, solarize above 256 - int(256 m), solarize-add int(110 m) below 128,
enhancement factor 1 +- 0.9 m. Geometric ops resample bicubic (the recipe's interpolation)
and fill with the ImageNet mean in 8 bits, (124, 116, 104): ``create_transform`` passes that
as ``img_mean``, so timm's (128, 128, 128) default never applies in this recipe.

Departures from timm, and why:
* Randomness comes from the example's ``np.random.Generator`` (grain's ``random_map``), not
  the global ``random``/``np.random`` state, so a view depends only on (seed, position); the
  draws are the same in kind and order but not the same numbers as timm's.
* Images are float32 HWC in [0, 1] (the project's convention). They are rounded to 8 bits
  for PIL, which is exact for views made by ``augment.py`` (their values are k / 255).
* ``random_erasing`` works in pixel space, not on the normalised tensor: timm fills the box
  with N(0, 1) per pixel after Normalize, and MAGE's step denormalises (x * std + mean)
  before its tokenizer, so the noise the tokenizer sees is N(mean_c, std_c) per channel. We
  draw that directly and clip it to [0, 1] (our tokenizer inputs' range; about 3% of the
  noise values are clipped, MAGE passes them through unclipped).
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from mage_jax.data.augment import _to_pil, to_float_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's aa_params img_mean: min(255, round(255 * mean)) per channel.
FILL = tuple(min(255, round(255 * m)) for m in IMAGENET_MEAN)
_MAX_LEVEL = 10.0  # timm's magnitude scale: M10 is the strongest setting.


def _signed(value: float, rng: np.random.Generator) -> float:
    return -value if rng.uniform() < 0.5 else value


def _affine(img, matrix, fill):
    # The matrix maps output to input coordinates, as timm's (PIL's AFFINE convention).
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BICUBIC, fillcolor=fill)


def _enhance(enhancer):
    def op(img, m, rng, fill):
        # 1.0 leaves the image unchanged; the blend moves away from it towards 0.1 or 1.9.
        return enhancer(img).enhance(max(0.1, 1.0 + _signed(0.9 * m, rng)))
    return op


def _posterize(img, bits):
    # A LUT, not ImageOps.posterize: recent Pillow (13 here) refuses bits=0, which M10 asks
    # for (a black image); M10 comes up whenever the magnitude noise is clipped, ~2% at M9.
    mask = (0xFF << (8 - bits)) & 0xFF
    return img.point([v & mask for v in range(256)] * len(img.getbands()))


def _solarize_add(img, m, rng, fill):
    add = int(110 * m)
    lut = [min(255, v + add) if v < 128 else v for v in range(256)]
    return img.point(lut * len(img.getbands()))


def _translate(axis):
    def op(img, m, rng, fill):
        pixels = _signed(0.45 * m, rng) * img.size[axis]
        return _affine(img, (1, 0, pixels, 0, 1, 0) if axis == 0 else (1, 0, 0, 0, 1, pixels),
                       fill)
    return op


# timm's _RAND_INCREASING_TRANSFORMS ('inc1'), in its order; each op(img, m, rng, fill) with
# m = magnitude / 10 in [0, 1].
OPS = {
    "AutoContrast": lambda img, m, rng, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng, fill: ImageOps.equalize(img),
    "Invert": lambda img, m, rng, fill: ImageOps.invert(img),
    "Rotate": lambda img, m, rng, fill: img.rotate(_signed(30 * m, rng),
                                                   resample=Image.BICUBIC, fillcolor=fill),
    "PosterizeIncreasing": lambda img, m, rng, fill: _posterize(img, 4 - int(4 * m)),
    "SolarizeIncreasing": lambda img, m, rng, fill: ImageOps.solarize(img, 256 - int(256 * m)),
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, m, rng, fill: _affine(img, (1, _signed(0.3 * m, rng), 0, 0, 1, 0),
                                                fill),
    "ShearY": lambda img, m, rng, fill: _affine(img, (1, 0, 0, _signed(0.3 * m, rng), 1, 0),
                                                fill),
    "TranslateXRel": _translate(0),
    "TranslateYRel": _translate(1),
}
OP_NAMES = tuple(OPS)


def _to_uint8_pil(image: np.ndarray) -> Image.Image:
    image = np.asarray(image, np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)  # The fill colour is RGB: work in RGB throughout.
    return _to_pil((np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8))


def apply_op(image: np.ndarray, name: str, magnitude: float, rng: np.random.Generator,
             fill=FILL) -> np.ndarray:
    """One op at a fixed magnitude (0..10), always applied; float32 HWC RGB in [0, 1]."""
    level = min(max(float(magnitude), 0.0), _MAX_LEVEL) / _MAX_LEVEL
    return to_float_rgb(OPS[name](_to_uint8_pil(image), level, rng, tuple(fill)))


def rand_augment(image: np.ndarray, rng: np.random.Generator, num_ops: int = 2,
                 magnitude: float = 9, magnitude_std: float = 0.5, increasing: bool = True,
                 prob: float = 0.5, fill=FILL) -> np.ndarray:
    """timm's RandAugment 'rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1'.

    ``image``: float32 HWC in [0, 1] with 1 or 3 channels; returns float32 HWC RGB in [0, 1]
    (the input itself, as float32, when ``num_ops`` is 0). ``magnitude_std=inf`` draws the
    magnitude uniformly in [0, magnitude] as timm does.
    """
    if not increasing:
        raise NotImplementedError("only timm's 'inc1' op set (the fine-tuning recipe's) is "
                                  "implemented; use increasing=True.")
    if num_ops <= 0:
        return np.asarray(image, np.float32)
    img = _to_uint8_pil(image)
    for index in rng.integers(0, len(OP_NAMES), size=num_ops):  # With replacement, as timm.
        if rng.uniform() >= prob:
            continue
        m = magnitude
        if magnitude_std == math.inf:
            m = rng.uniform(0.0, magnitude)
        elif magnitude_std > 0:
            m = rng.normal(magnitude, magnitude_std)
        level = min(max(m, 0.0), _MAX_LEVEL) / _MAX_LEVEL
        img = OPS[OP_NAMES[index]](img, level, rng, tuple(fill))
    return to_float_rgb(img)


def erase_box(height: int, width: int, rng: np.random.Generator, min_area: float = 0.02,
              max_area: float = 1 / 3, min_aspect: float = 0.3):
    """(top, left, h, w) as timm's RandomErasing draws one box, or None after 10 misses."""
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    for _ in range(10):
        target = rng.uniform(min_area, max_area) * height * width
        aspect = math.exp(rng.uniform(*log_aspect))
        h = round(math.sqrt(target * aspect))
        w = round(math.sqrt(target / aspect))
        if w < width and h < height:  # Strictly smaller, as timm.
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return None


def random_erasing(image: np.ndarray, rng: np.random.Generator, probability: float = 0.25,
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD) -> np.ndarray:
    """timm's RandomErasing(probability, mode='pixel', max_count=1) in pixel space.

    With probability ``probability`` one box of area fraction ~ U(min_area, max_area) and
    log aspect ~ U(+-log min_aspect) is filled with per-pixel noise N(mean_c, std_c), the
    pixel-space image of timm's N(0, 1) in the normalised space, clipped to [0, 1]. Returns
    a new float32 HWC array; the pixels outside the box are the input's.
    """
    out = np.array(image, np.float32)
    if rng.uniform() >= probability:
        return out
    box = erase_box(out.shape[0], out.shape[1], rng, min_area, max_area, min_aspect)
    if box is not None:
        top, left, h, w = box
        channels = out.shape[-1]
        noise = rng.normal(size=(h, w, channels)) * np.asarray(std)[:channels] + \
            np.asarray(mean)[:channels]
        out[top:top + h, left:left + w] = np.clip(noise, 0.0, 1.0)
    return out
