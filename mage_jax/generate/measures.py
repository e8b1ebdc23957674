"""Offline measures of samples: Frechet distances in a small classifier's feature space.

For the embedded dataset, where no Inception weights can be had (mage_jax/eval/classifier.py):

* ``fd_samples``: the samples against N real test images (the reference);
* ``fd_real``: the next N real test images against the same reference: the floor, what a
  perfect generator would score with this many images;
* ``fd_random_tokens``: N images decoded from uniformly random tokens: the ceiling, what a
  MAGE that learnt nothing would score through the same tokenizer;
* ``cond_accuracy``: for class-conditional samples, how often the classifier recognises
  the class each was sampled for.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mage_jax import pretrained
from mage_jax.data import pipeline
from mage_jax.eval import classifier, fid
from mage_jax.generate import sampler


def _real_images(data_cfg, count: int) -> np.ndarray:
    """The first ``count`` evaluation images as uint8 (written as samples are)."""
    split = data_cfg.get("eval_split", "test")
    chunks, total = [], 0
    for batch in pipeline.eval_dataset(data_cfg, batch_size=250, process_index=0,
                                       process_count=1, split=split):
        images = batch["image"][batch["mask"]]
        chunks.append(np.asarray(sampler.to_uint8(jnp.asarray(images))))
        total += len(images)
        if total >= count:
            break
    if total < count:
        raise ValueError(f"the offline measure needs {count} real images (twice the samples) "
                         f"but data.{split} has {total}; sample fewer images.")
    return np.concatenate(chunks)[:count]


def _random_token_images(pre: pretrained.Pretrained, count: int, seed: int) -> np.ndarray:
    ids = jax.random.randint(jax.random.key(seed), (count, pre.model.num_tokens), 0,
                             pre.model.codebook_size)
    decode = jax.jit(lambda p, i: sampler.to_uint8(pretrained.decode_tokens(pre, p, i)))
    return np.concatenate([np.asarray(decode(pre.tokenizer_params, ids[i:i + 250]))
                           for i in range(0, count, 250)])


def _statistics(features: np.ndarray):
    return features.mean(axis=0), np.cov(np.asarray(features, np.float64), rowvar=False)


def classifier_measures(pre: pretrained.Pretrained, samples: np.ndarray, labels: np.ndarray,
                        data_cfg, *, num_classes: int, train_steps: int,
                        seed: int = 0, cache_root: str | None = None) -> dict:
    """The measures above for uint8 ``samples (N, H, W, 3)`` sampled for ``labels`` (-1:
    unconditional)."""
    data_cfg = ml_collections.ConfigDict(dict(data_cfg))
    params = classifier.load_or_train(data_cfg, num_classes, train_steps, cache_root)
    features = classifier.make_features_fn(params, num_classes)
    count = len(samples)
    real = features(_real_images(data_cfg, 2 * count))[0]
    reference = _statistics(real[:count])
    sample_features, sample_logits = features(samples)
    scores = {
        "fd_samples": fid.frechet_distance(*_statistics(sample_features), *reference),
        "fd_real": fid.frechet_distance(*_statistics(real[count:]), *reference),
        "fd_random_tokens": fid.frechet_distance(
            *_statistics(features(_random_token_images(pre, count, seed))[0]), *reference),
    }
    conditioned = labels >= 0
    if conditioned.any():
        predicted = np.argmax(sample_logits[conditioned], axis=-1)
        scores["cond_accuracy"] = float(np.mean(predicted == labels[conditioned]))
    return scores
