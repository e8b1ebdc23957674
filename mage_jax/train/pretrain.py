"""Stage `pretrain`: MAGE (and MAGE-C) on a frozen tokenizer.

The tokenizer runs inside the jitted step on the augmented batch (online tokenization,
as the official code does); its parameters are a frozen input of the step, never trained.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mage_jax import checkpointing, masking, optim, pretrained, sharding, validation
from mage_jax.convert import torch_tokenizer
from mage_jax.models import arg_extremes, contrastive, mage, vqgan
from mage_jax.train import evaluation, interrupt, loop, report


class TokenizerMismatchError(ValueError):
    """The tokenizer checkpoint does not fit the tokenizer the config describes."""


def tokenizer_workdir(config, workdir: str) -> str:
    """``config.tokenizer_workdir``, else the tokenizer of ``config.init_from`` (a fine-tuned
    MAGE reads the tokens it was pretrained on), else ``<workdir>/tokenizer``."""
    return pretrained.tokenizer_dir(config.to_dict(), workdir)


def load_tokenizer(config: ml_collections.ConfigDict, workdir: str, devices=None,
                   train_tokenizer=None):
    """Restores the frozen tokenizer, first training it where the config says so with
    ``train_tokenizer(tokenizer_config, tokenizer_workdir)`` (stages.py passes its own
    ``run``: the stage below does not import the dispatcher above it)."""
    tok_dir = tokenizer_workdir(config, workdir)
    existing = checkpointing.Checkpointer(tok_dir, async_save=False, read_only=True)
    step = existing.latest_step()
    existing.close()
    if config.train_tokenizer_if_missing and (step or 0) < config.tokenizer_stage.total_steps:
        if train_tokenizer is None:
            raise FileNotFoundError(
                f"the tokenizer in {tok_dir} is missing or unfinished (step {step}); train it "
                f"first (python -m mage_jax.main --config=configs/tokenizer.py --workdir="
                f"{tok_dir}), or build this stage through mage_jax.train.stages.run.")
        logging.info("Training the tokenizer first, in %s.", tok_dir)
        train_tokenizer(tokenizer_stage_config(config), tok_dir)
        interrupt.raise_if_requested(f"while training the tokenizer in {tok_dir}")
    elif step is None:
        raise FileNotFoundError(
            f"no tokenizer checkpoint in {tok_dir}/checkpoints. Train one "
            f"(python -m mage_jax.main --config=configs/tokenizer.py --workdir={tok_dir}), convert "
            f"the official weights (python -m mage_jax.convert tokenizer --torch_checkpoint="
            f"vqgan_jax_strongaug.ckpt --output={tok_dir}), or set --config.tokenizer_workdir.")
    params, _ = checkpointing.restore_params(tok_dir)
    check_tokenizer(config, params, tok_dir)
    return params


# The dataset a tokenizer trained first shares with pretraining (augmentation is per stage).
_SHARED_DATA_KEYS = ("name", "data_dir", "manual_dir", "fashion_mnist_dir", "train_split",
                     "eval_split", "eval_crop_fraction", "eval_interpolation",
                     "image_size")


def tokenizer_stage_config(config) -> ml_collections.ConfigDict:
    """``config.tokenizer_stage`` with this config's tokenizer sizes, dataset and image size,
    so that one override (e.g. ``--config.data.data_dir``) moves both stages."""
    tok_config = ml_collections.ConfigDict(config.tokenizer_stage.to_dict())
    tok_config.tokenizer = ml_collections.ConfigDict(config.tokenizer.to_dict())
    for key in _SHARED_DATA_KEYS:
        tok_config.data[key] = config.data[key]
    tok_config.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
    return tok_config


def check_tokenizer(config, params, where: str) -> None:
    """Codebook and architecture of the checkpoint must be those ``config.tokenizer`` builds."""
    try:
        torch_tokenizer.check_tokenizer_params(params, config.tokenizer)
    except ValueError as e:
        raise TokenizerMismatchError(
            f"the tokenizer in {where} does not fit config.tokenizer ({dict(config.tokenizer)}): "
            f"{e} Set config.tokenizer to the sizes the tokenizer was trained with (its "
            f"config.json), or point --config.tokenizer_workdir elsewhere.") from e


def build_stage(config: ml_collections.ConfigDict, workdir: str, devices=None,
                train_tokenizer=None) -> loop.Stage:
    """Validates, builds the stage and loads (or first trains, with ``train_tokenizer``) its
    frozen tokenizer."""
    # Bad input stops here, before a tokenizer is trained or anything compiled.
    validation.validate_training_config(config, workdir)
    validation.validate_batch(config, sharding.make_mesh(config.mesh, devices))
    stage = make_stage(config)
    stage.check()
    if config.init_from:
        stage.warm_start = _warm_start(config.init_from)
    stage.frozen = load_tokenizer(config, workdir, devices, train_tokenizer)
    return stage


def _warm_start(init_from: str):
    """Puts the MAGE of ``init_from`` (a run or converted weights) into a fresh state."""
    source = pretrained.load(init_from)

    def warm_start(state):
        target = state["params"]["mage"]
        flat_target = dict(jax.tree_util.tree_flatten_with_path(target)[0])
        flat_source = dict(jax.tree_util.tree_flatten_with_path(source.params)[0])
        for path, leaf in flat_target.items():
            got = flat_source.get(path)
            if got is None or tuple(got.shape) != tuple(leaf.shape):
                raise ValueError(
                    f"config.init_from={init_from}: parameter {jax.tree_util.keystr(path)} is "
                    f"{'missing' if got is None else tuple(got.shape)} there but this model has "
                    f"{tuple(leaf.shape)}; use the model sizes (and scan_layers) of that run.")
        placed = jax.device_put(source.params, jax.tree.map(lambda x: x.sharding, target))
        logging.info("Fine-tuning from %s (step %d).", init_from, source.step)
        return {**state, "params": {**state["params"], "mage": placed}}
    return warm_start


def make_stage(config: ml_collections.ConfigDict, tokenizer_params=None) -> loop.Stage:
    """The pretrain `Stage` with ``tokenizer_params`` as its frozen input (may be None or
    abstract): no files are read, so presets can be shape-checked at their real sizes with
    ``jax.eval_shape`` (tests/test_presets.py) without any tokenizer checkpoint."""
    size = config.data.image_size
    grid = vqgan.token_grid(config.tokenizer, size)
    codebook_size = config.tokenizer.codebook_size
    tok_model = vqgan.vqgan_from_config(config.tokenizer)
    model = mage.mage_from_config(config, codebook_size=codebook_size,
                                  num_tokens=grid * grid).clone(
                                      drop_ratio=config.masking.drop_ratio)
    use_c = bool(config.contrastive.enabled)
    projection = contrastive.ProjectionMLP(
        config.contrastive.proj_hidden_dim, config.contrastive.proj_dim,
        config.contrastive.proj_layers)
    schedule = optim.epoch_schedule(config)
    opt = config.optimizer
    tx = optim.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                     grad_clip_norm=opt.grad_clip_norm)
    mcfg = config.masking
    num_tokens = grid * grid
    conditional = config.get("class_conditional", {}).get("enabled", False)

    def init_state(rng):
        m_rng, p_rng = jax.random.split(rng)
        tokens = jnp.zeros((1, num_tokens), jnp.int32)
        drop, masked = masking.sample_masks(m_rng, 1, num_tokens, 1.0, mcfg.drop_ratio)
        params = {"mage": model.init({"params": m_rng}, tokens, drop, masked, train=False)["params"]}
        if use_c:
            params["projection"] = projection.init(
                p_rng, jnp.zeros((1, config.model.embed_dim)))["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    def tokenize(tok_params, images):
        ids = tok_model.apply({"params": tok_params}, images, method=tok_model.encode)
        return jax.lax.stop_gradient(ids)

    def masks_for(rng, batch):
        drop, masked, ratio = masking.sample_step_masks(
            rng, batch, num_tokens, min_ratio=mcfg.min_ratio, max_ratio=mcfg.max_ratio,
            mean=mcfg.mean, std=mcfg.std, drop_ratio=mcfg.drop_ratio,
            examples_per_ratio=mcfg.examples_per_ratio)
        return ratio, drop, masked

    def first_tokens(rng, labels):
        """Class-conditional MAGE (our design): the class id at position 0, [C0] instead
        with probability ``label_dropout`` (and for unlabelled examples), so that one model
        samples with and without a class, as classifier-free guidance needs."""
        if not conditional:
            return None
        keep = jax.random.bernoulli(rng, 1.0 - config.class_conditional.label_dropout,
                                    labels.shape) & (labels >= 0)
        return jnp.where(keep, model.class_token_id(jnp.maximum(labels, 0)),
                         model.fake_class_id)

    def view_loss(params, tokens, rng, first=None):
        mask_rng, dropout_rng = jax.random.split(rng)
        ratio, drop, masked = masks_for(mask_rng, tokens.shape[0])
        out = model.apply({"params": params["mage"]}, tokens, drop, masked, train=True,
                          first_token=first, image_logits=True, rngs={"dropout": dropout_rng})
        loss, terms = mage.mage_loss(
            out["logits"], tokens, masked, codebook_size, config.label_smoothing,
            ratio_groups=masking.ratio_groups(tokens.shape[0], mcfg.examples_per_ratio))
        return loss, terms, out, jnp.mean(ratio)

    def loss_fn(params, batch, rng, tok_params):
        rng1, rng2, class_rng = jax.random.split(rng, 3)
        first = first_tokens(class_rng, batch["label"]) if conditional else None
        loss, terms, out, ratio = view_loss(params, tokenize(tok_params, batch["image"]), rng1,
                                            first)
        metrics = {"reconstruction_loss": loss, "mask_ratio": ratio, **terms}
        if use_c:
            loss2, _, out2, _ = view_loss(params, tokenize(tok_params, batch["image2"]), rng2)
            z1 = projection.apply({"params": params["projection"]}, out["pooled"])
            z2 = projection.apply({"params": params["projection"]}, out2["pooled"])
            nce, nce_acc = contrastive.info_nce(z1, z2, config.contrastive.temperature)
            loss = 0.5 * (loss + loss2)
            metrics.update(reconstruction_loss=loss, contrastive_loss=nce,
                           contrastive_accuracy=nce_acc)
            loss = loss + config.contrastive.weight * nce
        return loss, metrics

    def train_step(state, batch, rng, tok_params):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, rng, tok_params)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics.update(loss=loss, lr=schedule(state["step"]), grad_norm=optax.tree.norm(grads))
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    def decode(tok_params, ids):
        return jnp.clip(tok_model.apply({"params": tok_params}, ids, method=tok_model.decode),
                        0.0, 1.0)

    def one_step_prediction(mage_params, tok_params, images, rng):
        """(tokens, drop, masked, logits, prediction): one decoder pass fills every masked
        position of ``prediction``; the other positions keep their tokens. ``logits (B, L,
        codebook_size)``: the image positions' logits over the codebook."""
        tokens = tokenize(tok_params, images)
        _, drop, masked = masks_for(rng, tokens.shape[0])
        logits = model.apply({"params": mage_params}, tokens, drop, masked, train=False,
                             image_logits=True)["logits"]
        predicted = arg_extremes.argmax(logits)
        return tokens, drop, masked, logits, jnp.where(masked[:, 1:], predicted, tokens)

    def prediction_grid(images, masked, predicted, tok_params):
        """Masked input | one-step prediction | original, decoded by the tokenizer."""
        patch = size // grid
        pixel_mask = jnp.repeat(jnp.repeat(masked[:, 1:].reshape(-1, grid, grid), patch, 1),
                                patch, 2)[..., None]
        masked_input = jnp.where(pixel_mask, 0.5, images)
        return jnp.concatenate([masked_input, decode(tok_params, predicted), images], axis=2)

    def summarize(state, batch, rng, tok_params):
        images = batch["image"][: config.num_image_summaries]
        _, _, masked, _, predicted = one_step_prediction(state["params"]["mage"], tok_params,
                                                         images, rng)
        return {"masked_prediction_original": prediction_grid(images, masked, predicted,
                                                              tok_params)}

    def evaluate(state, tok_params, mesh, workdir):
        """Masked-token loss and accuracy on held-out images (masks drawn as in training,
        from a fixed key), beside the frequency of the most common masked token (what a
        model that ignores the image would score); reconstructions.png, predictions.png."""
        n = config.num_image_summaries

        @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
        def score(params, batch, rng):
            images, keep = batch["image"], batch["mask"]
            tokens, _, masked, logits, predicted = one_step_prediction(
                params["mage"], tok_params, images, rng)
            weight = masked[:, 1:] & keep[:, None]
            logp = jax.nn.log_softmax(logits.astype(jnp.float32))
            nll = -jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
            correct = predicted == tokens
            counts = jnp.zeros(codebook_size, jnp.int32).at[tokens.ravel()].add(
                weight.ravel().astype(jnp.int32))
            sums = {"masked": jnp.sum(weight), "correct": jnp.sum(correct & weight),
                    "nll": jnp.sum(jnp.where(weight, nll, 0.0))}
            return sums, counts

        @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
        def pictures(params, images, rng):  # The first batch's first n, decoded once.
            images = images[:n]
            tokens, _, masked, _, predicted = one_step_prediction(
                params["mage"], tok_params, images, rng)
            return (images, decode(tok_params, tokens),
                    prediction_grid(images, masked, predicted, tok_params))

        totals, counts, shown = {}, np.zeros(codebook_size, np.int64), None
        eval_rng = jax.random.key(config.seed + 1)
        for i, batch in enumerate(evaluation.test_batches(config, mesh)):
            rng = jax.random.fold_in(eval_rng, i)
            sums, batch_counts = jax.device_get(score(state["params"], batch, rng))
            totals = {k: totals.get(k, 0.0) + float(v) for k, v in sums.items()}
            counts += batch_counts
            if shown is None:
                shown = jax.device_get(pictures(state["params"], batch["image"], rng))
        masked_tokens = max(totals["masked"], 1.0)
        scores = {"test_masked_accuracy": totals["correct"] / masked_tokens,
                  "test_nll": totals["nll"] / masked_tokens,
                  "test_most_common_token_rate": float(counts.max()) / masked_tokens}
        originals, reconstructions, grid_images = shown
        evaluation.save_image_grid(os.path.join(workdir, report.RECONSTRUCTIONS_PNG),
                                   [originals, reconstructions])
        evaluation.save_image_grid(os.path.join(workdir, report.PREDICTIONS_PNG), [grid_images])
        return scores, {"test_masked_prediction_original": grid_images,
                        "test_inputs_and_reconstructions": np.concatenate(
                            [originals, reconstructions], axis=2)}

    def check():
        masking.ratio_groups(config.batch_size, mcfg.examples_per_ratio)  # raises if < 0
        if model.fused_attention and model.dropout_rate:
            raise ValueError(
                f"config.model.fused_attention=True has no attention dropout, but "
                f"config.model.dropout_rate={model.dropout_rate}: set "
                f"--config.model.dropout_rate=0 (the paper trains with 0.1) or leave "
                f"fused_attention off.")
        if config.batch_size < 2 and use_c:
            raise ValueError("MAGE-C needs config.batch_size >= 2 for InfoNCE negatives.")
        if conditional:
            cc = config.class_conditional
            if not 1 <= cc.num_classes <= model.num_class_ids:
                raise ValueError(
                    f"config.class_conditional.num_classes={cc.num_classes}: the legacy "
                    f"vocabulary has {model.num_class_ids} class ids beside [C0] (a 1000-class "
                    f"dataset such as ImageNet does not fit; its class 999 has no id).")
            if not 0.0 <= cc.label_dropout < 1.0:
                raise ValueError(f"config.class_conditional.label_dropout={cc.label_dropout} "
                                 f"must be in [0, 1) (0.1: one model for both modes).")

    return loop.Stage(init_state=init_state, train_step=train_step, summarize=summarize,
                      frozen=tokenizer_params, two_views=use_c, check=check, evaluate=evaluate)
