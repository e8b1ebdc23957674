"""FID and Inception Score with torch-fidelity's protocol (what MAGE's numbers come from).

    uint8 NHWC -> TF1 bilinear resize to 299x299 -> (x - 128) / 128 -> FID InceptionV3
      -> pool3 (2048)              -> float64 mean / covariance -> Frechet distance
      -> logits_unbiased (1008)    -> softmax -> Inception Score over consecutive splits

The network runs jitted on the device in float32; everything statistical runs on the host
in float64, as torch-fidelity's numpy code does.
"""
from __future__ import annotations

import functools
from typing import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.special
from etils import epath

from mage_jax.eval.inception import INPUT_SIZE, POOL3_SIZE, FIDInceptionV3


# --------------------------------------------------------------------------- network input

def _tf1_source_grid(in_size: int, out_size: int):
    """Source index pairs and weights of TensorFlow 1's ``resize_bilinear``.

    TF1 with align_corners=False maps output pixel i to source ``i * in/out`` (the legacy
    rule: no half-pixel offset), which torch-fidelity reproduces. Computed in float32 like
    torch-fidelity, so the weights round the same way.
    """
    source = np.arange(out_size, dtype=np.float32) * np.float32(in_size / out_size)
    lo = source.astype(np.int64)  # floor: source >= 0
    hi = np.minimum(lo + 1, in_size - 1)
    return lo, hi, (source - lo.astype(np.float32))


def resize_bilinear_tf1(images: jax.Array, height: int, width: int) -> jax.Array:
    """(N, H, W, C) float -> (N, height, width, C); no antialiasing, unlike jax.image.resize."""
    y_lo, y_hi, dy = _tf1_source_grid(images.shape[1], height)
    x_lo, x_hi, dx = _tf1_source_grid(images.shape[2], width)
    dx, dy = jnp.asarray(dx)[:, None], jnp.asarray(dy)[:, None, None]
    # Along width first, then height: torch-fidelity's order, for identical rounding.
    left, right = jnp.take(images, x_lo, axis=2), jnp.take(images, x_hi, axis=2)
    rows = left + (right - left) * dx
    top, bottom = jnp.take(rows, y_lo, axis=1), jnp.take(rows, y_hi, axis=1)
    return top + (bottom - top) * dy


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 (N, H, W, 3) -> float32 (N, 299, 299, 3) in [-1, 1)."""
    x = resize_bilinear_tf1(images.astype(jnp.float32), INPUT_SIZE, INPUT_SIZE)
    return (x - 128.0) / 128.0


@functools.partial(jax.jit, static_argnums=0)
def _features(model: FIDInceptionV3, variables, images):
    return model.apply(variables, preprocess(images))


def extract_features(variables, batches: Iterable[np.ndarray], batch_size: int
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (pool3, logits_unbiased) as float32 numpy for ``batches`` of uint8 NHWC images.

    Batches are cut or zero-padded to ``batch_size`` so the network compiles once; padded
    rows are dropped before anything leaves this function.
    """
    model = FIDInceptionV3()
    variables = jax.device_put(variables)  # once, not with every batch
    for batch in batches:
        batch = np.asarray(batch)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[-1] != 3:
            raise ValueError(f"images must be uint8 (N, H, W, 3); got {batch.dtype} {batch.shape}.")
        for start in range(0, len(batch), batch_size):
            chunk = batch[start:start + batch_size]
            padded = np.zeros((batch_size,) + chunk.shape[1:], np.uint8)
            padded[:len(chunk)] = chunk
            pool3, logits = jax.device_get(_features(model, variables, padded))
            yield pool3[:len(chunk)], logits[:len(chunk)]


# --------------------------------------------------------------------------- FID

