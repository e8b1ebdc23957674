"""The tokenizer stage end to end: outputs, sharded runs, exact resume, cross-mesh restore."""
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest

from mage_jax import checkpointing, metrics, sharding
from mage_jax.train import loop, stages, tokenizer
from tests.tiny_configs import assert_generator_loss_is_the_weighted_sum, tiny_tokenizer_config

STEPS = 4


def _run(workdir, total_steps=STEPS, mesh=(1, 1, 1), **overrides):
    config = tiny_tokenizer_config(total_steps)
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    config.update(overrides)
    n = int(np.prod(mesh))
    state = stages.run(config, str(workdir), devices=jax.devices()[:n])
    return config, jax.device_get(state)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tok_single")
    config, state = _run(workdir)
    return workdir, config, state


def _losses(workdir):
    return np.array([r["loss"] for r in metrics.read_metrics(str(workdir))])


def test_writes_config_metrics_events_and_checkpoints(single):
    workdir, config, _ = single
    with open(os.path.join(workdir, "config.json")) as f:
        written = json.load(f)
    assert written["stage"] == "tokenizer" and written["total_steps"] == STEPS
    records = metrics.read_metrics(str(workdir))
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for key in ("loss", "reconstruction_loss", "psnr", "codebook_usage", "perplexity",
                "discriminator_loss", "steps_per_sec", "images_per_sec"):
        assert all(np.isfinite(r[key]) for r in records), key
    # The adversarial terms switch on after the warm-up (2 steps).
    assert [r["adversarial_on"] for r in records] == [0.0, 0.0, 1.0, 1.0]
    assert records[0]["discriminator_loss"] == 0.0 and records[-1]["discriminator_loss"] > 0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))


def _image_summary(workdir, tag):
    """(width, height) and step of the newest TensorBoard image summary named ``tag``."""
    from tensorboard.backend.event_processing import event_accumulator
    events = event_accumulator.EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    events.Reload()
    assert tag in events.Tags()["tensors"], events.Tags()["tensors"]
    newest = events.Tensors(tag)[-1]
    # TF2 image summaries store [width, height, png, png, ...].
    width, height = (int(v) for v in newest.tensor_proto.string_val[:2])
    return (width, height), newest.step


def test_image_summaries_put_inputs_beside_reconstructions(single):
    workdir, config, _ = single
    size = config.data.image_size
    shape, step = _image_summary(workdir, "inputs_and_reconstructions")
    assert shape == (2 * size, size) and step == STEPS  # input | reconstruction


SHARDED_MESHES = ((2, 4, 1), (2, 1, 4))  # data x fsdp, data x tensor


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, request):
    """The same run on 8 devices under each mesh: {mesh: (workdir, final state)}.

    Runs with pytest's output capture off: CI twice lost a worker to an abort inside XLA
    here, and a fatal message XLA writes to the captured stderr dies with the process."""
    runs = {}
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        for mesh in SHARDED_MESHES:
            workdir = tmp_path_factory.mktemp("tok_mesh_" + "x".join(map(str, mesh)))
            runs[mesh] = (workdir, _run(workdir, mesh=mesh)[1])
    return runs


@pytest.mark.parametrize("mesh", SHARDED_MESHES)
def test_losses_on_8_devices_match_single_device(single, sharded, mesh):
    np.testing.assert_allclose(_losses(sharded[mesh][0]), _losses(single[0]),
                               rtol=2e-4, atol=1e-5)


def test_stopped_then_extended_run_equals_straight_run(single, tmp_path):
    workdir, _, straight = single
    _run(tmp_path, total_steps=2)
    _, resumed = _run(tmp_path, total_steps=STEPS)  # same workdir, larger total_steps
    assert int(resumed["step"]) == STEPS
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(_losses(tmp_path), _losses(workdir))


def test_worker_processes_train_and_resume_as_the_threaded_reader(single, tmp_path):
    """data.worker_processes=2 for the first leg (no iterator state saved: the position is
    the step), threads for the second: parameters and losses equal the threaded straight
    run's, bit for bit."""
    workdir, config, straight = single
    _run(tmp_path, total_steps=2, data=dict(config.data, worker_processes=2))
    assert not (tmp_path / "checkpoints" / "2" / "data").exists()
    _, resumed = _run(tmp_path, total_steps=STEPS)
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(_losses(tmp_path), _losses(workdir))


def _abstract_on(n_devices, mesh_shape):
    config = tiny_tokenizer_config()
    config.mesh.update(data=mesh_shape[0], fsdp=mesh_shape[1], tensor=mesh_shape[2])
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:n_devices])
    stage = tokenizer.build_stage(config)
    abstract, _ = loop.abstract_train_state(stage, mesh, jax.random.key(0))
    return abstract


