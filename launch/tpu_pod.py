#!/usr/bin/env python3
"""One mage_jax stage on a Cloud TPU slice, from its creation to its deletion.

    # What the config costs per chip on the slice (compiled on this machine, no TPU needed):
    python launch/tpu_pod.py --accelerator_type=v5p-128 --config=configs/pretrain.py:vit_l --plan
    # Create the slice (queued resources, spot), ship this checkout, install, run; on a
    # preemption or a failed worker recreate the slice and rerun, which resumes:
    python launch/tpu_pod.py --name=mage-l --zone=us-east5-a --accelerator_type=v5p-128 \
        --runtime_version=v2-alpha-tpuv5 --spot --config=configs/pretrain.py:vit_l \
        --workdir=gs://BUCKET/runs/mage_l --watch --max_restarts=20 -- --config.model.dtype=bfloat16
    # Tear it down:
    python launch/tpu_pod.py --name=mage-l --zone=us-east5-a --delete

The story of a run: check the arguments (nothing is created for a bad one); create the
queued resource ``NAME-qr`` holding the node ``NAME`` (or reuse it if it is ACTIVE) and
poll until it is ACTIVE; copy a tarball of this checkout (or clone ``--repo_url``) to every
worker, make a virtual environment there and ``pip install -e '.[tpu]'`` with the JAX
installed here; run ``python -m mage_jax.main`` on every worker over ``gcloud ... ssh
--worker=all``, worker 0's log streamed here. When the ssh command ends, the slice is
looked at: the run is done when it exited 0 on a slice that is still ACTIVE and READY (a
preempted worker gets SIGTERM, and mage_jax's handler saves and exits 0 too, so the exit
status alone cannot tell). Otherwise, with ``--watch``, a lost slice (queued resource
SUSPENDED/FAILED, node not READY) is deleted and created again, waiting in the queue for
capacity, and the same command reruns; on a slice that is still healthy (a worker's
process failed) the command reruns in place. The run resumes from the newest checkpoint
in its workdir, which must therefore be a ``gs://`` bucket. At most ``--max_restarts``.

Every gcloud call goes through ``_gcloud``; tests/launch/test_tpu_pod.py replaces
``gcloud`` on PATH with a recording stand-in and checks the calls.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

# The slice and runtime checks (launch/tpu_slices.py, beside this file: `python
# launch/tpu_pod.py` puts launch/ first on sys.path; it puts the checkout there for mage_jax).
from tpu_slices import ROOT, RUNTIMES, Slice, check_runtime, local_jax

BAD_INPUT = 2  # the exit status of every mage_jax command for a mistake the user can fix


def _hosts(tpu: Slice) -> str:
    return f"{tpu.hosts} host{'s' if tpu.hosts > 1 else ''}"


# ---------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------
def parse(argv):
    p = argparse.ArgumentParser(
        prog="python launch/tpu_pod.py", description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- (or any --config.KEY=VALUE) go to mage_jax.main.")
    p.add_argument("--name", help="TPU node name; the queued resource is NAME-qr.")
    p.add_argument("--zone")
    p.add_argument("--project", help="Google Cloud project (default: gcloud's).")
    p.add_argument("--accelerator_type", help="e.g. v5p-128, v4-32, v5litepod-16, v6e-8.")
    p.add_argument("--runtime_version", help=f"TPU VM image, e.g. {RUNTIMES}.")
    p.add_argument("--any_runtime", action="store_true", help="Skip the runtime check.")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="Spot capacity (preemptible).")
    kind.add_argument("--reserved", action="store_true", help="From the project's reservation.")
    p.add_argument("--config", help="e.g. configs/pretrain.py:vit_l.")
    p.add_argument("--workdir", help="gs://BUCKET/PATH (shared by the workers, kept across "
                   "slices).")
    p.add_argument("--repo_url", help="Workers git clone this instead of receiving this checkout.")
    p.add_argument("--branch", default="main", help="With --repo_url.")
    p.add_argument("--source_dir", default=str(ROOT),
                   help="The checkout shipped to the workers (default: this one).")
    p.add_argument("--python", default="{}.{}".format(*sys.version_info[:2]),
                   help="Python of the workers' virtual environment (default: this one's).")
    p.add_argument("--jax_version", default=local_jax(),
                   help="jax[tpu]==VERSION on the workers (default: the JAX installed here).")
    p.add_argument("--watch", action="store_true",
                   help="Recreate the slice and rerun after a preemption or a failed worker.")
    p.add_argument("--max_restarts", type=int, default=10)
    p.add_argument("--poll_seconds", type=float, default=30.0)
    p.add_argument("--delete_when_done", action="store_true",
                   help="Delete the slice once the run has finished.")
    p.add_argument("--delete", action="store_true", help="Delete the slice and exit.")
    p.add_argument("--plan", action="store_true",
                   help="Run the pod planner for this slice here and exit (needs '.[tpu]').")
    args, rest = p.parse_known_args(argv)
    if "--" in rest:
        rest.remove("--")
    stray = [a for a in rest if not a.startswith("--config.")]
    if stray:
        p.error(f"unrecognized arguments {stray}; overrides of the run are --config.KEY=VALUE.")
    args.overrides = rest
    return args


def _require(args, *names):
    missing = [f"--{n}" for n in names if not getattr(args, n)]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (python launch/tpu_pod.py --help).")


def validate(args) -> Slice | None:
    """Every mistake this can see, before any gcloud call."""
    if args.delete:
        _require(args, "name", "zone")
        return None
    _require(args, "accelerator_type", "config")
    tpu = Slice(args.accelerator_type)
    config_file = args.config.split(":")[0]
    source = pathlib.Path(args.source_dir)
    if not args.repo_url and not (source / config_file).is_file():
        raise ValueError(f"--config={args.config}: there is no {config_file} in {source}; "
                         f"use one of {sorted(str(p.relative_to(source)) for p in (source / 'configs').glob('*.py'))}.")
    if args.plan:
        return tpu
    _require(args, "name", "zone", "runtime_version", "workdir")
    if not args.any_runtime:
        check_runtime(args.runtime_version, tpu)
    if not args.workdir.startswith("gs://") and (tpu.hosts > 1 or args.watch):
        why = (f"{tpu.accelerator_type} has {tpu.hosts} hosts, whose local disks are not shared"
               if tpu.hosts > 1 else "--watch recreates the slice, whose new disk starts empty")
        raise ValueError(f"--workdir={args.workdir}: {why}; use a Cloud Storage path, "
                         f"--workdir=gs://BUCKET/runs/NAME.")
    if args.max_restarts < 0:
        raise ValueError(f"--max_restarts={args.max_restarts}: use 0 or more.")
    return tpu


def plan_command(args, tpu: Slice) -> list[str]:
    return ([sys.executable, "-m", "mage_jax.plan", f"--config={args.config}",
             f"--topology={tpu.topology}"] + args.overrides)


# ---------------------------------------------------------------------------------------
# gcloud
# ---------------------------------------------------------------------------------------
class Pod:
    def __init__(self, args):
        self.args = args
        self.qr = f"{args.name}-qr"
        self.where = [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])

    def _gcloud(self, *argv, capture=False) -> subprocess.CompletedProcess:
        cmd = ["gcloud", "compute", "tpus", *argv, *self.where]
        if not capture:
            print("+ " + shlex.join(cmd), flush=True)
        return subprocess.run(cmd, text=True, capture_output=capture)

    def state(self) -> str | None:
        """The queued resource's state, None if there is none. Another failure of gcloud
        (the network, credentials) is tried again a few times, then stops the launcher:
        taking it for "gone" would create a second slice."""
        for _ in range(5):
            out = self._gcloud("queued-resources", "describe", self.qr,
                               "--format=value(state.state)", capture=True)
            if out.returncode == 0:
                return out.stdout.strip() or "UNKNOWN"
            if "NOT_FOUND" in out.stderr or "not found" in out.stderr.lower():
                return None
            time.sleep(self.args.poll_seconds)
        raise RuntimeError(f"gcloud could not describe {self.qr}: {out.stderr.strip()}")

    def node_state(self) -> str:
        out = self._gcloud("tpu-vm", "describe", self.args.name, "--format=value(state)",
                           capture=True)
        return out.stdout.strip() if out.returncode == 0 else "ABSENT"

    def create(self) -> None:
        a = self.args
        kind = ["--spot"] if a.spot else ["--reserved"] if a.reserved else []
        if self._gcloud("queued-resources", "create", self.qr, f"--node-id={a.name}",
                        f"--accelerator-type={a.accelerator_type}",
                        f"--runtime-version={a.runtime_version}", *kind).returncode:
            raise RuntimeError(f"creating the queued resource {self.qr} failed (gcloud's "
                               f"message above).")

    def delete(self, wait: bool) -> int:
        return self._gcloud("queued-resources", "delete", self.qr, "--force", "--quiet",
                            *([] if wait else ["--async"])).returncode

    def healthy(self) -> tuple[bool, str]:
        state = self.state()
        if state != "ACTIVE":
            return False, f"queued resource {self.qr} is {state or 'gone'}"
        node = self.node_state()
        return node == "READY", f"node {self.args.name} is {node}"

    def wait_active(self) -> str:
        """Polls until ACTIVE (returned) or lost (FAILED, SUSPENDED, gone: returned)."""
        last = None
        while True:
            state = self.state()
            if state != last:
                print(f"queued resource {self.qr}: {state}", flush=True)
                last = state
            if state in ("ACTIVE", "FAILED", "SUSPENDING", "SUSPENDED", None):
                return state or "gone"
            time.sleep(self.args.poll_seconds)

    def ssh(self, command: str) -> int:
        return self._gcloud("tpu-vm", "ssh", self.args.name, "--worker=all",
                            f"--command={command}").returncode

    def scp(self, local: str, remote: str) -> int:
        return self._gcloud("tpu-vm", "scp", local, f"{self.args.name}:{remote}",
                            "--worker=all").returncode


# ---------------------------------------------------------------------------------------
# What runs on the workers
# ---------------------------------------------------------------------------------------
SRC_TARBALL = "~/mage_jax_src.tgz"


def setup_command(args) -> str:
    if args.repo_url:
        fetch = (f"rm -rf ~/mage_jax && git clone --depth=1 -b {shlex.quote(args.branch)} "
                 f"{shlex.quote(args.repo_url)} ~/mage_jax")
    else:
        fetch = f"rm -rf ~/mage_jax && mkdir -p ~/mage_jax && tar xzf {SRC_TARBALL} -C ~/mage_jax"
    # The images' Python (3.10 on Ubuntu 22.04) is older than recent JAX needs: uv makes a
    # virtual environment with the Python asked for, downloading it if the image lacks it.
    jax = f" 'jax[tpu]=={args.jax_version}'" if args.jax_version else ""
    return " && ".join([
        "set -e", fetch, "cd ~/mage_jax",
        "python3 -m pip install -q --user uv",
        f"(test -x ~/mage_venv/bin/python || python3 -m uv venv -q --python {args.python} ~/mage_venv)",
        f"python3 -m uv pip install -q --python ~/mage_venv/bin/python -e '.[tpu]'{jax}"])


def run_command(args) -> str:
    """Every worker starts the run in the background, its output in a log file; worker 0
    also streams its log to the ssh session. A process of an earlier attempt on this slice
    (its pid in ~/mage_jax_run.pid) gets SIGTERM first and is waited for: it saves."""
    main = shlex.join(["python", "-m", "mage_jax.main", f"--config={args.config}",
                       f"--workdir={args.workdir}", *args.overrides])
    return "\n".join([
        "cd ~/mage_jax || exit 1",
        'old=$(cat ~/mage_jax_run.pid 2>/dev/null)',
        'if [ -n "$old" ] && kill -TERM "$old" 2>/dev/null; then',
        '  for i in $(seq 600); do kill -0 "$old" 2>/dev/null || break; sleep 1; done',
        '  kill -KILL "$old" 2>/dev/null',
        "fi",
        ("worker=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/"
         "computeMetadata/v1/instance/attributes/agent-worker-number || echo 0)"),
        "mkdir -p ~/mage_jax_logs",
        'log=~/mage_jax_logs/run-$(date +%Y%m%d-%H%M%S).log',
        # Made here, not by the background job's redirection, which may come after tail.
        ': > "$log"',
        f'~/mage_venv/bin/{main} > "$log" 2>&1 &',
        "pid=$!",
        "echo $pid > ~/mage_jax_run.pid",
        'if [ "$worker" = 0 ]; then tail -n +1 -f --pid=$pid "$log"; fi',
        "wait $pid; status=$?",
        "rm -f ~/mage_jax_run.pid",
        'echo "worker $worker: mage_jax.main exited with status $status"',
        "exit $status"])


def make_tarball(source: pathlib.Path) -> str:
    """This checkout's tracked files (their working-tree contents), or every file of a
    folder that is not a git checkout, as a .tgz in a temporary file."""
    listed = subprocess.run(["git", "-C", str(source), "ls-files", "-z"], capture_output=True)
    if listed.returncode == 0 and listed.stdout:
        files = [f for f in listed.stdout.decode().split("\0") if f]
    else:
        files = [str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()
                 and not {".git", "__pycache__"} & set(p.relative_to(source).parts)]
    fd, path = tempfile.mkstemp(prefix="mage_jax_src_", suffix=".tgz")
    os.close(fd)
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(files):
            if (source / f).is_file():
                tar.add(source / f, arcname=f)
    return path


# ---------------------------------------------------------------------------------------
# The pod's life
# ---------------------------------------------------------------------------------------
class GaveUp(Exception):
    pass


_WAITING = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")


def launch(args, tpu: Slice) -> int:
    pod = Pod(args)
    restarts = 0

    def restart(why: str) -> None:
        nonlocal restarts
        if not args.watch:
            raise GaveUp(f"{why}; rerun this command (or add --watch) to resume from the "
                         f"newest checkpoint.")
        if restarts >= args.max_restarts:
            raise GaveUp(f"{why}; gave up after {restarts} restarts (--max_restarts).")
        restarts += 1
        print(f"--- {why}: restart {restarts} of at most {args.max_restarts}", flush=True)

    def fresh_slice(recreate: bool) -> None:
        """Until an ACTIVE slice: reuse one (unless `recreate`), or delete what is left of
        one, create it again and wait in the queue for capacity."""
        state = pod.state()
        if state in _WAITING and not recreate:  # e.g. queued by an earlier launcher
            state = pod.wait_active()
        while recreate or state != "ACTIVE":
            recreate = False
            if state is not None:
                pod.delete(wait=True)
            pod.create()
            state = pod.wait_active()
            if state != "ACTIVE":
                restart(f"queued resource {pod.qr} is {state}")
        print(f"slice {args.name} ({args.accelerator_type}, {_hosts(tpu)}) is ACTIVE",
              flush=True)

    tarball = None if args.repo_url else make_tarball(pathlib.Path(args.source_dir))
    recreate = False
    try:
        while True:
            fresh_slice(recreate)
            if tarball and pod.scp(tarball, SRC_TARBALL):
                failed = "copying the code to the workers failed"
            elif pod.ssh(setup_command(args)):
                failed = "installing on the workers failed"
            else:
                while True:
                    status = pod.ssh(run_command(args))
                    if status:  # a lost worker shows in the slice's state a little later
                        time.sleep(args.poll_seconds)
                    healthy, what = pod.healthy()
                    if healthy and status == 0:
                        print(f"run finished on {args.name}", flush=True)
                        if args.delete_when_done:
                            pod.delete(wait=False)
                        return 0
                    if healthy and status == BAD_INPUT:
                        print(f"tpu_pod: the run stopped on a mistake it names above (exit "
                              f"{BAD_INPUT}); not rerunning.", file=sys.stderr)
                        return BAD_INPUT
                    restart(f"the run ended with status {status}, {what}")
                    if not healthy:
                        break  # a new slice, then ship and install again
                recreate = True
                continue
            healthy, what = pod.healthy()
            restart(f"{failed}, {what}")
            recreate = not healthy
    except (GaveUp, RuntimeError) as e:
        print(f"tpu_pod: {e}", file=sys.stderr)
        return 1
    finally:
        if tarball:
            os.unlink(tarball)


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        tpu = validate(args)
    except ValueError as e:
        print(f"tpu_pod: {e}", file=sys.stderr)
        return BAD_INPUT
    if not args.plan and not shutil.which("gcloud"):
        print("tpu_pod: gcloud is not on PATH: install the Google Cloud CLI "
              "(https://cloud.google.com/sdk/docs/install) and run gcloud auth login.",
              file=sys.stderr)
        return BAD_INPUT
    if args.delete:
        return Pod(args).delete(wait=False)
    plan = plan_command(args, tpu)
    print(f"{args.accelerator_type} = planner slice {tpu.topology} ({tpu.chips} chips, "
          f"{_hosts(tpu)}). Its plan, compiled here without a TPU (pip install -e "
          f"'.[tpu]'):\n  {shlex.join(['python'] + plan[1:])}", flush=True)
    if args.plan:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        return subprocess.run(plan, cwd=ROOT, env=env).returncode
    return launch(args, tpu)


if __name__ == "__main__":
    sys.exit(main())
