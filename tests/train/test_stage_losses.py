"""The training stages' losses, recomputed here from the models' outputs and the formulas:

* MAGE-C (pretrain stage): ``0.5 * (l1 + l2) + weight * InfoNCE`` over two differing views,
  and the projection head's gradient (Adam's first moment after one step is (1 - b1) * g).
* Tokenizer stage: no adversarial term and a discriminator (parameters and Adam state) left
  exactly as initialised before ``adversarial_warmup_steps``; after it the generator adds
  ``adversarial_weight * E[softplus(-D(recon))]``, and the discriminator's gradient is that of
  ``E[softplus(-D(x))] + E[softplus(D(recon))] + r1_every * r1_weight * E_b ||d sum D / dx_b||^2``
  on R1 steps (``step % r1_every == 0``) and of the logistic terms alone on the others.
"""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mage_jax import masking
from mage_jax.data import pipeline
from mage_jax.models import contrastive, mage, vqgan
from mage_jax.train import pretrain, tokenizer
from tests.models.test_contrastive import _numpy_nt_xent
from tests.tiny_configs import tiny_pretrain_config, tiny_tokenizer_config


def _adam(opt_state) -> optax.ScaleByAdamState:
    """The one ScaleByAdamState (count, mu, nu) inside an optax chain's state."""
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)]
    assert len(found) == 1, found
    return found[0]


def _softplus(v):
    return np.logaddexp(0.0, np.asarray(v, np.float64))


def _assert_trees_close(got, want, rtol, atol_fraction):
    """Leafwise allclose, atol a fraction of the largest magnitude of the expected tree."""
    scale = max(float(np.abs(np.asarray(w)).max()) for w in jax.tree.leaves(want))
    assert scale > 0
    for path, g in jax.tree_util.tree_flatten_with_path(got)[0]:
        w = np.asarray(_at(want, path))
        np.testing.assert_allclose(np.asarray(g), w, rtol=rtol, atol=atol_fraction * scale,
                                   err_msg=jax.tree_util.keystr(path))


def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def _tree_norm(tree):
    return float(np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                             for x in jax.tree.leaves(tree))))


# --------------------------------------------------------------------------- MAGE-C


def _jnp_nt_xent(z1, z2, temperature):
    """NT-Xent written out: each of the 2B embeddings against its other view (positive) and
    the 2B - 2 other embeddings (negatives), cosine similarity / temperature."""
    z = jnp.concatenate([z1, z2])
    z = z / jnp.linalg.norm(z, axis=1, keepdims=True)
    n2 = z.shape[0]
    sim = z @ z.T / temperature
    positive = sim[jnp.arange(n2), (jnp.arange(n2) + n2 // 2) % n2]
    others = jnp.where(jnp.eye(n2, dtype=bool), -jnp.inf, sim)
    return jnp.mean(jax.scipy.special.logsumexp(others, axis=1) - positive)


def _numpy_masked_ce(logits, tokens, masked, codebook_size, smoothing):
    """Label-smoothed cross-entropy over the image-token logits, mean over masked positions
    (one masking-ratio group: examples_per_ratio >= the batch)."""
    x = np.asarray(logits, np.float64)[:, 1:, :codebook_size]
    logp = x - x.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.asarray(tokens)[..., None], axis=-1)[..., 0]
    per_token = (1 - smoothing) * nll + smoothing * -logp.mean(-1)
    weight = np.asarray(masked)[:, 1:].astype(np.float64)
    return float((per_token * weight).sum() / weight.sum())


def _random_params(module, *args, seed=0):
    """Plain parameters with lecun-scaled numpy values (flax's random init compiles a kernel
    per parameter shape: seconds each on a CPU)."""
    rng = np.random.default_rng(seed)
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))["params"]

    def draw(leaf):
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
        return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)
    return jax.tree.map(draw, shapes)


