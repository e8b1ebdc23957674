"""The mesh, the rules table and batch placement on 8 simulated CPU devices."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mage_jax import sharding


def _mesh_cfg(data, fsdp, tensor):
    return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor))


def test_mesh_fills_minus_one_axis_with_remaining_devices():
    mesh = sharding.make_mesh(_mesh_cfg(-1, 2, 1))
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
    assert sharding.data_parallel_size(mesh) == 8
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_mesh_that_does_not_match_device_count_names_sizes_and_fix():
    with pytest.raises(ValueError, match=r"data=2 x fsdp=2 x tensor=4 = 16 devices but 8"):
        sharding.make_mesh(_mesh_cfg(2, 2, 4))
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        sharding.make_mesh(_mesh_cfg(-1, -1, 1))


def test_single_device_mesh_from_explicit_devices():
    mesh = sharding.make_mesh(_mesh_cfg(1, 1, 1), devices=jax.devices()[:1])
    assert mesh.devices.size == 1


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(6, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")))(x)
        return nn.Dense(4, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("mlp", "embed")))(x)


def test_rules_shard_embed_over_fsdp_and_mlp_over_tensor_when_divisible():
    mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
    abstract = jax.eval_shape(_Tiny().init, jax.random.key(0), jnp.zeros((1, 8)))
    shardings = sharding.logical_shardings(abstract, mesh)
    assert shardings["params"]["Dense_0"]["kernel"].spec == P("fsdp", "tensor")
    assert shardings["params"]["Dense_1"]["kernel"].spec == P("tensor", "fsdp")
    # Unannotated leaves (biases here) are replicated.
    assert shardings["params"]["Dense_0"]["bias"].spec == P(None)


def test_dimension_not_divisible_by_its_mesh_axis_stays_replicated():
    mesh = sharding.make_mesh(_mesh_cfg(1, 2, 4))
    # mlp=6 is not divisible by tensor=4: that dim is replicated, embed=8 still over fsdp.
    spec = sharding._fit_spec(P("fsdp", "tensor"), (8, 6), mesh)
    assert spec == P(("fsdp",), None)


def test_host_batch_is_split_over_data_axes():
    mesh = sharding.make_mesh(_mesh_cfg(2, 2, 2))
    batch = {"image": np.arange(8 * 3, dtype=np.float32).reshape(8, 3)}
    placed = sharding.host_batch_to_global(batch, mesh)["image"]
    assert placed.sharding.spec == P(("data", "fsdp"), None)
    np.testing.assert_array_equal(np.asarray(placed), batch["image"])
    # Each of the 4 data-parallel groups holds 2 rows.
    assert {s.data.shape for s in placed.addressable_shards} == {(2, 3)}
