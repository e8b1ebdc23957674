"""Host-side float64 arrays gathered from every process, bit for bit.

Measures that each host computes on the samples it holds (FID's running statistics, the
Inception Score's per-split sums) are merged by gathering them from every process.
``multihost_utils.process_allgather`` moves data through JAX arrays, which hold float32
unless x64 is on: a float64 array would come back rounded. The arrays therefore travel as
their raw bytes (viewed as uint32) and are viewed as float64 again on arrival.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def gather(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{name: (process_count, *shape) float64}: every process's array, in process order.

    Every process must call it with the same names and shapes (a collective).
    """
    values = {k: np.array(v, np.float64, order="C") for k, v in values.items()}  # 0-d stays 0-d
    if jax.process_count() == 1:
        return {k: v[None] for k, v in values.items()}
    # Outside any mesh a caller set: process_allgather builds its own over all devices.
    with jax.set_mesh(None):
        raw = multihost_utils.process_allgather(
            {k: v.reshape(-1).view(np.uint32) for k, v in values.items()})
    return {k: np.array(raw[k], order="C").view(np.float64).reshape(
        (jax.process_count(),) + values[k].shape) for k in values}
