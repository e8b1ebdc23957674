"""Loss terms for training the VQGAN tokenizer (the MaskGIT recipe that MAGE's tokenizer uses).

The generator (VQGAN) loss is, with MaskGIT's weights,

    reconstruction (l2)  + 0.1 * perceptual  + VQ codebook/commitment (beta 0.25)
    + 0.1 * entropy  + adversarial_weight(step) * 0.1 * generator_adversarial_loss

and the discriminator loss is

    adversarial_weight(step) * (discriminator_loss + r1_every * r1_weight * r1_penalty),

r1_weight = 10, with the penalty computed every ``r1_every`` steps (1 in the ``paper``
config, as MaskGIT's; k > 1 is StyleGAN2's lazy R1, weighted x k).

The perceptual term (an ImageNet ResNet-50's features in MaskGIT's config, or LPIPS)
lives in :mod:`mage_jax.models.resnet50` and :mod:`mage_jax.models.lpips`; the VQ and
entropy terms belong to the quantiser. Everything here is a pure, jit-friendly function of arrays.

R1 convention: :func:`r1_penalty` returns ``E_x ||grad_x D(x)||^2`` *without* StyleGAN2's
factor 1/2, and the trainer multiplies it by ``r1_weight`` (10 in the config). In StyleGAN2's
``(gamma / 2) * E||grad||^2`` notation that is gamma = 2 * r1_weight = 20. The gradient is
taken with respect to the images as the trainer holds them, in [0, 1]. MaskGIT's
discriminator (the ``paper`` default) takes them as they are; the ``stylegan2_mbstd`` variant
maps them to [-1, 1] internally, so with it the penalty is 4x what it would be on [-1, 1]
inputs.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def reconstruction_loss(x: jax.Array, y: jax.Array, kind: str = "l2") -> jax.Array:
    """Mean elementwise ``(x - y)^2`` ('l2') or ``|x - y|`` ('l1') over all elements."""
    if x.shape != y.shape:
        raise ValueError(f"reconstruction_loss needs equal shapes; got {x.shape} and {y.shape}.")
    diff = x.astype(jnp.float32) - y.astype(jnp.float32)
    if kind == "l2":
        return jnp.mean(jnp.square(diff))
    if kind == "l1":
        return jnp.mean(jnp.abs(diff))
    raise ValueError(f"reconstruction_loss kind={kind!r} is not supported; use 'l2' or 'l1'.")


def generator_adversarial_loss(fake_logits: jax.Array) -> jax.Array:
    """Non-saturating generator loss ``E[softplus(-D(fake))] = -E[log sigmoid(D(fake))]``."""
    return jnp.mean(jax.nn.softplus(-fake_logits.astype(jnp.float32)))


def discriminator_loss(real_logits: jax.Array, fake_logits: jax.Array) -> jax.Array:
    """Logistic discriminator loss ``E[softplus(-D(real))] + E[softplus(D(fake))]``."""
    real = jnp.mean(jax.nn.softplus(-real_logits.astype(jnp.float32)))
    fake = jnp.mean(jax.nn.softplus(fake_logits.astype(jnp.float32)))
    return real + fake


def r1_penalty(disc_apply_fn: Callable[[Any, jax.Array], jax.Array], disc_params: Any,
               real_images: jax.Array, *, return_logits: bool = False):
    """R1 gradient penalty ``mean_b sum_{h,w,c} (d D(x)_b / d x_b)^2`` on real images.

    ``disc_apply_fn(disc_params, images) -> logits (B,)``; ``disc_params`` is a plain
    (unboxed) pytree. The penalty is differentiable in ``disc_params`` (it is a loss term of
    the discriminator). The gradient of ``sum_b D(x)_b`` is used, which equals the
    per-sample gradients when samples do not interact (the minibatch-stddev layer makes
    them interact slightly; StyleGAN2 uses the same summed form). With
    ``return_logits=True`` returns ``(penalty, real_logits)`` from the same forward pass.
    """
    real_logits, vjp = jax.vjp(lambda x: disc_apply_fn(disc_params, x), real_images)
    if real_logits.ndim != 1 or real_logits.shape[0] != real_images.shape[0]:
        raise ValueError(f"disc_apply_fn must return logits of shape (B,) = ({real_images.shape[0]},); "
                         f"got {real_logits.shape}.")
    (grads,) = vjp(jnp.ones_like(real_logits))
    grads = grads.astype(jnp.float32)
    penalty = jnp.mean(jnp.sum(jnp.square(grads).reshape(grads.shape[0], -1), axis=1))
    return (penalty, real_logits) if return_logits else penalty


def adversarial_weight(step, warmup_steps) -> jax.Array:
    """0.0 before ``warmup_steps``, 1.0 from then on (traceable: works on a traced step)."""
    return jnp.where(jnp.asarray(step) >= jnp.asarray(warmup_steps), 1.0, 0.0).astype(jnp.float32)
