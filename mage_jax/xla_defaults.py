"""XLA:CPU options this project sets by default, before JAX starts its backends.

jaxlib 0.10 hands XLA:CPU's convolutions to YNNPACK fusions, which ran the demo tokenizer's
train step about 1.4x slower on a 2-core x86-64 VM than XLA's own convolution path
(``--xla_cpu_experimental_ynn_fusion_type=``, no fusion types: benchmarks/README.md). The
option only concerns the CPU backend, so it changes nothing on GPU or TPU, and the
results are the same function up to float rounding. XLA aborts the process on a flag it
does not know, so it is set only for the jaxlib versions it was measured on, only where the
user's ``XLA_FLAGS`` does not already say, and not at all with ``MAGE_JAX_XLA_DEFAULTS=0``.

Import and call ``apply()`` before anything initialises a JAX backend (entry points do).
"""
from __future__ import annotations

import os
from importlib import metadata

CPU_CONV_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
# (major, minor) releases of jaxlib on which the flag exists and was measured faster.
MEASURED_JAXLIB = ((0, 10),)


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


def apply() -> list[str]:
    """Adds the defaults to ``os.environ['XLA_FLAGS']``; returns what it added."""
    current = os.environ.get("XLA_FLAGS", "")
    added = flags_to_add(current, _jaxlib_release(), os.environ.get("MAGE_JAX_XLA_DEFAULTS"))
    if added:
        os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
