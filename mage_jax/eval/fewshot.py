"""Few-shot linear classification by closed-form regularised least squares (big_vision).

The protocol of big_vision's ``fewshot_lsr`` evaluator, written here in numpy (float64:
the systems are at most a few thousand wide and solved on the host):

1. draw ``k`` training examples per class (a fixed draw per seed);
2. standardise the features by the mean and standard deviation of those examples and add
   a constant feature of 100 (a bias that the regulariser barely touches);
3. regress targets in {-1, +1} (2 * one-hot - 1) with an L2 penalty ``l2_reg`` (big_vision's
   default 2**10, fixed, not tuned on the test set), solving through the smaller of
   ``X^T X`` and ``X X^T``;
4. accuracy of the arg-max on the test features; the mean over seeds is reported.
"""
from __future__ import annotations

import numpy as np

BIAS_FEATURE = 100.0
DEFAULT_L2_REG = 2.0 ** 10


def _check(x, y, num_classes: int, what: str) -> None:
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{what}: features {x.shape} and labels {np.shape(y)} must be (N, D) "
                         f"and (N,) with the same N.")
    if len(y) and (np.min(y) < 0 or np.max(y) >= num_classes):
        raise ValueError(f"{what}: labels span [{np.min(y)}, {np.max(y)}] but num_classes="
                         f"{num_classes}; labels must lie in [0, num_classes).")


def sample_shots(labels: np.ndarray, shots: int, num_classes: int, seed: int) -> np.ndarray:
    """Indices of ``shots`` examples of every class, drawn without replacement for ``seed``."""
    if shots < 1:
        raise ValueError(f"shots={shots} must be at least 1.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < shots:
            raise ValueError(
                f"class {c} has {len(members)} examples in the training pool, fewer than "
                f"{shots} shots; lower the shot count (config ... shots) or use a larger "
                f"training split.")
        chosen.append(rng.choice(members, shots, replace=False))
    return np.concatenate(chosen)


def lsr_accuracy(train_x, train_y, test_x, test_y, num_classes: int,
                 l2_reg: float = DEFAULT_L2_REG) -> float:
    """Test accuracy of the regularised least-squares classifier fit on (train_x, train_y)."""
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    _check(train_x, train_y, num_classes, "train")
    _check(test_x, test_y, num_classes, "test")
    mean = train_x.mean(axis=0, keepdims=True)
    std = train_x.std(axis=0, keepdims=True) + 1e-5

    def design(x):
        return np.pad((x - mean) / std, ((0, 0), (0, 1)), constant_values=BIAS_FEATURE)

    x = design(train_x)
    targets = 2.0 * np.eye(num_classes)[np.asarray(train_y)] - 1.0
    n, d = x.shape
    if n >= d:   # (X^T X + l2 I) w = X^T Y
        w = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ targets)
    else:        # the same w through the n x n system: X^T (X X^T + l2 I)^-1 Y
        w = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), targets)
    predicted = np.argmax(design(test_x) @ w, axis=1)
    return float(np.mean(predicted == np.asarray(test_y)))


def fewshot_results(train_x, train_y, test_x, test_y, *, num_classes: int,
                    shots=(1, 5, 10, 25), seeds=(0, 1, 2),
                    l2_reg: float = DEFAULT_L2_REG) -> dict:
    """``{"<k>shot": mean test accuracy over seeds}`` for each k in ``shots``."""
    if not len(shots) or not len(seeds):
        raise ValueError(f"shots={tuple(shots)} and seeds={tuple(seeds)} must be non-empty.")
    train_x, train_y = np.asarray(train_x), np.asarray(train_y)
    _check(train_x, train_y, num_classes, "train")
    results = {}
    for k in shots:
        accuracies = []
        for seed in seeds:
            index = sample_shots(train_y, int(k), num_classes, int(seed))
            accuracies.append(lsr_accuracy(train_x[index], train_y[index], test_x, test_y,
                                           num_classes, l2_reg))
        results[f"{k}shot"] = float(np.mean(accuracies))
    return results
