"""Few-shot least squares (big_vision's fewshot_lsr protocol)."""
import numpy as np
import pytest

from mage_jax.eval import fewshot


def _design(train_x, x):
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    return np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=100.0)


@pytest.mark.parametrize("n,d", [(40, 6), (8, 30)])  # both branches: n >= d and n < d
def test_lsr_equals_the_ridge_solution(n, d):
    rng = np.random.default_rng(n)
    train_x, test_x = rng.normal(size=(n, d)), rng.normal(size=(200, d))
    train_y, num_classes, l2 = rng.integers(0, 4, n), 4, 3.0
    x = _design(train_x, train_x)
    w = np.linalg.lstsq(np.vstack([x, np.sqrt(l2) * np.eye(d + 1)]),
                        np.vstack([2 * np.eye(4)[train_y] - 1, np.zeros((d + 1, 4))]),
                        rcond=None)[0]  # ridge as an augmented least-squares problem
    test_y = np.argmax(_design(train_x, test_x) @ w, axis=1)
    test_y[::3] = (test_y[::3] + 1) % 4  # a third wrong: the accuracy is not trivially 1
    expected = np.mean(np.argmax(_design(train_x, test_x) @ w, axis=1) == test_y)
    assert fewshot.lsr_accuracy(train_x, train_y, test_x, test_y, num_classes, l2) == \
        pytest.approx(expected)


def test_separable_clusters_and_random_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(5, 16)) * 4.0
    y = rng.integers(0, 5, 2000)
    x = centres[y] + rng.normal(size=(2000, 16))
    scores = fewshot.fewshot_results(x[:1000], y[:1000], x[1000:], y[1000:], num_classes=5)
    assert scores["25shot"] > 0.97 and scores["1shot"] > 0.6
    assert scores["25shot"] >= scores["1shot"]
    noise = fewshot.fewshot_results(x[:1000], rng.integers(0, 5, 1000), x[1000:], y[1000:],
                                    num_classes=5, shots=(25,))
    assert abs(noise["25shot"] - 0.2) < 0.06


def test_sample_shots():
    labels = np.repeat(np.arange(3), 10)
    a = fewshot.sample_shots(labels, 4, 3, seed=0)
    assert len(a) == 12 and len(set(a.tolist())) == 12
    assert np.all(np.bincount(labels[a], minlength=3) == 4)
    np.testing.assert_array_equal(a, fewshot.sample_shots(labels, 4, 3, seed=0))
    assert not np.array_equal(a, fewshot.sample_shots(labels, 4, 3, seed=1))


def test_too_few_examples_names_the_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    with pytest.raises(ValueError, match="class 1 has 3 examples.*fewer than 5 shots"):
        fewshot.sample_shots(labels, 5, 3, seed=0)


def test_bad_labels():
    with pytest.raises(ValueError, match=r"labels span \[0, 7\] but num_classes=5"):
        fewshot.lsr_accuracy(np.zeros((3, 2)), np.array([0, 7, 1]), np.zeros((1, 2)),
                             np.array([0]), 5)
