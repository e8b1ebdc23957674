"""Stage `tokenizer`: the VQGAN and its discriminator, trained as MaskGIT trains them.

Generator loss = reconstruction + codebook + 0.25 commitment + 0.1 entropy
                 [+ 0.1 perceptual] [+ 0.1 adversarial after the warm-up];
the perceptual term compares a frozen ImageNet ResNet-50's features (MaskGIT's config) or
logits, or is LPIPS (``loss.perceptual_kind``, :mod:`mage_jax.models.resnet50`);
discriminator loss = logistic loss on real/reconstructed images + R1 penalty on real ones,
also only after the warm-up (``loss.adversarial_warmup_steps``; MaskGIT has none, and the
``paper`` config neither). Both use Adam (betas (0, 0.99)). With ``ema_decay`` > 0 the
state keeps MaskGIT's Polyak average of the VQGAN's weights (``ema_params``), and that
average is the tokenizer: summaries and test scores use it, and so does every stage that
restores the tokenizer (``checkpointing.restore_params`` prefers ``ema_params``).
"""
from __future__ import annotations

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from mage_jax import optim, sharding, tokenizer_losses, validation
from mage_jax.models import discriminator as disc_lib
from mage_jax.models import lpips, resnet50, vqgan
from mage_jax.train import evaluation, loop, report


DISCRIMINATOR_KINDS = ("maskgit", "stylegan2_mbstd")
# config.loss.perceptual_kind -> (what it is, the weights file(s) to give, the loader, the loss).
_RESNET50_WEIGHTS = (f"torchvision's ImageNet ResNet-50 ({resnet50.TORCHVISION_URL}): "
                     "--config.loss.perceptual_weights=resnet50-0676ba61.pth")
PERCEPTUAL_KINDS = {
    "resnet50_features": ("ResNet-50 features", _RESNET50_WEIGHTS,
                          resnet50.load_resnet50_params, resnet50.features_perceptual_loss),
    "resnet50_logits": ("ResNet-50 logits", _RESNET50_WEIGHTS,
                        resnet50.load_resnet50_params, resnet50.logits_perceptual_loss),
    "lpips": (
        "LPIPS", "the lpips package's weights: --config.loss.perceptual_weights=vgg16.pth,lin.pth",
        lpips.load_lpips_params, lpips.perceptual_loss),
}


def build_discriminator(
        cfg: ml_collections.ConfigDict,
) -> disc_lib.MaskGITDiscriminator | disc_lib.StyleGANDiscriminator:
    """``config.discriminator`` -> the module its ``kind`` names (see DISCRIMINATOR_KINDS).

    A config without ``kind`` (written before there was a choice) means "stylegan2_mbstd".
    """
    kind = cfg.get("kind", "stylegan2_mbstd")
    if kind == "maskgit":
        return disc_lib.MaskGITDiscriminator(
            filters=cfg.filters, channel_multiplier=cfg.channel_multiplier,
            blur_resample=cfg.blur_resample)
    if kind == "stylegan2_mbstd":
        return disc_lib.StyleGANDiscriminator(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult))
    raise ValueError(f"config.discriminator.kind={kind!r} is not one of {DISCRIMINATOR_KINDS}: "
                     f"'maskgit' (MaskGIT's discriminator) or 'stylegan2_mbstd' (the variant "
                     f"with minibatch-stddev).")


def _perceptual_term(loss_cfg: ml_collections.ConfigDict):
    """``config.loss`` -> (kind, loss function, frozen params or None when the term is off).

    A config without ``perceptual_kind`` (written before there was a choice) means "lpips".
    """
    kind = loss_cfg.get("perceptual_kind", "lpips")
    if kind not in PERCEPTUAL_KINDS:
        raise validation.ConfigError(
            f"config.loss.perceptual_kind={kind!r} is not one of {tuple(PERCEPTUAL_KINDS)}: "
            f"'resnet50_features' (MaskGIT's config: the squared error of an ImageNet "
            f"ResNet-50's last feature map), 'resnet50_logits' (of its logits: MAGVIT, "
            f"MaskBit) or 'lpips' (LPIPS, VGG16).")
    name, weights_hint, load, loss_fn = PERCEPTUAL_KINDS[kind]
    params = None
    if loss_cfg.perceptual_weights and loss_cfg.perceptual_weight > 0:
        # Comma-separated files merge (e.g. torchvision's VGG16 plus lpips' lin weights).
        params = load(*loss_cfg.perceptual_weights.split(","))
    elif loss_cfg.perceptual_weight > 0:
        # Nothing can be downloaded at run time, so without a file the term is off: say so.
        logging.warning(
            "config.loss.perceptual_weight=%s but no config.loss.perceptual_weights file: "
            "the perceptual (%s) term is OFF in this run (config.loss.perceptual_kind=%r). "
            "Give %s, or set --config.loss.perceptual_weight=0 to silence this.",
            loss_cfg.perceptual_weight, name, kind, weights_hint)
    return kind, loss_fn, params


