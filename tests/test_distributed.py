"""Two `jax.distributed` processes on this CPU, through the real entry point.

What a multi-host run must get right, and a single-process test cannot see:
* each process reads only its slice of the global batch (data/pipeline.py), and
  ``host_batch_to_global`` stitches the slices back in process order, so 2 processes x 2
  devices train on exactly the batches of 1 process x 4 devices: same losses, step by step;
* gloo collectives (the loss and gradient all-reduces cross the process boundary);
* only process 0 writes config.json / metrics.jsonl, both write their shards of the orbax
  checkpoint and their own data-iterator state, and a two-process restart resumes from it.

The reference run and the distributed run use the same mesh shape (data=4), so the same
reduction tree; the losses then agree to float round-off. All processes run with
``--xla_backend_optimization_level=0``: compiling dominates these tiny runs and that flag
makes it several times faster on CPU, and every run here uses it, so they stay comparable.
"""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np

from mage_jax import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_DEVICES = 4
NUM_PROCESSES = 2
TOTAL_STEPS = 4       # the reference run; the distributed one stops at 2 and resumes to 4
FIRST_LEG_STEPS = 2   # == tiny_tokenizer_config's checkpoint_every, so a checkpoint exists
TIMEOUT_S = 240       # per launch; a hang (e.g. a collective waiting forever) fails, not blocks
# Losses and the metrics derived from them; all are functions of the same global batch.
COMPARED = ("loss", "reconstruction_loss", "codebook_loss", "entropy_loss", "psnr",
            "discriminator_loss", "grad_norm")


def _write_config(tmp_path: pathlib.Path) -> str:
    """A config file main.py can load by path: the tiny tokenizer on a data=4 mesh."""
    path = tmp_path / "tiny_tokenizer.py"
    path.write_text(textwrap.dedent(f"""\
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from tiny_configs import tiny_tokenizer_config

        def get_config(arg=None):
            config = tiny_tokenizer_config(total_steps={TOTAL_STEPS})
            config.mesh.data = {TOTAL_DEVICES}  # the same mesh shape in every run
            # Smaller still than tiny_tokenizer_config (one resolution level, 8 px): these
            # runs are mostly compile time, which grows with the number of layers.
            config.tokenizer.update(ch_mult=(1,), codebook_size=16)
            config.data.image_size = 8
            return config
        """))
    return str(path)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices_per_process: int) -> dict:
    env = dict(os.environ)
    env.pop("JAX_COORDINATOR_ADDRESS", None)  # the flags below say everything
    env.update(
        JAX_PLATFORMS="cpu",
        # Replaces the 8 simulated devices the test process itself runs with (conftest).
        XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices_per_process} "
                   "--xla_backend_optimization_level=0"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    return env


