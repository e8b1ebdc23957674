"""Stage `probe`: the encoder's probe, then its baselines, and the summary line.

    python -m mage_jax.main --config=configs/probe.py:demo --workdir=DIR \
        --config.pretrain_workdir=workdirs/demo

Each feature source (``config.features``, then each of ``config.baselines`` in
``<workdir>/<source>``) is probed by the same recipe: on features of augmented views
computed in the step (``linear.py``, the paper's protocol), or on features computed once
(``cached.py``, ``config.cache_features``). The baselines' ``top1``/``top5`` come back as
``<source>_top1``/``<source>_top5`` in this run's metrics.jsonl.
"""
from __future__ import annotations

import os

import ml_collections
from absl import logging

from mage_jax import metrics as metrics_lib
from mage_jax import validation
from mage_jax.probe import cached, features as features_lib, linear
from mage_jax.train import loop


def _probe(config, workdir: str, devices) -> dict:
    if config.cache_features:
        return cached.train_and_evaluate(config, workdir, config.features, devices)
    loop.train_and_evaluate(config, workdir, linear.build_stage(config), devices)
    records = metrics_lib.read_metrics(workdir)
    return {k: v for r in records for k, v in r.items() if k in ("top1", "top5")}


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
    """Probes ``config.features``, then each of ``config.baselines``; returns the scores."""
    for source in (config.features, *config.baselines):
        if source not in features_lib.FEATURE_SOURCES:
            raise validation.ConfigError(
                f"feature source {source!r} (config.features / config.baselines) is unknown; "
                f"expected one of {list(features_lib.FEATURE_SOURCES)}.")
    validation.validate_training_config(config, workdir)
    linear.num_classes(config)  # a dataset without labels stops here, before any checkpoint
    scores = _probe(config, workdir, devices)
    extra = {}
    for source in config.baselines:
        sub = ml_collections.ConfigDict(config.to_dict())
        sub.features, sub.baselines = source, ()
        extra.update({f"{source}_{k}": v for k, v in _probe(
            sub, os.path.join(workdir, source), devices).items() if k in ("top1", "top5")})
    if extra:
        writer = metrics_lib.create_writer(workdir)
        writer.write_scalars(int(config.total_steps), extra)
        writer.flush()
    scores.update(extra)
    logging.info("\n%s", summary(config, workdir, scores))
    return scores


def summary(config, workdir: str, scores: dict) -> str:
    lines = [f"Linear probe ({config.features} features) on {config.data.name}: "
             f"top-1 {100 * scores.get('top1', float('nan')):.1f}%, "
             f"top-5 {100 * scores.get('top5', float('nan')):.1f}% ({workdir})"]
    for source in config.baselines:
        if f"{source}_top1" in scores:
            lines.append(f"  the same probe on {source.replace('_', ' ')} features: top-1 "
                         f"{100 * scores[f'{source}_top1']:.1f}% ({os.path.join(workdir, source)})")
    return "\n".join(lines)