class RunningStatistics:
    """Mean and covariance of feature rows, merged batch by batch in float64.

    Chan et al.'s pairwise update of (count, mean, centred sum of squares): as exact as
    np.cov on all rows at once, without keeping 50k x 2048 features or subtracting two
    large sums of outer products.
    """

    def __init__(self, feature_size: int = POOL3_SIZE):
        self.num_images = 0
        self.mean = np.zeros(feature_size, np.float64)
        self._m2 = np.zeros((feature_size, feature_size), np.float64)

    def update(self, features: np.ndarray) -> None:
        x = np.asarray(features, np.float64)
        if x.ndim != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"features must be (N, {self.mean.shape[0]}); got {x.shape}.")
        if len(x) == 0:
            return
        centred = x - x.mean(axis=0)
        self._merge(len(x), x.mean(axis=0), centred.T @ centred)

    def _merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        delta = mean - self.mean
        total = self.num_images + n
        self._m2 += m2 + np.outer(delta, delta) * (self.num_images * n / total)
        self.mean = self.mean + delta * (n / total)
        self.num_images = total

    def state(self) -> dict[str, np.ndarray]:
        return {"num_images": np.float64(self.num_images), "mean": self.mean, "m2": self._m2}

    @classmethod
    def merged(cls, states: dict[str, np.ndarray]) -> "RunningStatistics":
        """The statistics of all rows from stacked :meth:`state` s (e.g. one per host),
        folded in order with the same pairwise update."""
        stats = cls(states["mean"].shape[-1])
        for n, mean, m2 in zip(states["num_images"], states["mean"], states["m2"]):
            if n > 0:
                stats._merge(int(n), mean, m2)
        return stats

    def covariance(self) -> np.ndarray:
        """np.cov(features, rowvar=False): normalised by N - 1."""
        if self.num_images < 2:
            raise ValueError(f"a covariance needs at least 2 images; got {self.num_images}.")
        return self._m2 / (self.num_images - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)), in float64.

    tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues of
    sigma1 sigma2 (they are real and >= 0 in exact arithmetic; rounding may leave tiny
    negative or complex ones, whose square roots contribute their real part). This is how
    torch-fidelity 0.4 computes it; it needs no matrix square root, and a 2048 x 2048
    ``scipy.linalg.sqrtm`` is several times slower for the same value.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}.")
    eigenvalues = scipy.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128)
    trace_sqrt = float(np.sum(np.sqrt(eigenvalues).real))
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


# --------------------------------------------------------------------------- IS

