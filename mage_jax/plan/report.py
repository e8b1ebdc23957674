"""Plans as a table for the terminal (and the README) and as JSON for scripts."""
from __future__ import annotations

import dataclasses
import glob
import json
import os

from mage_jax.plan.aot import Plan
from mage_jax.plan.topology import GIB
_ABBREVIATIONS = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR",
                  "all-to-all": "A2A", "collective-permute": "CP", "ragged-all-to-all": "RA2A"}
COLUMNS = ("mesh d x f x t", "batch/dev", "remat", "scan", "params GiB", "opt GiB",
           "temp GiB", "total / HBM GiB", "fits", "model TFLOP", "executed TFLOP",
           "compute / HBM / ICI s", "est. step s", "images/s", "MFU",
           "collectives (count, GiB)", "compile s")


def fit_text(p: Plan) -> str:
    return "yes" if p.fits else f"NO, over by {p.over_bytes / GIB:.1f} GiB"


def collectives_text(p: Plan) -> str:
    return ", ".join(f"{_ABBREVIATIONS.get(k, k)} {c['count']} / {_gib(c['bytes'])}"
                     for k, c in p.collectives.items()) or "none"


def _gib(n: float) -> str:
    return f"{n / GIB:.3g}"


def row(p: Plan) -> list[str]:
    mesh = " x ".join(str(p.mesh[a]) for a in ("data", "fsdp", "tensor"))
    return [mesh, f"{p.batch_per_device:g}", "yes" if p.remat else "no",
            "yes" if p.scan_layers else "no", _gib(p.parameter_bytes),
            _gib(p.optimizer_bytes), _gib(p.temp_bytes),
            f"{_gib(p.total_bytes)} / {_gib(p.hbm_bytes)}", fit_text(p),
            f"{p.model_flops / 1e12:.3g}", f"{p.executed_dot_conv_flops / 1e12:.3g}",
            f"{p.compute_seconds:.3g} / {p.hbm_seconds:.3g} / {p.ici_seconds:.3g}",
            f"{p.step_seconds:.3g}" + (" (roofline)" if p.step_seconds_source == "roofline"
                                       else ""), f"{p.images_per_s:.4g}", f"{100 * p.mfu:.0f}%",
            collectives_text(p), f"{p.compile_seconds:.0f}"]


def table(plans: list[Plan]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(p)) + " |" for p in plans]
    return "\n".join(lines)


def header(p: Plan, config_name: str) -> str:
    return (f"{config_name} on {p.topology}: {p.devices} devices (one device = one {p.chip} "
            f"chip), global batch {p.batch_size}, compute {p.dtype}. Per device: bytes, FLOPs "
            f"of one step; 'model' FLOPs are the plain program's (unrolled, no remat), "
            f"'executed' the compiled program's matmuls and convolutions, loops counted per "
            f"iteration; "
            f"compute / HBM / ICI: the step's time if only that resource limited it; est. step: "
            f"XLA's cost model x loop correction, or the roofline (the largest of the three); "
            f"MFU: model FLOPs against the chip's peak bf16 rate.")


def to_json(plans: list[Plan], **extra) -> str:
    return json.dumps({**extra, "plans": [dict(dataclasses.asdict(p), over_bytes=p.over_bytes)
                                          for p in plans]}, indent=2)


def read_plans(path: str) -> tuple[dict, list[Plan]]:
    """A ``--json`` file back: (its header fields, its plans)."""
    with open(path, encoding="utf-8") as f:
        record = json.load(f)
    fields = {f.name for f in dataclasses.fields(Plan)}
    plans = [Plan(**{k: v for k, v in p.items() if k in fields}) for p in record["plans"]]
    return {k: v for k, v in record.items() if k != "plans"}, plans


def summary(directory: str) -> str:
    """One markdown table of every plan in ``directory``'s JSON files, config first."""
    lines = ["| config | topology | dtype | " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * (len(COLUMNS) + 3)]
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        head, plans = read_plans(path)
        for p in plans:
            lines.append(f"| {head.get('config', '?')} | {p.topology} | {p.dtype} | "
                         + " | ".join(row(p)) + " |")
    return "\n".join(lines)
