"""Few-shot evaluation as a stage and as an evaluator during pretraining."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax import evaluators, metrics, pretrained, validation
from mage_jax.data import augment, datasets
from mage_jax.eval import fewshot as lsr
from mage_jax.probe import stage as probe_stage
from mage_jax.probe.features import FeatureExtractor
from mage_jax.train import report, stages
from tests.tiny_configs import load_config, tiny_fewshot_task, tiny_pretrain_config

ONE = jax.devices()[:1]


def _fewshot_config(pretrain_dir, **task):
    config = load_config("fewshot", "demo")
    config.pretrain_workdir = pretrain_dir
    config.fewshot = tiny_fewshot_task(**task)
    config.mesh.update(data=1)
    return config


def test_fewshot_stage_equals_a_direct_computation(pretrain_dir, tmp_path):
    scores = probe_stage.run_fewshot(_fewshot_config(pretrain_dir), str(tmp_path), ONE)
    assert set(scores) == {"fashion_mnist_1shot", "fashion_mnist_5shot"}
    records = metrics.read_metrics(str(tmp_path))
    assert records[-1]["fashion_mnist_5shot"] == scores["fashion_mnist_5shot"]

    pre = pretrained.load(pretrain_dir)
    extractor = FeatureExtractor("encoder", pre.model, pre.tokenizer, pre.image_size)
    data = load_config("fewshot", "demo").data
    data.image_size = pre.image_size

    def direct(split, n):
        source = datasets.open_source(data, split)
        images = np.stack([augment.resize_center_crop(source[i]["image"], pre.image_size,
                                                      crop_fraction=1.0,
                                                      interpolation="bilinear")
                           for i in range(n)])
        feats = extractor.features({"mage": pre.params, "tokenizer": pre.tokenizer_params},
                                   jnp.asarray(images))
        return np.asarray(feats), np.array([source[i]["label"] for i in range(n)])

    expected = lsr.fewshot_results(*direct("train", 200), *direct("test", 40), num_classes=10,
                                   shots=(1, 5), seeds=(0, 1))
    assert scores["fashion_mnist_1shot"] == pytest.approx(expected["1shot"], abs=1e-6)
    assert scores["fashion_mnist_5shot"] == pytest.approx(expected["5shot"], abs=1e-6)


def test_more_shots_than_a_class_has(pretrain_dir, tmp_path):
    config = _fewshot_config(pretrain_dir, train_split="train[:30]")
    config.fewshot.shots = (1, 25)
    with pytest.raises(validation.ConfigError, match=r"class \d has \d examples, fewer than 25"):
        probe_stage.run_fewshot(config, str(tmp_path), ONE)


def test_unknown_dataset(pretrain_dir, tmp_path):
    config = _fewshot_config(pretrain_dir)
    config.fewshot.datasets = {"fashion_mnsit": ("train", "test")}
    with pytest.raises(datasets.DatasetNotFoundError, match="fashion_mnsit.*fashion_mnist"):
        probe_stage.run_fewshot(config, str(tmp_path), ONE)


def _pretrain_with_evals(pretrain_dir):
    config = tiny_pretrain_config(total_steps=4)
    config.tokenizer_workdir = os.path.join(pretrain_dir, "tokenizer")
    config.eval.num_examples = 0
    config.image_summary_every = 0
    config.evals.fewshot = dict(type="fewshot", every=2, **tiny_fewshot_task().to_dict())
    config.mesh.update(data=-1)  # main.run uses every device: 8 simulated ones
    config.sample_when_done = False
    return config


def test_evaluators_during_pretraining(pretrain_dir, tmp_path):
    """Few-shot accuracy and samples with their Frechet distance at steps 2 and 4."""
    config = _pretrain_with_evals(pretrain_dir)
    config.evals.samples = dict(type="samples", every=2, num_samples=8, num_steps=2,
                                choice_temperature=4.5, num_classes=10,
                                classifier_train_steps=5,
                                classifier_cache_dir=str(tmp_path / "classifier"))
    # As mage_jax.main.run does: build (and check) the evaluators, then train with them.
    stages.run(config, str(tmp_path / "run"), summarize=False,
               evaluators=evaluators.build(config))
    records = metrics.read_metrics(str(tmp_path / "run"))
    for key in ("fewshot/fashion_mnist_1shot", "fewshot/fashion_mnist_5shot",
                "samples/fd_samples", "samples/fd_random_tokens"):
        steps = [r["step"] for r in records if key in r]
        assert steps == [2, 4], (key, steps)
    shot = [r["fewshot/fashion_mnist_5shot"] for r in records if "fewshot/fashion_mnist_5shot" in r]
    assert all(0.0 <= a <= 1.0 for a in shot)
    with open(tmp_path / "run" / "config.json") as f:
        assert json.load(f)["evals"]["fewshot"]["every"] == 2
    text = report.summary(config, str(tmp_path / "run"))
    assert "during     fewshot at step 2 -> 4" in text
    assert "during     samples at step 2 -> 4" in text


def test_every_zero_turns_an_evaluator_off(pretrain_dir):
    config = _pretrain_with_evals(pretrain_dir)
    assert [e.name for e in evaluators.build(config)] == ["fewshot", "samples"]  # + the demo's
    config.evals.fewshot.every = 0
    assert [e.name for e in evaluators.build(config)] == ["samples"]
    config.evals.samples.every = 0
    assert evaluators.build(config) == ()


@pytest.mark.parametrize("change,error", [
    (dict(type="probe"), "unknown evaluator type 'probe'"),
    (dict(every=-1), "every=-1 must be a step count"),
    (dict(datasets={"no_such_dataset": ("train", "test")}), "no_such_dataset"),
])
def test_bad_evaluators_fail_before_training(pretrain_dir, tmp_path, change, error):
    config = _pretrain_with_evals(pretrain_dir)
    config.evals.fewshot.update(change)
    with pytest.raises(ValueError, match=error):
        evaluators.build(config)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")
