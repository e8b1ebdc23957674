"""One sharding vocabulary: logical axis names, the rules table, the mesh.

Modules name every parameter axis with a *logical* name (``nn.with_logical_partitioning``)
and every large activation with ``nn.with_logical_constraint``. This file alone maps those
names onto the mesh axes ``data``, ``fsdp`` and ``tensor``:

* ``batch`` is split over both data-parallel axes (``data`` and ``fsdp``: FSDP is data
  parallelism whose parameters are also sharded).
* ``embed`` (the model width of matrices) is split over ``fsdp``: parameters and optimiser
  state live in 1/fsdp of the memory and are gathered per layer by XLA.
* ``mlp``, ``heads``, ``vocab`` and ``conv_out`` are split over ``tensor`` (Megatron-style).

A dimension that a mesh axis does not divide is left replicated (see ``_fit_spec``), so the
same model runs on 1 CPU, on 8 simulated devices and on a pod without per-size rules.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
DATA_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or axes, or None for replicated).
LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", DATA_AXES),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("vocab", "tensor"),
    ("height", None),
    ("width", None),
    ("conv_in", "fsdp"),
    ("conv_out", "tensor"),
    ("codebook", None),
    ("norm", None),
)


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``data x fsdp x tensor`` mesh that ``config.mesh`` asks for.

    Axis sizes of -1 mean "all remaining devices" (at most one axis may say so).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_config[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if known <= 0 or len(devices) % known:
            raise ValueError(
                f"config.mesh {dict(zip(MESH_AXES, sizes))} cannot fill {len(devices)} devices: "
                f"{len(devices)} is not divisible by {known}.")
        sizes[sizes.index(-1)] = len(devices) // known
    if any(s < 1 for s in sizes) or math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh asks for data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = "
            f"{math.prod(sizes)} devices but {len(devices)} are available "
            f"({jax.process_count()} process(es), platform {devices[0].platform}). "
            f"Set --config.mesh.data/fsdp/tensor so that their product is {len(devices)} "
            f"(e.g. --config.mesh.data=-1).")
    return jax.make_mesh(tuple(sizes), MESH_AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in DATA_AXES)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops mesh axes that do not divide their dimension (those dims stay replicated)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            fitted.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        names = tuple(a for a in names if mesh.shape[a] > 1)
        size = math.prod(mesh.shape[a] for a in names)
        fitted.append(names if names and dim % size == 0 else None)
    return P(*fitted)


def logical_shardings(abstract_tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings for a (boxed) abstract pytree from ``jax.eval_shape(model.init, ...)``.

    Leaves without logical names are replicated. The result has the structure of
    ``nn.unbox(abstract_tree)``.
    """
    logical_specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(logical_specs, rules)
    shapes = nn.unbox(abstract_tree)

    def to_sharding(spec, leaf):
        spec = spec if isinstance(spec, P) else P()
        return NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh))

    return jax.tree.map(to_sharding, mesh_specs, shapes,
                        is_leaf=lambda x: isinstance(x, P) or x is None)


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names, through the rules table.

    A no-op outside a mesh (unit tests, notebooks). Like parameters, a dimension its mesh
    axes do not divide (e.g. the 2025-entry vocabulary) stays unconstrained-replicated, so
    the models annotate freely and the same code runs under any mesh.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), LOGICAL_AXIS_RULES)
    return jax.lax.with_sharding_constraint(x, _fit_spec(spec, x.shape, mesh))


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading (batch) axis over the data-parallel axes, everything else replicated."""
    return NamedSharding(mesh, P(DATA_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into globally sharded arrays."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
    return jax.tree.map(put, batch)
