"""Batches placed on the devices ahead of their step (``config.data.device_prefetch``).

JAX dispatches a step and returns, so the host already reads and transfers the next batch
while the devices compute; but where the loop waits on the devices (a logged step's
metrics, image summaries, an evaluation, a checkpoint) the next transfer would only start
after the wait. Keeping ``size`` batches already sent removes that gap, as flax's
``prefetch_to_device`` does for pmap, here for the global arrays ``jit`` takes.

The wrapper is a grain ``DatasetIterator``: its state is the position of the batch the
loop takes next, not of the batches in flight, so a checkpoint written at step ``s`` still
says ``{'next_index': s}`` and a resumed run sees the batches an uninterrupted one would.
"""
from __future__ import annotations

import collections

import grain
import numpy as np

from mage_jax import sharding
from mage_jax.data import datasets, pipeline


def to_devices(parent: grain.DatasetIterator, mesh, size: int = 2) -> "DevicePrefetch":
    """``parent``'s batches as global arrays on ``mesh``, ``size`` batches ahead."""
    if not isinstance(size, (int, np.integer)) or size < 0:
        raise ValueError(f"config.data.device_prefetch={size!r} must be a whole number >= 0 (the "
                         f"batches sent to the devices ahead of their step; 0: none ahead).")
    if not isinstance(parent, grain.DatasetIterator):  # its state is what is checkpointed
        raise TypeError(f"expected a grain DatasetIterator, got {type(parent).__name__}.")
    return DevicePrefetch(parent, mesh, int(size))


class DevicePrefetch(grain.DatasetIterator):
    """Yields the host batches of ``parent`` as global arrays on ``mesh``, ``size`` ahead.

    Each yielded batch keeps ``datasets.SKIPPED_KEY`` (unreadable files passed over) as a
    host integer: a count for the log, never sent to the devices.
    """

    def __init__(self, parent: grain.DatasetIterator, mesh, size: int):
        super().__init__(parent)
        self._mesh = mesh
        self._size = size
        self._queue: collections.deque = collections.deque()

    def _put(self) -> None:
        host_batch = dict(next(self._parent))
        skipped = int(np.sum(host_batch.pop(datasets.SKIPPED_KEY, 0)))
        batch = sharding.host_batch_to_global(host_batch, self._mesh)
        self._queue.append(dict(batch, **{datasets.SKIPPED_KEY: skipped}))

    def __next__(self) -> dict:
        while len(self._queue) <= self._size:  # the batch to yield, and `size` behind it
            self._put()
        return self._queue.popleft()

    def get_state(self) -> dict:
        return {"next_index": pipeline.next_index(self._parent.get_state()) - len(self._queue)}

    def set_state(self, state: dict) -> None:
        self._queue.clear()  # batches sent for the old position are dropped
        self._parent.set_state(state)
