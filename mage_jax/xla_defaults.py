"""XLA:CPU options this project sets by default, before JAX starts its backends.

jaxlib 0.10 hands XLA:CPU's convolutions to YNNPACK fusions, which ran the demo tokenizer's
train step about 1.4x slower on a 2-core x86-64 VM than XLA's own convolution path
(``--xla_cpu_experimental_ynn_fusion_type=``, no fusion types: benchmarks/README.md). The
option only concerns the CPU backend, so it changes nothing on GPU or TPU, and the
results are the same function up to float rounding. XLA aborts the process on a flag it
does not know, so it is set only for the jaxlib versions it was measured on, only where the
user's ``XLA_FLAGS`` does not already say, and not at all with ``MAGE_JAX_XLA_DEFAULTS=0``.

A CPU split into simulated devices (``--xla_force_host_platform_device_count=N``) also
gets a larger XLA:CPU thread pool (``NPROC``, which XLA reads as its pool size; default: the
core count). XLA:CPU runs a program's independent collectives concurrently and each one
holds a pool thread until every device reaches it; with 8 devices on 2 cores a sharded
train step's all-gathers took every thread and waited for each other forever (XLA then
aborts, "Termination timeout ... exceeded"). ``NPROC_PER_SIMULATED_DEVICE`` threads per
device never hung in that reproduction (tests/test_xla_defaults.py); 1.5 per device did.

Import and call ``apply()`` before anything initialises a JAX backend (entry points do).
"""
from __future__ import annotations

import os
import re
from importlib import metadata

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
# (major, minor) releases of jaxlib on which the flag exists and was measured faster.
MEASURED_JAXLIB = ((0, 10),)
NPROC_PER_SIMULATED_DEVICE = 8
_SIMULATED = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def _jaxlib_release() -> tuple[int, int] | None:
    try:
        major, minor = metadata.version("jaxlib").split(".")[:2]
        return int(major), int(minor)
    except (metadata.PackageNotFoundError, ValueError):
        return None


def flags_to_add(xla_flags: str, jaxlib_release, opt_out: str | None) -> list[str]:
    """The default flags that ``XLA_FLAGS`` lacks, for this jaxlib (pure, for the tests)."""
    if opt_out == "0" or jaxlib_release not in MEASURED_JAXLIB:
        return []
    name = CPU_CONV_FLAG.split("=")[0]
    return [] if name in xla_flags else [CPU_CONV_FLAG]


def thread_pool_size(xla_flags: str, nproc: str | None, opt_out: str | None) -> str | None:
    """The ``NPROC`` to set for these ``XLA_FLAGS``, or None to leave it (pure, for the
    tests): only for simulated devices, and never over the user's own ``NPROC``."""
    found = _SIMULATED.findall(xla_flags)
    if opt_out == "0" or nproc is not None or not found or int(found[-1]) < 2:
        return None
    return str(max(os.cpu_count() or 1, NPROC_PER_SIMULATED_DEVICE * int(found[-1])))


def apply() -> list[str]:
    """Adds the defaults to ``os.environ`` (``XLA_FLAGS``, ``NPROC``); returns what it added."""
    current = os.environ.get("XLA_FLAGS", "")
    opt_out = os.environ.get("MAGE_JAX_XLA_DEFAULTS")
    added = flags_to_add(current, _jaxlib_release(), opt_out)
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    nproc = thread_pool_size(current, os.environ.get("NPROC"), opt_out)
    if nproc is not None:
        os.environ["NPROC"] = nproc
        added.append(f"NPROC={nproc}")
    return added
