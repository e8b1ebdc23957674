"""Inpainting and outpainting on a token canvas (pure functions).

The region to regenerate is a pixel mask (True: regenerate). Its tokens start as [MASK];
the others are the tokenizer's tokens of the input image. A token is regenerated when any
of its pixels is, and the mask is then dilated by one token (the MAGE authors' recipe in the
official repository's issues): a token's receptive field spills over its patch, so the
tokens bordering the region are redrawn too and the seam is generated, not pasted. After
iterative decoding fills the canvas, the kept pixels are pasted back from the input.

Inpainting regenerates a region inside the image; outpainting regenerates everything
outside a region (``outside=True`` below, or an inverted mask).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def box_mask(image_size: int, box: tuple[int, int, int, int], outside: bool = False) -> np.ndarray:
    """(H, W) bool, True inside ``box = (left, top, right, bottom)`` (pixels, right/bottom
    exclusive), or outside it with ``outside``."""
    left, top, right, bottom = (int(v) for v in box)
    if not (0 <= left < right <= image_size and 0 <= top < bottom <= image_size):
        raise ValueError(f"box={box} must satisfy 0 <= left < right <= {image_size} and "
                         f"0 <= top < bottom <= {image_size} (pixels of the {image_size} px "
                         f"model input).")
    mask = np.zeros((image_size, image_size), bool)
    mask[top:bottom, left:right] = True
    return ~mask if outside else mask


def token_mask(pixel_mask: jax.Array, grid: int, dilate: int = 1) -> jax.Array:
    """``(B, H, W)`` pixel mask -> ``(B, grid * grid)`` token mask, dilated by ``dilate``."""
    batch, height, width = pixel_mask.shape
    if height % grid or width % grid:
        raise ValueError(f"mask of {height}x{width} pixels does not split into a {grid}x{grid} "
                         f"token grid; it must be the model's image size.")
    patches = pixel_mask.reshape(batch, grid, height // grid, grid, width // grid)
    tokens = jnp.any(patches, axis=(2, 4)).astype(jnp.float32)
    if dilate > 0:
        size = 2 * dilate + 1
        tokens = jax.lax.reduce_window(tokens, -jnp.inf, jax.lax.max, (1, size, size),
                                       (1, 1, 1), "SAME")
    return tokens.reshape(batch, grid * grid) > 0


def canvas(tokens: jax.Array, regenerate: jax.Array, mask_token_id: int) -> jax.Array:
    """The decoding input: the image's tokens, [MASK] where they are regenerated."""
    return jnp.where(regenerate, mask_token_id, tokens)


def paste(original: jax.Array, generated: jax.Array, pixel_mask: jax.Array) -> jax.Array:
    """Generated pixels inside the region, the original ones outside it (NHWC)."""
    return jnp.where(pixel_mask[..., None], generated, original)
