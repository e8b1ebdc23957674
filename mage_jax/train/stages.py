"""Which stage a config runs: ``config.stage`` -> a function building its `loop.Stage`."""
from __future__ import annotations

import time

import ml_collections
from absl import logging


def _tokenizer(config, workdir, devices):
    from mage_jax.train import tokenizer
    return tokenizer.build_stage(config)


def _pretrain(config, workdir, devices):
    from mage_jax.train import pretrain
    # The demo trains its tokenizer first, through this same dispatcher.
    return pretrain.build_stage(
        config, workdir, devices,
        train_tokenizer=lambda tok_config, tok_dir: run(tok_config, tok_dir, devices,
                                                        summarize=False))


STAGES = {"tokenizer": _tokenizer, "pretrain": _pretrain}


def run(config: ml_collections.ConfigDict, workdir: str, devices=None, summarize=True,
        evaluators=()):
    """Trains the stage ``config.stage`` names in ``workdir`` on ``devices`` (default: all),
    running ``evaluators`` (loop.Evaluator, built by mage_jax/evaluators.py from
    ``config.evals``) at their periods, then logs a short summary (scores, pictures, next
    commands; train/report.py)."""
    from mage_jax.train import loop, report
    started = time.perf_counter()
    if config.get("stage") not in STAGES:
        raise ValueError(
            f"config.stage={config.get('stage')!r} is not a training stage; expected one of "
            f"{sorted(STAGES)} (configs/<stage>.py sets it).")
    stage = STAGES[config.stage](config, workdir, devices)
    state = loop.train_and_evaluate(config, workdir, stage, devices, tuple(evaluators))
    if not summarize:
        return state
    logging.info("\n%s", report.summary(config, workdir, tokenizer_workdir(config, workdir),
                                        seconds=time.perf_counter() - started))
    return state


def tokenizer_workdir(config, workdir: str) -> str | None:
    """The tokenizer a pretraining run reads (None for other stages)."""
    if config.stage != "pretrain":
        return None
    from mage_jax.train import pretrain
    return pretrain.tokenizer_workdir(config, workdir)
