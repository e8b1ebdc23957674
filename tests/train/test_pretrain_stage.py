"""The pretrain stage end to end: the loss falls, sharded runs match, MAGE-C and options run."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax import metrics
from mage_jax.train import stages
from tests.tiny_configs import tiny_pretrain_config, tiny_tokenizer_config

STEPS = 30


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tokenizer")
    stages.run(tiny_tokenizer_config(total_steps=2), str(workdir), devices=jax.devices()[:1])
    return str(workdir)


def _config(tokenizer_dir, mesh=(1, 1, 1), total_steps=STEPS, arg="demo"):
    config = tiny_pretrain_config(total_steps, arg=arg)
    config.tokenizer_workdir = tokenizer_dir
    config.train_tokenizer_if_missing = False
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    # ~7500 steps per epoch at batch 8: warm up for 4 steps, cosine to 0 at 75.
    config.optimizer.update(blr=0.03, warmup_epochs=0.0005, epochs=0.01)
    config.log_every = 1
    config.checkpoint_every = STEPS
    config.image_summary_every = STEPS
    return config


def _run(config, workdir, mesh=(1, 1, 1)):
    state = stages.run(config, str(workdir), devices=jax.devices()[:int(np.prod(mesh))])
    return jax.device_get(state), metrics.read_metrics(str(workdir))


@pytest.fixture(scope="module")
def single(tokenizer_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain_single")
    return (workdir,) + _run(_config(tokenizer_dir), workdir)


def test_masked_token_loss_falls(single):
    _, _, records = single
    losses = np.array([r["loss"] for r in records])
    assert len(losses) == STEPS and np.all(np.isfinite(losses))
    # Tokens of a 2-step tokenizer carry little structure beyond their frequencies, so the
    # fall is small but steady: a clear trend, not noise (a run that does not learn, e.g.
    # zero lr or wrong targets, stays flat within about 0.01).
    assert losses[-5:].mean() < losses[:5].mean() - 0.03, losses
    assert np.polyfit(np.arange(STEPS), losses, 1)[0] < 0, losses
    accuracy = np.array([r["masked_accuracy"] for r in records])
    assert accuracy[-5:].mean() > accuracy[:5].mean()


def test_logs_what_training_shows(single):
    _, _, records = single
    for key in ("loss", "masked_accuracy", "mask_ratio", "lr", "grad_norm", "images_per_sec"):
        assert all(np.isfinite(r[key]) for r in records), key
    ratios = np.array([r["mask_ratio"] for r in records])
    assert np.all((ratios >= 0.5) & (ratios <= 1.0)) and ratios.std() > 0  # one per step
    lr = np.array([r["lr"] for r in records])
    assert lr[0] < lr[3] and lr[-1] < lr[10]  # warm-up, then cosine decay


def test_reconstruction_grid_is_masked_input_prediction_original(single):
    from tests.train.test_tokenizer_stage import _image_summary
    workdir, _, _ = single
    size = tiny_pretrain_config().data.image_size
    shape, step = _image_summary(workdir, "masked_prediction_original")
    assert shape == (3 * size, size) and step == STEPS


def test_data_fsdp_tensor_mesh_matches_single_device(single, tokenizer_dir, tmp_path):
    mesh = (2, 2, 2)
    _, records = _run(_config(tokenizer_dir, mesh=mesh), tmp_path, mesh=mesh)
    _, _, expected = single
    np.testing.assert_allclose([r["loss"] for r in records], [r["loss"] for r in expected],
                               rtol=1e-3)


def test_contrastive_bf16_remat_scan_and_tokenizer_first(tmp_path):
    """MAGE-C with every scale option on; the demo route trains the tokenizer first."""
    config = tiny_pretrain_config(total_steps=2, arg="demo,contrastive")
    config.tokenizer_stage.total_steps = 2
    config.model.update(dtype="bfloat16", remat=True, scan_layers=True)
    state, records = _run(config, tmp_path)
    assert sorted(os.listdir(tmp_path / "tokenizer" / "checkpoints")) == ["2"]
    weight = config.contrastive.weight
    for r in records:
        assert np.isfinite(r["contrastive_loss"]) and 0 <= r["contrastive_accuracy"] <= 1
        # The mean of the two views' losses plus the weighted InfoNCE (recomputed from the
        # model's outputs in tests/train/test_stage_losses.py).
        np.testing.assert_allclose(
            r["loss"], r["reconstruction_loss"] + weight * r["contrastive_loss"], rtol=1e-5)
        # The share of the 2B embeddings whose nearest one is their other view.
        hits = r["contrastive_accuracy"] * 2 * config.batch_size
        assert abs(hits - round(hits)) < 1e-4
    # bf16 compute keeps float32 parameters and optimizer state.
    assert {x.dtype for x in jax.tree.leaves(state["params"])} == {jnp.dtype("float32")}
    assert "projection" in state["params"]


def test_end_of_run_scores_and_pictures(single, tokenizer_dir):
    from PIL import Image
    workdir, _, records = single
    config = _config(tokenizer_dir)
    last = records[-1]
    assert last["step"] == STEPS
    assert 0 <= last["test_masked_accuracy"] <= 1 and np.isfinite(last["test_nll"])
    # A codebook of 64: the most common masked token is at least 1/64 of the masked ones.
    assert 1 / 64 <= last["test_most_common_token_rate"] <= 1
    size, rows = config.data.image_size, config.num_image_summaries
    for name, columns in (("reconstructions.png", 2), ("predictions.png", 3)):
        with Image.open(os.path.join(workdir, name)) as png:
            assert png.size == (columns * size * 4, rows * size * 4), name


def test_summary_reports_tokenizer_mage_and_pictures(single, tokenizer_dir):
    from mage_jax.train import report
    workdir, _, records = single
    config = _config(tokenizer_dir)
    text = report.summary(config, str(workdir), tokenizer_dir, seconds=60.0)
    tok_record = metrics.read_metrics(tokenizer_dir)[-1]
    assert f"test PSNR {tok_record['test_psnr']:.2f} dB" in text
    first, last = records[0]["loss"], records[-1]["loss"]
    assert f"loss {first:.3f} -> {last:.3f} ({100 * (last - first) / first:+.0f}%" in text
    assert f"test masked-token accuracy {100 * records[-1]['test_masked_accuracy']:.1f}%" in text
    for name in ("reconstructions.png", "predictions.png"):
        assert os.path.join(str(workdir), name) in text
    assert f"tensorboard --logdir {workdir}" in text
    assert "(MAGE-C)" in text and text.index("(MAGE-C)") < text.index("(linear probe)")
    config.contrastive.enabled = True  # a MAGE-C run: the same next steps but MAGE-C
    magec = report.summary(config, str(workdir), tokenizer_dir, seconds=60.0)
    assert "(MAGE-C)" not in magec and "(linear probe)" in magec and "(sample)" in magec


def test_demo_command_logs_the_summary(tokenizer_dir, tmp_path):
    """The README's command line, end to end at tiny size: the summary reaches the log."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    overrides = {"model.embed_dim": 32, "model.depth": 1, "model.num_heads": 2,
                 "model.decoder_embed_dim": 32, "model.decoder_depth": 1,
                 "model.decoder_num_heads": 2, "data.image_size": 16, "batch_size": 8,
                 "total_steps": 2, "log_every": 1, "eval.num_examples": 8,
                 "tokenizer_workdir": tokenizer_dir, "train_tokenizer_if_missing": False,
                 "mesh.data": 1, "generate_stage.num_samples": 20,
                 "generate_stage.batch_size": 10, "generate_stage.sampling.num_steps": 2,
                 "generate_stage.classifier_measures.train_steps": 20,
                 "generate_stage.classifier_measures.cache_dir": str(tmp_path / "cache")}
    tok = tiny_tokenizer_config().tokenizer
    overrides.update({f"tokenizer.{k}": v for k, v in tok.items() if k != "ch_mult"})
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    args.append("--config.tokenizer.ch_mult=" + ",".join(str(c) for c in tok.ch_mult))
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
    result = subprocess.run(
        [sys.executable, "-m", "mage_jax.main", "--config=configs/pretrain.py:demo",
         f"--workdir={tmp_path}", *args], cwd=repo, env=env, capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stderr
    assert "Run summary" in log and "test PSNR" in log and "test masked-token accuracy" in log
    assert os.path.join(str(tmp_path), "predictions.png") in log
    # ... then it samples from the model and measures the samples (sample_when_done).
    grid = os.path.join(str(tmp_path), "generate", "samples_grid.png")
    assert os.path.exists(grid) and f"samples    {grid}" in log
    assert "classifier Frechet distance" in log and "random tokens" in log
    assert len(os.listdir(os.path.join(str(tmp_path), "generate", "samples"))) == 20
