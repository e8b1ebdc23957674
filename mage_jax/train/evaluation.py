"""End-of-run evaluation on held-out images: the batches and the PNG grids.

A stage's ``evaluate`` (loop.Stage) runs once the last step is reached: it reads the first
``config.eval.num_examples`` images of the evaluation split (a fixed subset, so two runs
are scored on the same images), logs its scores as ``test_*`` at the final step in
metrics.jsonl and TensorBoard, and saves the pictures a user looks at into the workdir.
"""
from __future__ import annotations

import math
from typing import Iterator, Sequence

import jax
import numpy as np
from PIL import Image

from mage_jax import paths, sharding
from mage_jax.data import datasets, pipeline


def num_examples(config, split_size: int) -> int:
    """How many evaluation images: ``config.eval.num_examples`` (-1: the whole split)."""
    wanted = int(config.eval.num_examples)
    return split_size if wanted < 0 else min(wanted, split_size)


def test_batches(config, mesh) -> Iterator[dict]:
    """Global batches of the first ``config.eval.num_examples`` evaluation images.

    Each batch is sharded over the mesh's data axes and holds ``image``, ``label`` and
    ``mask`` (False on padding past the subset or the split), ``config.batch_size`` images.
    """
    source = datasets.open_source(config.data, config.data.eval_split)
    dataset = pipeline.eval_dataset_from_source(source, config.data,
                                                batch_size=config.batch_size,
                                                process_index=jax.process_index(),
                                                process_count=jax.process_count())
    count = num_examples(config, len(source))
    host_batch = pipeline.host_batch_size(config.batch_size, jax.process_count())
    for i, batch in enumerate(dataset):
        if i >= math.ceil(count / config.batch_size):
            break
        # Global index of each local example: batches are process-major (eval_dataset).
        start = i * config.batch_size + jax.process_index() * host_batch
        index = start + np.arange(host_batch)
        batch = dict(batch, mask=np.logical_and(batch["mask"], index < count))
        yield sharding.host_batch_to_global(batch, mesh)


def save_image_grid(path: str, columns: Sequence[np.ndarray], upscale: int = 4) -> str:
    """Writes images side by side: ``columns[j][i]`` is row i, column j (NHWC in [0, 1]).

    Small images are enlarged (nearest neighbour) by ``upscale`` so that a 32 px demo is
    readable in an image viewer. Only process 0 writes; returns ``path``.
    """
    rows = np.concatenate([np.asarray(c, np.float32) for c in columns], axis=2)
    grid = np.concatenate(list(rows), axis=0)  # (rows * H, columns * W, 3)
    pixels = np.round(np.clip(grid, 0.0, 1.0) * 255.0).astype(np.uint8)
    image = Image.fromarray(pixels)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    if jax.process_index() == 0:
        paths.save_image(image, path)  # a gs:// workdir too
    return path
