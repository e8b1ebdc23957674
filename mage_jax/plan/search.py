"""Plans for one config or for a grid of its variants, ranked, with what did not fit."""
from __future__ import annotations

import dataclasses
import re

import ml_collections
from absl import logging

from mage_jax import sharding
from mage_jax.plan import aot, report


@dataclasses.dataclass
class Refused:
    """A variant that could not be planned: invalid for the slice, or too big to compile."""
    variant: str
    reason: str


def parse_mesh(text: str) -> tuple[int, int, int]:
    """``1x-1x4`` -> (data, fsdp, tensor); -1 takes the remaining devices."""
    parts = text.lower().split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"--meshes entry {text!r} is not data x fsdp x tensor: write three "
                         f"sizes joined by x, at most one -1 (e.g. 1x-1x1 for FSDP only).")
    return sizes


def variant(config: ml_collections.ConfigDict, devices: int, mesh=None, remat=None,
            scan_layers=None, batch_per_device=None) -> ml_collections.ConfigDict:
    """A copy of ``config`` with the given mesh, remat, scan_layers and per-device batch."""
    out = ml_collections.ConfigDict(config.to_dict())
    if mesh is not None:
        out.mesh.update(dict(zip(sharding.MESH_AXES, mesh)))
    model = out.get("model")
    for key, value in (("remat", remat), ("scan_layers", scan_layers)):
        if value is not None:
            if model is None or key not in model:
                raise ValueError(f"--{key}: config.stage={config.stage} has no model.{key}.")
            model[key] = value
    if batch_per_device is not None:
        out.batch_size = int(batch_per_device) * devices
    return out


def _describe_variant(cfg) -> str:
    model = cfg.get("model", {})
    mesh = "x".join(str(cfg.mesh[a]) for a in sharding.MESH_AXES)
    return (f"mesh {mesh}, batch {cfg.batch_size}, remat {model.get('remat', False)}, "
            f"scan_layers {model.get('scan_layers', False)}")


_HBM_MESSAGE = re.compile(r"(Ran out of memory in memory space hbm|RESOURCE_EXHAUSTED)")


def run(config, topology: str, found, grid) -> tuple[list[aot.Plan], list[Refused]]:
    """Plans each grid entry (None: the config as given; else (mesh, remat, scan, batch per
    device)). Invalid or too-large variants are refused with the reason; with a single
    entry the error is raised instead, so that one bad config fails as one line."""
    devices = len(found[0])
    plans, refused = [], []
    for n, entry in enumerate(grid):
        cfg = config if entry is None else variant(config, devices, *entry)
        label = _describe_variant(cfg)
        logging.info("Planning %d/%d: %s", n + 1, len(grid), label)
        try:
            plans.append(aot.plan(cfg, topology, found))
        except ValueError as e:
            if len(grid) == 1:
                raise
            refused.append(Refused(label, " ".join(str(e).split())))
        except Exception as e:  # XLA refuses to compile a program larger than HBM
            if not _HBM_MESSAGE.search(str(e)):
                raise
            reason = does_not_fit(str(e))
            if len(grid) == 1:
                raise ValueError(f"{label} on {topology} {reason}") from e
            refused.append(Refused(label, reason))
    return plans, refused


# What to change when a configuration does not fit.
_FIXES = ("Lower the per-device batch, set --config.model.remat=True, or shard the parameters "
          "over more devices (mesh.fsdp).")
_REQUIRED = re.compile(r"\(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)")
_UNIT_GIB = {"K": 2 ** -20, "M": 2 ** -10, "G": 1.0, "T": 2 ** 10}  # XLA prints binary units


def does_not_fit(message: str) -> str:
    """XLA's out-of-memory refusal as one line, with the excess where XLA states both sizes."""
    text = " ".join(message.split())
    sizes = _REQUIRED.search(text)
    head = "does not fit"
    if sizes:
        need = float(sizes.group(1)) * _UNIT_GIB[sizes.group(2)]
        have = float(sizes.group(3)) * _UNIT_GIB[sizes.group(4)]
        head += (f": over by {need - have:.1f} GiB (XLA: {need:.1f} GiB needed, "
                 f"{have:.2f} GiB of HBM usable)")
    detail = text if len(text) <= 300 else text[:300] + " ..."
    return f"{head}. {_FIXES} [{detail}]"


def ranked(plans: list[aot.Plan]) -> list[aot.Plan]:
    """Those that fit first, fastest first; then those that do not, smallest excess first."""
    return sorted(plans, key=lambda p: (not p.fits, -p.images_per_s if p.fits else p.over_bytes))


def describe(name: str, plans: list[aot.Plan], refused: list[Refused], rank: bool) -> str:
    lines = []
    if plans:
        shown = ranked(plans) if rank else plans
        lines += [report.header(shown[0], name), "", report.table(shown)]
        for p in shown:
            lines += [f"note: {note}" for note in p.notes]
        if not any(p.fits for p in plans):
            lines.append(f"\nNothing fits. {_FIXES}")
    for r in refused:
        lines.append(f"refused: {r.variant}: {r.reason}")
    return "\n".join(lines)


def to_json(name: str, topology: str, plans, refused) -> str:
    return report.to_json(plans, config=name, topology=topology,
                          refused=[dataclasses.asdict(r) for r in refused])
