"""A small classifier of the demo dataset, whose features measure generated images offline.

FID needs the InceptionV3 weights, which cannot be had without a network. On a small
labelled dataset (the demo's Fashion-MNIST) a small CNN trained here on the dataset's own
labels gives a feature space in which the Frechet distance separates real images, samples
and noise just as well for comparing runs with each other (it is not comparable with FID
numbers elsewhere). It is trained once per dataset and image size and cached beside the
data (``<TFDS data_dir>/mage_jax_classifier/``); the same network scores how often a
class-conditional sample is recognised as its class.
"""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from mage_jax import checkpointing
from mage_jax.data import pipeline

FEATURE_SIZE = 64


class SmallClassifier(nn.Module):
    """Three conv stages (16, 32, 64 channels, 2x average pooling) -> 64-d features.

    Small on purpose: it trains in seconds on a CPU, and the measure needs a feature space
    that knows the dataset's classes, not a state-of-the-art classifier."""
    num_classes: int

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``images (B, H, W, 3)`` in [0, 1] -> ``(features (B, 64), logits (B, classes))``."""
        x = images * 2.0 - 1.0
        for width in (16, 32, 64):
            x = nn.relu(nn.Conv(width, (3, 3))(x))
            x = nn.avg_pool(x, (2, 2), (2, 2))
        features = nn.relu(nn.Dense(FEATURE_SIZE)(jnp.mean(x, axis=(1, 2))))
        return features, nn.Dense(self.num_classes)(features)


def cache_dir(data_cfg, root: str | None = None) -> str:
    """Where the trained classifier of ``data_cfg``'s dataset and image size is kept: under
    ``root``, by default beside the data (the TFDS data directory)."""
    root = root or data_cfg.get("data_dir") or os.path.expanduser(
        os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
    name = str(data_cfg["name"]).replace("/", "_").replace(":", "_")
    return os.path.join(root, "mage_jax_classifier", f"{name}_{int(data_cfg['image_size'])}px")


def _batches(data_cfg, split: str, batch_size: int):
    """Endless passes over ``split`` in dataset order, resized as evaluation views."""
    while True:
        for batch in pipeline.eval_dataset(data_cfg, batch_size=batch_size, process_index=0,
                                           process_count=1, split=split):
            keep = batch["mask"]
            yield batch["image"][keep], batch["label"][keep]


def train(data_cfg, num_classes: int, steps: int = 400, batch_size: int = 128,
          seed: int = 0) -> dict:
    """Adam on cross-entropy over the training split; returns the parameters."""
    model = SmallClassifier(num_classes)
    size = int(data_cfg["image_size"])
    params = model.init(jax.random.key(seed), jnp.zeros((1, size, size, 3)))["params"]
    tx = optax.adam(optax.cosine_decay_schedule(3e-3, steps))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, images, labels):
        def loss_fn(p):
            logits = model.apply({"params": p}, images)[1]
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    batches = _batches(data_cfg, data_cfg["train_split"], batch_size)
    for i in range(steps):
        images, labels = next(batches)
        if len(images) < batch_size:  # the end of a pass: take the next full batch
            images, labels = next(batches)
        params, opt_state, loss = step(params, opt_state, images, labels)
        if (i + 1) % 200 == 0:
            logging.info("feature classifier: step %d, loss %.3f", i + 1, float(loss))
    return jax.device_get(params)


def load_or_train(data_cfg, num_classes: int, steps: int = 400,
                  cache_root: str | None = None) -> dict:
    """The cached classifier of this dataset and size, trained first if there is none."""
    directory = cache_dir(data_cfg, cache_root)
    existing = checkpointing.Checkpointer(directory, async_save=False, read_only=True)
    found = existing.latest_step()
    existing.close()
    if found == steps:
        return checkpointing.restore_params(directory, steps)[0]
    logging.info("Training the feature classifier (%d steps) into %s.", steps, directory)
    params = train(data_cfg, num_classes, steps)
    if jax.process_index() == 0:
        writer = checkpointing.Checkpointer(directory, keep=1, async_save=False)
        writer.save(steps, {"params": params})
        writer.close()
    return params


def make_features_fn(params, num_classes: int, batch_size: int = 250):
    """``uint8 or [0, 1] images (N, H, W, 3) -> (features, logits)`` as numpy, batched."""
    model = SmallClassifier(num_classes)
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))

    def features(images: np.ndarray):
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        out = [jax.device_get(apply(params, images[i:i + batch_size]))
               for i in range(0, len(images), batch_size)]
        return (np.concatenate([f for f, _ in out]), np.concatenate([l for _, l in out]))
    return features


def accuracy_on_test(params, data_cfg, num_classes: int, limit: int = 2000) -> float:
    """Top-1 accuracy on the first ``limit`` test images (a sanity check of the cache)."""
    features = make_features_fn(params, num_classes)
    images, labels = [], []
    for batch_images, batch_labels in _batches(data_cfg, data_cfg["eval_split"], 250):
        images.append(batch_images)
        labels.append(batch_labels)
        if sum(len(x) for x in images) >= limit:
            break
    logits = features(np.concatenate(images)[:limit])[1]
    return float(np.mean(np.argmax(logits, -1) == np.concatenate(labels)[:limit]))
