"""A run's whole workdir in a ``gs://`` bucket (the emulator of conftest.py): the tokenizer
and pretraining demos (tiny) write there, stop, resume there, and later stages read them."""
import json
import pathlib
import subprocess
import sys

import jax
import pytest
from etils import epath

from mage_jax import checkpointing, metrics, pretrained, validation
from mage_jax.generate import stage as generate
from mage_jax.train import stages
from tests.tiny_configs import load_config, tiny_pretrain_config, tiny_tokenizer_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def _steps_in_file(workdir) -> list[int]:
    """The step of every line of metrics.jsonl, repeats included (a restart would repeat)."""
    text = epath.Path(workdir, "metrics.jsonl").read_text()
    return [json.loads(line)["step"] for line in text.splitlines()]


def _tensorboard_tags(workdir) -> set[str]:
    """Tags of the TensorBoard events that conftest.py sent from ``gs://`` to ``ram://``."""
    import tensorflow as tf
    tags = set()
    for f in tf.io.gfile.glob(workdir.replace("gs://", "ram://") + "/events.out.tfevents*"):
        for event in tf.compat.v1.train.summary_iterator(f):
            tags.update(v.tag for v in event.summary.value)
    return tags


@pytest.fixture(scope="module")
def runs(gcs):
    root = gcs.create_bucket("mage-runs")
    tok_dir, pre_dir = f"{root}/tokenizer", f"{root}/pretrain"
    one = jax.devices()[:1]
    stages.run(tiny_tokenizer_config(total_steps=2), tok_dir, devices=one)

    def pretrain(total_steps):
        config = tiny_pretrain_config(total_steps)
        config.tokenizer_workdir = tok_dir
        config.train_tokenizer_if_missing = False
        stages.run(config, pre_dir, devices=one)

    pretrain(2)
    steps_first = _steps_in_file(pre_dir)
    pretrain(4)  # the same run, continued: resumes from the checkpoint of step 2
    return tok_dir, pre_dir, steps_first


def test_tokenizer_run_lives_in_the_bucket(runs):
    tok_dir, _, _ = runs
    names = {p.name for p in epath.Path(tok_dir).iterdir()}
    assert {"config.json", "metrics.jsonl", "reconstructions.png", "checkpoints"} <= names
    assert not epath.Path("gs:").exists()  # no local folder named after the scheme
    assert checkpointing.Checkpointer(tok_dir, read_only=True).latest_step() == 2
    assert any(r.get("test_psnr") for r in metrics.read_metrics(tok_dir))
    assert "loss" in _tensorboard_tags(tok_dir)


def test_pretraining_resumes_in_the_bucket(runs):
    _, pre_dir, steps_first = runs
    assert steps_first == [1, 2, 2]  # step 2 twice: its test_* scores come last
    # Steps 3 and 4 follow 2 in the same file: the second run resumed, it did not restart.
    assert _steps_in_file(pre_dir) == [1, 2, 2, 3, 4, 4]
    checkpoints = checkpointing.Checkpointer(pre_dir, read_only=True)
    assert checkpoints.latest_step() == 4
    assert json.loads(epath.Path(pre_dir, "config.json").read_text())["total_steps"] == 4
    assert epath.Path(pre_dir, "predictions.png").exists()


def test_later_stages_read_the_bucket(runs, gcs):
    tok_dir, pre_dir, _ = runs
    pre = pretrained.load(pre_dir)
    assert pre.step == 4 and pre.tokenizer_params
    config = load_config("generate", "demo")
    config.pretrain_workdir = pre_dir
    config.update(num_samples=2, batch_size=2, num_grid=1)
    config.sampling.num_steps = 2
    config.classifier_measures.enabled = False
    out = f"{pre_dir}_samples"
    scores = generate.run(config, out, devices=jax.devices()[:1])
    assert scores["num_samples"] == 2
    names = {p.name for p in epath.Path(out).iterdir()}
    assert {"config.json", "samples.npz", "samples_grid.png", "metrics.jsonl"} <= names
    assert sorted(p.name for p in epath.Path(out, "samples").iterdir()) == [
        "000000.png", "000001.png"]


