"""A checkpoint that cannot be written mid-run (a full disk, a quota): the run stops with one
line naming the failure and the intact step, and the same command resumes from it.

The failure is made real for the running process only: its file-size limit is lowered to 0
(``prlimit``) once it has completed a checkpoint, so every later write fails in the kernel
(EFBIG, as ENOSPC would on a full disk), in tensorstore's threads as in Python's.
"""
import pathlib
import resource
import subprocess
import time

import jax
import numpy as np

from mage_jax import checkpointing
from tests.tiny_configs import tiny_run_env, tiny_tokenizer_command

REPO = pathlib.Path(__file__).resolve().parents[2]


def _command(workdir, steps):
    # Logged at the first and last step only, so the next write after the limit is a save.
    return tiny_tokenizer_command(workdir, steps, log_every=1000)


def _complete_steps(workdir) -> list[int]:
    root = workdir / "checkpoints"
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def test_a_failed_save_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(_command(workdir, 400), cwd=REPO, env=tiny_run_env(), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not _complete_steps(workdir):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
    _, stderr = proc.communicate(timeout=300)
    errors = [line for line in stderr.splitlines() if line.startswith("ERROR:")]
    assert proc.returncode == 2, stderr[-3000:]
    assert len(errors) == 1, errors
    kept = max(_complete_steps(workdir))
    assert "could not write a checkpoint" in errors[0] and "File too large" in errors[0]
    assert f"step {kept}, is intact" in errors[0] and "run the same command" in errors[0]

    params, step = checkpointing.restore_params(str(workdir))
    assert step == kept and all(np.isfinite(p).all() for p in jax.tree.leaves(params))
    # The same command, given room again, resumes from that step and finishes.
    done = subprocess.run(_command(workdir, kept + 2), cwd=REPO, env=tiny_run_env(), text=True,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"at step {kept}" in done.stderr and "Resuming" in done.stderr
    assert max(_complete_steps(workdir)) == kept + 2

