"""Mixup / CutMix with label smoothing, in the jitted step (timm ``Mixup``, 'batch' mode).

MAE's and MAGE's fine-tuning recipe: ``Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0,
switch_prob=0.5, mode='batch', label_smoothing=0.1)``. One lambda per batch; each image is
mixed with the image at the mirrored position of the batch (``x[::-1]``): with probability
``switch_prob`` by a CutMix box of area ``1 - lam`` (clipped at the borders, the targets
then weighted by the box's true area), else by Mixup with ``lam ~ Beta(0.8, 0.8)``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def cutmix_box(rng, lam: jax.Array, height: int, width: int) -> jax.Array:
    """(H, W) bool mask of timm's box for ``lam``: sides ``int(side * sqrt(1 - lam))`` around
    a uniform centre, clipped to the image."""
    cut = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (height * cut).astype(jnp.int32), (width * cut).astype(jnp.int32)
    ky, kx = jax.random.split(rng)
    cy = jax.random.randint(ky, (), 0, height)
    cx = jax.random.randint(kx, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def mixup_cutmix(rng, images: jax.Array, labels: jax.Array, num_classes: int, *,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5, prob: float = 1.0,
                 label_smoothing: float = 0.1) -> tuple[jax.Array, jax.Array]:
    """``(mixed images (B, H, W, C), soft targets (B, num_classes))``."""
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, targets
    k_apply, k_switch, k_mix, k_cut, k_box = jax.random.split(rng, 5)
    use_cutmix = (jax.random.uniform(k_switch) < switch_prob if mixup_alpha > 0 and
                  cutmix_alpha > 0 else jnp.asarray(cutmix_alpha > 0))
    lam_mix = jax.random.beta(k_mix, max(mixup_alpha, 1e-3), max(mixup_alpha, 1e-3))
    lam_cut = jax.random.beta(k_cut, max(cutmix_alpha, 1e-3), max(cutmix_alpha, 1e-3))
    applied = jax.random.uniform(k_apply) < prob
    height, width = images.shape[1:3]
    box = cutmix_box(k_box, lam_cut, height, width)
    flipped = images[::-1]
    cut_images = jnp.where(box[None, :, :, None], flipped, images)
    mixed_images = images * lam_mix + flipped * (1.0 - lam_mix)
    # CutMix's lambda is what the clipped box leaves of the image.
    lam_cut = 1.0 - jnp.mean(box.astype(jnp.float32))
    lam = jnp.where(applied, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0)
    out = jnp.where(applied, jnp.where(use_cutmix, cut_images, mixed_images), images)
    return out.astype(images.dtype), lam * targets + (1.0 - lam) * targets[::-1]


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of ``-sum targets * log_softmax(logits)`` (timm
    ``SoftTargetCrossEntropy``)."""
    return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), -1))
