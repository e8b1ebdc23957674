"""The generate stage end to end on a tiny trained MAGE: files, reproducibility, bad input."""
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from mage_jax import metrics, validation
from mage_jax.generate import stage as generate
from tests.tiny_configs import load_config


def _config(pretrain_dir, num_samples=6, batch_size=4, data=1):
    config = load_config("generate", "demo")
    config.pretrain_workdir = pretrain_dir
    config.num_samples = num_samples
    config.batch_size = batch_size
    config.sampling.num_steps = 4
    config.num_grid = 4
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
