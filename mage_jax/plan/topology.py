"""TPU slices to plan for: their names, their chips, and compile-only devices from libtpu.

``jax.experimental.topologies.get_topology_desc`` hands out the devices of a slice that
is not there: XLA compiles for them exactly as it would on the pod, on this CPU, and no
program ever runs. libtpu comes with ``pip install -e '.[tpu]'`` (``jax[tpu]``).

A *device* is what JAX sees: one chip (v4 and v5p chips of two TensorCores are compiled
for in "megacore" mode, one device per chip, as they train). Figures are per device.
"""
from __future__ import annotations

import dataclasses
import os
import re

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Public per-chip figures (Google Cloud's TPU pages): HBM, peak bf16 matmul rate, HBM
    bandwidth, inter-chip interconnect bandwidth, and how many TensorCores a chip has."""
    name: str
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float
    cores: int


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 1228e9, 2400e9 / 8, cores=2),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 819e9, 1600e9 / 8, cores=1),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2765e9, 4800e9 / 8, cores=2),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1640e9, 3584e9 / 8, cores=1),
}
# device_kind as libtpu reports it -> the chip generation above.
_KINDS = {"TPU v4": "v4", "TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v5": "v5p",
          "TPU v5p": "v5p", "TPU v6 lite": "v6e", "TPU v6e": "v6e"}
_NAME = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")
_EXAMPLES = "v5e:2x2, v5p:4x4x4, v4:2x2x2, v6e:4x4"


def chip_of_kind(device_kind: str) -> Chip | None:
    """The chip of a JAX device_kind string ("TPU v5 lite" -> v5e), None if unknown."""
    return CHIPS.get(_KINDS.get(device_kind, ""))


def check_name(topology: str) -> str:
    """The chip generation of ``v5p:4x4x4``-style names; a clear error for anything else,
    before libtpu is loaded."""
    match = _NAME.match(topology or "")
    if not match:
        raise ValueError(
            f"--topology={topology!r} is not a TPU slice name: use <generation>:<chips per "
            f"dimension>, generation one of {sorted(CHIPS)} (e.g. {_EXAMPLES}).")
    return match.group(1)


def _compile_only_environment() -> None:
    """Off a TPU VM libtpu looks for its host's metadata and prints a page of warnings;
    these say there is none to find (compiling is unaffected). libtpu also takes a
    machine-wide lock that a second planner (or test worker) would trip over: compiling
    opens no TPU, so several processes may load it."""
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-1"),
                       ("TPU_WORKER_ID", "0"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")):
        os.environ.setdefault(key, value)


def devices(topology: str):
    """(compile-only JAX devices of the slice, one per chip; the `Chip`)."""
    _compile_only_environment()
    try:
        import libtpu  # noqa: F401  (only to say clearly that it is missing)
    except ImportError as e:
        raise ImportError(
            "planning for a TPU needs libtpu, which the base install leaves out: "
            "pip install -e '.[tpu]' (or pip install 'jax[tpu]').") from e
    from jax.experimental import topologies
    chip = CHIPS[check_name(topology)]
    # Chips of two TensorCores run as one device ("megacore"), as jax.make_mesh requires
    # and as training on them runs; libtpu's default for v4 is one device per core.
    options = {"chip_config_name": "megacore"} if chip.cores == 2 else {}
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology, **options)
    except Exception as e:  # libtpu's own message names the bad shape
        raise ValueError(f"--topology={topology}: libtpu has no such slice ({e}). Examples: "
                         f"{_EXAMPLES}.") from e
    found = desc.devices
    kind = found[0].device_kind
    if chip_of_kind(kind) is not chip:
        raise ValueError(f"--topology={topology}: libtpu gave devices of kind {kind!r}, not "
                         f"{chip.name} chips; the planner knows {sorted(_KINDS)} (add a kind to "
                         f"mage_jax/plan/topology.py).")
    cores = getattr(found[0], "num_cores", chip.cores) or chip.cores
    if cores != chip.cores:  # the figures per device below are per chip
        raise ValueError(f"--topology={topology}: libtpu's devices have {cores} of a "
                         f"{chip.name} chip's {chip.cores} TensorCores (not megacore).")
    return list(found), chip
