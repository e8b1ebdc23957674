"""One plan: the real train step compiled ahead of time for a TPU slice, and what it costs.

The step is the loop's own (``loop.jit_train_step``: same stage, abstract state, logical
shardings, donated state) lowered with ShapeDtypeStructs that carry the slice's
shardings, so nothing is allocated and no checkpoint or dataset is read. From the
compiled program:

* memory per device: parameters and optimiser state (their shards, from the shardings),
  XLA's arguments, outputs, temporaries and code (``memory_analysis``), against HBM;
* FLOPs: the *model* FLOPs of a step are those of the plain program (layers unrolled, no
  rematerialisation), counted by XLA on the unpartitioned program on this CPU and split
  evenly over the devices, so ``scan_layers`` and ``remat`` do not change them; beside
  them the matmul/convolution FLOPs the compiled program really executes per device, loop
  bodies counted per iteration (plan/hlo.py), which ``remat`` raises;
* time: XLA's cost-model estimate of a step, corrected for loops (XLA counts a loop body
  once: the estimate is scaled by the ratio of the per-iteration to the once-per-loop
  matmul FLOPs) where libtpu gives one, else a roofline (``step_roofline``), and the
  images/s and model-FLOPs utilisation (MFU) that implies;
* the collectives of the compiled program (plan/hlo.py).
"""
from __future__ import annotations

import dataclasses
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mage_jax import sharding, validation
from mage_jax.plan import hlo, topology as topology_lib
from mage_jax.train import loop

PLANNED_STAGES = ("pretrain", "tokenizer")


def check_stage(config: ml_collections.ConfigDict) -> None:
    if config.get("stage") not in PLANNED_STAGES:
        raise ValueError(f"config.stage={config.get('stage')!r}: the planner compiles the "
                         f"training stages {PLANNED_STAGES} (configs/pretrain.py, "
                         f"configs/tokenizer.py).")


def build_stage(config: ml_collections.ConfigDict) -> loop.Stage:
    """The stage of ``config`` with abstract frozen inputs: no tokenizer checkpoint needed."""
    check_stage(config)
    if config.stage == "pretrain":
        from mage_jax.models import vqgan
        from mage_jax.train import pretrain
        size = config.data.image_size
        tok_model = vqgan.vqgan_from_config(config.tokenizer)
        tok_params = jax.eval_shape(
            lambda r: nn.unbox(tok_model.init(r, jnp.zeros((1, size, size, 3)))["params"]),
            jax.random.key(0))
        stage = pretrain.make_stage(config, tok_params)
    else:
        from mage_jax.train import tokenizer
        stage = tokenizer.build_stage(config)
    stage.check()
    return stage


def abstract_batch(config, stage: loop.Stage, mesh) -> dict:
    size, batch = config.data.image_size, config.batch_size
    image = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32,
                                 sharding=sharding.batch_sharding(mesh, 4))
    out = {"image": image, "label": jax.ShapeDtypeStruct(
        (batch,), jnp.int32, sharding=sharding.batch_sharding(mesh, 1))}
    if stage.two_views:
        out["image2"] = image
    return out


def run_keys(config):
    """(init, train) keys as the loop splits them, made outside any mesh: under a mesh the
    caller has set they would be placed on its devices, and under the slice's mesh on
    devices that are not there."""
    with jax.set_mesh(None):
        init_rng, train_rng, _ = jax.random.split(jax.random.key(config.seed), 3)
    return init_rng, train_rng


def lower_step(config, stage: loop.Stage, mesh, keys):
    """The loop's jitted step lowered for ``mesh`` with abstract inputs."""
    abstract_state, state_shardings = loop.abstract_train_state(stage, mesh, keys[0])
    frozen = None
    if stage.frozen is not None:
        frozen = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype,
                                           sharding=sharding.replicated(mesh)), stage.frozen)
    step = loop.jit_train_step(stage, mesh, state_shardings, keys[1])
    return step.lower(abstract_state, abstract_batch(config, stage, mesh), frozen), \
        abstract_state


def model_flops(config: ml_collections.ConfigDict) -> float:
    """FLOPs of one step of the plain program (unrolled layers, no rematerialisation) at
    the global batch, counted by XLA on the lowered, unpartitioned program on this CPU."""
    plain = ml_collections.ConfigDict(config.to_dict())
    if "model" in plain:
        plain.model.scan_layers = False
        plain.model.remat = False
    stage = build_stage(plain)
    cpu = jax.devices("cpu")[:1]
    mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=cpu)
    with jax.set_mesh(mesh):  # whatever mesh the caller has set
        lowered, _ = lower_step(plain, stage, mesh, run_keys(plain))
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _bytes_per_device(abstract_tree) -> int:
    return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for x in jax.tree.leaves(abstract_tree)))


def step_roofline(totals: hlo.Totals, bytes_accessed: float,
                  chip: topology_lib.Chip) -> dict:
    """Seconds of a step if only one resource limited it: the matmuls at peak, the bytes
    XLA reads and writes at HBM bandwidth, and the collectives over the chip's
    inter-chip links (result bytes; an all-reduce moves its data twice: reduce-scatter
    then all-gather). The step can be no faster than the slowest of the three."""
    link_bytes = sum(c.bytes * (2 if kind == "all-reduce" else 1)
                     for kind, c in totals.collectives.items())
    times = {"compute": totals.dot_conv_flops / chip.peak_bf16_flops,
             "hbm": bytes_accessed / chip.hbm_bytes_per_s,
             "ici": link_bytes / chip.ici_bytes_per_s}
    return dict(times, seconds=max(times.values()))


