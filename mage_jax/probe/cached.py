"""Features computed once per image, then the probe head trained on them.

The paper's probe recomputes the features of a freshly augmented view at every step
(``linear.build_stage``). Where the encoder costs more than the head can afford (the
demo on 2 CPU cores: the encoder reads ~250 images/s, the head alone ~100,000),
``config.cache_features`` computes each image's features once, from its evaluation view
(resize + center crop, no augmentation), and trains the same head with the same LARS
recipe on them. Evaluation features are computed once either way. ``extract`` is also
what the few-shot evaluation reads.
"""
from __future__ import annotations

import functools
import os

import jax
import numpy as np
from absl import logging

from mage_jax import metrics as metrics_lib
from mage_jax import paths, sharding, validation
from mage_jax.data import datasets, pipeline
from mage_jax.eval import accuracy
from mage_jax.probe import linear


@functools.lru_cache(maxsize=8)
def _replicated_features(extractor, mesh):
    """The jitted ``(frozen, batch) -> (features, mask, label)``, replicated so every host
    gets the whole global batch (its padding too). Cached per (extractor, mesh): an
    evaluator that extracts every N steps compiles it once, not at every run."""
    def features(frozen, batch):
        return extractor.features(frozen, batch["image"]), batch["mask"], batch["label"]
    return jax.jit(features, out_shardings=sharding.replicated(mesh))


def extract(extractor, frozen, data_cfg, split: str, batch_size: int, mesh,
            num_examples: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """``(features (N, dim) float32, labels (N,) int32)`` of the first ``num_examples``
    images of ``split`` (-1: all), evaluation view, in dataset order, on every host."""
    source = datasets.open_source(data_cfg, split)
    count = len(source) if num_examples < 0 else min(int(num_examples), len(source))
    dataset = pipeline.eval_dataset_from_source(source, data_cfg, batch_size=batch_size,
                                                process_index=jax.process_index(),
                                                process_count=jax.process_count())

    features = _replicated_features(extractor, mesh)
    feats, labels, seen = [], [], 0
    for batch in dataset:
        if seen >= count:
            break
        out, mask, label = (np.asarray(a) for a in jax.device_get(
            features(frozen, sharding.host_batch_to_global(batch, mesh))))
        feats.append(out[mask])
        labels.append(label[mask])
        seen += int(mask.sum())
    return (np.concatenate(feats)[:count].astype(np.float32),
            np.concatenate(labels)[:count].astype(np.int32))


def train_and_evaluate(config, workdir: str, source: str, devices=None) -> dict:
    """The probe on cached features of ``source``: returns and logs top1/top5."""
    validation.validate_training_config(config, workdir)
    classes = linear.num_classes(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    validation.validate_batch(config, mesh)
    jax.set_mesh(mesh)
    extractor, frozen = linear.extractor_and_params(config, source)
    frozen = extractor.place(frozen, mesh)
    train_x, train_y = extract(extractor, frozen, config.data, config.data.train_split,
                               config.batch_size, mesh)
    test_x, test_y = extract(extractor, frozen, config.data, config.data.eval_split,
                             config.batch_size, mesh, int(config.eval.num_examples))
    if len(train_x) < config.batch_size:
        raise validation.ConfigError(
            f"{config.data.train_split} has {len(train_x)} examples, fewer than one batch "
            f"({config.batch_size}); lower config.batch_size.")
    logging.info("Cached %s features: %d train, %d test images.", source, len(train_x),
                 len(test_x))

    writer = metrics_lib.create_writer(workdir)
    scores = fit(config, linear.Probe(config, classes, extractor.dim), (train_x, train_y),
                 (test_x, test_y), mesh, writer)
    writer.flush()
    if jax.process_index() == 0:
        paths.write_text(os.path.join(workdir, "config.json"),
                         config.to_json_best_effort(indent=2, sort_keys=True))
    return scores


def fit(config, probe, train, test, mesh, writer=None) -> dict:
    """Trains ``probe`` for ``config.total_steps`` on cached ``train = (features, labels)``
    (a new random order every epoch, from ``config.seed``); scores it on ``test``."""
    train_x, train_y = train
    state = jax.jit(probe.init_state, out_shardings=sharding.replicated(mesh))(
        jax.random.key(config.seed))
    step_fn = jax.jit(probe.step, donate_argnums=0)
    rng = np.random.default_rng(config.seed)
    order, cursor = rng.permutation(len(train_x)), 0
    for step in range(1, config.total_steps + 1):
        if cursor + config.batch_size > len(order):  # a new epoch, a new order
            order, cursor = rng.permutation(len(train_x)), 0
        index = order[cursor:cursor + config.batch_size]
        cursor += config.batch_size
        state, metrics = step_fn(state, train_x[index], train_y[index])
        if writer is not None and (step % config.log_every == 0
                                   or step in (1, config.total_steps)):
            writer.write_scalars(step, {k: float(v) for k, v in jax.device_get(metrics).items()})
    test_x, test_y = test
    sums = jax.device_get(jax.jit(probe.score)(state, test_x, test_y,
                                               np.ones(len(test_y), bool)))
    scores = accuracy.ratios({k: float(v) for k, v in sums.items()})
    if writer is not None:
        writer.write_scalars(config.total_steps, scores)
    return scores
