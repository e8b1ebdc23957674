"""Iterative decoding: the official re-masking rule by hand, and a step on the official logits."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.generate import decoding


def test_mask_schedule_hand_computed():
    table = decoding.mask_schedule(4, 256)
    # floor(256 cos(pi/8)), floor(256 cos(pi/4)), floor(256 cos(3pi/8)), floor(256 cos(pi/2))
    np.testing.assert_array_equal(table[:, 256], [236, 181, 97, 0])
    # 2T/3: cos(pi/3) = 0.5000000000000001 in float64, so 128, not 127 as float32 gives.
    assert decoding.mask_schedule(3, 256)[1, 256] == 128
    assert decoding.mask_schedule(12, 16)[0, 16] == 15
    assert decoding.mask_schedule(12, 16)[:, 0].tolist() == [0] * 12


def test_num_to_mask_clamps_to_one_and_unknown_minus_one():
    table = jnp.asarray(decoding.mask_schedule(4, 256))
    got = decoding.num_to_mask(table, 3, jnp.array([256, 256]), jnp.array([256, 5]))
    np.testing.assert_array_equal(got, [1, 1])  # scheduled 0 -> at least one
    got = decoding.num_to_mask(table, 0, jnp.array([256, 256]), jnp.array([256, 10]))
    np.testing.assert_array_equal(got, [236, 9])  # at most unknown - 1


def test_remask_lowest_confidence_unknown_only():
    key = jax.random.key(0)
    logp = jnp.array([-1.0, -3.0, -2.0, -0.5, -9.0])
    unknown = jnp.array([True, True, True, True, False])  # the -9 one is known: kept
    got = decoding.remask(key, logp, unknown, jnp.int32(2), 0.0)
    np.testing.assert_array_equal(got, [False, True, True, False, False])
    got = decoding.remask(key, logp, jnp.zeros(5, bool), jnp.int32(1), 0.0)
    assert not bool(got.any())  # nothing unknown: nothing masked


def test_remask_noise_scales_with_temperature():
    logp = jnp.zeros(64)
    unknown = jnp.ones(64, bool)
    masks = [decoding.remask(jax.random.key(s), logp, unknown, jnp.int32(32), 1.0)
             for s in range(2)]
    assert int(masks[0].sum()) == 32 and not bool((masks[0] == masks[1]).all())


def _step_inputs(fixture):
    meta = fixture["meta"]
    tokens = np.asarray(fixture["decode_step/input_tokens"])
    return (meta, tokens[:, 1:].astype(np.int32), np.asarray(fixture["decode_step/logits"]))


@pytest.mark.parametrize("step,num_steps", [(0, 12), (5, 12), (11, 12), (1, 3)])
def test_step_on_the_official_logits(mage_torch_fixture, step, num_steps):
    meta, ids, logits = _step_inputs(mage_torch_fixture)
    mask_id, codebook = int(meta["mask_token_label"]), int(meta["codebook_size"])
    batch, length = ids.shape
    unknown = ids == mask_id
    assert unknown.any(axis=1).all()
    keys = jax.random.split(jax.random.key(1), batch)
    table = jnp.asarray(decoding.mask_schedule(num_steps, length))
    next_ids, sampled = decoding.step_update(
        keys, jnp.asarray(logits), jnp.asarray(ids), step, table, jnp.full((batch,), length),
        num_steps=num_steps, choice_temperature=0.0, codebook_size=codebook,
        mask_token_id=mask_id)
    next_ids, sampled = np.asarray(next_ids), np.asarray(sampled)
    np.testing.assert_array_equal(sampled[~unknown], ids[~unknown])
    assert (sampled[unknown] < codebook).all()
    # log p of the sampled tokens from the official logits, in float64.
    z = logits[:, 1:, :codebook].astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    chosen = np.take_along_axis(logp, sampled[..., None], -1)[..., 0]
    for b in range(batch):
        n_unknown = int(unknown[b].sum())
        scheduled = math.floor(length * math.cos(math.pi / 2 * (step + 1) / num_steps))
        expected = max(1, min(n_unknown - 1, scheduled))
        remasked = next_ids[b] == mask_id
        assert remasked.sum() == expected, (b, remasked.sum(), expected)
        assert (unknown[b] | ~remasked).all()  # only unknown positions are masked again
        # Without noise: exactly the `expected` least likely of the unknown samples.
        order = np.argsort(np.where(unknown[b], chosen[b], np.inf), kind="stable")
        np.testing.assert_array_equal(np.sort(np.flatnonzero(remasked)),
                                      np.sort(order[:expected]))
        np.testing.assert_array_equal(next_ids[b][~remasked], sampled[b][~remasked])


def test_sampling_follows_the_codebook_softmax():
    codebook, vocab, rows = 4, 7, 4000
    logits = jnp.array([0.0, 1.0, -1.0, 0.5, 50.0, 50.0, 50.0])  # beyond the codebook: ignored
    logits = jnp.broadcast_to(logits, (rows, 2, vocab))
    ids = jnp.full((rows, 1), 6, jnp.int32)
    keys = jax.random.split(jax.random.key(3), rows)
    table = jnp.asarray(decoding.mask_schedule(2, 1))
    _, sampled = decoding.step_update(keys, logits, ids, 0, table, jnp.ones(rows, jnp.int32),
                                      num_steps=2, choice_temperature=1.0,
                                      codebook_size=codebook, mask_token_id=6)
    freq = np.bincount(np.asarray(sampled[:, 0]), minlength=vocab) / rows
    expected = np.asarray(jax.nn.softmax(logits[0, 1, :codebook]))
    np.testing.assert_allclose(freq[:codebook], expected, atol=0.03)
    assert freq[codebook:].sum() == 0
    # The model's image_logits (positions 1..L over the codebook) sample the same tokens.
    _, from_part = decoding.step_update(keys, logits[:, 1:, :codebook], ids, 0, table,
                                        jnp.ones(rows, jnp.int32), num_steps=2,
                                        choice_temperature=1.0, codebook_size=codebook,
                                        mask_token_id=6)
    np.testing.assert_array_equal(from_part, sampled)


def _toy_logits_fn(vocab, codebook):
    """A deterministic stand-in model: logits depend on the ids (so steps interact)."""
    table = jax.random.normal(jax.random.key(7), (vocab, vocab)) * 3.0

    def fn(ids):
        c0 = jnp.full((ids.shape[0], 1), codebook, ids.dtype)
        full = jnp.concatenate([c0, ids], axis=1)
        context = jnp.roll(full, 1, axis=1)
        return table[context]
    return fn


def test_iterative_decode_fills_every_mask_keeps_known_and_is_per_example():
    codebook, mask_id, length = 8, 9, 12
    fn = _toy_logits_fn(10, codebook)
    ids = jnp.full((3, length), mask_id, jnp.int32)
    ids = ids.at[1, :4].set(jnp.array([1, 2, 3, 4]))  # a canvas with known tokens
    ids = ids.at[2].set(jnp.arange(length) % codebook)  # nothing unknown
    kwargs = dict(num_steps=5, choice_temperature=4.5, codebook_size=codebook,
                  mask_token_id=mask_id)
    decode = jax.jit(lambda i, idx: decoding.iterative_decode(fn, jax.random.key(0), idx, i,
                                                              **kwargs))
    out = np.asarray(decode(ids, jnp.arange(3)))
    assert (out < codebook).all()
    np.testing.assert_array_equal(out[1, :4], [1, 2, 3, 4])
    np.testing.assert_array_equal(out[2], np.arange(length) % codebook)
    # Row 1 alone, with its global index, is the same sample; another index is another.
    alone = np.asarray(decode(ids[1:2], jnp.array([1])))
    np.testing.assert_array_equal(alone[0], out[1])
    other = np.asarray(decode(jnp.full((4, length), mask_id, jnp.int32), jnp.arange(4)))
    assert not all((other[0] == other[i]).all() for i in range(1, 4))
