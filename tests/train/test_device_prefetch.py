"""config.data.device_prefetch: batches sent to the devices ahead of their step, with the
iterator's state (what a checkpoint saves) at the batch the loop takes next."""
import grain
import jax
import numpy as np
import pytest

from mage_jax import checkpointing, sharding
from mage_jax.data import datasets
from mage_jax.train import device_prefetch


class _Counting:
    """A list-backed grain source that counts the examples read (the parent's progress)."""

    def __init__(self, n):
        self.reads = 0
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        return {"image": np.full((2, 2, 3), i, np.float32), "label": np.int32(i),
                datasets.SKIPPED_KEY: np.int32(i % 2)}


def _iterator(source, start=0):
    it = iter(grain.MapDataset.source(source).batch(4).to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))
    if start:
        it.set_state({"next_index": start})
    return it


def _mesh():
    return sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, jax.devices()[:8])


@pytest.mark.parametrize("size", [0, 2])
def test_batches_arrive_in_order_sharded_and_size_ahead(size):
    source = _Counting(64)
    mesh = _mesh()
    it = device_prefetch.to_devices(_iterator(source), mesh, size)
    first = next(it)
    assert source.reads == 4 * (1 + size)  # the batch taken and `size` more on their way
    assert first.pop(datasets.SKIPPED_KEY) == 2  # examples 1 and 3: a host count
    assert isinstance(first["image"], jax.Array)
    assert first["image"].sharding == sharding.batch_sharding(mesh, 4)
    np.testing.assert_array_equal(first["label"], [0, 1, 2, 3])
    for step in range(1, 5):
        batch = next(it)
        np.testing.assert_array_equal(batch["label"], np.arange(4 * step, 4 * step + 4))
        np.testing.assert_array_equal(np.asarray(batch["image"])[:, 0, 0, 0], batch["label"])
    assert it.get_state() == {"next_index": 5}  # not 5 + size: the batches in flight


def test_state_round_trips_through_an_orbax_checkpoint(tmp_path):
    """Saved at step 3 with 2 batches in flight, restored into a fresh iterator: the next
    batch is batch 3, as in the uninterrupted stream."""
    mesh = _mesh()
    it = device_prefetch.to_devices(_iterator(_Counting(64)), mesh, 2)
    taken = [next(it) for _ in range(3)]
    state = {"w": jax.numpy.zeros(3)}
    checkpointer = checkpointing.Checkpointer(str(tmp_path))
    checkpointer.save(3, state, it)
    checkpointer.close()
    fresh = device_prefetch.to_devices(_iterator(_Counting(64)), mesh, 2)
    next(fresh)  # a position to be replaced, batches in flight to be dropped
    restored = checkpointing.Checkpointer(str(tmp_path))
    restored.restore(3, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
                     fresh)
    restored.close()
    assert fresh.get_state() == {"next_index": 3}
    np.testing.assert_array_equal(next(fresh)["label"], np.arange(12, 16))
    assert len(taken) == 3


def test_bad_sizes_and_parents_are_refused():
    for size in (-1, 1.5):
        with pytest.raises(ValueError, match="device_prefetch=.* whole number >= 0"):
            device_prefetch.to_devices(_iterator(_Counting(8)), _mesh(), size)
    with pytest.raises(TypeError, match="grain DatasetIterator"):
        device_prefetch.to_devices(iter([{}]), _mesh(), 2)
