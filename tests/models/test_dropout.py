"""Dropout from four 16-bit fields per threefry hash (mage_jax/models/dropout.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mage_jax import sharding
from mage_jax.models import mage
from mage_jax.models.dropout import Dropout, keep_mask, keep_threshold
from tests.tiny_configs import tiny_pretrain_config


def _binomial_ok(kept: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(kept - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_keep_threshold_is_the_16_bit_rounding():
    assert keep_threshold(0.9) == 58982  # 0.9 * 65536 = 58982.4
    assert keep_threshold(1.0) == 65536
    with pytest.raises(ValueError, match="dropout rate in"):
        keep_threshold(0.0)


@pytest.mark.parametrize("shape", [(8, 12, 33, 33), (4, 65, 128), (1001,)])
def test_keep_fraction_is_the_quantised_probability(shape):
    mask = np.asarray(keep_mask(jax.random.key(0), shape, 0.9))
    assert mask.shape == shape and mask.dtype == bool
    assert _binomial_ok(int(mask.sum()), mask.size, keep_threshold(0.9) / 65536)


def test_fields_of_one_hash_and_neighbouring_rows_are_independent():
    # Elements 0..3 of a row share one hash; a mask that reused bits across them (or
    # across rows) would show P(both kept) far from p^2 at those offsets.
    p = 0.5
    mask = np.asarray(keep_mask(jax.random.key(1), (4096, 64), p))
    n = mask[:, :-4].size
    for offset in (1, 2, 3, 4):
        both = int((mask[:, :-4] & mask[:, offset:offset + 60]).sum())
        assert _binomial_ok(both, n, p * p), offset
    rows = int((mask[:-1] & mask[1:]).sum())
    assert _binomial_ok(rows, mask[1:].size, p * p)
    # Each field position within a hash keeps at the same rate (no biased 16-bit half).
    for field in range(4):
        column = mask[:, field::4]
        assert _binomial_ok(int(column.sum()), column.size, p), field


def test_same_key_same_mask_other_key_other_mask_any_key_type():
    a = keep_mask(jax.random.key(3), (16, 40), 0.7)
    assert np.array_equal(a, keep_mask(jax.random.key(3), (16, 40), 0.7))
    assert not np.array_equal(a, keep_mask(jax.random.key(4), (16, 40), 0.7))
    rbg = keep_mask(jax.random.key(3, impl="rbg"), (16, 40), 0.7)
    assert rbg.shape == (16, 40) and 0.4 < float(np.mean(rbg)) < 0.95


def test_mask_is_the_same_sharded_over_a_mesh():
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=4, fsdp=1, tensor=2)))
    spec = NamedSharding(mesh, P("data", None, "tensor"))
    fn = jax.jit(lambda k: keep_mask(k, (8, 5, 64), 0.9), out_shardings=spec)
    with jax.set_mesh(mesh):
        sharded = fn(jax.random.key(5))
    assert np.array_equal(np.asarray(sharded), np.asarray(keep_mask(jax.random.key(5), (8, 5, 64), 0.9)))


def test_packed_dropout_scales_kept_values_by_the_probability_used():
    x = jnp.full((64, 257), 2.0)
    y = np.asarray(Dropout(0.1, packed=True).apply({}, x, False,
                                                   rngs={"dropout": jax.random.key(0)}))
    kept = y != 0
    np.testing.assert_allclose(y[kept], 2.0 * 65536 / keep_threshold(0.9), rtol=1e-6)
    assert _binomial_ok(int(kept.sum()), kept.size, keep_threshold(0.9) / 65536)


def test_unpacked_dropout_is_flax_dropout():
    """The default (every preset, for TPUs): flax's masks, kept values divided by 0.9."""
    x = jnp.full((64, 257), 2.0)
    rngs = {"dropout": jax.random.key(0)}
    y = np.asarray(Dropout(0.1).apply({}, x, False, rngs=rngs))
    kept = y != 0
    np.testing.assert_allclose(y[kept], 2.0 / 0.9, rtol=1e-6)
    assert _binomial_ok(int(kept.sum()), kept.size, 0.9)


def test_mage_from_config_passes_packed_dropout_to_every_dropout():
    config = tiny_pretrain_config(arg="demo")
    assert mage.mage_from_config(config, 16, 16).packed_dropout is False
    config.model.update(packed_dropout=True, dropout_rate=0.1)
    model = mage.mage_from_config(config, 16, 16)
    tokens = jnp.zeros((1, 16), jnp.int32)
    drop = jnp.zeros((1, 17), bool).at[0, 1:9].set(True)
    params = model.init(jax.random.key(0), tokens, drop, drop, train=False)
    packed = []  # every Dropout the training forward calls, and whether it packs

    def record(call, args, kwargs, context):
        if isinstance(context.module, Dropout):
            packed.append(context.module.packed)
        return call(*args, **kwargs)
    with nn.intercept_methods(record):
        model.apply(params, tokens, drop, drop, train=True, rngs={"dropout": jax.random.key(1)})
    # token embedding + per block (attention, projection, 2 in the MLP), encoder and decoder
    blocks = config.model.depth + config.model.decoder_depth
    assert len(packed) == 1 + 4 * blocks and all(packed), packed


def test_dropout_is_identity_when_deterministic_or_rate_zero_and_refuses_bad_rates():
    x = jnp.arange(12.0).reshape(3, 4)
    assert Dropout(0.5, packed=True).apply({}, x, True) is x
    assert Dropout(0.0, packed=True).apply({}, x, False) is x
    with pytest.raises(ValueError, match=r"rate 1.0 must be in \[0, 1\)"):
        Dropout(1.0).apply({}, x, False, rngs={"dropout": jax.random.key(0)})


def test_counters_that_would_overflow_are_refused():
    with pytest.raises(ValueError, match="exceed the 32-bit counters"):
        jax.eval_shape(lambda k: keep_mask(k, (2 ** 16, 2 ** 16, 4), 0.9), jax.random.key(0))
