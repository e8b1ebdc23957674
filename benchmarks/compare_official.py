"""The official PyTorch MAGE code against this project, timed side by side on this machine.

    python benchmarks/compare_official.py --official_repo=/path/to/mage \\
        --official_python=/path/to/venv/bin/python              # both workloads, ViT-B, batch 8

Two workloads, both on the CPU in float32 (torch with ``--threads`` threads, 2 by default;
JAX with its default CPU setup and this project's XLA defaults, as ``mage_jax.main`` runs):

* ``train``: one MAGE ViT-B training step on a batch of random 256 px images: VQGAN
  tokenization of the batch, masking, encoder, decoder, loss, backward, gradient clipping
  at 3.0 and the AdamW update. Official: ``models_mage.mage_vit_base_patch16`` with
  ``config/vqgan.yaml``, the model's own forward, as ``main_pretrain.py`` builds and steps it
  (``benchmarks/official_worker.py``). Ours: ``benchmarks/train_throughput.py``'s jitted
  step of ``configs/pretrain.py:<preset>`` at ``--batch_size``, with the CPU's
  ``model.packed_dropout=True`` (the presets leave it off for TPUs).
* ``sample``: unconditional generation of a batch, ``--num_iter`` decoding steps at
  ``--choice_temperature``, and the VQGAN decode of the final tokens. Official:
  ``gen_img_uncond.gen_image``; ours: ``benchmarks/sample_throughput.py``'s jitted sampler.

Weights are random on both sides (they do not change the cost); no VQGAN checkpoint can be
assumed, so the official side loads a randomly initialised one it saves itself.

The official code is not part of this project and is never shipped with it: the user
supplies a checkout of https://github.com/LTH14/mage (``--official_repo``) and a Python
environment with its requirements (``--official_python``: torch, torchvision, timm,
omegaconf, pytorch-lightning, einops, scipy, opencv-python-headless); the worker imports
the checkout from that path at run time and edits nothing in it. The official code calls
``.cuda()`` on tensors and modules; on this CPU comparison the worker makes
``torch.Tensor.cuda`` and ``torch.nn.Module.cuda`` return ``self`` (the other run-time shims
are listed in ``benchmarks/official_worker.py``).

Every measurement runs in a fresh process (ours with this interpreter, theirs with
``--official_python``): ``--warmup`` untimed steps or calls (ours: the compile, then the
warm-up calls), then ``--steps`` timed train steps or ``--repeats`` timed sampling calls.
Each round runs one process per side, the order alternating between rounds (official
first in odd rounds, ours first in even ones) so both see the same machine. A process's
figure is images per second over its timed steps; the summary is the median over rounds
and the ratio ours / official of the medians. Writes
``<output_dir>/<time>_compare_official_<workload>.json`` and prints a markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCHMARKS = os.path.join(_REPO, "benchmarks")
OFFICIAL_WORKER = os.path.join(_BENCHMARKS, "official_worker.py")
MARKER = "COMPARE_RESULT "
SIDES = ("official", "ours")
OFFICIAL_FILES = ("models_mage.py", "gen_img_uncond.py", os.path.join("config", "vqgan.yaml"))
_CHECK = ("import json, platform, torch, timm, omegaconf; print(json.dumps({'torch': "
          "torch.__version__, 'timm': timm.__version__, 'omegaconf': omegaconf.__version__, "
          "'python': platform.python_version()}))")


# ----------------------------------------------------------------------------- input checks

def check_official_repo(path: str) -> str | None:
    """The one-line error for a ``--official_repo`` that is not a checkout, else None."""
    missing = [f for f in OFFICIAL_FILES if not os.path.isfile(os.path.join(path, f))]
    if not missing:
        return None
    return (f"error: --official_repo={path} has no {', '.join(missing)}: pass a checkout of "
            f"the official code (git clone https://github.com/LTH14/mage), e.g. "
            f"--official_repo=/path/to/mage")


def check_official_python(python: str) -> tuple[dict | None, str | None]:
    """(library versions, None) if ``python`` imports torch, timm and omegaconf, else
    (None, the one-line error)."""
    fix = ("pass the python of a virtual environment with the official code's requirements "
           "(torch, torchvision, timm, omegaconf, pytorch-lightning, einops, scipy, "
           "opencv-python-headless), e.g. --official_python=/path/to/venv/bin/python")
    try:
        proc = subprocess.run([python, "-c", _CHECK], check=False, capture_output=True, text=True,
                              timeout=600, cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"error: --official_python={python} cannot run ({e}); {fix}"
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"]
        return None, (f"error: --official_python={python} cannot import torch, timm and "
                      f"omegaconf ({lines[-1].strip()}); {fix}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), None


def official_commit(repo: str) -> str | None:
    """The checkout's commit, read from its .git directory (None if not a git checkout)."""
    git = os.path.join(repo, ".git")
    try:
        with open(os.path.join(git, "HEAD"), encoding="utf-8") as f:
            head = f.read().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if os.path.isfile(os.path.join(git, ref)):
            with open(os.path.join(git, ref), encoding="utf-8") as f:
                return f.read().strip()
        with open(os.path.join(git, "packed-refs"), encoding="utf-8") as f:
            return next((line.split()[0] for line in f if line.strip().endswith(" " + ref)),
                        None)
    except OSError:
        return None


