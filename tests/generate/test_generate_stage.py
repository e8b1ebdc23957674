"""The generate stage end to end on a tiny trained MAGE: files, reproducibility, bad input."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from mage_jax import metrics
from mage_jax.generate import stage as generate
from tests.tiny_configs import load_config


def _config(pretrain_dir, num_samples=6, batch_size=4, data=1):
    config = load_config("generate", "demo")
    config.pretrain_workdir = pretrain_dir
    config.num_samples = num_samples
    config.batch_size = batch_size
    config.sampling.num_steps = 4
    config.num_grid = 4
    config.classifier_measures.enabled = False  # trains a classifier: its own test
    config.mesh.update(data=data)
    return config


def _run(config, workdir, devices=1):
    generate.run(config, str(workdir), devices=jax.devices()[:devices])
    with np.load(os.path.join(workdir, "samples.npz")) as f:
        return f["images"], f["index"]


@pytest.fixture(scope="module")
def single(pretrain_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("generate")
    return (str(workdir),) + _run(_config(pretrain_dir), workdir)


def test_writes_pngs_npz_grid_and_metrics(single):
    workdir, images, index = single
    assert images.dtype == np.uint8 and images.shape == (6, 16, 16, 3)
    np.testing.assert_array_equal(index, np.arange(6))
    names = sorted(os.listdir(os.path.join(workdir, "samples")))
    assert names == [f"{i:06d}.png" for i in range(6)]  # the padded 2 of batch 2 are not kept
    for i in (0, 5):
        png = np.asarray(Image.open(os.path.join(workdir, "samples", f"{i:06d}.png")))
        np.testing.assert_array_equal(png, images[i])
    grid = np.asarray(Image.open(os.path.join(workdir, "samples_grid.png")))
    assert grid.shape == (32, 32, 3)
    np.testing.assert_array_equal(grid[:16, 16:], images[1])
    record = metrics.read_metrics(workdir)[-1]
    assert record["num_samples"] == 6 and record["images_per_sec"] > 0
    assert json.load(open(os.path.join(workdir, "config.json")))["stage"] == "generate"
    # Not all the same image: the samples differ from each other.
    assert len({images[i].tobytes() for i in range(6)}) > 1


def test_same_samples_whatever_the_batch_and_mesh(pretrain_dir, single, tmp_path):
    _, images, _ = single
    other, _ = _run(_config(pretrain_dir, batch_size=8, data=4), tmp_path, devices=4)
    np.testing.assert_array_equal(other, images)


def test_mage_split_over_fsdp_samples_the_same(pretrain_dir, single, tmp_path):
    """With config.mesh.fsdp > 1, MAGE's parameters are split as in pretraining (a model
    that needs FSDP to train samples on the same chips), and the samples do not change."""
    from mage_jax import pretrained, sharding
    from mage_jax.generate import sampler
    _, images, _ = single
    config = _config(pretrain_dir, batch_size=4, data=1)
    config.mesh.fsdp = 4
    other, _ = _run(config, tmp_path, devices=4)
    np.testing.assert_array_equal(other, images)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:4])
    layouts = jax.tree.leaves(sampler.mage_shardings(pretrained.load(pretrain_dir).model, mesh))
    assert any(not s.is_fully_replicated for s in layouts)


def test_another_seed_gives_other_samples(pretrain_dir, single, tmp_path):
    _, images, _ = single
    config = _config(pretrain_dir, num_samples=2, batch_size=2)
    config.seed = 1
    other, _ = _run(config, tmp_path)
    assert not np.array_equal(other, images[:2])


@pytest.mark.parametrize("key,value,message", [
    ("num_samples", 0, "num_samples=0"),
    ("sampling.num_steps", 0, "num_steps=0"),
    ("sampling.class_label", 1000, "class_label=1000"),
    ("sampling.class_label", -3, "class_label=-3"),
    ("pretrain_workdir", "", "pretrain_workdir is empty"),
])
def test_bad_input_is_named_before_sampling(pretrain_dir, tmp_path, key, value, message):
    config = _config(pretrain_dir)
    node, _, leaf = key.rpartition(".")
    (config[node] if node else config)[leaf] = value
    with pytest.raises(ValueError, match=message):
        generate.run(config, str(tmp_path / "out"), devices=jax.devices()[:1])
    assert not os.path.exists(tmp_path / "out" / "samples")


def test_not_a_pretraining_run_is_named(pretrain_dir, tmp_path):
    config = _config(os.path.join(pretrain_dir, "tokenizer"))
    with pytest.raises(ValueError, match="not a MAGE pretraining run"):
        generate.run(config, str(tmp_path), devices=jax.devices()[:1])
    config = _config(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        generate.run(config, str(tmp_path), devices=jax.devices()[:1])


def test_fid_and_inception_score_against_saved_statistics(pretrain_dir, single, tmp_path):
    """The stage's FID of samples against statistics of the very same images is 0; its IS
    is the IS of their features (fixture weights: random, but the real network)."""
    from mage_jax.eval import fid, inception
    from tests.conftest import _fixture_path
    weights = str(_fixture_path("INCEPTION_FIXTURE", "inception_fid_tiny.npz"))
    _, images, _ = single
    expected, stats = fid.evaluate(inception.load_inception(weights), [images], 8, splits=2)
    fid.save_statistics(tmp_path / "ref.npz", stats.mean, stats.covariance(), stats.num_images)
    config = _config(pretrain_dir)
    config.fid.update(reference_stats=str(tmp_path / "ref.npz"), inception_weights=weights,
                      splits=2, batch_size=8)
    config.classifier_measures.enabled = False
    generate.run(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    record = metrics.read_metrics(str(tmp_path / "run"))[-1]
    scale = float(np.trace(stats.covariance()))
    # eigvals of a rank-5 product of 2048 x 2048 matrices: zero up to ~1e-6 of the trace.
    assert abs(record["fid"]) < 2e-5 * scale, (record["fid"], scale)
    np.testing.assert_allclose(record["inception_score"], expected["inception_score_mean"],
                               rtol=1e-6)
    config.seed = 5
    generate.run(config, str(tmp_path / "other"), devices=jax.devices()[:1])
    assert metrics.read_metrics(str(tmp_path / "other"))[-1]["fid"] > 1e-3 * scale


def test_missing_fid_inputs_are_named(pretrain_dir, tmp_path):
    config = _config(pretrain_dir)
    config.fid.reference_stats = str(tmp_path / "nope.npz")
    with pytest.raises(FileNotFoundError, match="nope.npz does not exist"):
        generate.run(config, str(tmp_path / "a"), devices=jax.devices()[:1])
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=np.zeros(2048), sigma=np.eye(2048))
    config.fid.update(reference_stats=str(stats), inception_weights=str(tmp_path / "w.pth"))
    with pytest.raises(FileNotFoundError, match="inception_weights=.*w.pth does not exist"):
        generate.run(config, str(tmp_path / "b"), devices=jax.devices()[:1])


def test_classifier_measures_separate_real_images_from_random_tokens(pretrain_dir, tmp_path):
    config = _config(pretrain_dir, num_samples=40, batch_size=20)
    config.classifier_measures.update(enabled=True, train_steps=60,
                                      cache_dir=str(tmp_path / "root"))
    generate.run(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    record = metrics.read_metrics(str(tmp_path / "run"))[-1]
    for key in ("fd_samples", "fd_real", "fd_random_tokens"):
        assert np.isfinite(record[key]) and record[key] >= 0, record
    # Real test images against real test images beat decoded noise by far.
    assert record["fd_real"] < 0.5 * record["fd_random_tokens"], record
    assert "cond_accuracy" not in record  # unconditional samples
    # Cached: a second run reads the classifier instead of training it again.
    cache = tmp_path / "root" / "mage_jax_classifier" / "fashion_mnist_16px" / "checkpoints"
    assert os.listdir(cache) == ["60"]
    stamp = os.path.getmtime(cache / "60")
    generate.run(config, str(tmp_path / "again"), devices=jax.devices()[:1])
    assert os.path.getmtime(cache / "60") == stamp
    again = metrics.read_metrics(str(tmp_path / "again"))[-1]
    assert again["fd_samples"] == pytest.approx(record["fd_samples"], rel=1e-6)
