"""mage_jax.models.arg_extremes: the same index as numpy, ties and NaNs included."""
import jax
import jax.numpy as jnp
import numpy as np

from mage_jax.models import arg_extremes


def test_same_index_as_numpy_with_ties_and_nans():
    rng = np.random.default_rng(0)
    # Few distinct values, so most rows hold their extreme more than once.
    x = rng.integers(0, 4, size=(6, 7, 9)).astype(np.float32)
    x[0, 0, [2, 5]] = np.nan
    x[1, 3, 0] = np.nan
    x[2, 1] = -np.inf
    x[3, 2] = np.inf
    for fn, ref in ((arg_extremes.argmin, np.argmin), (arg_extremes.argmax, np.argmax)):
        for arr in (x, x[0, 1], rng.normal(size=(300, 256)).astype(np.float32)):
            got = jax.jit(fn)(jnp.asarray(arr))
            assert got.dtype == jnp.int32
            np.testing.assert_array_equal(got, ref(arr, axis=-1))


def test_gradients_flow_around_it():
    # Under autodiff the index is a constant: the loss of the chosen entries differentiates.
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 5)).astype(np.float32))

    def picked(v):
        return jnp.sum(jnp.take_along_axis(v, arg_extremes.argmax(v)[:, None], axis=1))
    grad = jax.jit(jax.grad(picked))(x)
    expected = np.zeros((4, 5), np.float32)
    expected[np.arange(4), np.argmax(np.asarray(x), axis=1)] = 1.0
    np.testing.assert_array_equal(grad, expected)
