"""mage_jax.models.dense_grad: the same function and gradients as autodiff of x @ W + b."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.models import dense_grad


@pytest.mark.parametrize("x_shape,kernel_shape,num_in", [
    ((2, 5, 6), (6, 3, 2, 4), 1),   # qkv: one input axis, three output axes
    ((2, 5, 3, 4), (3, 4, 7), 2),   # attention output: two input axes (heads, head_dim)
    ((4, 6), (6, 5), 1),            # a plain matrix
])
def test_gradients_match_autodiff(x_shape, kernel_shape, num_in):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
    bias = jnp.asarray(rng.normal(size=kernel_shape[num_in:]), jnp.float32)
    weights = jnp.asarray(rng.normal(size=x_shape[:len(x_shape) - num_in]
                                     + kernel_shape[num_in:]), jnp.float32)

    def plain(x, k, b):
        contract = (tuple(range(x.ndim - num_in, x.ndim)), tuple(range(num_in)))
        return jax.lax.dot_general(x, k, (contract, ((), ()))) + b

    def objective(fn):
        return lambda x, k, b: jnp.sum(jnp.sin(fn(x, k, b)) * weights)

    ours = jax.jit(lambda x, k, b: dense_grad.dense(x, k, b, num_in))
    np.testing.assert_allclose(ours(x, kernel, bias), plain(x, kernel, bias), rtol=1e-6,
                               atol=1e-6)
    got = jax.jit(jax.grad(objective(lambda x, k, b: dense_grad.dense(x, k, b, num_in)),
                           (0, 1, 2)))(x, kernel, bias)
    want = jax.grad(objective(plain), (0, 1, 2))(x, kernel, bias)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # The bias gradient is the column sum of the output gradient, not zero or a row sum.
    assert np.abs(np.asarray(got[2])).min() > 0


def test_bfloat16_cotangents_keep_their_dtypes():
    x = jnp.ones((3, 4, 8), jnp.bfloat16)
    kernel = jnp.full((8, 5), 0.5, jnp.bfloat16)
    bias = jnp.zeros((5,), jnp.bfloat16)
    grads = jax.jit(jax.grad(lambda x, k, b: jnp.sum(
        dense_grad.dense(x, k, b, 1).astype(jnp.float32)), (0, 1, 2)))(x, kernel, bias)
    assert [g.dtype for g in grads] == [jnp.bfloat16] * 3
    np.testing.assert_array_equal(np.asarray(grads[2], np.float32), np.full(5, 12.0))
    np.testing.assert_array_equal(np.asarray(grads[1], np.float32), np.full((8, 5), 12.0))