# ----------------------------------------------------------------------------- pure parts

def parse_worker_output(stdout: str) -> dict:
    """The result a worker printed: its last ``COMPARE_RESULT {json}`` line."""
    lines = [line for line in stdout.splitlines() if line.startswith(MARKER)]
    if not lines:
        raise ValueError(f"no line starting with {MARKER.strip()!r} in the worker's output")
    result = json.loads(lines[-1][len(MARKER):])
    if not isinstance(result, dict) or not result.get("images_per_sec", 0) > 0:
        raise ValueError(f"the worker's result has no positive images_per_sec: {result!r}")
    return result


def summarize(rounds: list[dict]) -> dict:
    """Per side the images/s of every round and their median; the ratio ours / official
    of the medians. ``rounds``: ``[{"official": {"images_per_sec": x, ...}, "ours": ...}]``."""
    if not rounds:
        raise ValueError("no rounds to summarize")
    summary = {}
    for side in SIDES:
        values = [float(r[side]["images_per_sec"]) for r in rounds]
        summary[side] = {"images_per_sec": values, "median": statistics.median(values)}
    summary["ratio_ours_over_official"] = summary["ours"]["median"] / summary["official"]["median"]
    return summary


def markdown_table(summaries: dict[str, dict], settings: dict[str, str]) -> str:
    """One row per workload: ``summaries`` maps workload -> summarize(...)."""
    columns = ("workload", "settings", "official images/s (median)", "ours images/s (median)",
               "ours / official", "official per round", "ours per round")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for workload, s in summaries.items():
        lines.append("| " + " | ".join([
            workload, settings.get(workload, ""), f"{s['official']['median']:.4g}",
            f"{s['ours']['median']:.4g}", f"{s['ratio_ours_over_official']:.3g}x",
            ", ".join(f"{v:.4g}" for v in s["official"]["images_per_sec"]),
            ", ".join(f"{v:.4g}" for v in s["ours"]["images_per_sec"])]) + " |")
    return "\n".join(lines)


def round_order(index: int) -> tuple[str, str]:
    """Official first in the first round, ours first in the second, and so on."""
    return SIDES if index % 2 == 0 else SIDES[::-1]


# ----------------------------------------------------------------------------- workers

def official_command(args, workload: str) -> list[str]:
    return [args.official_python, OFFICIAL_WORKER, f"--repo={os.path.abspath(args.official_repo)}",
            f"--workload={workload}", f"--model={args.official_model}",
            f"--batch_size={args.batch_size}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--repeats={args.repeats}",
            f"--num_iter={args.num_iter}", f"--choice_temperature={args.choice_temperature}",
            f"--threads={args.threads}"]


