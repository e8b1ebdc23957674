"""MaskGIT's tokenizer recipe: the weight average (EMA) of the VQGAN, its update and that it
is the tokenizer; the perceptual term never silently off."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from mage_jax import checkpointing
from mage_jax.train import stages, tokenizer
from tests.tiny_configs import tiny_tokenizer_config


def _with_ema(total_steps=4):
    config = tiny_tokenizer_config(total_steps)
    config.ema_decay = 0.9
    return config


def test_ema_follows_the_polyak_average_of_the_weights():
    config = _with_ema()
    decay = config.ema_decay
    stage = tokenizer.build_stage(config)
    state = nn.unbox(stage.init_state(jax.random.key(0)))
    step = jax.jit(stage.train_step)
    images = jax.random.uniform(jax.random.key(1), (2, config.data.image_size,
                                                     config.data.image_size, 3))
    trajectory = [state["params"]]
    for i in range(3):
        state, _ = step(state, {"image": images}, jax.random.key(i), None)
        trajectory.append(state["params"])
    # ema_0 = p_0; ema_t = decay * ema_{t-1} + (1 - decay) * p_t
    expected = jax.tree.map(np.asarray, trajectory[0])
    for params in trajectory[1:]:
        expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * np.asarray(p),
                                expected, params)
    for got, want, raw in zip(jax.tree.leaves(state["ema_params"]), jax.tree.leaves(expected),
                              jax.tree.leaves(state["params"])):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-7)
    moved = [np.abs(np.asarray(r) - np.asarray(g)).max() for r, g in
             zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state["ema_params"]))]
    assert max(moved) > 0  # the average lags the weights


def test_restored_tokenizer_is_the_ema(tmp_path):
    config = _with_ema(total_steps=2)
    state = jax.device_get(stages.run(config, str(tmp_path), devices=jax.devices()[:1]))
    params, step = checkpointing.restore_params(str(tmp_path))
    raw, _ = checkpointing.restore_params(str(tmp_path), ema=False)
    assert step == 2
    for got, ema, weights, raw_got in zip(*(jax.tree.leaves(t) for t in (
            params, state["ema_params"], state["params"], raw))):
        np.testing.assert_array_equal(got, ema)
        np.testing.assert_array_equal(raw_got, weights)


def test_bad_decay_is_refused_before_compiling(tmp_path):
    config = _with_ema()
    config.ema_decay = 1.0
    with pytest.raises(ValueError, match="ema_decay=1.0"):
        stages.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert not (tmp_path / "checkpoints").exists()


def test_perceptual_term_without_weights_is_announced(caplog):
    config = tiny_tokenizer_config()
    config.loss.update(perceptual_weight=0.1, perceptual_weights=None)
    with caplog.at_level("WARNING"):
        stage = tokenizer.build_stage(config)
    assert stage.frozen is None  # the term is off ...
    assert "perceptual (LPIPS) term is OFF" in caplog.text  # ... and the log says so
    caplog.clear()
    config.loss.perceptual_weight = 0.0
    with caplog.at_level("WARNING"):
        tokenizer.build_stage(config)
    assert "perceptual" not in caplog.text
