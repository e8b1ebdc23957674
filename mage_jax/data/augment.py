"""MAGE's image augmentations, per example, in numpy + PIL (they run in grain's threads).

Every random choice is drawn from the ``np.random.Generator`` that grain's ``random_map``
hands to each example, so an example's augmentation depends only on (seed, its position in
the stream): the whole input pipeline is reproducible and resumable.

Inputs are uint8 HWC images with 1 or 3 channels (Fashion-MNIST is 1-channel); outputs are
always float32 HWC RGB in [0, 1], the range the official code feeds to the VQGAN tokenizer.

What the official code does (github.com/LTH14/mage, mirrored read-only):
* pretraining (main_pretrain.py): torchvision ``RandomResizedCrop(size, scale=(0.2, 1.0))``
  with torchvision's default BILINEAR resize, then ``RandomHorizontalFlip()``.
* linear probing (main_linprobe.py): the same crop with BICUBIC resize for training; for
  evaluation ``Resize(292, bicubic)`` of the shorter side, then ``CenterCrop(256)``, i.e. the
  usual crop fraction 0.875 (292 = int(256 / 0.875)).
* MAGE-C's contrastive views are not in that repository; we use the MoCo-v2/SimCLR colour
  augmentation (colour jitter with probability 0.8, grayscale with probability 0.2).
Resizing uses PIL exactly as torchvision does on PIL images (PIL antialiases when it shrinks).
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
# ITU-R 601-2 luma, the weights of PIL's convert('L') and torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# ----------------------------------------------------------------------------- helpers

def _to_pil(image: np.ndarray) -> Image.Image:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image as the sources yield, got dtype {image.dtype}; "
                        "convert with (x * 255).round().astype(np.uint8) first.")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an HWC image with 1 or 3 channels, got shape {image.shape}.")
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def _resample(interpolation: str) -> int:
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation={interpolation!r}; use one of {sorted(_RESAMPLE)}.")
    return _RESAMPLE[interpolation]


def to_float_rgb(image) -> np.ndarray:
    """A uint8 PIL image or HWC array (1 or 3 channels) -> float32 HWC RGB in [0, 1]."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[-1] == 1:  # Grayscale -> RGB by repeating: what PIL's convert('RGB') does.
        array = np.repeat(array, 3, axis=-1)
    return array


# ----------------------------------------------------------------------------- geometry