@pytest.fixture(scope="module")
def mage_c_step():
    """One MAGE-C train step on a pipeline batch, and the same step's quantities recomputed
    from the models (tokenizer, MAGE, projection head) with the step's masks and keys."""
    config = tiny_pretrain_config(arg="demo,contrastive")
    # Unclipped, so that Adam's first moment after one step is exactly (1 - b1) * gradient.
    config.optimizer.grad_clip_norm = 0.0
    batch_size, size = config.batch_size, config.data.image_size
    assert config.masking.examples_per_ratio >= batch_size  # one ratio group per step
    tok_model = vqgan.vqgan_from_config(config.tokenizer)
    tok_params = _random_params(tok_model, jnp.zeros((1, size, size, 3)))
    stage = pretrain.make_stage(config, tok_params)
    # The batch the stage trains on: two augmented views of each image, from its pipeline.
    batch = next(pipeline.train_iterator(
        config.data, seed=0, global_batch_size=batch_size, process_index=0, process_count=1,
        two_views=stage.two_views))
    state = jax.jit(lambda r: nn.unbox(stage.init_state(r)))(jax.random.key(0))
    rng = jax.random.key(7)
    new_state, logged = jax.device_get(jax.jit(stage.train_step)(state, batch, rng, tok_params))

    grid = vqgan.token_grid(config.tokenizer, size)
    model = mage.mage_from_config(config, codebook_size=config.tokenizer.codebook_size,
                                  num_tokens=grid * grid).clone(
                                      drop_ratio=config.masking.drop_ratio)
    projection = contrastive.ProjectionMLP(
        config.contrastive.proj_hidden_dim, config.contrastive.proj_dim,
        config.contrastive.proj_layers)
    mcfg, c = config.masking, config.contrastive

    @jax.jit
    def independent(params, batch, rng):
        views = []
        # The step's keys: (view 1, view 2, class token); per view (masks, dropout).
        for image, view_rng in zip((batch["image"], batch["image2"]),
                                   jax.random.split(rng, 3)[:2]):
            mask_rng, dropout_rng = jax.random.split(view_rng)
            drop, masked, _ = masking.sample_step_masks(
                mask_rng, batch_size, grid * grid, min_ratio=mcfg.min_ratio,
                max_ratio=mcfg.max_ratio, mean=mcfg.mean, std=mcfg.std,
                drop_ratio=mcfg.drop_ratio, examples_per_ratio=mcfg.examples_per_ratio)
            tokens = tok_model.apply({"params": tok_params}, image, method=tok_model.encode)
            out = model.apply({"params": params["mage"]}, tokens, drop, masked, train=True,
                              rngs={"dropout": dropout_rng})
            views.append(dict(tokens=tokens, masked=masked, logits=out["logits"],
                              pooled=out["pooled"]))
        project = lambda p, v: projection.apply({"params": p}, v["pooled"])
        weighted_nce = lambda p: c.weight * _jnp_nt_xent(project(p, views[0]),
                                                         project(p, views[1]), c.temperature)
        return dict(views=views, z=[project(params["projection"], v) for v in views],
                    projection_grad=jax.grad(weighted_nce)(params["projection"]))

    return types.SimpleNamespace(config=config, stage=stage, batch=batch, logged=logged,
                                 new_state=new_state,
                                 ref=jax.device_get(independent(state["params"], batch, rng)))


def test_mage_c_trains_on_two_differing_views(mage_c_step):
    batch, ref = mage_c_step.batch, mage_c_step.ref
    assert mage_c_step.stage.two_views and batch["image"].shape == batch["image2"].shape
    differ = [not np.array_equal(a, b) for a, b in zip(batch["image"], batch["image2"])]
    # Same crop (the demo crops nothing); colour jitter and flips drawn per view.
    assert sum(differ) >= len(differ) - 2, differ
    # They reach the model as different tokens, masked differently.
    first, second = ref["views"]
    assert np.mean(first["tokens"] != second["tokens"]) > 0.05
    assert np.mean(first["masked"] != second["masked"]) > 0.1


def test_mage_c_loss_is_mean_of_the_view_losses_plus_weighted_info_nce(mage_c_step):
    config, logged, ref = mage_c_step.config, mage_c_step.logged, mage_c_step.ref
    k, smoothing = config.tokenizer.codebook_size, config.label_smoothing
    l1, l2 = (_numpy_masked_ce(v["logits"], v["tokens"], v["masked"], k, smoothing)
              for v in ref["views"])
    nce = _numpy_nt_xent(*ref["z"], config.contrastive.temperature)
    weight = config.contrastive.weight
    np.testing.assert_allclose(logged["reconstruction_loss"], 0.5 * (l1 + l2), rtol=1e-5)
    np.testing.assert_allclose(logged["contrastive_loss"], nce, rtol=1e-5)
    np.testing.assert_allclose(logged["loss"], 0.5 * (l1 + l2) + weight * nce, rtol=1e-5)
    # Teeth: one view's loss, the sum of both, or the unweighted InfoNCE are all off by far
    # more than the tolerance.
    assert abs(l1 - l2) > 1e-3 and weight * nce > 1e-2


