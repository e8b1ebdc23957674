"""launch/tpu_pod.py against a recording stand-in for gcloud, and launch/slurm.sbatch's requeue.

No cloud: a `gcloud` script written into tmp_path and put first on PATH appends every call's
argv as a JSON line to calls.jsonl, answers `queued-resources describe` with the next state
of a scripted list (the last one repeats; NOT_FOUND fails as gcloud does for a missing
resource), `tpu-vm describe` likewise from node_states, and ends the run's ssh command with
the next status of run_status. The tests then read which commands ran, in which order.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import tarfile
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "launch" / "tpu_pod.py"
SBATCH = ROOT / "launch" / "slurm.sbatch"
sys.path.insert(0, str(ROOT / "launch"))
import tpu_pod  # noqa: E402
import tpu_slices  # noqa: E402

FAKE_GCLOUD = '''#!{python}
import json, os, shutil, sys
d = os.environ["FAKE_GCLOUD_DIR"]
argv = sys.argv[1:]
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(argv) + "\\n")

def pop(name, default):
    path = os.path.join(d, name)
    lines = open(path).read().split() if os.path.exists(path) else []
    if len(lines) > 1:
        open(path, "w").write("\\n".join(lines[1:]) + "\\n")
    return lines[0] if lines else default

words = [a for a in argv if not a.startswith("-")]
if words[2:4] == ["queued-resources", "describe"]:
    state = pop("qr_states", "ACTIVE")
    if state == "NOT_FOUND":
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND")
    if state == "NETWORK_ERROR":
        sys.exit("ERROR: (gcloud.compute.tpus.queued-resources.describe) connection reset")
    print(state)
elif words[2:4] == ["tpu-vm", "describe"]:
    print(pop("node_states", "READY"))
elif words[2:4] == ["tpu-vm", "scp"]:
    shutil.copy(words[4], os.path.join(d, "shipped.tgz"))
elif words[2:4] == ["tpu-vm", "ssh"]:
    command = [a for a in argv if a.startswith("--command=")][0]
    if "mage_jax.main" in command:
        print("worker 0: step 1 loss 6.9")
        sys.exit(int(pop("run_status", "0")))
'''


@pytest.fixture
def cloud(tmp_path):
    """(run(args, **scripted lists) -> CompletedProcess, calls() -> list of argv)."""
    bin_dir, state = tmp_path / "bin", tmp_path / "gcloud_state"
    bin_dir.mkdir()
    state.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    source = tmp_path / "checkout"  # what is shipped: a small stand-in for this checkout
    (source / "configs").mkdir(parents=True)
    (source / "configs" / "pretrain.py").write_text("# config\n")
    (source / "setup.py").write_text("# setup\n")

    def run(args, path=None, **scripted):
        for name, values in scripted.items():
            (state / name).write_text("\n".join(map(str, values)) + "\n")
        env = dict(os.environ, FAKE_GCLOUD_DIR=str(state),
                   PATH=path if path is not None else f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        return subprocess.run([sys.executable, str(LAUNCHER), f"--source_dir={source}", *args],
                              env=env, capture_output=True, text=True, timeout=60)

    def calls():
        log = state / "calls.jsonl"
        return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

    run.state_dir = state
    return run, calls


LAUNCH = ["--name=pod", "--zone=us-central2-b", "--project=proj", "--accelerator_type=v4-16",
          "--runtime_version=tpu-ubuntu2204-base", "--config=configs/pretrain.py:demo",
          "--workdir=gs://bucket/runs/demo", "--poll_seconds=0"]
WHERE = ["--zone=us-central2-b", "--project=proj"]


def kind(argv):
    """`qr describe`, `qr create`, `node describe`, `scp`, `setup`, `run`, ..."""
    group, verb = argv[2], argv[3]
    if verb == "ssh":
        return "run" if "mage_jax.main" in argv[-len(WHERE) - 1] else "setup"
    return verb if verb == "scp" else f"{'qr' if group == 'queued-resources' else 'node'} {verb}"


def test_creates_waits_ships_installs_and_runs(cloud):
    run, calls = cloud
    out = run(LAUNCH + ["--spot", "--", "--config.total_steps=5"],
              qr_states=["NOT_FOUND", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    assert out.returncode == 0, out.stderr
    got = calls()
    assert [kind(c) for c in got] == [
        "qr describe", "qr create", "qr describe", "qr describe", "qr describe",
        "scp", "setup", "run", "qr describe", "node describe"]
    assert got[0] == ["compute", "tpus", "queued-resources", "describe", "pod-qr",
                      "--format=value(state.state)", *WHERE]
    assert got[1] == ["compute", "tpus", "queued-resources", "create", "pod-qr", "--node-id=pod",
                      "--accelerator-type=v4-16", "--runtime-version=tpu-ubuntu2204-base",
                      "--spot", *WHERE]
    scp, setup, main = got[5], got[6], got[7]
    assert scp[4:7] == [scp[4], "pod:~/mage_jax_src.tgz", "--worker=all"]
    assert setup[:6] == ["compute", "tpus", "tpu-vm", "ssh", "pod", "--worker=all"]
    assert "tar xzf ~/mage_jax_src.tgz" in setup[6] and "-e '.[tpu]'" in setup[6]
    assert "jax[tpu]==" in setup[6]  # pinned to the JAX installed here
    assert ("python -m mage_jax.main --config=configs/pretrain.py:demo "
            "--workdir=gs://bucket/runs/demo --config.total_steps=5") in main[6]
    assert got[9][:5] == ["compute", "tpus", "tpu-vm", "describe", "pod"]
    with tarfile.open(run.state_dir / "shipped.tgz") as tar:  # the checkout reached the workers
        assert {"configs/pretrain.py", "setup.py"} <= set(tar.getnames())
    assert "worker 0: step 1 loss 6.9" in out.stdout  # worker 0's log, streamed
    assert "python -m mage_jax.plan --config=configs/pretrain.py:demo --topology=v4:2x2x2" in out.stdout


def test_preemption_recreates_the_slice_and_reruns_the_same_command(cloud):
    run, calls = cloud
    out = run(LAUNCH + ["--watch", "--max_restarts=3"],
              qr_states=["NOT_FOUND", "ACTIVE", "SUSPENDED", "SUSPENDED", "ACTIVE"],
              run_status=[255, 0])
    assert out.returncode == 0, out.stderr
    got = calls()
    assert [kind(c) for c in got] == [
        "qr describe", "qr create", "qr describe", "scp", "setup", "run",
        "qr describe",                                   # SUSPENDED: preempted
        "qr describe", "qr delete", "qr create", "qr describe",  # wait for capacity again
        "scp", "setup", "run", "qr describe", "node describe"]
    creates = [c for c in got if kind(c) == "qr create"]
    runs = [c for c in got if kind(c) == "run"]
    assert creates[0] == creates[1] and runs[0] == runs[1]
    delete = next(c for c in got if kind(c) == "qr delete")
    assert delete == ["compute", "tpus", "queued-resources", "delete", "pod-qr", "--force",
                      "--quiet", *WHERE]  # waits for the deletion before creating again
    assert "restart 1 of at most 3" in out.stdout


def test_a_failed_worker_on_a_healthy_slice_reruns_in_place(cloud):
    run, calls = cloud
    out = run(LAUNCH + ["--watch"], qr_states=["ACTIVE"], run_status=[1, 0])
    assert out.returncode == 0, out.stderr
    assert [kind(c) for c in calls()] == [
        "qr describe", "scp", "setup", "run", "qr describe", "node describe",
        "run", "qr describe", "node describe"]  # the ACTIVE slice is reused, never created


def test_a_node_that_is_not_ready_is_recreated(cloud):
    run, calls = cloud
    out = run(LAUNCH + ["--watch"], qr_states=["ACTIVE"], node_states=["PREEMPTED", "READY"],
              run_status=[0, 0])
    assert out.returncode == 0, out.stderr
    assert [kind(c) for c in calls()] == [
        "qr describe", "scp", "setup", "run", "qr describe", "node describe",
        "qr describe", "qr delete", "qr create", "qr describe",
        "scp", "setup", "run", "qr describe", "node describe"]


def test_a_failed_queued_request_is_made_again_with_watch(cloud):
    run, calls = cloud
    out = run(LAUNCH + ["--watch"],
              qr_states=["NOT_FOUND", "WAITING_FOR_RESOURCES", "FAILED", "ACTIVE"])
    assert out.returncode == 0, out.stderr
    assert [kind(c) for c in calls()][:7] == [
        "qr describe", "qr create", "qr describe", "qr describe",
        "qr delete", "qr create", "qr describe"]


def test_an_unreachable_api_is_not_taken_for_a_missing_slice(cloud):
    run, calls = cloud
    out = run(LAUNCH, qr_states=["NETWORK_ERROR"])
    assert out.returncode == 1 and "connection reset" in out.stderr
    assert [kind(c) for c in calls()] == ["qr describe"] * 5  # tried again, nothing created


def test_restarts_are_bounded(cloud):
    run, calls = cloud
    out = run(LAUNCH + ["--watch", "--max_restarts=2"], qr_states=["ACTIVE"], run_status=[1])
    assert out.returncode == 1
    assert [kind(c) for c in calls()].count("run") == 3  # the first run and 2 restarts
    assert "gave up after 2 restarts" in out.stderr


def test_without_watch_a_preemption_stops_and_says_how_to_resume(cloud):
    run, calls = cloud
    out = run(LAUNCH, qr_states=["ACTIVE", "SUSPENDED"], run_status=[255])
    assert out.returncode == 1
    assert "queued resource pod-qr is SUSPENDED" in out.stderr and "--watch" in out.stderr
    assert [kind(c) for c in calls()] == ["qr describe", "scp", "setup", "run", "qr describe"]


def test_a_run_that_stops_on_bad_input_is_not_rerun(cloud):
    run, calls = cloud
    out = run(LAUNCH + ["--watch"], qr_states=["ACTIVE"], run_status=[2])
    assert out.returncode == 2
    assert [kind(c) for c in calls()].count("run") == 1


def test_delete_when_done_and_delete(cloud):
    run, calls = cloud
    assert run(LAUNCH + ["--delete_when_done"], qr_states=["ACTIVE"]).returncode == 0
    assert calls()[-1] == ["compute", "tpus", "queued-resources", "delete", "pod-qr", "--force",
                           "--quiet", "--async", *WHERE]
    n = len(calls())
    out = run(["--name=pod", "--zone=us-central2-b", "--delete"])
    assert out.returncode == 0, out.stderr
    assert calls()[n:] == [["compute", "tpus", "queued-resources", "delete", "pod-qr", "--force",
                            "--quiet", "--async", "--zone=us-central2-b"]]


def _with(**changes):
    args = {a.split("=")[0]: a for a in LAUNCH}
    for key, value in changes.items():
        args[f"--{key}"] = f"--{key}={value}" if value is not None else None
    return [a for a in args.values() if a]


@pytest.mark.parametrize("args, names", [
    (_with(accelerator_type="v3-8"), ["--accelerator_type='v3-8'", "v5litepod-N", "v6e-N"]),
    (_with(accelerator_type="v5e-16"), ["v5litepod-N"]),
    (_with(accelerator_type="v5p-12"), ["v5p-12", "v5p-N"]),
    (_with(runtime_version="v2-alpha-tpuv6e"), ["--runtime_version=v2-alpha-tpuv6e",
                                               "--runtime_version=tpu-ubuntu2204-base"]),
    (_with(accelerator_type="v5p-16"), ["--runtime_version=v2-alpha-tpuv5"]),
    (_with(runtime_version="tpu-vm-tf-2.16.1-pod-pjrt"), ["TensorFlow", "tpu-ubuntu2204-base"]),
    (_with(runtime_version="tpu-vm-v4-base"), ["Python 3.8", "tpu-ubuntu2204-base"]),
    (_with(workdir="/tmp/runs/demo"), ["--workdir=/tmp/runs/demo", "2 hosts", "gs://"]),
    (_with(accelerator_type="v4-8", workdir="runs/demo") + ["--watch"], ["--watch", "gs://"]),
    (_with(config="configs/nope.py:demo"), ["configs/nope.py", "configs/pretrain.py"]),
    (_with(zone=None), ["--zone"]),
    (_with(max_restarts=-1), ["--max_restarts=-1"]),
])
def test_bad_input_stops_before_any_gcloud_call(cloud, args, names):
    run, calls = cloud
    out = run(args)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and all(n in lines[0] for n in names), out.stderr
    assert calls() == []


def test_no_gcloud_on_path_is_bad_input(cloud, tmp_path):
    run, _ = cloud
    out = run(LAUNCH, path=str(tmp_path / "empty"))
    assert out.returncode == 2 and "gcloud is not on PATH" in out.stderr


def test_accelerator_types_map_onto_the_planners_slices():
    want = {"v4-8": ("v4:2x2x1", 1), "v4-32": ("v4:2x2x4", 4), "v5p-128": ("v5p:4x4x4", 16),
            "v5p-256": ("v5p:4x4x8", 32), "v5litepod-8": ("v5e:2x4", 1),
            "v5litepod-16": ("v5e:4x4", 4), "v6e-8": ("v6e:2x4", 1), "v6e-256": ("v6e:16x16", 64)}
    for name, (topo, hosts) in want.items():
        tpu = tpu_slices.Slice(name)
        assert (tpu.topology, tpu.hosts) == (topo, hosts), name
        assert tpu_slices.topology.check_name(tpu.topology) == tpu.generation
    assert set(tpu_slices.RUNTIMES) == set(tpu_slices.topology.CHIPS)


# ---------------------------------------------------------------------------------------
# The command every worker runs (run_command), executed here with stand-ins
# ---------------------------------------------------------------------------------------
def _worker_home(tmp_path, worker, status):
    home = tmp_path / f"home{worker}"
    (home / "mage_jax").mkdir(parents=True)
    (home / "mage_venv" / "bin").mkdir(parents=True)
    python = home / "mage_venv" / "bin" / "python"
    python.write_text(f"#!/bin/sh\necho \"training $*\"\nexit {status}\n")
    bin_dir = tmp_path / f"bin{worker}"
    bin_dir.mkdir()
    curl = bin_dir / "curl"  # the metadata server's answer: this VM's worker number
    curl.write_text(f"#!/bin/sh\necho {worker}\n")
    for f in (python, curl):
        f.chmod(0o755)
    return home, dict(os.environ, HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.parametrize("worker", [0, 1])
def test_worker_command_streams_worker_0_and_returns_the_runs_status(tmp_path, worker):
    args = tpu_pod.parse(["--config=configs/pretrain.py:demo", "--workdir=gs://b/r",
                          "--config.seed=3"])
    home, env = _worker_home(tmp_path, worker, status=7)
    leftover = subprocess.Popen(["sleep", "60"])  # an earlier attempt's process on this VM
    reaper = threading.Thread(target=leftover.wait)  # reaped at once, as init does on a VM
    reaper.start()
    (home / "mage_jax_run.pid").write_text(f"{leftover.pid}\n")
    try:
        out = subprocess.run(["bash", "-c", tpu_pod.run_command(args)], env=env,
                             capture_output=True, text=True, timeout=60)
    finally:
        leftover.kill()
        reaper.join()
    assert leftover.returncode == -signal.SIGTERM  # asked to save and stop first
    assert out.returncode == 7
    line = ("training -m mage_jax.main --config=configs/pretrain.py:demo --workdir=gs://b/r "
            "--config.seed=3")
    assert (line in out.stdout) == (worker == 0)
    logs = list((home / "mage_jax_logs").iterdir())
    assert len(logs) == 1 and line in logs[0].read_text()
    assert not (home / "mage_jax_run.pid").exists()


# ---------------------------------------------------------------------------------------
# launch/slurm.sbatch
# ---------------------------------------------------------------------------------------
def test_sbatch_asks_for_requeue_and_an_early_sigterm():
    text = SBATCH.read_text()
    assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:TERM@" in text
    assert "scontrol requeue" in text
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)


FAKE_SRUN = """#!/bin/bash
echo "$@" > "$FAKE_DIR/srun_args"
trap 'echo saved >> "$FAKE_DIR/srun_log"; exit 0' TERM
touch "$FAKE_DIR/started"
for i in $(seq "$FAKE_SRUN_TENTHS"); do sleep 0.1; done
exit "$FAKE_SRUN_STATUS"
"""


@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >> "$FAKE_DIR/scontrol_calls"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)

    def start(status=0, tenths=1, **env):
        env = dict(os.environ, FAKE_DIR=str(tmp_path), FAKE_SRUN_STATUS=str(status),
                   FAKE_SRUN_TENTHS=str(tenths), SLURM_JOB_ID="1234",
                   PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env)
        return subprocess.Popen(["bash", str(SBATCH), "configs/pretrain.py:demo", "/shared/run",
                                 "--config.seed=1"], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def requeues():
        log = tmp_path / "scontrol_calls"
        return log.read_text().splitlines() if log.exists() else []

    def signal_when_started(proc):
        deadline = time.time() + 30
        while not (tmp_path / "started").exists():
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)

    return start, requeues, signal_when_started, tmp_path


@pytest.mark.parametrize("status", [0, 3])
def test_sbatch_run_that_ends_by_itself_is_not_requeued(slurm, status):
    start, requeues, _, tmp_path = slurm
    proc = start(status=status)
    assert proc.wait(timeout=30) == status
    assert requeues() == []
    assert (tmp_path / "srun_args").read_text().split() == [
        "python", "-m", "mage_jax.main", "--config=configs/pretrain.py:demo",
        "--workdir=/shared/run", "--config.seed=1"]


def test_sbatch_sigterm_saves_then_requeues(slurm):
    start, requeues, signal_when_started, tmp_path = slurm
    proc = start(tenths=600)
    signal_when_started(proc)
    assert proc.wait(timeout=30) == 0
    assert (tmp_path / "srun_log").read_text() == "saved\n"  # the run got SIGTERM, and saved
    assert requeues() == ["requeue 1234"]


def test_sbatch_requeues_are_bounded(slurm):
    start, requeues, signal_when_started, _ = slurm
    proc = start(tenths=600, SLURM_RESTART_COUNT="20")
    signal_when_started(proc)
    assert proc.wait(timeout=30) == 1
    assert requeues() == []
