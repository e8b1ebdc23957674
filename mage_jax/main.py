"""The one entry point: ``python -m mage_jax.main --config=configs/<stage>.py[:args] --workdir=DIR``.

The config names its stage (``config.stage``); overrides go through ``--config.key=value``
and the config is locked, so an unknown key stops the run before anything happens.
"""
from __future__ import annotations

import logging as std_logging
import os
import time

# TensorFlow is only imported for TFDS preparation and TensorBoard writing: keep its C++
# start-up chatter out of the run log.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import sys

from mage_jax import cli, workdir_lock, xla_defaults
from mage_jax.train import interrupt

xla_defaults.apply()  # before any JAX backend starts (mage_jax/xla_defaults.py says why)

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config file, e.g. configs/pretrain.py:demo.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, config.json.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "jax.distributed.initialize(): 'auto' when launched on several hosts (TPU pod, SLURM with "
    "several tasks, or JAX_COORDINATOR_ADDRESS set), 'on' always, 'off' never.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (only where not auto-detected).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (manual).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (manual).")
_VERBOSE = flags.DEFINE_bool(
    "verbose", False, "On an error, show the Python traceback (also MAGE_JAX_VERBOSE=1).")


def _multi_host_environment() -> bool:
    """True where jax.distributed can discover several processes by itself."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or _COORDINATOR.value:
        return True
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def initialize_distributed() -> bool:
    """Starts jax.distributed where the flags or the environment ask; True if it did."""
    if _DISTRIBUTED.value == "off" or (
            _DISTRIBUTED.value == "auto" and not _multi_host_environment()):
        return False
    import jax
    # CPU hosts talk through gloo; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=_COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS"),
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
    logging.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


class _QuietLibraries(std_logging.Filter):
    """Keeps orbax's per-save INFO chatter out of the run log (warnings still show)."""

    def filter(self, record):
        return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def run(config, workdir: str):
    """Runs the stage the config names; importable for tests and notebooks.

    A pretraining config with ``sample_when_done`` (the demo) then samples from the
    trained model with its ``generate_stage`` config into ``<workdir>/generate``, before
    the run's summary is logged. The stages set their mesh as JAX's global one; it is put
    back as it was when the run returns, so a notebook's next cell does not inherit it.
    """
    import jax
    with jax.set_mesh(None):
        return _run(config, workdir)


def _run(config, workdir: str):
    from mage_jax.generate import stage as generate
    if config.get("stage") == "generate":
        return generate.run(config, workdir)
    if config.get("stage") == "finetune":
        from mage_jax.finetune import stage as finetune
        return finetune.run(config, workdir)
    if config.get("stage") in ("probe", "fewshot"):
        from mage_jax.probe import stage as probe
        return (probe.run if config.stage == "probe" else probe.run_fewshot)(config, workdir)
    from mage_jax import evaluators as evaluators_lib
    from mage_jax.train import report, stages
    evaluators = evaluators_lib.build(config)  # config.evals: checked before compiling
    if not config.get("sample_when_done", False):
        return stages.run(config, workdir, evaluators=evaluators)
    started = time.perf_counter()
    state = stages.run(config, workdir, summarize=False, evaluators=evaluators)
    if int(state["step"]) >= config.total_steps:  # not preempted: the model is finished
        sampling = ml_collections.ConfigDict(config.generate_stage.to_dict())
        sampling.pretrain_workdir = workdir
        sampling.mesh = ml_collections.ConfigDict(config.mesh.to_dict())
        generate.run(sampling, os.path.join(workdir, report.SAMPLES_WORKDIR))
    logging.info("\n%s", report.summary(config, workdir, stages.tokenizer_workdir(config, workdir),
                                        seconds=time.perf_counter() - started))
    return state


# Exit status of a process whose run lost another of its processes (a killed or failed
# host): every process must be started again; the run resumes from its newest checkpoint.
PEER_LOST_STATUS = 3


def _peer_lost(error: BaseException) -> bool:
    """In a multi-process run, a collective or a coordination barrier that fails at run
    time (gloo's "Connection reset by peer", orbax's barrier time-outs, the coordination
    service's errors) means a peer stopped."""
    import jax
    return (jax.process_count() > 1
            and isinstance(error, (jax.errors.JaxRuntimeError, TimeoutError, RuntimeError)))


def _exit_peer_lost(error: BaseException) -> None:
    import jax
    sys.stderr.write(
        f"ERROR: process {jax.process_index()} of {jax.process_count()}: another process of "
        f"this run stopped ({cli.one_line(error)[:300]}). Start every process again with "
        f"the same command: the run resumes from its newest complete checkpoint. "
        f"[{type(error).__name__}; exit {PEER_LOST_STATUS}]\n")
    logging.flush()
    sys.stderr.flush()
    # Not sys.exit: JAX's exit handlers would wait on, then abort in, the coordination
    # service the lost peer belonged to (SIGABRT and a C++ stack instead of this line).
    os._exit(PEER_LOST_STATUS)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides are --config.key=value.")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required, e.g. --workdir=/tmp/mage_demo.")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    workdir = _WORKDIR.value
    lock = None
    distributed = False
    try:
        distributed = initialize_distributed()
        import jax
        if workdir_lock.lockable(workdir) and jax.process_index() == 0:
            lock = workdir_lock.WorkdirLock(workdir).acquire()  # one run per workdir
        if _CONFIG.value.get("stage") in interrupt.STAGES:
            interrupt.install()  # SIGTERM / Ctrl-C: checkpoint, then stop (train/interrupt.py)
        run(_CONFIG.value, workdir)
    except interrupt.Stopped as e:
        logging.warning("%s: its checkpoint is saved; run the same command to resume.", e)
    except Exception as e:  # noqa: BLE001  (a lost peer first; then the user's errors)
        if distributed and _peer_lost(e):
            _exit_peer_lost(e)
        if not isinstance(e, cli.USER_ERRORS):
            raise
        if lock is not None:
            lock.release_and_remove_if_unused()  # a refused run leaves no new directory
            lock = None
        if cli.verbose(_VERBOSE.value):
            raise
        logging.flush()
        cli.exit_with_error(e)
    finally:
        if lock is not None:
            lock.release()
    if interrupt.requested():
        sys.exit(interrupt.exit_status())  # 0 after SIGTERM, 130 after Ctrl-C


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main, flags_parser=cli.parse_flags)