@dataclasses.dataclass
class Plan:
    """Per device unless a name says otherwise; bytes, FLOPs, seconds."""
    topology: str
    chip: str
    devices: int
    mesh: dict
    batch_size: int
    batch_per_device: float
    dtype: str
    remat: bool
    scan_layers: bool
    parameter_bytes: int
    optimizer_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    total_bytes: int
    hbm_bytes: float
    fits: bool
    model_flops: float
    executed_dot_conv_flops: float
    xla_flops_loops_once: float
    loop_correction: float
    xla_step_seconds: float
    step_seconds: float
    step_seconds_source: str   # "xla" (its cost model, loop-corrected) or "roofline"
    bytes_accessed: float      # XLA's count, loop-corrected
    compute_seconds: float     # executed matmul FLOPs at the chip's peak bf16 rate
    hbm_seconds: float         # bytes accessed at HBM bandwidth
    ici_seconds: float         # collective bytes over the chip's links (see step_roofline)
    images_per_s: float
    mfu: float
    compile_seconds: float
    collectives: dict
    notes: list

    @property
    def over_bytes(self) -> float:
        return max(0.0, self.total_bytes - self.hbm_bytes)


def plan(config: ml_collections.ConfigDict, topology: str, found=None) -> Plan:
    """Compiles ``config``'s train step for ``topology`` (devices: ``found`` or libtpu's)."""
    if found is None:
        found = topology_lib.devices(topology)
    devices, chip = found
    stage = build_stage(config)
    flops_global = model_flops(config)
    mesh = sharding.make_mesh(config.mesh, devices)
    validation.validate_batch(config, mesh)
    keys = run_keys(config)
    with jax.set_mesh(mesh):
        started = time.perf_counter()
        lowered, abstract_state = lower_step(config, stage, mesh, keys)
        compiled = lowered.compile()
        compile_seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    text = compiled.as_text()
    per_iteration, once = hlo.analyse(text), hlo.analyse(text, per_iteration=False)
    correction = (per_iteration.dot_conv_flops / once.dot_conv_flops
                  if once.dot_conv_flops else 1.0)
    notes = []
    if per_iteration.unknown_trip_counts:
        notes.append(f"{per_iteration.unknown_trip_counts} loop(s) of unknown trip count "
                     f"were counted once.")
    params = {k: v for k, v in abstract_state.items() if "opt_state" not in k and k != "step"}
    opt = {k: v for k, v in abstract_state.items() if "opt_state" in k}
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes
             + memory.generated_code_size_in_bytes)
    xla_seconds = float(cost.get("optimal_seconds", float("nan")))
    bytes_accessed = float(cost.get("bytes accessed", 0.0)) * correction
    roofline = step_roofline(per_iteration, bytes_accessed, chip)
    if xla_seconds > 0:
        step_seconds, source = xla_seconds * correction, "xla"
    else:
        # libtpu's compile-only cost model returned a negative time for every program
        # tried here (libtpu 0.0.42.1): the roofline stands in for it.
        step_seconds, source = roofline["seconds"], "roofline"
        notes.append(f"XLA's step-time estimate is unavailable ({xla_seconds:.3g} s); est. "
                     f"step is the roofline: the slowest of matmuls at peak, bytes at HBM "
                     f"bandwidth, collectives over the chip's links, as if fully overlapped "
                     f"(a lower bound).")
    flops_per_device = flops_global / len(devices)
    model = config.get("model", config.get("tokenizer"))
    return Plan(
        topology=topology, chip=chip.name, devices=len(devices),
        mesh={k: int(v) for k, v in mesh.shape.items()},
        batch_size=int(config.batch_size), batch_per_device=config.batch_size / len(devices),
        dtype=str(model.get("dtype", "float32")), remat=bool(model.get("remat", False)),
        scan_layers=bool(model.get("scan_layers", False)),
        parameter_bytes=_bytes_per_device(params), optimizer_bytes=_bytes_per_device(opt),
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes), temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(memory.generated_code_size_in_bytes), total_bytes=int(total),
        hbm_bytes=chip.hbm_bytes, fits=total <= chip.hbm_bytes,
        model_flops=flops_per_device,
        executed_dot_conv_flops=per_iteration.dot_conv_flops,
        xla_flops_loops_once=float(cost.get("flops", float("nan"))),
        loop_correction=correction, xla_step_seconds=xla_seconds, step_seconds=step_seconds,
        step_seconds_source=source, bytes_accessed=bytes_accessed,
        compute_seconds=roofline["compute"], hbm_seconds=roofline["hbm"],
        ici_seconds=roofline["ici"],
        images_per_s=config.batch_size / step_seconds,
        mfu=flops_per_device / (step_seconds * chip.peak_bf16_flops),
        compile_seconds=compile_seconds,
        collectives={k: {"count": int(round(c.count)), "bytes": int(c.bytes)}
                     for k, c in sorted(per_iteration.collectives.items())},
        notes=notes)
