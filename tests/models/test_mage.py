"""Unit tests of the MAGE encoder-decoder, its transformer stack and its loss (tiny sizes)."""
import json
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mage_jax.masking import sample_masks
from mage_jax.models.mage import MAGE, image_token_logits, mage_from_config, mage_loss
from mage_jax.sharding import LOGICAL_AXIS_RULES

TINY = dict(codebook_size=16, num_tokens=16, embed_dim=32, depth=2, num_heads=4,
            decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)
BATCH = 2


def _inputs(seed=0, ratio=0.75):
    k1, k2 = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(k1, (BATCH, TINY["num_tokens"]), 0, TINY["codebook_size"])
    drop, masked = sample_masks(k2, BATCH, TINY["num_tokens"], ratio)
    return tokens, drop, masked


@pytest.fixture(scope="module")
def plain():
    """The plain model with random parameters of the init's shapes.

    Random rather than ``model.init`` (XLA takes seconds to compile the initialisers,
    which the sharded test exercises anyway); non-trivial norm scales and biases, so
    a misplaced norm cannot hide behind ones and zeros.
    """
    model = MAGE(**TINY)
    abstract = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *_inputs())["params"])
    rng = np.random.default_rng(0)

    def sample(path, leaf):
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if jax.tree_util.keystr(path).endswith("['scale']"):
            return jnp.asarray(1.0 + 0.1 * noise)
        fan_in = leaf.shape[0] if len(leaf.shape) > 1 else 25.0
        return jnp.asarray(noise / np.sqrt(fan_in))

    return model, jax.tree_util.tree_map_with_path(sample, abstract)


@pytest.fixture(scope="module")
def forward(plain):
    """The plain model's jitted eval forward pass, compiled once for the whole module."""
    model, params = plain
    fn = jax.jit(lambda t, d, a: model.apply({"params": params}, t, d, a))
    return fn


def _to_scan_layout(params):
    out = dict(params)
    for stack in ("encoder", "decoder"):
        blocks = [params[stack][f"block_{i}"] for i in range(len(params[stack]))]
        out[stack] = {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}
    return out


def test_special_ids_of_the_legacy_vocabulary():
    model = MAGE(codebook_size=1024, num_tokens=256)
    assert (model.vocab_size, model.fake_class_id, model.mask_token_id) == (2025, 1100, 2024)
    assert model.num_dropped == 128
    other = MAGE(codebook_size=64, num_tokens=16)
    assert (other.vocab_size, other.fake_class_id, other.mask_token_id) == (1065, 140, 1064)


def test_param_logical_names_come_from_the_vocabulary():
    vocabulary = {name for name, _ in LOGICAL_AXIS_RULES}
    for scan in (False, True):
        model = MAGE(**TINY, scan_layers=scan)
        abstract = jax.eval_shape(model.init, jax.random.key(0), *_inputs())["params"]
        leaves = jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned), leaf
            names = leaf.names
            assert len(names) == leaf.value.ndim
            if scan and names[0] is None:  # the stacked layer axis is never sharded
                names = names[1:]
            assert set(names) <= vocabulary, names


def _objective(model, tokens, drop, masked, weights):
    """A scalar that depends on every logit (the loss ignores the non-codebook ones)."""
    def fn(p):
        return jnp.sum(model.apply({"params": p}, tokens, drop, masked)["logits"] * weights)
    return fn


@pytest.fixture(scope="module")
def grad_case(plain):
    """Inputs whose ids avoid 8..15, and the plain model's gradient of ``_objective``."""
    model, params = plain
    tokens, drop, masked = _inputs(3)
    tokens = tokens % 8
    weights = jax.random.normal(jax.random.key(4), (BATCH, TINY["num_tokens"] + 1,
                                                    model.vocab_size))
    case = (tokens, drop, masked, weights)
    return case, jax.jit(jax.grad(_objective(model, *case)))(params)