def test_mage_c_projection_head_gets_the_weighted_info_nce_gradient(mage_c_step):
    """Nothing else reaches the head; Adam's first moment after the first step holds
    (1 - b1) times its gradient."""
    grads = mage_c_step.ref["projection_grad"]
    assert sorted(grads) == ["fc0", "fc1", "norm0"]
    for leaf in jax.tree.leaves(grads):
        assert float(np.abs(leaf).max()) > 0
    mu = _adam(mage_c_step.new_state["opt_state"]).mu["projection"]
    b1 = mage_c_step.config.optimizer.b1
    _assert_trees_close(mu, jax.tree.map(lambda g: (1 - b1) * np.asarray(g), grads),
                        rtol=1e-4, atol_fraction=1e-5)


# --------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def gan_run():
    """Four steps of the tiny tokenizer stage on one batch: the adversarial phase starts at
    step 2 and R1 runs on even steps. ``states[i]`` is the state before step i."""
    config = tiny_tokenizer_config()
    loss = config.loss
    assert (loss.adversarial_warmup_steps, loss.r1_every) == (2, 2)
    assert config.optimizer.grad_clip_norm == 0 and config.optimizer.weight_decay == 0
    stage = tokenizer.build_stage(config)
    model, disc = tokenizer.build_models(config)
    step = jax.jit(stage.train_step)
    state = jax.jit(lambda r: nn.unbox(stage.init_state(r)))(jax.random.key(0))
    size = config.data.image_size
    images = jax.random.uniform(jax.random.key(1), (config.batch_size, size, size, 3))
    states, records = [jax.device_get(state)], []
    for i in range(4):
        state, logged = step(state, {"image": images}, jax.random.key(i), None)
        states.append(jax.device_get(state))
        records.append(jax.device_get(logged))

    @jax.jit
    def independent(params, disc_params, images):
        """What the formulas say, from the models alone, for one step's inputs."""
        d = lambda p, x: disc.apply({"params": p}, x)
        recon = model.apply({"params": params}, images, train=True)[0]

        def logistic(p):  # E[softplus(-D(x))] + E[softplus(D(recon))]
            return (jnp.mean(jnp.logaddexp(0.0, -d(p, images)))
                    + jnp.mean(jnp.logaddexp(0.0, d(p, recon))))

        def r1(p):  # E_b ||d (sum_b D(x)_b) / d x_b||^2
            g = jax.grad(lambda x: jnp.sum(d(p, x)))(images)
            return jnp.mean(jnp.sum(jnp.square(g), axis=(1, 2, 3)))

        def generator_adversarial(p):  # E[softplus(-D(recon))], through the VQGAN
            return jnp.mean(jnp.logaddexp(0.0, -d(disc_params, model.apply(
                {"params": p}, images, train=True)[0])))

        return dict(real=d(disc_params, images), fake=d(disc_params, recon),
                    r1=r1(disc_params), logistic_grad=jax.grad(logistic)(disc_params),
                    r1_grad=jax.grad(r1)(disc_params),
                    generator_adversarial_grad=jax.grad(generator_adversarial)(params))

    def at(i):
        return jax.device_get(independent(states[i]["params"], states[i]["disc_params"],
                                          images))

    return types.SimpleNamespace(config=config, step=step, images=images, states=states,
                                 records=records, at=at)


def _base_generator_loss(record, w):
    return (w.reconstruction_weight * record["reconstruction_loss"]
            + w.codebook_weight * record["codebook_loss"]
            + w.commitment_weight * record["commitment_loss"]
            + w.entropy_weight * record["entropy_loss"])


def test_discriminator_and_its_adam_state_stay_as_initialised_until_the_start(gan_run):
    states = gan_run.states
    initial = states[0]
    # Steps 0 and 1 (before the start at 2) leave both bit-identical ...
    for i in (1, 2):
        for key in ("disc_params", "disc_opt_state"):
            for a, b in zip(jax.tree.leaves(states[i][key]), jax.tree.leaves(initial[key])):
                np.testing.assert_array_equal(a, b, err_msg=f"{key} after step {i - 1}")
    # ... while the generator trains (step 0 has learning rate 0 in the warm-up).
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(states[2]["params"]), jax.tree.leaves(initial["params"])))
    # From the start on the discriminator's Adam counts its own steps from 0 ...
    assert [int(_adam(s["disc_opt_state"]).count) for s in states] == [0, 0, 0, 1, 2]
    assert [int(_adam(s["opt_state"]).count) for s in states] == [0, 1, 2, 3, 4]
    assert all(np.abs(m).max() > 0 for m in jax.tree.leaves(_adam(states[3]["disc_opt_state"]).mu))
    # ... and its weights move (its first step had its warm-up's learning rate 0): all of them.
    for a, b in zip(jax.tree.leaves(states[4]["disc_params"]),
                    jax.tree.leaves(initial["disc_params"])):
        assert not np.array_equal(a, b)


