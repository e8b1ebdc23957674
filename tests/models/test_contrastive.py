"""MAGE-C's InfoNCE: the formula, and that it spans the global batch on a sharded mesh."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mage_jax import sharding
from mage_jax.models.contrastive import ProjectionMLP, info_nce


def _numpy_nt_xent(z1, z2, t):
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    n = len(z1)
    sim = z @ z.T / t
    losses = []
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [j for j in range(2 * n) if j != i]
        losses.append(-(sim[i, positive] - np.log(np.exp(sim[i, others]).sum())))
    return np.mean(losses)


def test_info_nce_matches_the_nt_xent_formula():
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    loss, _ = info_nce(jnp.asarray(z1), jnp.asarray(z2), 0.2)
    np.testing.assert_allclose(float(loss), _numpy_nt_xent(z1, z2, 0.2), rtol=1e-5)


def test_identical_views_are_found_and_give_lower_loss_than_random_pairs():
    rng = np.random.default_rng(1)
    z = jnp.asarray(rng.normal(size=(8, 16)))
    loss_same, accuracy = info_nce(z, z, 0.2)
    loss_random, _ = info_nce(z, jnp.asarray(rng.normal(size=(8, 16))), 0.2)
    assert float(accuracy) == 1.0 and float(loss_same) < float(loss_random)


def test_negatives_come_from_every_device_of_the_global_batch():
    """Sharded over 8 devices, every example still meets all 2B - 2 negatives."""
    rng = np.random.default_rng(2)
    z1, z2 = rng.normal(size=(16, 4)), rng.normal(size=(16, 4))
    expected = _numpy_nt_xent(z1, z2, 0.5)
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=2, tensor=1)))
    batch = NamedSharding(mesh, P(("data", "fsdp"), None))
    sharded = [jax.device_put(jnp.asarray(z, jnp.float32), batch) for z in (z1, z2)]
    # Its own mesh: a stage run earlier in this process leaves its mesh set globally.
    with jax.set_mesh(mesh):
        loss, _ = jax.jit(lambda a, b: info_nce(a, b, 0.5))(*sharded)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    # A per-device loss (negatives only from the local 2 examples) would differ.
    local = np.mean([_numpy_nt_xent(z1[i:i + 2], z2[i:i + 2], 0.5) for i in range(0, 16, 2)])
    assert abs(local - expected) > 1e-2


def test_projection_mlp_layers_and_output_width():
    import flax.linen as nn
    mlp = ProjectionMLP(hidden_dim=8, out_dim=3, num_layers=3)
    params = nn.unbox(jax.eval_shape(mlp.init, jax.random.key(0), jnp.zeros((2, 5)))["params"])
    assert sorted(k for k in params if k.startswith("fc")) == ["fc0", "fc1", "fc2"]
    ones = jax.tree.map(lambda x: jnp.ones(x.shape, x.dtype), params)
    assert mlp.apply({"params": ones}, jnp.ones((2, 5))).shape == (2, 3)