def ours_command(args, workload: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--worker=ours",
            f"--workload={workload}", f"--preset={args.preset}",
            f"--batch_size={args.batch_size}", f"--steps={args.steps}",
            f"--warmup={args.warmup}", f"--repeats={args.repeats}",
            f"--num_iter={args.num_iter}", f"--choice_temperature={args.choice_temperature}"]


def run_worker(side: str, workload: str, command: list[str], cwd: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(command, check=False, capture_output=True, text=True, cwd=cwd, env=env)
    try:
        if proc.returncode != 0:
            raise ValueError(f"exit {proc.returncode}")
        return parse_worker_output(proc.stdout)
    except ValueError as e:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-30:])
        raise SystemExit(f"error: the {side} {workload} worker failed ({e}): "
                         f"{' '.join(command)}\n{tail}") from None


def ours_worker(args) -> None:
    """This project's measurement, in this process; prints ``COMPARE_RESULT {json}``."""
    import platform
    sys.path.insert(0, _BENCHMARKS)
    from absl import logging
    # Both apply the XLA defaults mage_jax.main applies, before JAX starts.
    import sample_throughput
    import train_throughput
    logging.set_verbosity(logging.WARNING)
    if args.workload == "train":
        from mage_jax import config_files
        config = config_files.load(os.path.join(_REPO, "configs", f"pretrain.py:{args.preset}"))
        config.batch_size = args.batch_size
        # Both sides on the CPU: our CPU setting for dropout (configs/pretrain.py).
        config.model.packed_dropout = True
        r = train_throughput.run_benchmark(config, args.steps, args.warmup, "synthetic", -1)
        result = {"batch_size": r["batch_size"], "dtype": r["dtype"],
                  "step_seconds": [r["seconds"] / r["steps"]] * r["steps"],
                  "images_per_sec": r["images_per_sec"], "compile_seconds": r["compile_seconds"],
                  "first_step_seconds": r["first_step_seconds"],
                  "trained_params": r["trained_params"], "final_loss": r["final_loss"],
                  "flops_per_step": r["flops_per_step"],
                  "model_flops_per_step": r["model_flops_per_step"],
                  "step_seconds_note": "mean of the timed loop (one timer around all steps)"}
    else:
        pre = sample_throughput._random_pretrained(args.preset)
        r = sample_throughput.run(pre, args.batch_size, args.num_iter, args.choice_temperature,
                                  args.repeats, warmup=args.warmup, time_decode=False)
        result = {"batch_size": r["batch_size"], "num_iter": r["num_steps"],
                  "choice_temperature": args.choice_temperature,
                  "image_size": r["image_size"], "step_seconds": r["all_seconds"],
                  "images_per_sec": r["batch_size"] * len(r["all_seconds"])
                  / sum(r["all_seconds"]),
                  "compile_seconds": r["compile_seconds"]}
    import flax
    import jax
    import jaxlib
    result.update(side="ours", workload=args.workload, preset=args.preset,
                  platform=jax.devices()[0].platform,
                  cpu_affinity=len(os.sched_getaffinity(0))
                  if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                  xla_flags=os.environ.get("XLA_FLAGS", ""),
                  versions={"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                            "flax": flax.__version__, "python": platform.python_version()})
    print(MARKER + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- main

def build_record(args, results: dict, official_versions: dict, machine: dict) -> dict:
    """The result file's content. ``results``: workload -> {"rounds": [...], "summary":
    summarize(rounds)}; ``official_versions``: what check_official_python returned."""
    settings = {
        "train": f"batch {args.batch_size}, {args.steps} steps after {args.warmup}",
        "sample": f"batch {args.batch_size}, {args.num_iter} decoding steps, temperature "
                  f"{args.choice_temperature}, {args.repeats} calls after {args.warmup}"}
    table = markdown_table({w: r["summary"] for w, r in results.items()},
                           {w: f"{args.preset} / {args.official_model}, {s}"
                            for w, s in settings.items()})
    first = next(iter(results.values()))["rounds"][0]
    return {
        "name": f"compare_official {args.workload}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workload": args.workload,
        "settings": {k: getattr(args, k) for k in (
            "rounds", "steps", "warmup", "repeats", "preset", "official_model", "batch_size",
            "num_iter", "choice_temperature", "threads")} | {"dtype": "float32",
                                                             "device": "cpu"},
        "machine": machine,
        "official": {"repo": os.path.abspath(args.official_repo),
                     "commit": official_commit(args.official_repo),
                     "python": args.official_python,
                     "versions": {**official_versions, **first["official"]["versions"]},
                     "threads": first["official"]["threads"],
                     "cuda_shim": "torch.Tensor.cuda and torch.nn.Module.cuda return self "
                                  "(the official code hard-codes .cuda(); CPU run)"},
        "ours": {"python": sys.executable, "versions": first["ours"]["versions"],
                 "threads": "XLA:CPU default", "xla_flags": first["ours"]["xla_flags"]},
        "results": results,
        "table": table,
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--official_repo", help="checkout of https://github.com/LTH14/mage "
                   "(required)")
    p.add_argument("--official_python", help="python of a venv with the official code's "
                   "requirements (required)")
    p.add_argument("--workload", choices=("train", "sample", "both"), default="both")
    p.add_argument("--rounds", type=int, default=2, help="processes per side and workload")
    p.add_argument("--steps", type=int, default=5, help="timed train steps per process")
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed steps or calls per process (ours: after the compile)")
    p.add_argument("--repeats", type=int, default=2, help="timed sampling calls per process")
    p.add_argument("--preset", default="vit_b", help="ours: configs/pretrain.py preset")
    p.add_argument("--official_model", default="mage_vit_base_patch16",
                   help="official: models_mage function")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--num_iter", type=int, default=12, help="sampling: decoding steps")
    p.add_argument("--choice_temperature", type=float, default=4.5)
    p.add_argument("--threads", type=int, default=2, help="official: torch.set_num_threads")
    p.add_argument("--output_dir", default=os.path.join(_BENCHMARKS, "results"),
                   help="where the result JSON goes ('' writes none)")
    p.add_argument("--worker", choices=("ours",), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.worker == "ours":
        ours_worker(args)
        return 0
    for name in ("official_repo", "official_python"):
        if not getattr(args, name):
            parser.error(f"--{name} is required")
    for name in ("rounds", "steps", "warmup", "repeats", "batch_size", "num_iter", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be >= 1")
    error = check_official_repo(args.official_repo)
    if error:
        print(error, file=sys.stderr)
        return 2
    official_versions, error = check_official_python(args.official_python)
    if error:
        print(error, file=sys.stderr)
        return 2
    os.environ["JAX_PLATFORMS"] = "cpu"  # a CPU comparison; the workers get it too

    workloads = ("train", "sample") if args.workload == "both" else (args.workload,)
    results = {}
    for workload in workloads:
        rounds = []
        for index in range(args.rounds):
            measured = {}
            for side in round_order(index):
                if side == "official":
                    command, cwd = official_command(args, workload), args.official_repo
                else:
                    command, cwd = ours_command(args, workload), _REPO
                result = measured[side] = run_worker(side, workload, command, cwd)
                timed = ", ".join(f"{s:.3g}" for s in result["step_seconds"])
                print(f"[{workload} round {index + 1}/{args.rounds}] {side}: "
                      f"{result['images_per_sec']:.4g} images/s (timed seconds: {timed})",
                      flush=True)
            rounds.append(measured)
        results[workload] = {"rounds": rounds, "summary": summarize(rounds)}

    sys.path.insert(0, _BENCHMARKS)
    import record
    import train_throughput
    record_ = build_record(args, results, official_versions,
                           train_throughput.machine_description())
    print(record_["table"])
    record.write(args.output_dir, f"compare_official_{args.workload}", record_)
    return 0


if __name__ == "__main__":
    sys.exit(main())