@pytest.mark.parametrize("remat,scan", [(True, False), (False, True), (True, True)])
def test_remat_and_scan_match_the_plain_stack(plain, forward, remat, scan):
    model, params = plain
    other = MAGE(**TINY, remat=remat, scan_layers=scan)
    other_params = _to_scan_layout(params) if scan else params
    tokens, drop, masked = _inputs(1)
    out_ref = forward(tokens, drop, masked)
    out = jax.jit(lambda p: other.apply({"params": p}, tokens, drop, masked))(other_params)
    for key in ("logits", "encoder_output", "pooled"):
        np.testing.assert_allclose(out[key], out_ref[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("remat", [True, False])  # False: scanned blocks save only matmuls
def test_remat_scan_gradients_match_the_plain_stack(plain, grad_case, remat):
    model, params = plain
    case, g_ref = grad_case
    other = MAGE(**TINY, remat=remat, scan_layers=True)
    g = jax.jit(jax.grad(_objective(other, *case)))(_to_scan_layout(params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max())), g, _to_scan_layout(g_ref))


def test_remat_keeps_dropout_identical(plain, forward):
    model, params = plain
    tokens, drop, masked = _inputs(2)

    def run(m):
        # rbg keys: XLA compiles threefry-based dropout masks far more slowly on CPU.
        rngs = {"dropout": jax.random.key(7, impl="rbg")}
        return jax.jit(lambda p: m.apply({"params": p}, tokens, drop, masked, train=True,
                                         rngs=rngs))(params)

    a, b = run(model), run(MAGE(**TINY, remat=True))
    c = forward(tokens, drop, masked)
    np.testing.assert_allclose(a["logits"], b["logits"], rtol=1e-5, atol=1e-6)
    assert np.abs(np.asarray(a["logits"]) - np.asarray(c["logits"])).max() > 1e-3  # dropout on


def test_word_embeddings_get_gradient_only_through_the_input(plain, grad_case):
    model, _ = plain
    (tokens, _, masked, _), grads = grad_case
    g = np.abs(np.asarray(grads["token_emb"]["word_embeddings"])).sum(axis=1)
    used = set(np.asarray(tokens)[~np.asarray(masked)[:, 1:]].tolist())
    used |= {model.fake_class_id, model.mask_token_id}
    unused = np.array([i for i in range(model.vocab_size) if i not in used])
    assert np.all(g[unused] == 0.0)  # the MLM head reads a gradient-stopped table
    assert np.all(g[sorted(used)] > 0.0)
    assert np.abs(np.asarray(grads["mlm_head"]["bias"])).sum() > 0


def test_dropped_positions_do_not_reach_the_encoder(plain, forward):
    model, params = plain
    tokens, drop, _ = _inputs(5)
    masked = jnp.zeros_like(drop)  # keep dropped ids visible, so only dropping hides them
    out = forward(tokens, drop, masked)
    changed = jnp.where(drop[:, 1:], (tokens + 1) % TINY["codebook_size"], tokens)
    out2 = forward(changed, drop, masked)
    np.testing.assert_array_equal(out["encoder_output"], out2["encoder_output"])
    kept_change = jnp.where(~drop[:, 1:], (tokens + 1) % TINY["codebook_size"], tokens)
    out3 = forward(kept_change, drop, masked)
    assert np.abs(np.asarray(out3["encoder_output"] - out["encoder_output"])).max() > 1e-3

    # The kept positions go in positional order with their own position embeddings.
    def encode_kept(m, ids, keep):
        x = m.token_emb(m._with_c0(ids), True)
        return m.norm(m.encoder(x[:, keep], True))

    for b in range(BATCH):
        keep = np.flatnonzero(~np.asarray(drop[b]))
        ref = jax.jit(lambda t, k: model.apply({"params": params}, t, k, method=encode_kept))(
            tokens[b:b + 1], keep)
        np.testing.assert_allclose(out["encoder_output"][b:b + 1], ref, rtol=1e-5, atol=1e-6)


def test_masked_targets_do_not_leak_into_the_logits(forward):
    # Masked (dropped or not) positions are [MASK] in the encoder and the [C0] output in
    # the decoder: their target tokens must not change any logit; an unmasked one must.
    tokens, drop, masked = _inputs(6)
    out = forward(tokens, drop, masked)
    changed = jnp.where(masked[:, 1:], (tokens + 3) % TINY["codebook_size"], tokens)
    np.testing.assert_array_equal(out["logits"], forward(changed, drop, masked)["logits"])
    visible = jnp.where(masked[:, 1:], tokens, (tokens + 3) % TINY["codebook_size"])
    assert np.abs(np.asarray(forward(visible, drop, masked)["logits"] - out["logits"])).max() > 0


def test_wrong_drop_count_is_rejected(plain):
    model, params = plain
    tokens, drop, masked = _inputs(7)
    with pytest.raises(ValueError, match="num_dropped=8"):
        model.apply({"params": params}, tokens, drop.at[:, 1].set(True).at[:, 2].set(True),
                    masked | drop.at[:, 1].set(True).at[:, 2].set(True))
    with pytest.raises(ValueError, match="token_all_mask has shape"):
        model.apply({"params": params}, tokens, drop, masked[:, 1:])


def test_bfloat16_compute_is_close(plain, forward):
    model, params = plain
    tokens, drop, masked = _inputs(8)
    ref = forward(tokens, drop, masked)
    bf = jax.jit(lambda p: MAGE(**TINY, dtype=jnp.bfloat16).apply(
        {"params": p}, tokens, drop, masked))(params)
    assert bf["encoder_output"].dtype == jnp.bfloat16
    assert bf["logits"].dtype == jnp.float32
    for key in ("logits", "encoder_output"):
        r, b = np.asarray(ref[key], np.float32), np.asarray(bf[key], np.float32)
        assert np.isfinite(b).all()
        assert np.abs(r - b).max() <= 0.05 * np.abs(r).max(), key


def test_mage_loss_against_the_formula():
    rng = np.random.default_rng(0)
    codebook, length, vocab, smoothing = 5, 4, 12, 0.2
    logits = rng.normal(size=(2, length + 1, vocab)).astype(np.float32)
    logits[..., codebook:] += 50.0  # class / [MASK] columns must be ignored
    logits[:, 0] += 50.0  # so must the [C0] position
    targets = rng.integers(0, codebook, (2, length))
    masked = np.zeros((2, length + 1), bool)
    masked[0, [1, 3]] = masked[1, [2, 3, 4]] = True
    expected, hits = [], []
    for b, i in zip(*np.nonzero(masked[:, 1:])):
        row = logits[b, i + 1, :codebook].astype(np.float64)
        logp = row - np.log(np.exp(row - row.max()).sum()) - row.max()
        expected.append((1 - smoothing) * -logp[targets[b, i]] + smoothing * -logp.mean())
        hits.append(row.argmax() == targets[b, i])
    loss, metrics = mage_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(masked),
                              codebook, smoothing)
    assert float(loss) == pytest.approx(np.mean(expected), rel=1e-5)
    assert float(metrics["masked_accuracy"]) == pytest.approx(np.mean(hits))


