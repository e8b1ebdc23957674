"""Bad input stops a run before anything is compiled, with a message naming the value and
the fix; nothing is trained, and no checkpoint is written or overwritten.

"Nothing compiled" is observed, not assumed: jax logs every XLA program it lowers (logger
``jax._src.interpreters.pxla``, DEBUG), and the loop's model programs (``step_fn``, the
``<lambda>`` that initialises the state) must not be among them. Tiny eager ops (a PRNG
seed) may compile; they cost milliseconds.

Three real tiny runs are shared by the module: a tokenizer (2 steps), a MAGE pretrain on it
(2 steps), and its continuation with a learning rate that diverges.
"""
import contextlib
import logging
import math
import pathlib
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mage_jax import checkpointing, metrics
from mage_jax.convert import files as convert_files
from mage_jax.convert import torch_mage
from mage_jax.data.datasets import DatasetNotFoundError
from mage_jax.train import loop, pretrain, stages
from mage_jax.validation import ConfigError
from tiny_configs import load_config, tiny_pretrain_config, tiny_tokenizer_config

REPO = pathlib.Path(__file__).resolve().parents[1]
_MODEL_PROGRAMS = ("step_fn", "<lambda>", "init")


class _Lowered(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.names = []

    def emit(self, record):
        if record.getMessage().startswith("Compiling"):
            self.names.append(str(record.args[0]) if record.args else record.getMessage())


@contextlib.contextmanager
def lowered_programs():
    """Collects the names of the XLA programs jax lowers (= compiles) inside the block."""
    logger = logging.getLogger("jax._src.interpreters.pxla")
    handler, level = _Lowered(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler.names
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _checkpoint_steps(workdir) -> list[int]:
    root = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def _metric_lines(workdir) -> list[str]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _assert_nothing_ran(programs, workdir, checkpoint_steps=(), metric_lines=()):
    model_programs = [p for p in programs if any(m in p for m in _MODEL_PROGRAMS)]
    assert not model_programs, f"compiled before failing: {model_programs}"
    assert _checkpoint_steps(workdir) == list(checkpoint_steps)
    assert _metric_lines(workdir) == list(metric_lines)


def _fails(config, workdir, devices, error, match):
    """Runs the stage expecting ``error``; returns the programs lowered meanwhile."""
    with lowered_programs() as programs, pytest.raises(error, match=match):
        stages.run(config, str(workdir), devices)
    return programs


def _one_device():
    return jax.devices()[:1]


# ----------------------------------------------------------------------- command line

@pytest.mark.parametrize("override, named", [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.tokenizer.codebooksize=8", 'Did you mean "codebook_size"'),
])
def test_unknown_config_key_fails_fast_on_the_command_line(tmp_path, override, named):
    workdir = tmp_path / "run"
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mage_jax.main", "--config=configs/tokenizer.py:demo", override,
         f"--workdir={workdir}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - start
    assert result.returncode == 2
    assert named in result.stderr and override.split("=")[0] in result.stderr, result.stderr
    assert "fix the spelling" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr  # one clear line, not a stack
    assert elapsed < 60, f"took {elapsed:.0f}s: the config must be checked before any work"
    assert not workdir.exists()


def test_unknown_config_argument(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config argument.*'vit_xl'.*'vit_b', 'vit_l'"):
        load_config("pretrain", "vit_xl")
    with pytest.raises(ValueError, match=r"'dem'.*'demo', 'paper'"):
        load_config("tokenizer", "dem")
    result = subprocess.run(
        [sys.executable, "-m", "mage_jax.main", "--config=configs/pretrain.py:vit_xl",
         f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("FATAL Flags parsing error: flag --config=configs/pretrain.py:vit_xl")
    assert "vit_xl" in last and "contrastive" in last, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_error_during_the_run_is_one_line_with_status_2_and_verbose_shows_the_traceback(
        tmp_path):
    command = [sys.executable, "-m", "mage_jax.main", "--config=configs/tokenizer.py:demo",
               "--config.mesh.data=3", f"--workdir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: config.mesh asks for data=3 x fsdp=1 x tensor=1 = 3 devices")
    assert "--config.mesh.data=-1" in last and "--verbose for the traceback" in last
    assert not (tmp_path / "run").exists()  # refused before writing: no directory left
    verbose = subprocess.run(command + ["--verbose"], cwd=REPO, capture_output=True, text=True,
                             timeout=180)
    assert verbose.returncode != 0 and "Traceback" in verbose.stderr
    assert "config.mesh asks for data=3" in verbose.stderr


# --------------------------------------------------------------------- mesh and batch

def _stage_config(stage):
    # The demo pretrain trains its tokenizer first when missing: any check that came after
    # that would be seen as compiled programs.
    return tiny_tokenizer_config() if stage == "tokenizer" else tiny_pretrain_config()


@pytest.mark.parametrize("stage", ["tokenizer", "pretrain"])
@pytest.mark.parametrize("mesh, num_devices, match", [
    ((2, 2, 4), 8, r"data=2 x fsdp=2 x tensor=4 = 16 devices but 8 are available"),
    ((1, 1, 2), 8, r"= 2 devices but 8 are available.*product is 8"),
    ((1, 1, 4), 2, r"= 4 devices but 2 are available.*--config.mesh.data=-1"),
    ((3, -1, 1), 8, r"cannot fill 8 devices: 8 is not divisible by 3"),
])
def test_mesh_that_does_not_fit_the_devices(tmp_path, stage, mesh, num_devices, match):
    config = _stage_config(stage)
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    programs = _fails(config, tmp_path, jax.devices()[:num_devices], ValueError, match)
    _assert_nothing_ran(programs, tmp_path)
    assert not (tmp_path / "tokenizer").exists()


@pytest.mark.parametrize("stage, mesh, batch, fix", [
    ("tokenizer", (-1, 1, 1), 6, "--config.batch_size=8"),
    ("pretrain", (2, 2, 2), 6, "--config.batch_size=4"),
    ("pretrain", (1, 8, 1), 12, "--config.batch_size=8"),
])
def test_batch_not_divisible_by_data_parallel_size(tmp_path, stage, mesh, batch, fix):
    config = _stage_config(stage)
    config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    config.batch_size = batch
    dp = 8 // mesh[2]
    programs = _fails(config, tmp_path, jax.devices(), ConfigError,
                      rf"batch_size={batch} is not divisible by the data-parallel size {dp}"
                      rf".*{fix}")
    _assert_nothing_ran(programs, tmp_path)


# ------------------------------------------------------------------ dataset, workdir

@pytest.mark.parametrize("stage", ["tokenizer", "pretrain"])
def test_missing_dataset_says_how_to_install_it(tmp_path, stage):
    config = _stage_config(stage)
    (tmp_path / "no_idx").mkdir()
    (tmp_path / "no_tfds").mkdir()
    config.data.fashion_mnist_dir = str(tmp_path / "no_idx")
    config.data.data_dir = str(tmp_path / "no_tfds")
    workdir = tmp_path / "run"
    programs = _fails(config, workdir, _one_device(), DatasetNotFoundError,
                      r"(?s)fashion_mnist is not prepared in .*no_tfds.*no_idx.*"
                      r"apt-get install -y dataset-fashion-mnist")
    _assert_nothing_ran(programs, workdir)
    assert not list((tmp_path / "no_tfds").iterdir())  # nothing half-prepared there


def test_jpeg_draft_with_a_folder_dataset(tmp_path):
    from PIL import Image
    (tmp_path / "images" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "cat" / "0.png")
    config = _stage_config("pretrain")
    config.data.update(name="folder", manual_dir=str(tmp_path / "images"), jpeg_draft=True)
    config.eval.num_examples = 0
    workdir = tmp_path / "run"
    programs = _fails(config, workdir, _one_device(), ConfigError,
                      r"jpeg_draft=True needs a TFDS dataset.*--config.data.jpeg_draft=False")
    _assert_nothing_ran(programs, workdir)


@pytest.mark.parametrize("stage", ["tokenizer", "pretrain"])
def test_unwritable_workdir(tmp_path, stage):
    # Tests run as root, for whom chmod does not make a directory read-only: a path below a
    # regular file cannot be created by anyone.
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    workdir = blocker / "run"
    with lowered_programs() as programs, pytest.raises(
            ConfigError, match=rf"--workdir={workdir} is not writable.*--workdir="):
        stages.run(_stage_config(stage), str(workdir), _one_device())
    assert not [p for p in programs if any(m in p for m in _MODEL_PROGRAMS)]
    assert blocker.read_text() == "not a directory"


# -------------------------------------------------------------- checkpoints that misfit

@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory):
    """A tiny tokenizer trained 2 steps (one checkpoint, at step 2)."""
    workdir = tmp_path_factory.mktemp("tokenizer_run")
    config = tiny_tokenizer_config(total_steps=2)
    config.image_summary_every = 0
    with lowered_programs() as programs:
        stages.run(config, str(workdir), _one_device())
    # The detector sees a real run's model programs, so its silence elsewhere means something.
    assert any("step_fn" in p for p in programs) and any("<lambda>" in p for p in programs)
    assert _checkpoint_steps(workdir) == [2]
    return workdir, config


def test_checkpoint_of_other_shapes(tokenizer_run):
    workdir, trained = tokenizer_run
    metric_lines = _metric_lines(workdir)
    config = tiny_tokenizer_config(total_steps=4)
    config.image_summary_every = 0
    other = 2 * trained.tokenizer.codebook_size
    config.tokenizer.codebook_size = other
    dim = trained.tokenizer.embed_dim
    programs = _fails(
        config, workdir, _one_device(), checkpointing.CheckpointMismatchError,
        rf"params/quantizer/codebook of shape \({trained.tokenizer.codebook_size}, {dim}\) but "
        rf"this config builds \({other}, {dim}\).*fresh --workdir")
    _assert_nothing_ran(programs, workdir, [2], metric_lines)


@pytest.mark.parametrize("change, named", [
    ({"codebook_size": 128}, r"quantizer/codebook"),
    ({"ch_mult": (1, 2, 2)}, r"encoder/down_2|decoder/up_2"),
])
def test_tokenizer_that_does_not_fit_the_pretrain_config(tokenizer_run, tmp_path, change, named):
    tok_dir, trained = tokenizer_run
    config = tiny_pretrain_config()
    config.tokenizer_workdir = str(tok_dir)
    config.train_tokenizer_if_missing = False
    config.tokenizer.update(**trained.tokenizer.to_dict())
    config.tokenizer.update(**change)
    programs = _fails(config, tmp_path, _one_device(), pretrain.TokenizerMismatchError,
                      rf"the tokenizer in {tok_dir} does not fit.*{named}.*config.tokenizer_workdir")
    _assert_nothing_ran(programs, tmp_path)
    assert _checkpoint_steps(tok_dir) == [2]  # the tokenizer was not trained further


def test_official_checkpoint_of_another_size(mage_torch_fixture, tmp_path):
    import torch  # installed with the test extras; CI has it
    meta = mage_torch_fixture["meta"]
    state_dict = {k[len("state_dict/"):]: torch.from_numpy(np.array(v))
                  for k, v in mage_torch_fixture.items() if k.startswith("state_dict/")}
    path = tmp_path / "mage-tiny.pth"
    torch.save({"model": state_dict}, path)
    vit_b = load_config("pretrain", "vit_b")
    output = tmp_path / "converted"
    with lowered_programs() as programs, pytest.raises(
            ValueError, match=rf"token_emb\.word_embeddings\.weight .*embed_dim="
                              rf"{meta['embed_dim']}.*config\.model\.embed_dim=768.*preset"):
        convert_files.convert_mage_file(str(path), vit_b, str(output))
    assert not output.exists() and not programs
    # The same weights converted at their own head counts still do not fit the vit_b
    # model: the shape check names a parameter and says to pick the matching preset.
    params, _ = torch_mage.convert_mage(
        {k: v.numpy() for k, v in state_dict.items()}, num_heads=meta["num_heads"],
        decoder_num_heads=meta["decoder_num_heads"])
    with pytest.raises(ValueError, match=r"parameter \['\w+'\].*model expects.*vit_b"):
        convert_files.check_against_config(params, vit_b)


# ------------------------------------------------------------------ a diverging run

@pytest.fixture(scope="module")
def pretrain_run(tokenizer_run, tmp_path_factory):
    """MAGE pretrained 2 sane steps on the tiny tokenizer (checkpoint at step 2)."""
    tok_dir, trained = tokenizer_run
    workdir = tmp_path_factory.mktemp("pretrain_run")
    config = tiny_pretrain_config(total_steps=2)
    config.tokenizer_workdir = str(tok_dir)
    config.train_tokenizer_if_missing = False
    config.tokenizer.update(**trained.tokenizer.to_dict())
    config.image_summary_every = 0
    stages.run(config, str(workdir), _one_device())
    return workdir, config


def test_non_finite_loss_keeps_the_last_good_checkpoint(pretrain_run):
    workdir, sane = pretrain_run
    assert _checkpoint_steps(workdir) == [2]
    good, step = checkpointing.restore_params(str(workdir))
    assert step == 2 and all(np.all(np.isfinite(x)) for x in jax.tree.leaves(good))

    config = tiny_pretrain_config(total_steps=6)
    config.tokenizer_workdir = sane.tokenizer_workdir
    config.train_tokenizer_if_missing = False
    config.tokenizer.update(**sane.tokenizer.to_dict())
    config.image_summary_every = 0
    config.optimizer.blr = 1e30  # one Adam step moves every weight by ~1e26: inf, then NaN
    with pytest.raises(loop.NonFiniteLossError, match=r"loss is (nan|inf|-inf) at step \d+") as e:
        stages.run(config, str(workdir), _one_device())
    bad_step = int(str(e.value).split(" at step ")[1].split(";")[0])
    assert 2 < bad_step <= 6

    assert _checkpoint_steps(workdir) == [2], "nothing may be saved after the good checkpoint"
    kept, step = checkpointing.restore_params(str(workdir))
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, kept, good)
    logged = metrics.read_metrics(str(workdir))
    assert max(r["step"] for r in logged) < bad_step
    assert all(math.isfinite(r["loss"]) for r in logged)