def build_models(config: ml_collections.ConfigDict):
    model = vqgan.vqgan_from_config(config.tokenizer)
    return model, build_discriminator(config.discriminator)


def _schedule(opt) -> optax.Schedule:
    if opt.schedule == "constant":
        return optim.warmup_constant(opt.lr, opt.warmup_steps)
    if opt.schedule == "cosine":
        return optim.warmup_cosine(opt.lr, opt.warmup_steps, opt.decay_steps)
    raise ValueError(f"config.optimizer.schedule={opt.schedule!r} is not one of 'constant' "
                     f"(MaskGIT) or 'cosine' (to 0 at config.optimizer.decay_steps).")


def _optimizer(config) -> optax.GradientTransformation:
    opt = config.optimizer
    return optim.adamw(_schedule(opt), b1=opt.b1, b2=opt.b2,
                       weight_decay=opt.weight_decay, grad_clip_norm=opt.grad_clip_norm)


def build_stage(config: ml_collections.ConfigDict) -> loop.Stage:
    model, disc = build_models(config)
    tx, disc_tx = _optimizer(config), _optimizer(config)
    size = config.data.image_size
    loss_cfg = config.loss
    # With adversarial_weight 0 (the demo) the discriminator is never run: a GAN phase is
    # for perceptual sharpness at scale, and it costs most of a step (docs/demo.md).
    use_gan = loss_cfg.adversarial_weight > 0
    ema_decay = float(config.get("ema_decay", 0.0))

    def check():
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"config.ema_decay={ema_decay} must be in [0, 1) (MaskGIT: 0.999; "
                             f"0 keeps no average).")
        vqgan.token_grid(config.tokenizer, size)  # raises if size does not fit the factor
        # Shape-checks the discriminator at this size without compiling anything.
        jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))

    def init_state(rng):
        g_rng, d_rng = jax.random.split(rng)
        images = jnp.zeros((1, size, size, 3), jnp.float32)
        params = model.init(g_rng, images)["params"]
        disc_params = disc.init(d_rng, images)["params"]
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": tx.init(params),
                 "disc_params": disc_params, "disc_opt_state": disc_tx.init(disc_params)}
        if ema_decay:
            # A copy (not the same arrays): the train step donates the whole state.
            state["ema_params"] = jax.tree.map(lambda x: x.copy(), params)
        return state

    def tokenizer_params(state):
        """The weights users get: the EMA when the run keeps one."""
        return state["ema_params"] if ema_decay else state["params"]

    _, perceptual_loss, perceptual_params = _perceptual_term(loss_cfg)

    def generator_loss(params, disc_params, images, adv_on, frozen):
        recon, aux = model.apply({"params": params}, images, train=True)
        terms = {
            "reconstruction_loss": tokenizer_losses.reconstruction_loss(
                recon, images, loss_cfg.reconstruction),
            "codebook_loss": aux["codebook_loss"],
            "commitment_loss": aux["commitment_loss"],
            "entropy_loss": aux["entropy_loss"],
        }
        loss = (loss_cfg.reconstruction_weight * terms["reconstruction_loss"]
                + loss_cfg.codebook_weight * terms["codebook_loss"]
                + loss_cfg.commitment_weight * terms["commitment_loss"]
                + loss_cfg.entropy_weight * terms["entropy_loss"])
        if frozen is not None:
            terms["perceptual_loss"] = perceptual_loss(frozen, recon, images)
            loss += loss_cfg.perceptual_weight * terms["perceptual_loss"]
        if use_gan:
            # lax.cond: before the warm-up ends the discriminator is not even run.
            terms["generator_adversarial_loss"] = jax.lax.cond(
                adv_on > 0,
                lambda: tokenizer_losses.generator_adversarial_loss(
                    disc.apply({"params": disc_params}, recon)),
                lambda: jnp.zeros((), jnp.float32))
            loss += adv_on * loss_cfg.adversarial_weight * terms["generator_adversarial_loss"]
        terms.update(codebook_usage=aux["codebook_usage"], perplexity=aux["perplexity"],
                     psnr=_psnr(recon, images))
        return loss, (terms, recon)

    def discriminator_loss(disc_params, images, recon, step):
        apply = lambda p, x: disc.apply({"params": p}, x)
        real, fake = apply(disc_params, images), apply(disc_params, jax.lax.stop_gradient(recon))
        d_loss = tokenizer_losses.discriminator_loss(real, fake)
        # R1 every r1_every steps, scaled by r1_every to keep its weight: 1 is MaskGIT's
        # every-step R1, more is StyleGAN2's lazy R1.
        every = max(int(loss_cfg.r1_every), 1)
        r1 = jax.lax.cond(step % every == 0,
                          lambda: tokenizer_losses.r1_penalty(apply, disc_params, images),
                          lambda: jnp.zeros((), jnp.float32))
        return (d_loss + every * loss_cfg.r1_weight * r1,
                {"discriminator_loss": d_loss, "r1_penalty": r1})

    def train_step(state, batch, rng, frozen):
        del rng  # the VQGAN and discriminator are deterministic
        images = batch["image"]
        adv_on = tokenizer_losses.adversarial_weight(state["step"],
                                                     loss_cfg.adversarial_warmup_steps)
        (loss, (terms, recon)), grads = jax.value_and_grad(generator_loss, has_aux=True)(
            state["params"], state["disc_params"], images, adv_on, frozen)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, **terms, "grad_norm": optax.tree.norm(grads)}
        new_state = dict(state, step=state["step"] + 1, params=params, opt_state=opt_state)
        if ema_decay:
            new_state["ema_params"] = optax.incremental_update(params, state["ema_params"],
                                                               1.0 - ema_decay)
        if not use_gan:  # The discriminator stays as initialised and costs nothing.
            return new_state, metrics

        (_, d_terms), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
            state["disc_params"], images, recon, state["step"])
        d_updates, new_disc_opt_state = disc_tx.update(d_grads, state["disc_opt_state"],
                                                       state["disc_params"])
        new_disc_params = optax.apply_updates(state["disc_params"], d_updates)
        # Before the warm-up ends the discriminator does not move (nor does Adam's count).
        # Selecting with `where` instead of a lax.cond around the update is ~3x faster on
        # XLA:CPU after the warm-up (benchmarks/README.md), at the price of computing the
        # discriminator during the warm-up too.
        keep = lambda new, old: jnp.where(adv_on > 0, new, old)
        disc_params = jax.tree.map(keep, new_disc_params, state["disc_params"])
        disc_opt_state = jax.tree.map(keep, new_disc_opt_state, state["disc_opt_state"])
        d_terms = jax.tree.map(lambda v: v * adv_on, d_terms)

        metrics.update(d_terms, adversarial_on=adv_on)
        new_state.update(disc_params=disc_params, disc_opt_state=disc_opt_state)
        return new_state, metrics

    def summarize(state, batch, rng, frozen):
        images = batch["image"][: config.num_image_summaries]
        recon, _ = model.apply({"params": tokenizer_params(state)}, images)
        # Inputs beside reconstructions, one pair per row.
        return {"inputs_and_reconstructions": jnp.concatenate(
            [images, jnp.clip(recon, 0.0, 1.0)], axis=2)}

    def evaluate(state, frozen, mesh, workdir):
        """PSNR and codebook use on held-out images; reconstructions.png in the workdir."""
        del frozen

        @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
        def reconstruct(params, batch):  # Replicated outputs: every host reads them.
            recon, aux = model.apply({"params": params}, batch["image"])
            recon = jnp.clip(recon, 0.0, 1.0)
            n = config.num_image_summaries  # Only the shown images are gathered.
            return (_psnr_per_image(recon, batch["image"]), aux["token_ids"], batch["mask"],
                    batch["image"][:n], recon[:n])

        psnr, counts, shown = [], np.zeros(config.tokenizer.codebook_size, np.int64), None
        for batch in evaluation.test_batches(config, mesh):
            image_psnr, ids, keep, images, recon = jax.device_get(
                reconstruct(tokenizer_params(state), batch))
            psnr.append(image_psnr[keep])
            counts += np.bincount(ids[keep].ravel(), minlength=counts.size)
            if shown is None:
                shown = [images, recon]
        frequencies = counts[counts > 0] / counts.sum()
        scores = {"test_psnr": float(np.mean(np.concatenate(psnr))),
                  "test_codes_used": float(np.count_nonzero(counts)),
                  "test_perplexity": float(np.exp(-np.sum(frequencies * np.log(frequencies)))),
                  "test_examples": float(sum(len(p) for p in psnr))}
        evaluation.save_image_grid(os.path.join(workdir, report.RECONSTRUCTIONS_PNG), shown)
        return scores, {"test_inputs_and_reconstructions": np.concatenate(shown, axis=2)}

    return loop.Stage(init_state=init_state, train_step=train_step, summarize=summarize,
                      frozen=perceptual_params, check=check, evaluate=evaluate)


def _psnr_per_image(x, y):
    """PSNR in dB of each image in [0, 1] (x is clipped to [0, 1] first)."""
    mse = jnp.mean(jnp.square(jnp.clip(x, 0.0, 1.0) - y), axis=(1, 2, 3))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def _psnr(x, y):
    """PSNR in dB of images in [0, 1], averaged over the batch."""
    return jnp.mean(_psnr_per_image(x, y))
