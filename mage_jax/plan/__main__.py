"""The pod planner: what a training config costs per chip on a TPU slice, before paying for it.

    pip install -e '.[tpu]'
    python -m mage_jax.plan --config=configs/pretrain.py:vit_l --topology=v5p:4x4x4
    python -m mage_jax.plan --config=configs/pretrain.py:vit_b --topology=v5p:2x2x2 --search \
        --meshes=1x-1x1,-1x1x1 --remat=false,true --scan_layers=true --batch_per_device=32,64
    python -m mage_jax.plan --summarize=benchmarks/plans   # one table of saved --json files

The train step the loop runs is compiled ahead of time for the slice's devices (libtpu's
compile-only devices; nothing runs, no TPU is needed) and reported per device: memory
against HBM, FLOPs, XLA's estimated step time with the images/s and MFU it implies, and
the collectives (mage_jax/plan/aot.py says how each figure is obtained). ``--search``
compiles every combination of the listed meshes, remat, scan_layers and per-device batches
and ranks those that fit by images/s. ``--json=FILE`` writes the plans as JSON.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the TPU is compiled for, never opened
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import itertools  # noqa: E402

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mage_jax import cli  # noqa: E402
from mage_jax.plan import aot, report, search, topology as topology_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Stage config, e.g. configs/pretrain.py:vit_l (overrides: --config.k=v).",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU slice, e.g. v5p:4x4x4, v5e:2x2, v4:4x4x4.")
_SEARCH = flags.DEFINE_bool("search", False, "Compile every combination of the lists below and "
                            "rank the configurations that fit.")
_MESHES = flags.DEFINE_list("meshes", ["1x-1x1", "-1x1x1"],
                            "--search: meshes data x fsdp x tensor (-1: the remaining devices).")
_REMAT = flags.DEFINE_list("remat", ["false", "true"], "--search: model.remat values.")
_SCAN = flags.DEFINE_list("scan_layers", ["false", "true"], "--search: model.scan_layers values.")
_BATCH = flags.DEFINE_list("batch_per_device", [],
                           "--search: examples per device (default: the config's batch_size).")
_JSON = flags.DEFINE_string("json", None, "Also write the plans to this JSON file.")
_SUMMARIZE = flags.DEFINE_string("summarize", None, "Print one table of the --json files in "
                                 "this directory (e.g. benchmarks/plans) and exit.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an error, show the Python traceback.")


def _config_name() -> str:
    """``configs/pretrain.py:vit_l model.remat=True``: the config and its overrides."""
    flag = flags.FLAGS["config"]
    return " ".join([config_flags.get_config_filename(flag)] + cli.config_overrides(flag))


def _bools(values: list[str], flag: str) -> list[bool]:
    table = {"true": True, "false": False, "1": True, "0": False}
    bad = [v for v in values if v.lower() not in table]
    if bad:
        raise ValueError(f"--{flag}={','.join(values)}: {bad} are not booleans; use true,false.")
    return [table[v.lower()] for v in values]


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides are --config.key=value.")
    if _SUMMARIZE.value:
        print(report.summary(_SUMMARIZE.value))
        return
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config=configs/pretrain.py:vit_l.")
    if not _TOPOLOGY.value:
        raise app.UsageError("--topology is required, e.g. --topology=v5p:4x4x4.")
    try:
        topology_lib.check_name(_TOPOLOGY.value)
        config = _CONFIG.value
        aot.check_stage(config)
        grid = [None]  # the config as given
        if _SEARCH.value:
            grid = list(itertools.product(
                [search.parse_mesh(m) for m in _MESHES.value], _bools(_REMAT.value, "remat"),
                _bools(_SCAN.value, "scan_layers"),
                [int(b) for b in _BATCH.value] or [None]))
        found = topology_lib.devices(_TOPOLOGY.value)
        plans, refused = search.run(config, _TOPOLOGY.value, found, grid)
    except cli.USER_ERRORS as e:
        if cli.verbose(_VERBOSE.value):
            raise
        cli.exit_with_error(e)
    name = _config_name()
    print(search.describe(name, plans, refused, rank=_SEARCH.value))
    if _JSON.value:
        with open(_JSON.value, "w", encoding="utf-8") as f:
            f.write(search.to_json(name, _TOPOLOGY.value, plans, refused))
        logging.info("Wrote %s", _JSON.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
