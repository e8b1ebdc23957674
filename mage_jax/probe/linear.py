"""The linear probe on features of augmented views, computed in the step (MAE's protocol).

The encoder (MAGE from ``config.pretrain_workdir``: a run or converted official weights)
and its tokenizer are frozen inputs of the jitted step, placed by the pretraining sharding
rules; the features are computed under ``stop_gradient`` from the augmented batch; only
the head (``probe/head.py``) has parameters and LARS state. At the last step the head is
scored on the evaluation split: ``top1`` and ``top5`` in ``metrics.jsonl``. ``Probe`` (head
and optimiser) is shared with the cached-feature path (``cached.py``).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from mage_jax import optim, pretrained, sharding, validation
from mage_jax.probe import features as features_lib
from mage_jax.eval import accuracy
from mage_jax.probe.head import ProbeHead
from mage_jax.train import evaluation, loop


def num_classes(config) -> int:
    """The dataset's class count (``config.num_classes``, when not -1, must equal it)."""
    return validation.check_num_classes(config)


def extractor_and_params(config, source: str, rng=None):
    """(FeatureExtractor, its frozen params) for feature source ``source``."""
    if source not in features_lib.FEATURE_SOURCES:
        raise validation.ConfigError(
            f"feature source {source!r} is unknown; expected one of "
            f"{list(features_lib.FEATURE_SOURCES)} (config.features, config.baselines).")
    if source == "pixels":
        return features_lib.FeatureExtractor("pixels", None, None,
                                             int(config.data.image_size)), {}
    pre = pretrained.load(config.pretrain_workdir, dtype=config.get("model_dtype", "float32"))
    if pre.image_size != int(config.data.image_size):
        raise validation.ConfigError(
            f"config.data.image_size={config.data.image_size} but the MAGE in "
            f"{config.pretrain_workdir} reads {pre.image_size} px images ({pre.grid}x{pre.grid} "
            f"tokens); set --config.data.image_size={pre.image_size}.")
    extractor = features_lib.FeatureExtractor(source, pre.model, pre.tokenizer, pre.image_size)
    used = extractor.abstract_mage()  # the encoder's part of MAGE: no decoder on devices
    if source == "random_init":
        mage_params = extractor.random_mage(jax.random.key(config.seed) if rng is None else rng)
    else:
        mage_params = {k: pre.params[k] for k in used}
    return extractor, {"mage": mage_params, "tokenizer": pre.tokenizer_params}


class Probe:
    """The head and its optimiser: what is trained, whatever computes the features."""

    def __init__(self, config, classes: int, dim: int):
        self.classes, self.dim = classes, dim
        self.head = ProbeHead(classes, float(config.head.bn_eps), float(config.head.init_std))
        self.schedule = optim.epoch_schedule(config)
        opt = config.optimizer
        self.tx = optim.lars(self.schedule, momentum=opt.momentum,
                             trust_coefficient=opt.trust_coefficient,
                             weight_decay=opt.weight_decay)

    def init_state(self, rng):
        variables = self.head.init(rng, jnp.zeros((1, self.dim)), train=False)
        params = {"head": variables["params"]}
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "batch_stats": variables["batch_stats"], "opt_state": self.tx.init(params)}

    def step(self, state, feats, labels):
        """One LARS step on a batch of features (BatchNorm in training mode)."""
        def loss_fn(params):
            logits, updates = self.head.apply(
                {"params": params["head"], "batch_stats": state["batch_stats"]}, feats,
                train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            top1 = accuracy.topk_correct(logits, labels, 1).mean()
            return loss, (updates["batch_stats"], top1)

        (loss, (batch_stats, top1)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "train_top1": top1, "lr": self.schedule(state["step"])}
        return {"step": state["step"] + 1, "params": params, "batch_stats": batch_stats,
                "opt_state": opt_state}, metrics

    def score(self, state, feats, labels, weight):
        """Sums of correct top-1 / top-5 predictions (running BatchNorm statistics)."""
        logits = self.head.apply({"params": state["params"]["head"],
                                  "batch_stats": state["batch_stats"]}, feats, train=False)
        return accuracy.topk_sums(logits, labels, weight)


def build_stage(config: ml_collections.ConfigDict, source: str | None = None) -> loop.Stage:
    """The probe `Stage` for ``source`` (default ``config.features``); reads the encoder."""
    source = source or config.features
    classes = num_classes(config)
    extractor, frozen = extractor_and_params(config, source)
    probe = Probe(config, classes, extractor.dim)

    def train_step(state, batch, rng, frozen_params):
        return probe.step(state, extractor.features(frozen_params, batch["image"]),
                          batch["label"])

    def evaluate(state, frozen_params, mesh, workdir):
        @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
        def score(state, batch, frozen_params):
            feats = extractor.features(frozen_params, batch["image"])
            return probe.score(state, feats, batch["label"], batch["mask"])

        totals = {}
        for batch in evaluation.test_batches(config, mesh):
            sums = jax.device_get(score(state, batch, frozen_params))
            totals = accuracy.add(totals, sums)
        return accuracy.ratios(totals), {}

    def check():
        if int(config.batch_size) < 2:
            raise validation.ConfigError(
                f"config.batch_size={config.batch_size}: the probe's BatchNorm needs at least "
                f"2 examples per batch.")

    return loop.Stage(init_state=probe.init_state, train_step=train_step, frozen=frozen,
                      check=check, evaluate=evaluate,
                      place_frozen=functools.partial(_place, extractor))


def _place(extractor, frozen, mesh):
    return extractor.place(frozen, mesh)