def _wait_all(procs: list[subprocess.Popen]) -> list[str]:
    """Waits for every process; stops at the first failure (its peers would only hang in a
    collective waiting for it) or at the deadline. Returns what went wrong, if anything."""
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        codes = [proc.poll() for proc in procs]
        failed = [f"process {i}: exit {c}" for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            return failed
        if all(c == 0 for c in codes):
            return []
        time.sleep(0.5)
    return [f"process {i}: still running after {TIMEOUT_S} s"
            for i, proc in enumerate(procs) if proc.poll() is None]


def _stop_all(procs: list[subprocess.Popen], logs) -> None:
    """No child outlives its test: kill what still runs, close the logs."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for log in logs:
        log.close()


def _launch(config_path: str, workdir: pathlib.Path, log_dir: pathlib.Path, *,
            num_processes: int, overrides=()) -> list[str]:
    """Runs `python -m mage_jax.main` in ``num_processes`` processes; returns their logs.

    Raises AssertionError with every process's log tail when one fails or times out; no
    child outlives this call.
    """
    devices = TOTAL_DEVICES // num_processes
    base = [sys.executable, "-m", "mage_jax.main", f"--config={config_path}",
            f"--workdir={workdir}", *overrides]
    if num_processes == 1:
        commands = [base + ["--distributed=off"]]
    else:
        address = f"127.0.0.1:{_free_port()}"
        commands = [base + ["--distributed=on", f"--coordinator_address={address}",
                            f"--num_processes={num_processes}", f"--process_id={i}"]
                    for i in range(num_processes)]
    log_dir.mkdir(parents=True, exist_ok=True)
    log_paths = [log_dir / f"process_{i}.log" for i in range(num_processes)]
    procs, logs = [], []
    try:
        for command, log_path in zip(commands, log_paths):
            log = open(log_path, "w", encoding="utf-8")
            logs.append(log)
            procs.append(subprocess.Popen(command, cwd=REPO, env=_env(devices), stdout=log,
                                          stderr=subprocess.STDOUT))
        failures = _wait_all(procs)
    finally:
        _stop_all(procs, logs)
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in log_paths]
    if failures:
        tails = "\n".join(f"----- process {i} ({log_paths[i]}), last lines:\n"
                          + "\n".join(t.splitlines()[-40:]) for i, t in enumerate(texts))
        raise AssertionError(f"{' '.join(commands[0])}\nfailed: {failures}\n{tails}")
    return texts


def _losses(workdir: pathlib.Path) -> dict[int, dict]:
    return {r["step"]: r for r in metrics_lib.read_metrics(str(workdir))}


def _assert_same_losses(got: dict, want: dict, steps) -> None:
    for step in steps:
        assert step in got, f"step {step} missing from metrics.jsonl (has {sorted(got)})"
        for key in COMPARED:
            np.testing.assert_allclose(
                got[step][key], want[step][key], rtol=1e-5, atol=1e-6,
                err_msg=f"{key} at step {step}: 2 processes x {TOTAL_DEVICES // 2} devices "
                        f"differ from 1 process x {TOTAL_DEVICES} devices")


def test_two_processes_match_one_process_and_resume(tmp_path):
    config_path = _write_config(tmp_path)

    # Reference: one process holding all devices, uninterrupted to TOTAL_STEPS.
    single = tmp_path / "single"
    _launch(config_path, single, tmp_path / "logs_single", num_processes=1)
    want = _losses(single)
    assert sorted(want) == list(range(1, TOTAL_STEPS + 1))
    # The comparison would be vacuous if the steps did not differ from each other, or if
    # the discriminator never ran (tiny_tokenizer_config turns it on at step 3).
    assert len({want[s]["loss"] for s in want}) == TOTAL_STEPS
    assert want[TOTAL_STEPS]["discriminator_loss"] > 0

    # Two processes, stopped after FIRST_LEG_STEPS (a checkpoint is written there).
    multi = tmp_path / "multi"
    _launch(config_path, multi, tmp_path / "logs_first_leg", num_processes=NUM_PROCESSES,
            overrides=[f"--config.total_steps={FIRST_LEG_STEPS}"])
    assert (multi / "config.json").is_file()
    assert (multi / "metrics.jsonl").is_file()
    assert (multi / "checkpoints" / str(FIRST_LEG_STEPS)).is_dir()
    # Every process saved its own data-iterator position beside the shared state.
    data_files = sorted(p.name for p in (multi / "checkpoints" / str(FIRST_LEG_STEPS))
                        .rglob("process_*-of-*.json"))
    assert data_files == [f"process_{i}-of-{NUM_PROCESSES}.json" for i in range(NUM_PROCESSES)]
    got = _losses(multi)
    assert sorted(got) == list(range(1, FIRST_LEG_STEPS + 1))
    _assert_same_losses(got, want, range(1, FIRST_LEG_STEPS + 1))

    # Two processes again, to TOTAL_STEPS: they must resume, not restart, and continue on
    # exactly the batches and parameters of the uninterrupted single-process run.
    logs = _launch(config_path, multi, tmp_path / "logs_resume", num_processes=NUM_PROCESSES)
    for i, log in enumerate(logs):
        assert f"at step {FIRST_LEG_STEPS}" in log and "Resuming" in log, (
            f"process {i} did not resume from step {FIRST_LEG_STEPS}:\n{log[-3000:]}")
    assert (multi / "checkpoints" / str(TOTAL_STEPS)).is_dir()
    got = _losses(multi)
    assert sorted(got) == list(range(1, TOTAL_STEPS + 1))
    _assert_same_losses(got, want, range(1, TOTAL_STEPS + 1))


def test_a_killed_process_stops_its_peer_and_both_resume_exactly(tmp_path):
    """kill -9 of one host: the other does not hang. Waiting in a collective, it fails at
    once and exits with one line and status 3 (main.py); waiting elsewhere (an orbax save
    barrier), JAX's coordination service ends it when the lost peer's heartbeats stop
    (at most ~100 s), with JAX's own message. Both started again resume from the newest
    complete checkpoint, on the batches and parameters of a never interrupted run."""
    config_path = _write_config(tmp_path)
    multi = tmp_path / "multi"
    address = f"127.0.0.1:{_free_port()}"
    command = [sys.executable, "-m", "mage_jax.main", f"--config={config_path}",
               f"--workdir={multi}", "--config.total_steps=1000", "--distributed=on",
               f"--coordinator_address={address}", f"--num_processes={NUM_PROCESSES}"]
    logs = [open(tmp_path / f"killed_{i}.log", "w") for i in range(NUM_PROCESSES)]
    procs = [subprocess.Popen(command + [f"--process_id={i}"], cwd=REPO,
                              env=_env(TOTAL_DEVICES // NUM_PROCESSES), stdout=log,
                              stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (multi / "metrics.jsonl").exists() or len(_losses(multi)) < 3:
            assert all(p.poll() is None for p in procs), "a process ended before the kill"
            assert time.monotonic() < deadline, "no third logged step"
            time.sleep(0.2)
        procs[1].kill()
        status = procs[0].wait(timeout=180)  # a hang fails here instead of blocking
    finally:
        _stop_all(procs, logs)
    survivor = (tmp_path / "killed_0.log").read_text(errors="replace")
    if status == 3:  # main.py's line
        errors = [line for line in survivor.splitlines() if line.startswith("ERROR:")]
        assert len(errors) == 1 and "another process of this run stopped" in errors[0], errors
    else:  # JAX's coordination service (LOG(FATAL): SIGABRT)
        assert status == -6, survivor[-3000:]
        assert "the JAX distributed service detected fatal errors" in survivor, survivor[-3000:]

    steps = [int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit()]
    newest = max(steps, default=0)
    total = newest + 2
    logs = _launch(config_path, multi, tmp_path / "logs_resume", num_processes=NUM_PROCESSES,
                   overrides=[f"--config.total_steps={total}"])
    if newest:
        for log in logs:
            assert f"at step {newest}" in log and "Resuming" in log, log[-3000:]
    single = tmp_path / "single"
    _launch(config_path, single, tmp_path / "logs_single", num_processes=1,
            overrides=[f"--config.total_steps={total}"])
    _assert_same_losses(_losses(multi), _losses(single), range(1, total + 1))


def test_two_processes_score_fid_and_inception_score_as_one(tmp_path, pretrain_dir):
    """The generate stage on 2 hosts: each keeps and scores only the samples it holds, and
    the merged FID/IS equal those of all samples scored in one place. Batch 4 over 2 x 2
    devices: host 0 holds samples 0, 1, 4, 5 and host 1 samples 2, 3, so the IS's first
    split (samples 0-2) spans both hosts."""
    from mage_jax.eval import fid, inception
    from tests.conftest import _fixture_path
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(2048, 16))
    mu, sigma = rng.normal(size=2048), basis @ basis.T / 16
    reference = tmp_path / "reference.npz"
    fid.save_statistics(reference, mu, sigma, 100)
    weights = _fixture_path("INCEPTION_FIXTURE", "inception_fid_tiny.npz")
    _launch("configs/generate.py:demo", tmp_path / "two", tmp_path / "logs", num_processes=2,
            overrides=[
                f"--config.pretrain_workdir={pretrain_dir}", "--config.num_samples=6",
                "--config.batch_size=4", "--config.mesh.data=4", "--config.sampling.num_steps=2",
                "--config.classifier_measures.enabled=False", "--config.save_png=False",
                f"--config.fid.reference_stats={reference}", "--config.fid.splits=2",
                f"--config.fid.inception_weights={weights}", "--config.fid.batch_size=2"])
    held = [np.load(tmp_path / "two" / f"samples.{i}-of-2.npz") for i in range(2)]
    assert [h["index"].tolist() for h in held] == [[0, 1, 4, 5], [2, 3]]
    images = np.zeros((6,) + held[0]["images"].shape[1:], np.uint8)
    for h in held:
        images[h["index"]] = h["images"]
    # The same batches of 2 as the hosts ran ([0, 1], [4, 5] and [2, 3]), scored here.
    want, _ = fid.evaluate(inception.load_inception(str(weights)), [images], batch_size=2,
                           splits=2, reference=(mu, sigma))
    got = metrics_lib.read_metrics(str(tmp_path / "two"))[-1]
    # Float32 logits computed in other processes differ in the last bits (~2e-9 of the IS);
    # scoring the hosts' rows in host order instead ([0, 1, 4, 5] + [2, 3]) moves the mean
    # by 2e-4 of itself and the std by 16%.
    np.testing.assert_allclose(got["inception_score"], want["inception_score_mean"], rtol=1e-7)
    np.testing.assert_allclose(got["inception_score_std"], want["inception_score_std"], rtol=1e-5)
    # Statistics merged in another order (float64 round-off): the eigenvalues of the rank-5
    # covariance product that are 0 in exact arithmetic differ by ~1e-14, and their square
    # roots move the FID by up to ~1e-7 of itself.
    np.testing.assert_allclose(got["fid"], want["frechet_inception_distance"], rtol=1e-6)
    assert got["fid"] > 1.0 and got["inception_score_std"] > 0  # not a degenerate case
