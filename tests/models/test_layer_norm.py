"""The LayerNorm with a hand-written backward computes flax's LayerNorm and its gradients."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.models.layer_norm import LayerNorm, layer_norm


def _case(shape=(3, 7, 16), seed=0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    # A large mean and uneven scale: a one-pass variance or a dropped centring term shows.
    x = 5.0 + 3.0 * jax.random.normal(k1, shape) * jnp.linspace(0.2, 2.0, shape[-1])
    params = {"scale": 1.0 + 0.3 * jax.random.normal(k2, shape[-1:]),
              "bias": 0.5 * jax.random.normal(k3, shape[-1:])}
    cotangent = jax.random.normal(k4, shape)
    return x, params, cotangent


def _value_and_grads(module, x, params, cotangent):
    def objective(x, p):
        return jnp.sum(module.apply({"params": p}, x) * cotangent)
    y = module.apply({"params": params}, x)
    return y, jax.grad(objective, argnums=(0, 1))(x, params)


@pytest.mark.parametrize("eps", [1e-6, 1e-5])
def test_explicit_grad_matches_flax_layer_norm_and_its_autodiff(eps):
    x, params, cotangent = _case()
    ref_y, (ref_dx, ref_dp) = _value_and_grads(
        nn.LayerNorm(epsilon=eps, use_fast_variance=False), x, params, cotangent)
    y, (dx, dp) = _value_and_grads(LayerNorm(epsilon=eps), x, params, cotangent)
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dp["scale"], ref_dp["scale"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp["bias"], ref_dp["bias"], rtol=1e-4, atol=1e-4)


def test_explicit_grad_against_the_formula_in_numpy():
    x, params, cotangent = _case(shape=(5, 8), seed=1)
    x64, g = np.asarray(x, np.float64), np.asarray(cotangent, np.float64)
    scale = np.asarray(params["scale"], np.float64)
    mean = x64.mean(-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdims=True)
    normed = (x64 - mean) / np.sqrt(var + 1e-6)
    # Central differences of sum(y * g) in float64 for d/dx.
    def objective(xx):
        m = xx.mean(-1, keepdims=True)
        v = ((xx - m) ** 2).mean(-1, keepdims=True)
        return np.sum(((xx - m) / np.sqrt(v + 1e-6) * scale) * g)
    numeric = np.zeros_like(x64)
    for idx in np.ndindex(x64.shape):
        step = np.zeros_like(x64)
        step[idx] = 1e-5
        numeric[idx] = (objective(x64 + step) - objective(x64 - step)) / 2e-5
    _, (dx, dp) = _value_and_grads(LayerNorm(epsilon=1e-6), x, params, cotangent)
    np.testing.assert_allclose(dx, numeric, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(dp["scale"], (g * normed).sum(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dp["bias"], g.sum(0), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_returns_bfloat16():
    x, params, cotangent = _case()
    module = layer_norm(1e-6, jnp.bfloat16, jnp.float32, "norm", explicit_grad=True)
    ref = layer_norm(1e-6, jnp.bfloat16, jnp.float32, "norm", explicit_grad=False)
    xb = x.astype(jnp.bfloat16)
    y, (dx, dp) = _value_and_grads(module, xb, params, cotangent)
    assert dx.dtype == jnp.bfloat16
    ref_y, (_, ref_dp) = _value_and_grads(ref, xb, params, cotangent)
    assert y.dtype == ref_y.dtype == jnp.bfloat16
    assert dp["scale"].dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref_y, np.float32),
                               rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(dp["scale"], ref_dp["scale"], rtol=2e-2, atol=5e-2)


def test_same_parameters_as_flax():
    x, _, _ = _case()
    for explicit in (False, True):
        module = layer_norm(1e-6, jnp.float32, jnp.float32, "norm", explicit_grad=explicit)
        params = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
        boxed = {k: v for k, v in params.items()}
        assert sorted(boxed) == ["bias", "scale"]
        assert all(v.names == ("norm",) and v.value.shape == (16,) for v in boxed.values())