def crop_params(height: int, width: int, rng: np.random.Generator,
                scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, crop_height, crop_width) drawn as torchvision's RandomResizedCrop draws them.

    Up to 10 tries of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); if none
    fits in the image, a central crop with the aspect ratio clamped into ``ratio``.
    """
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], "
                         f"got scale={tuple(scale)}, ratio={tuple(ratio)}.")
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                        interpolation: str = "bilinear") -> np.ndarray:
    """A random crop (see ``crop_params``) resized to ``size x size``; float32 RGB in [0, 1].

    MAGE pretraining uses bilinear (torchvision's default); its linear probing uses bicubic.
    """
    pil = _to_pil(image)
    top, left, h, w = crop_params(pil.height, pil.width, rng, scale, ratio)
    crop = pil.crop((left, top, left + w, top + h)).resize((size, size), _resample(interpolation))
    return to_float_rgb(crop)


# ----------------------------------------------------------------------------- encoded images

def l_or_rgb(image: Image.Image) -> Image.Image:
    """Grey images stay 1-channel ('L'); palette, RGBA, CMYK and the rest become RGB."""
    return image.convert("L") if image.mode in ("L", "1", "I;16", "I") else image.convert("RGB")


def decode(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 (H, W, 1) or (H, W, 3), as the decoded sources yield."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(l_or_rgb(image), dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def draft_scale(crop_height: int, crop_width: int, size: int) -> int:
    """The largest of 1, 2, 4, 8 by which a crop can shrink and still span ``size`` pixels on
    both sides: libjpeg can decode at 1/2, 1/4 or 1/8 scale (DCT scaling, PIL's draft mode),
    and a crop that large is shrunk to ``size`` anyway, so decoding it at that scale costs up
    to 64 times fewer pixels without enlarging anything."""
    fits = min(crop_height, crop_width) // size
    return max(s for s in (1, 2, 4, 8) if s <= max(fits, 1))


def random_resized_crop_encoded(data: bytes, rng: np.random.Generator, size: int,
                                scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
                                interpolation: str = "bilinear") -> np.ndarray:
    """``random_resized_crop`` of an encoded image, decoding a JPEG at reduced size where the
    crop allows it (``draft_scale``).

    The crop is drawn from the header's size before any pixel is decoded, with the same
    draws as ``random_resized_crop``: where no reduction applies (a crop under twice
    ``size`` on a side, or not a JPEG) the output is that function's, pixel for pixel; where
    one does, the crop box is mapped into the reduced image exactly (PIL resamples a
    fractional box) and the pixels differ from a full decode's by libjpeg's scaling filter.
    """
    resample = _resample(interpolation)
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        top, left, h, w = crop_params(height, width, rng, scale, ratio)
        factor = draft_scale(h, w, size)
        reduced = image.draft(None, (width // factor, height // factor)) if factor > 1 else None
        pixels = l_or_rgb(image)  # decodes, at the reduced size where draft applied
    shrink = width / reduced[1][2] if reduced else 1.0
    if shrink == 1.0:
        view = pixels.crop((left, top, left + w, top + h)).resize((size, size), resample)
    else:
        box = (left / shrink, top / shrink, (left + w) / shrink, (top + h) / shrink)
        view = pixels.resize((size, size), resample, box=box)
    return to_float_rgb(view)


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Mirrors left-right with probability ``p`` (one draw from ``rng`` either way)."""
    return image[:, ::-1] if rng.uniform() < p else image


def resize_center_crop(image: np.ndarray, size: int, crop_fraction: float = 0.875,
                       interpolation: str = "bicubic") -> np.ndarray:
    """Evaluation view: shorter side -> int(size / crop_fraction), then a central size x size.

    At size 256 this is MAGE's ``Resize(292, bicubic)`` + ``CenterCrop(256)``.
    """
    pil = _to_pil(image)
    short = int(size / crop_fraction)
    if pil.width <= pil.height:  # torchvision: the long side is int(short * long / short_in).
        new_w, new_h = short, int(short * pil.height / pil.width)
    else:
        new_w, new_h = int(short * pil.width / pil.height), short
    if (new_w, new_h) != (pil.width, pil.height):
        pil = pil.resize((new_w, new_h), _resample(interpolation))
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    return to_float_rgb(pil.crop((left, top, left + size, top + size)))


# ----------------------------------------------------------------------------- colour

def grayscale(image: np.ndarray) -> np.ndarray:
    """float RGB -> float RGB whose three channels are the luma."""
    return np.repeat((image @ _LUMA)[..., None], 3, axis=-1)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = rgb.max(-1), rgb.min(-1)
    delta = maxc - minc
    safe = np.where(delta > 0, delta, 1.0)
    s = np.where(maxc > 0, delta / np.where(maxc > 0, maxc, 1.0), 0.0)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = np.where(r == maxc, bc - gc, np.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    h = np.where(delta > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, maxc], -1).astype(np.float32)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(h * 6.0)
    f = h * 6.0 - sector
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    sector = sector.astype(np.int32) % 6
    choices = [np.stack(c, -1) for c in
               ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))]
    return np.choose(sector[..., None], choices).astype(np.float32)


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float,
                 contrast: float, saturation: float, hue: float) -> np.ndarray:
    """torchvision's ColorJitter on float RGB: the four adjustments in a random order.

    Factors ~ U(max(0, 1 - x), 1 + x) for brightness/contrast/saturation, a hue shift
    ~ U(-hue, hue) of a turn. Works in float, so results differ from torchvision's uint8
    PIL path by rounding only.
    """
    out = image.astype(np.float32)
    for op in rng.permutation(4):
        if op == 0 and brightness > 0:
            out = out * rng.uniform(max(0.0, 1 - brightness), 1 + brightness)
        elif op == 1 and contrast > 0:
            factor = rng.uniform(max(0.0, 1 - contrast), 1 + contrast)
            out = factor * out + (1 - factor) * float((out @ _LUMA).mean())
        elif op == 2 and saturation > 0:
            factor = rng.uniform(max(0.0, 1 - saturation), 1 + saturation)
            out = factor * out + (1 - factor) * (out @ _LUMA)[..., None]
        elif op == 3 and hue > 0:
            hsv = rgb_to_hsv(out)
            hsv[..., 0] = (hsv[..., 0] + rng.uniform(-hue, hue)) % 1.0
            out = hsv_to_rgb(hsv)
        out = np.clip(out, 0.0, 1.0)
    return out.astype(np.float32)


def contrastive_color(image: np.ndarray, rng: np.random.Generator, strength: float = 0.4,
                      jitter_prob: float = 0.8, grayscale_prob: float = 0.2) -> np.ndarray:
    """MAGE-C's colour augmentation of a view, MoCo-v2 style.

    ``RandomApply(ColorJitter(s, s, s, s / 4), p=jitter_prob)`` then
    ``RandomGrayscale(grayscale_prob)``: at strength 0.4 this is MoCo v2's
    ColorJitter(0.4, 0.4, 0.4, 0.1). Gaussian blur is not applied.
    """
    if rng.uniform() < jitter_prob:
        image = color_jitter(image, rng, strength, strength, strength, strength / 4)
    if rng.uniform() < grayscale_prob:
        image = grayscale(image)
    return image
