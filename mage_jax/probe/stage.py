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
from mage_jax import paths, validation
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


def run_fewshot(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
    """Stage `fewshot`: the few-shot task of ``config`` on the MAGE of
    ``config.pretrain_workdir``; ``<dataset>_<k>shot`` in metrics.jsonl at its step."""
    import jax
    from mage_jax import pretrained, sharding
    from mage_jax.probe import fewshot
    validation.validate_workdir(workdir)
    pre = pretrained.load(config.pretrain_workdir, dtype=config.model_dtype)
    task = fewshot.FewshotTask.from_config(config.fewshot, config.data, pre.image_size)
    task.check()
    mesh = sharding.make_mesh(config.mesh, devices)
    validation.validate_batch(ml_collections.ConfigDict(
        {"batch_size": config.fewshot.batch_size}), mesh)
    jax.set_mesh(mesh)
    extractor = features_lib.FeatureExtractor("encoder", pre.model, pre.tokenizer,
                                              pre.image_size)
    used = extractor.abstract_mage()
    params = extractor.place({"mage": {k: pre.params[k] for k in used},
                              "tokenizer": pre.tokenizer_params}, mesh)
    scores = task.evaluate(pre.model, pre.tokenizer, params, mesh)
    writer = metrics_lib.create_writer(workdir)
    writer.write_scalars(pre.step, scores)
    writer.flush()
    if jax.process_index() == 0:
        paths.write_text(os.path.join(workdir, "config.json"),
                         config.to_json_best_effort(indent=2, sort_keys=True))
    logging.info("\nFew-shot linear evaluation of %s (step %d): %s", config.pretrain_workdir,
                 pre.step, ", ".join(f"{k} {100 * v:.1f}%" for k, v in scores.items()))
    return scores
