"""Tokenizer losses: reconstruction, logistic GAN losses, R1 penalty, adversarial warm-up."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.models.discriminator import StyleGANDiscriminator
from mage_jax.tokenizer_losses import (adversarial_weight, discriminator_loss,
                                       generator_adversarial_loss, r1_penalty, reconstruction_loss)

RNG = np.random.default_rng(0)


def _softplus(v):
    return np.logaddexp(0.0, v.astype(np.float64))


def test_reconstruction_losses_against_numpy():
    x, y = RNG.normal(size=(2, 4, 4, 3)), RNG.normal(size=(2, 4, 4, 3))
    np.testing.assert_allclose(reconstruction_loss(x, y), np.mean((x - y) ** 2), rtol=1e-5)
    np.testing.assert_allclose(reconstruction_loss(x, y, "l1"), np.mean(np.abs(x - y)), rtol=1e-5)
    with pytest.raises(ValueError, match=r"kind='l3'.*'l2' or 'l1'"):
        reconstruction_loss(x, y, "l3")
    with pytest.raises(ValueError, match="equal shapes"):
        reconstruction_loss(x, y[:1])


def test_logistic_gan_losses_against_numpy():
    real, fake = RNG.normal(size=7) * 3, RNG.normal(size=7) * 3
    np.testing.assert_allclose(generator_adversarial_loss(fake), np.mean(_softplus(-fake)), rtol=1e-5)
    np.testing.assert_allclose(discriminator_loss(real, fake),
                               np.mean(_softplus(-real)) + np.mean(_softplus(fake)), rtol=1e-5)
    # Saturated logits stay finite and linear: softplus(100) = 100.
    np.testing.assert_allclose(generator_adversarial_loss(jnp.array([-100.0])), 100.0, rtol=1e-6)
    np.testing.assert_allclose(discriminator_loss(jnp.array([100.0]), jnp.array([-100.0])), 0.0, atol=1e-6)


def test_r1_of_linear_discriminator_is_squared_weight_norm():
    w = jnp.asarray(RNG.normal(size=(5, 4, 3)), jnp.float32)
    images = jnp.asarray(RNG.uniform(size=(3, 5, 4, 3)), jnp.float32)

    def linear_disc(params, x):  # D(x) = sum(w * x) + b, independently per sample
        return jnp.sum(params["w"] * x, axis=(1, 2, 3)) + params["b"]

    params = {"w": w, "b": jnp.float32(0.3)}
    penalty, logits = r1_penalty(linear_disc, params, images, return_logits=True)
    np.testing.assert_allclose(penalty, np.sum(np.square(w)), rtol=1e-5)
    np.testing.assert_allclose(logits, linear_disc(params, images), rtol=1e-6)
    # The penalty is a loss of the discriminator: d||w||^2 / dw = 2w.
    grads = jax.grad(lambda p: r1_penalty(linear_disc, p, images))(params)
    np.testing.assert_allclose(grads["w"], 2 * w, rtol=1e-5)
    np.testing.assert_allclose(grads["b"], 0.0, atol=1e-7)


def test_r1_of_quadratic_discriminator_averages_per_sample_norms():
    x = jnp.asarray(RNG.normal(size=(4, 3, 2, 1)), jnp.float32)
    penalty = r1_penalty(lambda p, im: p * jnp.sum(im ** 2, axis=(1, 2, 3)), 1.5, x)
    # grad = 2 * 1.5 * x per sample; mean over the batch of the per-sample squared norms.
    expected = np.mean(np.sum((3.0 * np.asarray(x)) ** 2, axis=(1, 2, 3)))
    np.testing.assert_allclose(penalty, expected, rtol=1e-5)


def test_r1_rejects_non_vector_logits():
    with pytest.raises(ValueError, match=r"logits of shape \(B,\)"):
        r1_penalty(lambda p, im: im.sum(axis=(2, 3)), None, jnp.ones((2, 3, 3, 1)))


def test_r1_with_the_stylegan_discriminator_matches_finite_differences():
    """The penalty of the real discriminator against a float64 numpy re-implementation of it
    (tests/models/test_discriminator.py): grad_x sum_b D(x)_b by central differences over
    every pixel, then mean_b ||.||^2. Its gradient in the weights (double backpropagation)
    against central differences of that numpy penalty along a random direction."""
    from tests.models.test_discriminator import _numpy_discriminator
    rng = np.random.default_rng(10)
    disc = StyleGANDiscriminator(ch=4, ch_mult=(1,), mbstd_group_size=2)
    images = jnp.asarray(rng.uniform(size=(2, 8, 8, 3)), jnp.float32)
    shapes = nn.unbox(jax.eval_shape(disc.init, jax.random.key(0), images))
    params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.3, s.dtype), shapes)
    penalty, grads = jax.jit(jax.value_and_grad(lambda p, x: r1_penalty(disc.apply, p, x)))(params, images)

    x = np.asarray(images, np.float64)
    basis = np.eye(x.size).reshape((x.size,) + x.shape)  # one perturbed batch per pixel

    def numpy_penalty(p, eps=1e-5):
        d = lambda im: _numpy_discriminator(p, im, num_blocks=1, mbstd_group_size=2).sum(-1)
        g = ((d(x + eps * basis) - d(x - eps * basis)) / (2 * eps)).reshape(x.shape)
        return np.mean(np.sum(np.square(g), axis=(1, 2, 3)))

    np.testing.assert_allclose(float(penalty), numpy_penalty(params), rtol=1e-5)
    # The discriminator's R1 is piecewise smooth in its weights (leaky ReLU kinks): the step
    # is small enough to stay clear of them here (1e-4 is not).
    direction = jax.tree.map(lambda a: rng.normal(size=a.shape), params)
    eps = 1e-5
    shifted = [jax.tree.map(lambda a, v: np.asarray(a, np.float64) + sign * eps * v, params,
                            direction) for sign in (1, -1)]
    numeric = (numpy_penalty(shifted[0]) - numpy_penalty(shifted[1])) / (2 * eps)
    analytic = sum(np.sum(np.asarray(g, np.float64) * v)
                   for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4)
    assert abs(numeric) > 1e-2


def test_adversarial_weight_switches_on_at_warmup():
    assert [float(adversarial_weight(s, 3)) for s in (0, 2, 3, 10)] == [0.0, 0.0, 1.0, 1.0]
    assert float(adversarial_weight(0, 0)) == 1.0
    traced = jax.jit(adversarial_weight)(jnp.arange(5), 2)  # works on traced, batched steps
    np.testing.assert_array_equal(traced, [0, 0, 1, 1, 1])
