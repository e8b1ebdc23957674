"""Shared test fixtures: paths of the reference files computed by the official code."""
import json
import os
import pathlib

from mage_jax import xla_defaults  # imports no JAX

# Every test process sees 8 simulated CPU devices (a small pod slice); single-device runs
# build their mesh from jax.devices()[:1]. Must happen before JAX initialises its backend.
# XLA's CPU backend optimisation level 0 compiles about 4x faster; the tests are dominated
# by compiling tiny models, and their results were identical at the default level
# (benchmarks, which measure speed, keep the default).
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
# XLA:CPU aborts the whole process (LOG(FATAL), "Termination timeout ... exceeded") when the
# simulated devices of one collective do not all reach it within a time limit. With 8
# devices on 2 busy cores (two test workers) a sharded run's devices can fall that far
# behind each other (a 1-second limit aborts them on a loaded machine). Only the limit
# changes; a real hang still ends, after 3 minutes.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in _flags:
    _flags += (" --xla_cpu_collective_call_terminate_timeout_seconds=180"
               " --xla_cpu_collective_call_warn_stuck_timeout_seconds=60")
os.environ["XLA_FLAGS"] = _flags.strip()
# The thread pool the entry points give simulated devices (mage_jax/xla_defaults.py says
# why: with the default, a sharded step's concurrent all-gathers hung for good), here too,
# since the tests run stages in-process; subprocesses inherit it.
_nproc = xla_defaults.thread_pool_size(_flags, os.environ.get("NPROC"), None)
if _nproc is not None:
    os.environ["NPROC"] = _nproc
# The tests run on this CPU. With the `[tpu]` extra installed, JAX would otherwise look for
# a TPU in every test process and subprocess first (libtpu's warnings, seconds each); the
# planner's compile-only TPU devices do not need it (mage_jax/plan/topology.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

_SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "reference"


def _fixture_path(env_var: str, default_name: str) -> pathlib.Path:
    path = pathlib.Path(os.environ.get(env_var, _SHARED / default_name))
    if not path.exists():
        raise FileNotFoundError(
            f"{env_var}={path} does not exist; point {env_var} at a reference .npz "
            f"(the shared checkout has {_SHARED / default_name}).")
    return path


@pytest.fixture(scope="session")
def mage_torch_fixture():
    """The official PyTorch MAGE reference: a dict of arrays plus ``meta`` (parsed JSON)."""
    with np.load(_fixture_path("MAGE_TORCH_FIXTURE", "mage_torch_tiny.npz")) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["meta"] = json.loads(str(arrays.pop("meta_json")))
    return arrays


@pytest.fixture(scope="session")
def inception_fixture():
    with np.load(_fixture_path("INCEPTION_FIXTURE", "inception_fid_tiny.npz")) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["meta"] = json.loads(str(arrays.pop("meta_json")))
    return arrays


@pytest.fixture(scope="session")
def pretrain_dir(tmp_path_factory):
    """A 2-step tiny pretraining run (its tokenizer trained first, inside the run), shared
    by the stages that read a trained MAGE (generate, probe, few-shot)."""
    import jax
    from mage_jax.train import stages
    from tests.tiny_configs import tiny_pretrain_config
    workdir = tmp_path_factory.mktemp("pretrain")
    config = tiny_pretrain_config(total_steps=2)
    config.tokenizer_stage.total_steps = 2
    config.eval.num_examples = 0
    config.image_summary_every = 0
    stages.run(config, str(workdir), devices=jax.devices()[:1], summarize=False)
    return str(workdir)


@pytest.fixture(scope="module", autouse=True)
def _free_compiled_programs():
    """Drop each module's compiled programs when it ends: an xdist worker runs hundreds of
    tests in one process, and XLA's caches of their executables would otherwise grow with
    every module (CI once lost a worker to a native crash deep into the run)."""
    yield
    import gc

    import jax
    jax.clear_caches()
    gc.collect()
