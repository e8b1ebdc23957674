"""Which stage a config runs: ``config.stage`` -> a function building its `loop.Stage`."""
from __future__ import annotations

import ml_collections


def _tokenizer(config, workdir, devices):
    from mage_jax.train import tokenizer
    return tokenizer.build_stage(config)


def _pretrain(config, workdir, devices):
    from mage_jax.train import pretrain
    return pretrain.build_stage(config, workdir, devices)


STAGES = {"tokenizer": _tokenizer, "pretrain": _pretrain}


def run(config: ml_collections.ConfigDict, workdir: str, devices=None):
    """Trains the stage ``config.stage`` names in ``workdir`` on ``devices`` (default: all)."""
    from mage_jax.train import loop
    if config.get("stage") not in STAGES:
        raise ValueError(
            f"config.stage={config.get('stage')!r} is not a training stage; expected one of "
            f"{sorted(STAGES)} (configs/<stage>.py sets it).")
    stage = STAGES[config.stage](config, workdir, devices)
    return loop.train_and_evaluate(config, workdir, stage, devices)