def _assert_restores(workdir, saved_state, mesh_shape):
    n = int(np.prod(mesh_shape))
    abstract = _abstract_on(n, mesh_shape)
    checkpointer = checkpointing.Checkpointer(str(workdir), keep=3)
    restored = checkpointer.restore(STEPS, abstract)
    checkpointer.close()
    kernel = restored["params"]["encoder"]["conv_in"]["kernel"]
    assert len(kernel.sharding.device_set) == n
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_saved_on_1_device_restores_on_8(single):
    workdir, _, state = single
    _assert_restores(workdir, state, (2, 2, 2))


def test_checkpoint_saved_on_8_devices_restores_on_1(sharded):
    workdir, state = sharded[(2, 4, 1)]
    _assert_restores(workdir, state, (1, 1, 1))


def test_perceptual_loss_from_a_weights_file_joins_the_generator_loss(tmp_path):
    from tests.models.test_lpips import _torch_layout_state
    weights = tmp_path / "lpips_vgg.npz"
    np.savez(weights, **_torch_layout_state())
    config, _ = _run(tmp_path / "run", total_steps=1,
                     loss=dict(tiny_tokenizer_config().loss, perceptual_weights=str(weights),
                               perceptual_weight=0.1))  # the demo has it off
    record = metrics.read_metrics(str(tmp_path / "run"))[-1]
    assert record["perceptual_loss"] > 0
    assert_generator_loss_is_the_weighted_sum(record, config.loss)


def _first_test_images(config, count):
    """The evaluation view of the first ``count`` test images, computed independently."""
    from mage_jax.data import augment, datasets
    source = datasets.open_source(config.data, config.data.eval_split)
    return np.stack([augment.resize_center_crop(source[i]["image"], config.data.image_size,
                                                config.data.eval_crop_fraction,
                                                config.data.eval_interpolation)
                     for i in range(count)])


def test_end_of_run_scores_the_fixed_test_subset(single):
    """test_psnr is the mean per-image PSNR of the first eval.num_examples test images
    (padding of the last batch excluded), recomputed here from the final weight average
    (MaskGIT's EMA, what the stage's tokenizer is)."""
    workdir, config, state = single
    assert config.ema_decay
    record = metrics.read_metrics(str(workdir))[-1]
    assert record["step"] == STEPS and record["test_examples"] == config.eval.num_examples
    images = _first_test_images(config, config.eval.num_examples)
    model, _ = tokenizer.build_models(config)
    trained = model.apply({"params": state["params"]}, images)[0]
    recon, aux = model.apply({"params": state["ema_params"]}, images)
    assert np.abs(np.asarray(trained) - np.asarray(recon)).max() > 1e-4  # not the same weights
    mse = np.mean((np.clip(np.asarray(recon), 0, 1) - images) ** 2, axis=(1, 2, 3))
    np.testing.assert_allclose(record["test_psnr"], np.mean(-10 * np.log10(mse)), rtol=1e-4)
    ids = np.asarray(aux["token_ids"]).ravel()
    assert record["test_codes_used"] == len(np.unique(ids))
    assert 1 <= record["test_perplexity"] <= record["test_codes_used"]


def test_reconstructions_png_holds_test_images_beside_reconstructions(single):
    from PIL import Image
    workdir, config, _ = single
    size, rows = config.data.image_size, config.num_image_summaries
    with Image.open(os.path.join(workdir, "reconstructions.png")) as png:
        pixels = np.asarray(png.convert("RGB"), np.float32) / 255
    assert pixels.shape == (rows * size * 4, 2 * size * 4, 3)  # enlarged 4x for viewing
    # The left column is the test images themselves (nearest-neighbour enlarged).
    first = _first_test_images(config, rows)
    left = pixels[::4, : size * 4 : 4].reshape(rows, size, size, 3)
    np.testing.assert_allclose(left, first, atol=1 / 255 + 1e-6)


def test_summary_names_psnr_codebook_and_pictures(single):
    from mage_jax.train import report
    workdir, config, _ = single
    text = report.summary(config, str(workdir), seconds=12.0)
    record = metrics.read_metrics(str(workdir))[-1]
    assert f"test PSNR {record['test_psnr']:.2f} dB" in text
    assert f"{int(record['test_codes_used'])} of {config.tokenizer.codebook_size} codes" in text
    assert os.path.join(str(workdir), "reconstructions.png") in text
    assert f"tensorboard --logdir {workdir}" in text
    assert f"--config.tokenizer_workdir={workdir}" in text


def test_without_adversarial_weight_the_discriminator_never_runs(tmp_path):
    loss = dict(tiny_tokenizer_config().loss, adversarial_weight=0.0)
    config, state = _run(tmp_path, total_steps=STEPS, loss=loss)
    records = metrics.read_metrics(str(tmp_path))
    assert not any("discriminator_loss" in r for r in records)
    # Its parameters and optimizer state stay as initialised (kept for checkpoint layout).
    init = jax.device_get(nn.unbox(tokenizer.build_stage(config).init_state(
        jax.random.split(jax.random.key(config.seed), 3)[0])))
    for a, b in zip(jax.tree.leaves(state["disc_params"]), jax.tree.leaves(init["disc_params"])):
        np.testing.assert_array_equal(a, b)
