"""The Cloud TPU slices and runtimes launch/tpu_pod.py accepts, checked before any gcloud call.

``Slice``: an accelerator type (``v5p-128``, ``v5litepod-16`` ...) -> the planner's
``gen:AxBxC`` slice, its chips and its TPU VMs; ``check_runtime``: the TPU VM image must be
the JAX base image of the slice's chip generation. Imported by launch/tpu_pod.py (``launch/``
is not a package: ``python launch/tpu_pod.py`` finds this file beside it).
"""
from __future__ import annotations

import importlib.metadata
import math
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python launch/tpu_pod.py` from a checkout without install

from mage_jax.plan import topology  # noqa: E402  (a small module: no JAX is imported)


def local_jax() -> str | None:
    """The version of the JAX installed here (the one the planner compiles with), if any."""
    try:
        return importlib.metadata.version("jax")
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------
# Accelerator types -> the planner's slices
# ---------------------------------------------------------------------------------------
# gcloud's name prefix -> the planner's chip generation (mage_jax/plan/topology.py CHIPS).
# v4 and v5p names count TensorCores (2 per chip), v5e and v6e names count chips.
_GENERATIONS = {"v4": "v4", "v5p": "v5p", "v5litepod": "v5e", "v6e": "v6e"}
_CORES_IN_NAME = {"v4": 2, "v5p": 2, "v5e": 1, "v6e": 1}
# Slice sizes in chips: 3-D tori double one side at a time from 2x2x1 to 16x16x16; the
# 2-D ones (v5e, v6e) are 1x1, 2x2, 2x4 ... 16x16.
_SIZES = {"v4": [4 * 2 ** i for i in range(11)], "v5p": [4 * 2 ** i for i in range(11)],
          "v5e": [1, 4, 8, 16, 32, 64, 128, 256], "v6e": [1, 4, 8, 16, 32, 64, 128, 256]}
# Chips one TPU VM drives: v4/v5p 4; v5e/v6e 8 in a one-host slice, 4 in a multi-host one.
_SINGLE_HOST_CHIPS = {"v4": 4, "v5p": 4, "v5e": 8, "v6e": 8}
_CHIPS_PER_HOST = 4


def _known_types() -> str:
    names = []
    for prefix, gen in _GENERATIONS.items():
        if gen in topology.CHIPS:
            sizes = [n * _CORES_IN_NAME[gen] for n in _SIZES[gen]]
            names.append(f"{prefix}-N with N in {sizes[0]}, {sizes[1]}, {sizes[2]} ... {sizes[-1]}")
    return "; ".join(names)


class Slice:
    """What the launcher needs of an accelerator type: the planner's ``gen:AxBxC`` name, the
    chips and the number of TPU VMs (workers)."""

    def __init__(self, accelerator_type: str):
        prefix, _, count = (accelerator_type or "").rpartition("-")
        gen = _GENERATIONS.get(prefix)
        hint = " (v5e slices are named v5litepod-N)" if prefix == "v5e" else ""
        if gen not in topology.CHIPS or not count.isdigit():
            raise ValueError(f"--accelerator_type={accelerator_type!r} is not a TPU slice the "
                             f"planner knows{hint}: use {_known_types()}.")
        chips = int(count) // _CORES_IN_NAME[gen]
        if int(count) % _CORES_IN_NAME[gen] or chips not in _SIZES[gen]:
            raise ValueError(f"--accelerator_type={accelerator_type}: no {prefix} slice has "
                             f"{count}; use {_known_types()}.")
        dims = [2, 2, 1] if len(_SIZES[gen]) == 11 else [1, 1]
        while math.prod(dims) < chips:  # double the smallest side, the last of equals first
            i = max(j for j, d in enumerate(dims) if d == min(dims))
            dims[i] *= 2
        self.accelerator_type, self.generation, self.chips = accelerator_type, gen, chips
        self.topology = f"{gen}:{'x'.join(map(str, dims))}"
        topology.check_name(self.topology)
        self.hosts = 1 if chips <= _SINGLE_HOST_CHIPS[gen] else chips // _CHIPS_PER_HOST


# ---------------------------------------------------------------------------------------
# Runtime versions
# ---------------------------------------------------------------------------------------
# The TPU VM image ("runtime version") supplies the OS and the TPU driver of one chip
# generation; JAX and libtpu come from pip (`jax[tpu]`, pinned below to the JAX installed
# here, the one the planner compiled with). The rule checked: the runtime must be Google's
# JAX/PyTorch base image of the accelerator's generation (Cloud TPU's "TPU software
# versions" page). The framework images (tpu-vm-tf-*, tpu-vm-pt-*) and the Ubuntu 20.04
# ones (tpu-vm-base, tpu-vm-v4-base: Python 3.8, which no JAX this project supports runs
# on) are refused by name. A newer image: --any_runtime skips this check.
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5e": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
_OLD_RUNTIMES = ("tpu-vm-base", "tpu-vm-v4-base")


def check_runtime(runtime: str, tpu: Slice) -> None:
    want = RUNTIMES[tpu.generation]
    if runtime == want:
        return
    if runtime in RUNTIMES.values():
        why = f"is the image of {next(g for g, r in RUNTIMES.items() if r == runtime)} chips"
    elif runtime.startswith(("tpu-vm-tf-", "tpu-vm-pt-")):
        why = "is a TensorFlow/PyTorch image, not the base image JAX is installed on"
    elif runtime in _OLD_RUNTIMES:
        why = f"is Ubuntu 20.04 with Python 3.8, which JAX {local_jax() or ''} does not run on"
    else:
        why = "is not a runtime this launcher knows (--any_runtime skips the check)"
    raise ValueError(f"--runtime_version={runtime} {why}; {tpu.accelerator_type} "
                     f"({tpu.generation}) takes --runtime_version={want}.")