def test_missing_bucket_is_named_before_anything_runs(gcs):
    with pytest.raises(validation.ConfigError, match=r"gs://no-such-bucket/run cannot be "
                       r"written .*gcloud storage buckets create gs://no-such-bucket"):
        validation.validate_workdir("gs://no-such-bucket/run")


def test_workdir_without_bucket_stops_the_command_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "mage_jax.main", "--config=configs/tokenizer.py:demo",
         "--workdir=gs:///run"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "--workdir=gs:///run names no bucket: give gs://BUCKET/RUN" in last, last
    assert "gcloud storage buckets create gs://BUCKET" in last, last
    assert not pathlib.Path(REPO, "gs:").exists()


def test_converted_weights_and_edits_go_to_a_bucket(gcs, runs, tmp_path):
    """The converter's output directory and an edit's output PNG may be gs:// paths."""
    import numpy as np
    from PIL import Image
    from mage_jax.convert import files as convert_files
    root = gcs.create_bucket("mage-converted")
    params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    convert_files.save_params(f"{root}/tok", params, {"stage": "tokenizer"})
    restored, step = checkpointing.restore_params(f"{root}/tok")
    assert step == 0
    np.testing.assert_array_equal(restored["w"], params["w"])
    assert json.loads(epath.Path(root, "tok", "config.json").read_text()) == {"stage": "tokenizer"}

    image = tmp_path / "in.png"
    Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(image)
    result = subprocess.run(
        [sys.executable, "-m", "mage_jax.generate.edit", f"--pretrain_workdir={runs[1]}",
         f"--image={image}", "--box=4,4,12,12", "--num_steps=2",
         f"--output={root}/edits/out.png"], cwd=REPO, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with epath.Path(root, "edits", "out.png").open("rb") as f:
        out = np.asarray(Image.open(f))
    assert out.shape == (16, 16, 3) and np.all(out[:4] == 100)


def test_a_folder_dataset_in_a_bucket(gcs):
    """config.data.name='folder' with manual_dir=gs://...: listed, decoded, labelled."""
    import io
    import numpy as np
    from PIL import Image
    from mage_jax.data import datasets
    root = gcs.create_bucket("mage-images")
    for label, name in enumerate(("cat", "dog")):
        for i in range(2):
            buffer = io.BytesIO()
            Image.fromarray(np.full((4, 4, 3), 10 * label + i, np.uint8)).save(buffer, "PNG")
            epath.Path(root, "images", name, "sub" if i else "", f"{i}.png").parent.mkdir(
                parents=True, exist_ok=True)
            epath.Path(root, "images", name, "sub" if i else "", f"{i}.png").write_bytes(
                buffer.getvalue())
    source = datasets.FolderSource(datasets.folder_root(f"{root}/images", "train"))
    assert source.classes == ["cat", "dog"] and len(source) == 4
    values = [(int(source[i]["image"][0, 0, 0]), source[i]["label"]) for i in range(4)]
    assert values == [(0, 0), (1, 0), (10, 1), (11, 1)]


def test_weights_files_are_read_from_a_bucket(gcs):
    """Released PyTorch checkpoints and .npz weights (Inception, LPIPS style) in a bucket."""
    import io
    import numpy as np
    from mage_jax.convert import torch_tokenizer
    from mage_jax.eval import inception
    torch = pytest.importorskip("torch", reason="pip install -e '.[torch]'")
    root = gcs.create_bucket("mage-weights")
    buffer = io.BytesIO()
    torch.save({"state_dict": {"conv.weight": torch.arange(6.0).reshape(2, 3)}}, buffer)
    epath.Path(root, "vqgan.ckpt").write_bytes(buffer.getvalue())
    got = torch_tokenizer.load_torch_state_dict(f"{root}/vqgan.ckpt")
    np.testing.assert_array_equal(got["conv.weight"], np.arange(6.0).reshape(2, 3))
    buffer = io.BytesIO()
    np.savez(buffer, **{"state_dict/fc.bias": np.ones(3, np.float32)})
    epath.Path(root, "inception.npz").write_bytes(buffer.getvalue())
    path = inception.inception_weights_path(f"{root}/inception.npz")
    np.testing.assert_array_equal(inception.read_state_dict(path)["fc.bias"], np.ones(3))
