"""Evaluators during pretraining, built from ``config.evals`` (big_vision style).

``config.evals`` is data: a dict ``{name: {type, every, ...}}``. Each entry becomes a
``loop.Evaluator`` that the training loop runs every ``every`` steps and at the last step,
on the training mesh, logging ``<name>/<measure>``; ``every=0`` turns one off:

* ``fewshot``: few-shot linear classification (``eval/fewshot.py``, big_vision's
  ``fewshot_lsr``) on the encoder's probe features (``probe/features.py``) of the current
  parameters: ``<name>/<dataset>_<k>shot`` for each dataset and shot count.
* ``samples``: a grid sampled by iterative decoding from the current parameters, with the
  offline Frechet distance of the samples (``generate/measures.py``).

Everything checkable (types, periods, datasets, shot counts) is checked when the
evaluators are built, before the first compile. This module sits above the stages (main
builds the evaluators and hands them to the loop), so the loop imports none of them.
"""
from __future__ import annotations

import math

import jax
import ml_collections
import numpy as np

from mage_jax import pretrained, sharding, validation
from mage_jax.data import datasets
from mage_jax.models import mage, vqgan
from mage_jax.train import loop

TYPES = ("fewshot", "samples")


def _models(config):
    grid = vqgan.token_grid(config.tokenizer, config.data.image_size)
    model = mage.mage_from_config(config, codebook_size=config.tokenizer.codebook_size,
                                  num_tokens=grid * grid)
    return model, vqgan.vqgan_from_config(config.tokenizer)


def _samples(config, name: str, spec) -> loop.Evaluator:
    """Samples from the current MAGE, a grid, and their Frechet distance (one host)."""
    from mage_jax.generate import measures, sampler as sampler_lib
    if jax.process_count() > 1:
        raise validation.ConfigError(
            f"config.evals.{name}: the samples evaluator measures on one host; drop it on a "
            f"pod and run the generate stage on the checkpoints instead.")
    model, tokenizer = _models(config)
    count = int(spec.num_samples)
    compiled = {}

    def run(state, frozen, mesh, step):
        pre = pretrained.Pretrained(
            model=model, params=state["params"]["mage"], tokenizer=tokenizer,
            tokenizer_params=frozen, image_size=int(config.data.image_size), step=step,
            workdir="", run_config={"data": config.data.to_dict()})
        if "sample" not in compiled:
            compiled["sample"] = sampler_lib.make_sampler(
                model, lambda tp, ids: pretrained.decode_tokens(pre, tp, ids), mesh,
                num_steps=int(spec.num_steps), choice_temperature=float(spec.choice_temperature))
        batch = sharding.batch_sharding(mesh, 1)
        ids = jax.device_put(np.full((count, model.num_tokens), model.mask_token_id, np.int32),
                             sharding.batch_sharding(mesh, 2))
        index = jax.device_put(np.arange(count, dtype=np.int32), batch)
        labels = jax.device_put(np.full(count, -1, np.int32), batch)
        # The same key every time: the grid shows one set of random numbers improving.
        _, images = compiled["sample"](state["params"]["mage"], frozen, ids, index, labels,
                                       jax.random.key(int(config.seed)))
        images = np.asarray(jax.device_get(images))
        scores = measures.classifier_measures(
            pre, images, np.full(count, -1), config.data.to_dict(),
            num_classes=int(spec.num_classes), train_steps=int(spec.classifier_train_steps),
            seed=int(config.seed), cache_root=spec.get("classifier_cache_dir") or None)
        columns = max(1, int(math.sqrt(count)))
        rows = [np.concatenate(list(images[i:i + columns]), axis=1)
                for i in range(0, count - count % columns, columns)]
        return scores, {"grid": np.concatenate(rows, axis=0)[None].astype(np.float32) / 255.0}

    return loop.Evaluator(name, int(spec.every), run)


def _fewshot(config, name: str, spec) -> loop.Evaluator:
    """Few-shot accuracy of the current encoder on each dataset of ``spec.datasets``."""
    from mage_jax.probe import fewshot
    model, tokenizer = _models(config)
    task = fewshot.FewshotTask.from_config(spec, config.data, int(config.data.image_size))
    task.check()

    def run(state, frozen, mesh, step):
        params = {"mage": state["params"]["mage"], "tokenizer": frozen}
        return task.evaluate(model, tokenizer, params, mesh), {}

    return loop.Evaluator(name, int(spec.every), run)


_BUILDERS = {"fewshot": _fewshot, "samples": _samples}


def build(config: ml_collections.ConfigDict) -> tuple[loop.Evaluator, ...]:
    """The evaluators ``config.evals`` describes (none where it has none)."""
    evals = config.get("evals") or {}
    built = []
    for name, spec in evals.items():
        kind = spec.get("type", name)
        if kind not in _BUILDERS:
            raise validation.ConfigError(
                f"config.evals.{name}: unknown evaluator type {kind!r}; expected one of "
                f"{list(TYPES)}.")
        if int(spec.every) < 0:
            raise validation.ConfigError(
                f"config.evals.{name}.every={spec.every} must be a step count (0: off).")
        if int(spec.every) == 0:
            continue
        if config.stage != "pretrain":
            raise validation.ConfigError(
                f"config.evals.{name}: evaluators read a MAGE under training, so they run in "
                f"the pretrain stage, not {config.stage!r}.")
        datasets.check_dataset(config.data, config.data.eval_split)
        built.append(_BUILDERS[kind](config, name, spec))
    return tuple(built)