def test_before_the_start_the_generator_loss_has_no_adversarial_term(gan_run):
    w = gan_run.config.loss
    for record in gan_run.records[:2]:
        for key in ("adversarial_on", "generator_adversarial_loss", "discriminator_loss",
                    "r1_penalty"):
            assert record[key] == 0.0, key
        np.testing.assert_allclose(record["loss"], _base_generator_loss(record, w), rtol=1e-6)
    # A non-zero adversarial term (E[softplus(-D)] ~ log 2 at init) would be visible.
    assert w.adversarial_weight * np.log(2) > 1e-3 * abs(gan_run.records[1]["loss"])


def test_after_the_start_the_generator_adds_the_weighted_non_saturating_loss(gan_run):
    w, b1 = gan_run.config.loss, gan_run.config.optimizer.b1
    ref = gan_run.at(2)
    record = gan_run.records[2]
    expected_adv = float(np.mean(_softplus(-ref["fake"])))
    assert record["adversarial_on"] == 1.0
    np.testing.assert_allclose(record["generator_adversarial_loss"], expected_adv, rtol=1e-5)
    np.testing.assert_allclose(
        record["loss"], _base_generator_loss(record, w) + w.adversarial_weight * expected_adv,
        rtol=1e-5)

    # The term reaches the generator's gradient with that weight: the same step run as a
    # pre-start step (step 1, same weights and optimizer state) differs in Adam's first
    # moment by exactly (1 - b1) * adversarial_weight * d E[softplus(-D(recon))] / d params.
    state = gan_run.states[2]
    before_start, _ = gan_run.step(dict(state, step=np.int32(1)), {"image": gan_run.images},
                                   jax.random.key(2), None)
    mu_on = _adam(gan_run.states[3]["opt_state"]).mu
    mu_off = jax.device_get(_adam(before_start["opt_state"]).mu)
    difference = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, mu_on, mu_off)
    expected = jax.tree.map(lambda g: (1 - b1) * w.adversarial_weight * np.asarray(g),
                            ref["generator_adversarial_grad"])
    _assert_trees_close(difference, expected, rtol=1e-3, atol_fraction=1e-4)
    assert _tree_norm(expected) > 1e-3 * _tree_norm(mu_on)  # not lost in the rounding


def test_discriminator_loss_is_logistic_plus_lazy_r1_scaled_by_its_interval(gan_run):
    w, b1 = gan_run.config.loss, gan_run.config.optimizer.b1
    every = w.r1_every
    # Step 2: an R1 step. The logged terms ...
    ref = gan_run.at(2)
    record = gan_run.records[2]
    np.testing.assert_allclose(
        record["discriminator_loss"],
        np.mean(_softplus(-ref["real"])) + np.mean(_softplus(ref["fake"])), rtol=1e-5)
    np.testing.assert_allclose(record["r1_penalty"], ref["r1"], rtol=1e-4)
    assert ref["r1"] > 0
    # ... and the gradient the discriminator's Adam received (its first step: mu = (1-b1) g).
    expected = jax.tree.map(
        lambda g, r: (1 - b1) * (np.asarray(g, np.float64) + every * w.r1_weight * r),
        ref["logistic_grad"], ref["r1_grad"])
    mu2 = _adam(gan_run.states[3]["disc_opt_state"]).mu
    _assert_trees_close(mu2, expected, rtol=1e-4, atol_fraction=1e-5)
    # Teeth: R1 weighted r1_weight alone (not x r1_every) moves the gradient far more than
    # the tolerance.
    half = jax.tree.map(lambda r: (1 - b1) * w.r1_weight * np.asarray(r), ref["r1_grad"])
    assert _tree_norm(half) > 0.05 * _tree_norm(expected)

    # Step 3: no R1 (3 % 2 != 0); the gradient is the logistic loss's alone.
    ref3 = gan_run.at(3)
    record3 = gan_run.records[3]
    assert record3["r1_penalty"] == 0.0
    np.testing.assert_allclose(
        record3["discriminator_loss"],
        np.mean(_softplus(-ref3["real"])) + np.mean(_softplus(ref3["fake"])), rtol=1e-5)
    mu3 = _adam(gan_run.states[4]["disc_opt_state"]).mu
    expected3 = jax.tree.map(lambda m, g: b1 * np.asarray(m, np.float64) + (1 - b1) * g,
                             mu2, ref3["logistic_grad"])
    _assert_trees_close(mu3, expected3, rtol=1e-4, atol_fraction=1e-5)
