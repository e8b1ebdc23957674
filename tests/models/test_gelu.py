"""The exact GELU in torch's erf form: torch's values and gradients, flax's function."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch

from mage_jax.models.gelu import gelu


def test_matches_torch_gelu_values_and_gradients():
    x = np.linspace(-8.0, 8.0, 40001, dtype=np.float32)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.nn.functional.gelu(xt)  # approximate='none': the official code's nn.GELU
    yt.sum().backward()
    y, grad = jax.value_and_grad(lambda v: gelu(v).sum())(jnp.asarray(x))
    # Where erf(x / sqrt 2) nears -1 (x below about -3), 1 + erf loses digits in float32:
    # absolute errors up to about 1e-6 on values that small (tanh's GELU is 5e-4 away).
    np.testing.assert_allclose(np.asarray(gelu(jnp.asarray(x))), yt.detach().numpy(),
                               rtol=2e-6, atol=1.5e-6)
    np.testing.assert_allclose(np.asarray(grad), xt.grad.numpy(), rtol=2e-6, atol=1.5e-6)


def test_is_flax_exact_gelu_not_the_tanh_one():
    x = jax.random.normal(jax.random.key(0), (4096,)) * 3
    exact, tanh = nn.gelu(x, approximate=False), nn.gelu(x, approximate=True)
    np.testing.assert_allclose(gelu(x), exact, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(gelu(x) - tanh))) > 1e-4  # the approximation is not it


def test_keeps_the_input_dtype():
    x = jnp.linspace(-3, 3, 64, dtype=jnp.bfloat16)
    assert gelu(x).dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(gelu(x), np.float32),
                               np.asarray(gelu(x.astype(jnp.float32))), atol=2e-2)
