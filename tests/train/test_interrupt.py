"""SIGTERM and Ctrl-C sent to a real training process: it saves the step it is at, waits for
the save and exits 0 (SIGTERM) or 130 (Ctrl-C); a second Ctrl-C quits at once and the newest
complete checkpoint still restores; the same command resumes."""
import json
import pathlib
import signal
import subprocess
import sys
import time

from mage_jax import checkpointing

REPO = pathlib.Path(__file__).resolve().parents[2]
# A small tokenizer run that would take hours, logging every step and never checkpointing
# by itself: every checkpoint here is one that a signal asked for.
_COMMAND = [sys.executable, "-m", "mage_jax.main", "--config=configs/tokenizer.py:demo",
            "--config.total_steps=100000", "--config.log_every=1",
            "--config.checkpoint_every=100000", "--config.image_summary_every=0",
            "--config.eval.num_examples=0", "--config.batch_size=8",
            "--config.tokenizer.codebook_size=32"]


def _logged_steps(workdir: pathlib.Path) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _start_and_wait_for_step(workdir, after: int, log: pathlib.Path):
    """Starts the command (its log into ``log``: a pipe could fill and block it)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(_COMMAND + [f"--workdir={workdir}"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=f, text=True)
    deadline = time.time() + 240
    while not any(s > after + 2 for s in _logged_steps(workdir)):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "the run never logged a step"
        time.sleep(0.5)
    return proc


def _wait(proc, log: pathlib.Path, timeout: float) -> str:
    proc.wait(timeout=timeout)
    return log.read_text()


def _latest(workdir) -> int:
    ckpt = checkpointing.Checkpointer(str(workdir), async_save=False, read_only=True)
    try:
        return ckpt.latest_step()
    finally:
        ckpt.close()


def test_sigterm_then_ctrl_c_save_and_resume_and_a_second_ctrl_c_quits_at_once(tmp_path):
    workdir = tmp_path / "run"
    # SIGTERM (a preemption notice): checkpoint at the current step, exit 0.
    log = tmp_path / "log.txt"
    proc = _start_and_wait_for_step(workdir, 0, log)
    proc.send_signal(signal.SIGTERM)
    err = _wait(proc, log, 120)
    assert proc.returncode == 0, err[-3000:]
    first = _latest(workdir)
    assert first == max(_logged_steps(workdir)) > 2  # the step it was at, not a later one
    assert "SIGTERM" in err and "run the same command to resume" in err

    # The same command resumes from there; Ctrl-C saves and exits 130.
    proc = _start_and_wait_for_step(workdir, first, log)
    proc.send_signal(signal.SIGINT)
    err = _wait(proc, log, 120)
    assert proc.returncode == 130, err[-3000:]
    steps = _logged_steps(workdir)
    assert steps[first] == first + 1  # resumed: the step after the saved one comes next
    second = _latest(workdir)
    assert second == max(steps) > first

    # Two Ctrl-C in a row: out at once, and the newest complete checkpoint restores.
    proc = _start_and_wait_for_step(workdir, second, log)
    proc.send_signal(signal.SIGINT)
    # The second one once the first has been taken (two at once would coalesce into one).
    deadline = time.time() + 60
    while "saving a checkpoint after this step" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    started = time.time()
    err = _wait(proc, log, 60)
    assert proc.returncode == 130 and time.time() - started < 30, err[-3000:]
    assert "Second Ctrl-C" in err
    params, step = checkpointing.restore_params(str(workdir))
    assert step >= second and "encoder" in params
