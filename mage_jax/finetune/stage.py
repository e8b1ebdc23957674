"""Stage `finetune`: the pretrained encoder and a classification head, trained end to end.

    python -m mage_jax.main --config=configs/finetune.py:demo --workdir=DIR \
        --config.pretrain_workdir=workdirs/demo

The official ``main_finetune.py`` (MAE's, as MAGE's README runs it): ``MageClassifier``
(``models/classifier.py``) warm-started with the pretrained ``token_emb`` and encoder; the
tokenizer frozen in the step; Mixup/CutMix with label smoothing on the batch
(``mixup.py``); AdamW (0.9, 0.999) with weight decay on matrices only, warm-up and cosine,
and layer-wise lr decay (``optim.scale_by_layer_decay``); drop-path in the blocks. At the
last step ``top1``/``top5`` on the evaluation split, as the probe.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from mage_jax import optim, pretrained, sharding, validation
from mage_jax.eval import accuracy
from mage_jax.finetune import mixup
from mage_jax.models.classifier import MageClassifier
from mage_jax.train import evaluation, loop


def build_stage(config: ml_collections.ConfigDict) -> loop.Stage:
    """Checks the config and the checkpoint, builds the model, its optimizer and steps."""
    classes = validation.check_num_classes(config)
    pre = pretrained.load(config.pretrain_workdir, dtype=config.model.dtype)
    if pre.image_size != int(config.data.image_size):
        raise validation.ConfigError(
            f"config.data.image_size={config.data.image_size} but the MAGE in "
            f"{config.pretrain_workdir} reads {pre.image_size} px images; set "
            f"--config.data.image_size={pre.image_size}.")
    m = pre.model
    model = MageClassifier(
        codebook_size=m.codebook_size, num_tokens=m.num_tokens, num_classes=classes,
        embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
        drop_path_rate=float(config.model.drop_path), dtype=jnp.dtype(config.model.dtype),
        remat=bool(config.model.remat))
    schedule = optim.epoch_schedule(config)
    opt = config.optimizer
    tx = optax.chain(optim.adamw(schedule, b1=opt.b1, b2=opt.b2,
                                 weight_decay=opt.weight_decay, grad_clip_norm=0.0),
                     optim.scale_by_layer_decay(m.depth, float(opt.layer_decay)))
    tokenizer = pre.tokenizer
    aug = config.mixup

    def tokenize(tok_params, images):
        return jax.lax.stop_gradient(tokenizer.apply({"params": tok_params}, images,
                                                     method=tokenizer.encode))

    def init_state(rng):
        tokens = jnp.zeros((1, m.num_tokens), jnp.int32)
        params = model.init({"params": rng}, tokens)["params"]
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    def warm_start(state):
        """The pretrained token embedding and encoder, by name (the decoder is left out)."""
        params = dict(state["params"])
        for name in ("token_emb", "encoder"):
            target, source = params[name], pre.params[name]
            shapes = jax.tree.map(lambda a: tuple(a.shape), target)
            if shapes != jax.tree.map(lambda a: tuple(np.shape(a)), source):
                raise ValueError(f"{config.pretrain_workdir}: its `{name}` does not have the "
                                 f"shapes of this classifier's (scan_layers runs differ).")
            params[name] = jax.device_put(source, jax.tree.map(lambda a: a.sharding, target))
        logging.info("Fine-tuning the encoder of %s (step %d).", config.pretrain_workdir,
                     pre.step)
        return {**state, "params": params}

    def train_step(state, batch, rng, tok_params):
        mix_rng, dropout_rng = jax.random.split(rng)
        images, targets = mixup.mixup_cutmix(
            mix_rng, batch["image"], batch["label"], classes, mixup_alpha=aug.mixup_alpha,
            cutmix_alpha=aug.cutmix_alpha, switch_prob=aug.switch_prob, prob=aug.prob,
            label_smoothing=config.label_smoothing)
        tokens = tokenize(tok_params, images)

        def loss_fn(params):
            logits = model.apply({"params": params}, tokens, train=True,
                                 rngs={"dropout": dropout_rng})
            return mixup.soft_cross_entropy(logits, targets)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "lr": schedule(state["step"]),
                   "grad_norm": optax.tree.norm(grads)}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    def evaluate(state, tok_params, mesh, workdir):
        @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
        def score(params, batch):
            logits = model.apply({"params": params}, tokenize(tok_params, batch["image"]))
            return accuracy.topk_sums(logits, batch["label"], batch["mask"])

        totals = {}
        for batch in evaluation.test_batches(config, mesh):
            sums = jax.device_get(score(state["params"], batch))
            totals = accuracy.add(totals, sums)
        return accuracy.ratios(totals), {}

    return loop.Stage(init_state=init_state, train_step=train_step, frozen=pre.tokenizer_params,
                      evaluate=evaluate, warm_start=warm_start)


def run(config: ml_collections.ConfigDict, workdir: str, devices=None):
    validation.validate_training_config(config, workdir)
    state = loop.train_and_evaluate(config, workdir, build_stage(config), devices)
    return state
