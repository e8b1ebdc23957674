"""Stage `generate`: sample images from a trained MAGE, write them, and measure them.

    python -m mage_jax.main --config=configs/generate.py:demo --workdir=DIR \
        --config.pretrain_workdir=workdirs/demo

Reads the run in ``config.pretrain_workdir`` (mage_jax/pretrained.py), samples
``config.num_samples`` images in global batches of ``config.batch_size`` sharded over the
mesh, and writes, in ``--workdir``:

* ``samples/000000.png ...``: one PNG per sample, numbered by its global index (as the
  official ``gen_img_uncond.py``). On a pod every host writes only the samples its devices
  computed: no image is gathered onto another host.
* ``samples.npz``: ``images`` (uint8, N x H x W x 3) and ``index``; with several hosts,
  one ``samples.<host>-of-<hosts>.npz`` per host.
* ``samples_grid.png`` and the same grid in TensorBoard; ``metrics.jsonl`` with the run's
  measures at the MAGE checkpoint's step.

Sample ``i`` of a seed is the same image whatever the batch size, mesh or host count.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from mage_jax import metrics as metrics_lib
from mage_jax import paths, pretrained, sharding, validation
from mage_jax.generate import sampler as sampler_lib

SAMPLES_DIR = "samples"
GRID_PNG = "samples_grid.png"


def check_config(config: ml_collections.ConfigDict) -> None:
    """Everything checkable before a checkpoint is read or anything compiled."""
    s = config.sampling
    problems = []
    if int(config.num_samples) < 1:
        problems.append(f"config.num_samples={config.num_samples} must be at least 1")
    if int(config.batch_size) < 1:
        problems.append(f"config.batch_size={config.batch_size} must be at least 1")
    if int(s.num_steps) < 1:
        problems.append(f"config.sampling.num_steps={s.num_steps} must be at least 1 "
                        f"(the official script uses 12, its README 20)")
    if float(s.choice_temperature) < 0:
        problems.append(f"config.sampling.choice_temperature={s.choice_temperature} must be "
                        f">= 0 (official: 4.5 or 6.0)")
    if float(s.guidance_scale) < 0:
        problems.append(f"config.sampling.guidance_scale={s.guidance_scale} must be >= 0 "
                        f"(0: no classifier-free guidance)")
    if problems:
        raise validation.ConfigError("; ".join(problems) + ".")


def class_labels(config, indices: np.ndarray) -> np.ndarray:
    """The label of each sample: -1 (unconditional), one class, or classes in turn."""
    label = int(config.sampling.class_label)
    if label == -2:  # every class in turn: sample i gets class i % num_classes
        return (indices % int(config.sampling.num_classes)).astype(np.int32)
    return np.full(indices.shape, label, np.int32)


def check_labels(config, model) -> None:
    label, count = int(config.sampling.class_label), int(config.sampling.num_classes)
    limit = model.num_class_ids
    if label < -2 or label >= limit or (label == -2 and not 1 <= count <= limit):
        raise validation.ConfigError(
            f"config.sampling.class_label={label} (num_classes={count}) is outside the "
            f"vocabulary's class ids: use -1 (unconditional), a label in [0, {limit}), or -2 "
            f"with 1 <= num_classes <= {limit} (every class in turn).")


def _inception_measures(config, images: np.ndarray, index: np.ndarray) -> dict:
    """FID and IS of all hosts' samples: each host runs the Inception network on the
    samples it holds; the running statistics and the per-split IS sums of every host are
    merged (exactly: float64 throughout), so the result is that of one host holding them
    all, and no image leaves its host."""
    from mage_jax.eval import fid, hosts, inception
    weights = inception.inception_weights_path(
        config.fid.inception_weights or None, bool(config.fid.download),
        setting="config.fid.inception_weights", download_setting="config.fid.download")
    reference = fid.load_statistics(config.fid.reference_stats)[:2]
    total, splits = int(config.num_samples), int(config.fid.splits)
    stats, is_sums = fid.RunningStatistics(), fid.InceptionScoreSums(total, splits, inception.NUM_CLASSES)
    done = 0
    with jax.set_mesh(None):  # a plain jit on this host's device, not over the pod's mesh
        for pool3, logits in fid.extract_features(inception.load_inception(weights), [images],
                                                  int(config.fid.batch_size)):
            stats.update(pool3)
            is_sums.update(logits, index[done:done + len(logits)])
            done += len(logits)
    stats = fid.RunningStatistics.merged(hosts.gather(stats.state()))
    is_mean, is_std = fid.InceptionScoreSums.summed(hosts.gather(is_sums.state()), total,
                                                    splits).score()
    return {"fid": fid.frechet_distance(stats.mean, stats.covariance(), *reference),
            "inception_score": is_mean, "inception_score_std": is_std}


def _measures(config, pre, images: np.ndarray, labels: np.ndarray, index: np.ndarray) -> dict:
    """FID/IS against saved reference statistics, and the offline classifier measures."""
    scores = {}
    if config.fid.reference_stats:
        scores.update(_inception_measures(config, images, index))
    if config.classifier_measures.enabled:
        from mage_jax.generate import measures
        scores.update(measures.classifier_measures(
            pre, images, labels, pre.run_config["data"],
            num_classes=int(config.classifier_measures.num_classes),
            train_steps=int(config.classifier_measures.train_steps), seed=int(config.seed),
            cache_root=config.classifier_measures.cache_dir or None))
    return scores


def _check_measures(config, pre) -> None:
    if config.classifier_measures.enabled and jax.process_count() > 1:
        raise validation.ConfigError(
            "the classifier measures (for the embedded dataset's demo) run on one host; on "
            "several, turn them off with --config.classifier_measures.enabled=False (FID/IS "
            "with config.fid.reference_stats work on any number of hosts).")
    if config.fid.reference_stats:
        from mage_jax.eval import fid, inception
        fid.load_statistics(config.fid.reference_stats)  # exists, right feature size
        inception.inception_weights_path(
            config.fid.inception_weights or None, bool(config.fid.download),
            setting="config.fid.inception_weights", download_setting="config.fid.download")
        if int(config.num_samples) < int(config.fid.splits):
            raise validation.ConfigError(
                f"config.num_samples={config.num_samples} is fewer than the Inception Score's "
                f"config.fid.splits={config.fid.splits}.")
    if config.classifier_measures.enabled and "data" not in pre.run_config:
        raise validation.ConfigError(
            f"config.classifier_measures needs the dataset the model was trained on, but "
            f"{pre.workdir}/config.json names none (converted weights?); turn it off with "
            f"--config.classifier_measures.enabled=False.")


def _global(values: np.ndarray, mesh) -> jax.Array:
    """A global batch array from the full host-side array (each host reads its slices)."""
    spec = sharding.batch_sharding(mesh, values.ndim)
    return jax.make_array_from_callback(values.shape, spec, lambda index: values[index])


def _local_rows(array: jax.Array):
    """(first global row, rows) of each distinct shard this host holds."""
    seen = {}
    for shard in array.addressable_shards:
        start = shard.index[0].start or 0
        if start not in seen:
            seen[start] = np.asarray(shard.data)
    return sorted(seen.items())


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict:
    """Samples, writes and measures on ``devices`` (default: all); returns the measures."""
    check_config(config)
    validation.validate_workdir(workdir)
    step = None if int(config.checkpoint_step) < 0 else int(config.checkpoint_step)
    pre = pretrained.load(config.pretrain_workdir, step, dtype=config.dtype)
    check_labels(config, pre.model)
    _check_measures(config, pre)
    mesh = sharding.make_mesh(config.mesh, devices)
    validation.validate_batch(config, mesh)
    jax.set_mesh(mesh)
    if jax.process_index() == 0:
        paths.write_text(os.path.join(workdir, "config.json"),
                         config.to_json_best_effort(indent=2, sort_keys=True))

    s = config.sampling
    # MAGE's parameters split as in pretraining (over config.mesh.fsdp / tensor), so a model
    # that needs FSDP to train samples on the same chips; the tokenizer is small: replicated.
    mage_shardings = sampler_lib.mage_shardings(pre.model, mesh)
    sample = sampler_lib.make_sampler(
        pre.model, lambda tp, ids: pretrained.decode_tokens(pre, tp, ids), mesh,
        num_steps=int(s.num_steps), choice_temperature=float(s.choice_temperature),
        guidance_scale=float(s.guidance_scale), mage_shardings=mage_shardings)
    mage_params = jax.device_put(pre.params, mage_shardings)
    tok_params = jax.device_put(pre.tokenizer_params, sharding.replicated(mesh))
    key = jax.random.key(int(config.seed))

    total, batch = int(config.num_samples), int(config.batch_size)
    samples_dir = os.path.join(workdir, SAMPLES_DIR)
    epath.Path(samples_dir).mkdir(parents=True, exist_ok=True)
    kept_index, kept_images = [], []
    started = time.perf_counter()
    for b in range(math.ceil(total / batch)):
        index = np.arange(b * batch, (b + 1) * batch)  # past `total`: computed, not kept
        ids = np.full((batch, pre.model.num_tokens), pre.model.mask_token_id, np.int32)
        _, images = sample(mage_params, tok_params, _global(ids, mesh),
                           _global(index.astype(np.int32), mesh),
                           _global(class_labels(config, index), mesh), key)
        for start, rows in _local_rows(images):
            for offset, image in enumerate(rows):
                i = int(index[0]) + start + offset
                if i >= total:
                    break
                kept_index.append(i)
                kept_images.append(image)
                if config.save_png:
                    # Each host writes the samples it holds (distinct files).
                    paths.save_image(Image.fromarray(image),
                                     os.path.join(samples_dir, f"{i:06d}.png"))
        logging.info("generate: %d / %d samples", min((b + 1) * batch, total), total)
    seconds = time.perf_counter() - started

    order = np.argsort(kept_index)
    local_images = np.stack([kept_images[i] for i in order])
    local_index = np.asarray(kept_index, np.int64)[order]
    name = ("samples.npz" if jax.process_count() == 1 else
            f"samples.{jax.process_index()}-of-{jax.process_count()}.npz")
    with epath.Path(workdir, name).open("wb") as f:
        np.savez(f, images=local_images, index=local_index)

    grid = local_images[: int(config.num_grid)]
    columns = max(1, int(math.sqrt(len(grid))))
    rows = [grid[i:i + columns] for i in range(0, len(grid) - len(grid) % columns, columns)]
    picture = np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)
    writer = metrics_lib.create_writer(workdir)
    scores = {"num_samples": float(total), "sampling_seconds": seconds,
              "images_per_sec": total / seconds}
    local_labels = class_labels(config, local_index)
    scores.update(_measures(config, pre, local_images, local_labels, local_index))
    if jax.process_index() == 0:
        paths.save_image(Image.fromarray(picture), os.path.join(workdir, GRID_PNG))
    writer.write_images(pre.step, {"samples": picture[None].astype(np.float32) / 255.0})
    writer.write_scalars(pre.step, scores)
    writer.flush()
    logging.info("generate: %s in %s (%s)", total, workdir, json.dumps(scores))
    return scores
