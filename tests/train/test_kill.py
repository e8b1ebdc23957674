"""kill -9 at random moments, during asynchronous saves too: restarted each time with the same
command, the run ends bit-identical to one that was never interrupted; a half-written step
is never restored and is cleaned up."""
import json
import os
import pathlib
import random
import signal
import subprocess
import time

import jax
import numpy as np

from mage_jax import checkpointing
from tests.tiny_configs import tiny_run_env, tiny_tokenizer_command

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 40


def _command(workdir, steps: int = STEPS) -> list[str]:
    # Every step checkpointed (asynchronously) and logged, so kills land in and between saves.
    return tiny_tokenizer_command(workdir, steps, log_every=1, checkpoint_every=1,
                                  keep_checkpoints=3)


def _losses(workdir) -> dict[int, float]:
    """step -> loss; a step logged twice (run again after a kill) must log the same loss."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step, loss = record["step"], record["loss"]
        assert out.setdefault(step, loss) == loss, (step, out[step], loss)
    return out


def _lines(workdir) -> int:
    path = workdir / "metrics.jsonl"
    return len(path.read_bytes().splitlines()) if path.exists() else 0


def _params(workdir):
    params, step = checkpointing.restore_params(str(workdir))
    return step, jax.tree.leaves(params)


def test_five_kills_at_random_moments_end_bit_identical_to_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_command(straight), cwd=REPO, env=tiny_run_env(),
                   check=True, capture_output=True, timeout=600)
    rng = random.Random(0)
    kills = 0
    while kills < 5:
        log = open(tmp_path / f"log{kills}.txt", "w")
        proc = subprocess.Popen(_command(killed), cwd=REPO, env=tiny_run_env(),
                                stdout=subprocess.DEVNULL, stderr=log)
        # Wait for this run's own first logged step, then kill it a random moment later.
        before = _lines(killed)
        deadline = time.time() + 300
        while _lines(killed) <= before:
            assert proc.poll() is None, (tmp_path / f"log{kills}.txt").read_text()[-3000:]
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.0))
        if proc.poll() is not None:  # finished before the kill: not a kill, start over
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        log.close()
        kills += 1
    subprocess.run(_command(killed), cwd=REPO, env=tiny_run_env(), check=True,
                   capture_output=True, timeout=600)
    assert kills == 5, "the run finished before five kills: lengthen it"
    step_a, params_a = _params(straight)
    step_b, params_b = _params(killed)
    assert step_a == step_b == STEPS
    for a, b in zip(params_a, params_b):
        np.testing.assert_array_equal(a, b)
    losses_a, losses_b = _losses(straight), _losses(killed)
    assert sorted(losses_b) == list(range(1, STEPS + 1))
    assert losses_a == losses_b
    leftovers = [p for p in os.listdir(killed / "checkpoints") if "orbax-checkpoint-tmp" in p]
    assert not leftovers, leftovers


def test_a_half_written_step_is_ignored_and_removed(tmp_path):
    def run(steps):
        subprocess.run(_command(workdir, steps), cwd=REPO, env=tiny_run_env(), check=True,
                       capture_output=True, timeout=600)

    workdir = tmp_path / "run"
    run(2)
    # What a kill during the save of a step leaves (orbax's name for a step being written;
    # step 9, which the resumed run below never writes itself).
    partial = workdir / "checkpoints" / "9.orbax-checkpoint-tmp"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 100)
    step, _ = _params(workdir)  # a reader ignores it ...
    assert step == 2
    run(3)  # ... and the resumed run removes it
    assert not partial.exists()
    step, params = _params(workdir)
    assert step == 3 and all(np.isfinite(p).all() for p in params)