def inception_score(logits_unbiased: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Mean and std over ``splits`` consecutive chunks of exp(E_x KL(p(y|x) || p(y))).

    torch-fidelity's definition: chunk i is rows [i N // splits, (i + 1) N // splits), in
    the given order (the caller turns shuffling off), computed in float64.
    """
    logits = np.asarray(logits_unbiased, np.float64)
    n = len(logits)
    if not 1 <= splits <= n:
        raise ValueError(f"splits={splits} must be between 1 and the number of images ({n}).")
    log_p = scipy.special.log_softmax(logits, axis=1)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        chunk, log_chunk = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        log_marginal = np.log(chunk.mean(axis=0, keepdims=True))
        kl = np.sum(chunk * (log_chunk - log_marginal), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


class InceptionScoreSums:
    """The Inception Score of ``total`` images from sums that hosts can add up.

    For split i (rows [i N // splits, (i + 1) N // splits) of the global order, as
    :func:`inception_score`), E_x KL(p(y|x) || p(y)) = E_x sum_y p log p - sum_y pbar log pbar
    with pbar the split's mean of p(y|x): so each split needs only its row count, the sum of
    p(y|x) and the sum of sum_y p log p. A host adds the rows it holds (by global index)
    wherever they fall; the sums of all hosts give the score of all images.
    """

    def __init__(self, total: int, splits: int, num_classes: int):
        if not 1 <= splits <= total:
            raise ValueError(f"splits={splits} must be between 1 and the number of images ({total}).")
        self.bounds = np.asarray([i * total // splits for i in range(splits + 1)])
        self.count = np.zeros(splits, np.float64)
        self.p_sum = np.zeros((splits, num_classes), np.float64)
        self.p_log_p_sum = np.zeros(splits, np.float64)

    def update(self, logits_unbiased: np.ndarray, index: np.ndarray) -> None:
        """Adds rows whose global indices (in [0, total)) are ``index``."""
        index = np.asarray(index)
        if index.min(initial=0) < 0 or index.max(initial=0) >= self.bounds[-1]:
            raise ValueError(f"indices must lie in [0, {self.bounds[-1]}); got "
                             f"{index.min()}..{index.max()}.")
        split = np.searchsorted(self.bounds, index, side="right") - 1
        log_p = scipy.special.log_softmax(np.asarray(logits_unbiased, np.float64), axis=1)
        p = np.exp(log_p)
        np.add.at(self.count, split, 1.0)
        np.add.at(self.p_sum, split, p)
        np.add.at(self.p_log_p_sum, split, np.sum(p * log_p, axis=1))

    def state(self) -> dict[str, np.ndarray]:
        return {"count": self.count, "p_sum": self.p_sum, "p_log_p_sum": self.p_log_p_sum}

    @classmethod
    def summed(cls, states: dict[str, np.ndarray], total: int, splits: int) -> "InceptionScoreSums":
        """The sums of stacked :meth:`state` s (e.g. one per host)."""
        sums = cls(total, splits, states["p_sum"].shape[-1])
        sums.count = np.sum(states["count"], axis=0)
        sums.p_sum = np.sum(states["p_sum"], axis=0)
        sums.p_log_p_sum = np.sum(states["p_log_p_sum"], axis=0)
        return sums

    def score(self) -> tuple[float, float]:
        expected = np.diff(self.bounds)
        if not np.array_equal(self.count, expected):
            raise ValueError(f"images per split {self.count.astype(int).tolist()} differ from "
                             f"the expected {expected.tolist()}: an image is missing or counted twice.")
        marginal = self.p_sum / self.count[:, None]
        kl = self.p_log_p_sum / self.count - np.sum(scipy.special.xlogy(marginal, marginal), axis=1)
        scores = np.exp(kl)
        return float(np.mean(scores)), float(np.std(scores))


# --------------------------------------------------------------------------- files

def save_statistics(path, mu: np.ndarray, sigma: np.ndarray, num_images: int) -> None:
    path = epath.Path(path)  # a local file or an object (gs://...)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
                 num_images=np.int64(num_images), feature_size=np.int64(len(mu)))


def load_statistics(path, feature_size: int = POOL3_SIZE) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, num_images) from :func:`save_statistics`'s file, checked for size."""
    if not epath.Path(path).is_file():
        raise FileNotFoundError(f"statistics file {path} does not exist; write it with "
                                f"`python -m mage_jax.eval.score --images=REAL_IMAGES --save_stats={path}`.")
    with epath.Path(path).open("rb") as f, np.load(f) as data:
        missing = [k for k in ("mu", "sigma") if k not in data.files]
        if missing:
            raise ValueError(f"{path} lacks {missing} (has {data.files}); write reference "
                             f"statistics with `python -m mage_jax.eval.score --save_stats`.")
        mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        num_images = int(data["num_images"]) if "num_images" in data.files else -1
    if mu.shape != (feature_size,) or sigma.shape != (feature_size, feature_size):
        raise ValueError(f"{path} holds statistics of {mu.shape[-1] if mu.ndim else '?'}-d "
                         f"features (mu {mu.shape}, sigma {sigma.shape}); FID here uses the "
                         f"{feature_size}-d pool3 features. Recompute the reference statistics "
                         f"with `python -m mage_jax.eval.score --save_stats`.")
    return mu, sigma, num_images


# --------------------------------------------------------------------------- all together

def evaluate(variables, batches: Iterable[np.ndarray], batch_size: int = 50, splits: int = 10,
             reference: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[dict, RunningStatistics]:
    """Metrics of uint8 image ``batches`` (torch-fidelity's key names) and their statistics.

    ``reference`` is (mu, sigma) of the real images; without it there is no FID. The IS
    logits are kept on the host (4 KB per image) because the splits need the total count.
    """
    stats, logits = RunningStatistics(), []
    for pool3, chunk_logits in extract_features(variables, batches, batch_size):
        stats.update(pool3)
        logits.append(chunk_logits)
    if stats.num_images == 0:
        raise ValueError("no images to evaluate.")
    is_mean, is_std = inception_score(np.concatenate(logits), splits)
    metrics = {"num_images": stats.num_images,
               "inception_score_mean": is_mean, "inception_score_std": is_std}
    if reference is not None:
        metrics["frechet_inception_distance"] = frechet_distance(
            stats.mean, stats.covariance(), *reference)
    return metrics, stats