def test_mage_loss_averages_groups_as_ddp_averages_gpus():
    # Four examples in two groups (two official GPUs) masked at different ratios: each group
    # is its own masked mean, the loss their plain mean; one pooled mean would differ.
    rng = np.random.default_rng(1)
    codebook, length = 6, 8
    logits = rng.normal(size=(4, length + 1, codebook)).astype(np.float32)
    targets = rng.integers(0, codebook, (4, length))
    masked = np.zeros((4, length + 1), bool)
    masked[0, 1:3] = masked[1, 2:4] = True            # group 0: 2 masked per example
    masked[2, 1:8] = masked[3, 2:9] = True            # group 1: 7 masked per example
    logp = logits[:, 1:] - np.log(np.exp(logits[:, 1:]).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    weight = masked[:, 1:]
    group_means = [nll[g][weight[g]].mean() for g in (slice(0, 2), slice(2, 4))]
    loss, metrics = mage_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(masked),
                              codebook, 0.0, ratio_groups=[0, 0, 1, 1])
    assert float(loss) == pytest.approx(np.mean(group_means), rel=1e-5)
    assert float(metrics["nll"]) == pytest.approx(np.mean(group_means), rel=1e-5)
    pooled, _ = mage_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(masked),
                          codebook, 0.0)
    assert float(pooled) == pytest.approx(nll[weight].mean(), rel=1e-5)
    assert abs(float(pooled) - float(loss)) > 1e-3


def test_image_logits_are_the_part_of_the_logits_the_loss_reads(plain):
    # image_logits=True computes positions 1..L against the codebook only: the same values,
    # the same loss and the same gradients as slicing the whole output, in training mode.
    model, params = plain
    tokens, drop, masked = _inputs(seed=3)
    k = TINY["codebook_size"]

    def run(p, image_logits):
        return model.apply({"params": p}, tokens, drop, masked, train=True,
                           image_logits=image_logits, rngs={"dropout": jax.random.key(1)})

    full, part = run(params, False)["logits"], run(params, True)["logits"]
    assert full.shape == (BATCH, TINY["num_tokens"] + 1, model.vocab_size)
    assert part.shape == (BATCH, TINY["num_tokens"], k)
    np.testing.assert_allclose(part, full[:, 1:, :k], rtol=1e-5, atol=1e-6)

    def loss(p, image_logits):
        return mage_loss(run(p, image_logits)["logits"], tokens, masked, k)[0]
    (l_full, g_full), (l_part, g_part) = (jax.value_and_grad(loss)(params, flag)
                                          for flag in (False, True))
    assert float(l_part) == pytest.approx(float(l_full), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 g_full, g_part)
    step_ids = jnp.concatenate([jnp.full((BATCH, 1), model.fake_class_id),
                                jnp.where(masked[:, 1:], model.mask_token_id, tokens)], axis=1)
    decode_full, decode_part = (
        model.apply({"params": params}, step_ids, flag, method=MAGE.decode_step_logits)
        for flag in (False, True))
    np.testing.assert_allclose(decode_part, decode_full[:, 1:, :k], rtol=1e-5, atol=1e-6)


def test_image_token_logits_takes_either_layout_and_names_a_wrong_one():
    logits = jnp.arange(2 * 5 * 9, dtype=jnp.float32).reshape(2, 5, 9)
    np.testing.assert_array_equal(image_token_logits(logits, 4, 6), logits[:, 1:, :6])
    part = logits[:, 1:, :6]
    np.testing.assert_array_equal(image_token_logits(part, 4, 6), part)
    with pytest.raises(ValueError, match=r"shape \(2, 4, 9\).*\(batch, 4, 6\)"):
        image_token_logits(logits[:, 1:], 4, 6)
    with pytest.raises(ValueError, match="expected"):
        mage_loss(logits[:, :3], jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5), bool), 6)


def test_mage_from_config():
    cfg = ml_collections.ConfigDict(dict(model=dict(
        embed_dim=32, depth=3, num_heads=4, decoder_embed_dim=16, decoder_depth=1,
        decoder_num_heads=2, mlp_ratio=2, dropout_rate=0.0, remat=True, scan_layers=True,
        dtype="bfloat16")))
    model = mage_from_config(cfg, codebook_size=64, num_tokens=9)
    assert (model.embed_dim, model.depth, model.decoder_depth, model.mlp_ratio) == (32, 3, 1, 2)
    assert model.remat and model.scan_layers and model.dtype == jnp.bfloat16
    assert (model.codebook_size, model.num_tokens, model.num_dropped) == (64, 9, 5)


_SHARDED_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
    from mage_jax import sharding
    from mage_jax.masking import sample_masks
    from mage_jax.models.mage import MAGE
    kw = json.loads(sys.argv[1])
    model = MAGE(**kw, scan_layers=True, remat=True)
    tokens = jax.random.randint(jax.random.key(1), (8, kw["num_tokens"]), 0, kw["codebook_size"])
    drop, masked = sample_masks(jax.random.key(2), 8, kw["num_tokens"], 0.7)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens, drop, masked)["params"]
    init_key = jax.random.key(0, impl="rbg")  # threefry initialisers compile slowly on CPU
    params = nn.unbox(jax.jit(model.init)(init_key, tokens, drop, masked)["params"])
    fn = jax.jit(lambda p, t, d, a: model.apply({"params": p}, t, d, a)["logits"])
    ref = fn(params, tokens, drop, masked)
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    shardings = sharding.logical_shardings(boxed, mesh)
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
        p = jax.device_put(params, shardings)
        out = fn(p, tokens, drop, masked)  # retraced: sharded inputs, constraints active
    qkv = p["encoder"]["layers"]["attn"]["qkv"]["kernel"]
    print(json.dumps(dict(diff=float(np.abs(np.asarray(out) - np.asarray(ref)).max()),
                          qkv_spec=str(qkv.sharding.spec))))
""")


def test_sharded_forward_on_8_devices_matches_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT, json.dumps(TINY)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["diff"] < 1e-5
    # (layers, embed, qkv, heads, kv): embed over fsdp, heads over tensor.
    assert result["qkv_spec"] == str(
        jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None))


@pytest.mark.parametrize("option", [
    "explicit_layer_norm_grad",  # the hand-written LayerNorm backward
    "fused_attention",           # jax.nn.dot_product_attention (cuDNN on GPUs; XLA here)
])
def test_option_gives_the_same_model_and_gradients(plain, forward, grad_case, option):
    model, params = plain
    other = MAGE(**TINY, **{option: True})
    tokens, drop, masked = _inputs(1)
    out = jax.jit(lambda p: other.apply({"params": p}, tokens, drop, masked))(params)
    np.testing.assert_allclose(out["logits"], forward(tokens, drop, masked)["logits"],
                               rtol=1e-5, atol=1e-5)
    case, g_ref = grad_case
    g = jax.jit(jax.grad(_objective(other, *case)))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max())), g, g_ref)


def test_fused_attention_refuses_attention_dropout_in_training(plain):
    model, params = plain
    fused = MAGE(**TINY, fused_attention=True)  # TINY trains with dropout 0.1
    tokens, drop, masked = _inputs(1)
    with pytest.raises(ValueError, match="dropout_rate=0"):
        fused.apply({"params": params}, tokens, drop, masked, train=True,
                    rngs={"dropout": jax.random.key(0)})
