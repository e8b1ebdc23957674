"""The per-host input pipeline: grain over a random-access source, deterministic and resumable.

Training stream (grain ``MapDataset``: every stage is a pure function of an index)::

    source --seed--> shuffle (a new permutation every epoch) --> repeat forever
      --> random_map(augment)     example g gets randomness from (seed, g) only
      --> batch(B_host)           host-sized blocks of consecutive examples
      --> [process_index::process_count]
      --> to_iter_dataset(ReadOptions)   threads + prefetch, order preserved

With ``G = global_batch_size`` and ``B = G // process_count``, the batch of process ``p`` at
step ``s`` holds the stream's examples ``s*G + p*B ... s*G + (p+1)*B - 1``. So:
* the batch at step ``s`` is a pure function of (seed, s, process_index, process_count);
* concatenating the hosts' batches in process order gives the same global batch whatever
  the number of processes (and the same augmentations: they depend on g, not on the host);
* resuming is O(1): the grain iterator's state is ``{'next_index': step}``, and
  ``train_iterator(start_step=s)`` simply sets it.

Checkpointing the iterator with orbax (grain 0.2.18, verified in tests/data)::

    import grain
    mngr.save(step, args=ocp.args.Composite(
        state=..., data=grain.checkpoint.CheckpointSave(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=..., data=grain.checkpoint.CheckpointRestore(it)))  # restores `it` in place

(one ``process_<i>-of-<n>.json`` per host). Because the state is just the step, restoring
it is equivalent to ``train_iterator(..., start_step=step)``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import grain
import numpy as np

from mage_jax.data import augment
from mage_jax.data import datasets
from mage_jax.data import randaugment


def host_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the "
            f"{process_count} processes; change the batch size to a multiple of {process_count}.")
    return global_batch_size // process_count


def _check_process(process_index: int, process_count: int) -> None:
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside [0, {process_count}).")


def _read_options(data_cfg) -> grain.ReadOptions:
    # The MapDataset elements are whole host batches: each thread makes one batch, and the
    # buffer holds `prefetch` batches.
    return grain.ReadOptions(num_threads=int(data_cfg.get("read_threads", 2)),
                             prefetch_buffer_size=int(data_cfg.get("prefetch", 2)))


# ----------------------------------------------------------------------------- per example

def _label(example) -> np.int32:
    return np.int32(example.get("label", -1))  # -1 for unlabelled datasets.


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """The training augmentation, read once from ``config.data`` (not per example)."""
    size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bilinear"  # MAGE pretraining: torchvision's default (bilinear).
    hflip: bool = True
    color_jitter: float = 0.4
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    # Fine-tuning (randaugment.py): timm's rand-m<magnitude>-mstd<std>-inc1 with
    # `rand_augment_ops` ops (0: off, as in pretraining), then random erasing.
    rand_augment_ops: int = 0
    rand_augment_magnitude: float = 9.0
    rand_augment_std: float = 0.5
    random_erasing: float = 0.0

    @classmethod
    def from_config(cls, data_cfg) -> "TrainAugment":
        defaults = cls(size=0)
        return cls(
            size=int(data_cfg.image_size),
            crop_scale=tuple(data_cfg.get("crop_scale", defaults.crop_scale)),
            crop_ratio=tuple(data_cfg.get("crop_ratio", defaults.crop_ratio)),
            interpolation=data_cfg.get("interpolation", defaults.interpolation),
            hflip=bool(data_cfg.get("hflip", defaults.hflip)),
            color_jitter=float(data_cfg.get("color_jitter", defaults.color_jitter)),
            color_jitter_prob=float(data_cfg.get("color_jitter_prob", defaults.color_jitter_prob)),
            grayscale_prob=float(data_cfg.get("grayscale_prob", defaults.grayscale_prob)),
            rand_augment_ops=int(data_cfg.get("rand_augment_ops", defaults.rand_augment_ops)),
            rand_augment_magnitude=float(data_cfg.get("rand_augment_magnitude",
                                                      defaults.rand_augment_magnitude)),
            rand_augment_std=float(data_cfg.get("rand_augment_std", defaults.rand_augment_std)),
            random_erasing=float(data_cfg.get("random_erasing", defaults.random_erasing)))

    def view(self, image, rng: np.random.Generator, contrastive: bool) -> np.ndarray:
        """One training view of a uint8 HWC image, or of its encoded bytes (jpeg_draft)."""
        crop = (augment.random_resized_crop_encoded if isinstance(image, bytes)
                else augment.random_resized_crop)
        view = crop(image, rng, self.size, scale=self.crop_scale, ratio=self.crop_ratio,
                    interpolation=self.interpolation)
        if self.hflip:
            view = augment.horizontal_flip(view, rng)
        if contrastive:
            view = augment.contrastive_color(view, rng, strength=self.color_jitter,
                                             jitter_prob=self.color_jitter_prob,
                                             grayscale_prob=self.grayscale_prob)
        if self.rand_augment_ops:
            view = randaugment.rand_augment(view, rng, num_ops=self.rand_augment_ops,
                                            magnitude=self.rand_augment_magnitude,
                                            magnitude_std=self.rand_augment_std)
        if self.random_erasing:
            view = randaugment.random_erasing(view, rng, probability=self.random_erasing)
        return np.ascontiguousarray(view, dtype=np.float32)


def _train_example(example, rng, *, aug: TrainAugment, two_views: bool) -> dict:
    image = example["image"]
    if two_views and isinstance(image, bytes):  # two crops of one image: decode it once
        image = augment.decode(image)
    out = {"image": aug.view(image, rng, contrastive=two_views), "label": _label(example)}
    if datasets.SKIPPED_KEY in example:  # folder datasets: unreadable files passed over
        out[datasets.SKIPPED_KEY] = np.int32(example[datasets.SKIPPED_KEY])
    if two_views:  # MAGE-C: a second, independently augmented view of the same image.
        out["image2"] = aug.view(image, rng, contrastive=True)
    return out


# ----------------------------------------------------------------------------- training

def _train_source(data_cfg):
    # jpeg_draft: the source hands over the stored bytes and each crop decodes only what it
    # needs (augment.random_resized_crop_encoded).
    return datasets.open_source(data_cfg, data_cfg.get("train_split", "train"),
                                encoded=bool(data_cfg.get("jpeg_draft", False)))


def _train_batches(source, data_cfg, *, seed: int, global_batch_size: int,
                   process_index: int, process_count: int, two_views: bool = False):
    """This host's training batches as a MapDataset: batch s at index s."""
    _check_process(process_index, process_count)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed={seed!r}: the data seed must be a non-negative integer.")
    batch = host_batch_size(global_batch_size, process_count)
    if len(source) < global_batch_size:
        raise ValueError(f"the dataset has {len(source)} examples, fewer than one global batch "
                         f"({global_batch_size}); lower the batch size.")
    ds = grain.MapDataset.source(source).seed(int(seed))
    ds = ds.shuffle().repeat()  # repeat() reseeds the shuffle each epoch: a new order.
    ds = ds.random_map(functools.partial(
        _train_example, aug=TrainAugment.from_config(data_cfg), two_views=two_views))
    return ds.batch(batch, drop_remainder=True)[process_index::process_count]


def train_dataset_from_source(source, data_cfg, *, seed: int, global_batch_size: int,
                              process_index: int, process_count: int,
                              two_views: bool = False) -> grain.IterDataset:
    """``train_dataset`` over an already opened random-access source (tests use small ones)."""
    return _train_batches(source, data_cfg, seed=seed, global_batch_size=global_batch_size,
                          process_index=process_index, process_count=process_count,
                          two_views=two_views).to_iter_dataset(_read_options(data_cfg))


def worker_processes(data_cfg) -> int:
    """``data.worker_processes``: 0 reads in threads of the training process (its iterator
    state is ``{'next_index': step}``); N > 0 decodes and augments in N grain worker
    processes, for hosts whose cores one Python process cannot keep busy (the GIL)."""
    count = int(data_cfg.get("worker_processes", 0))
    if count < 0:
        raise ValueError(f"config.data.worker_processes={count} must be >= 0 (0: threads only).")
    return count


def train_dataset(data_cfg, *, seed: int, global_batch_size: int, process_index: int,
                  process_count: int, two_views: bool = False) -> grain.IterDataset:
    """This process's endless stream of training batches.

    Yields ``{'image': float32 (B, H, W, 3) in [0, 1], 'label': int32 (B,)}`` with
    ``B = global_batch_size // process_count``; with ``two_views`` also ``'image2'``, and
    both views get MAGE-C's colour augmentation on top of crop + flip.
    """
    return train_dataset_from_source(
        _train_source(data_cfg), data_cfg, seed=seed, global_batch_size=global_batch_size,
        process_index=process_index, process_count=process_count, two_views=two_views)


def next_index(state: dict) -> int:
    """The step an iterator state ``{'next_index': step}`` stands for; anything else (a grain
    whose state format differs) raises rather than being guessed at."""
    if set(state) != {"next_index"}:
        raise NotImplementedError(f"unexpected grain iterator state {state}; position the "
                                  "iterator with set_state of a saved state instead.")
    return int(state["next_index"])


def position_iterator(dataset: grain.IterDataset, start_step: int):
    """An iterator over ``dataset`` whose next batch is batch ``start_step``, in O(1)."""
    it = iter(dataset)
    if start_step:
        next_index(it.get_state())  # the format is the one set below
        it.set_state({"next_index": int(start_step)})
    return it


def train_iterator(data_cfg, *, seed: int, global_batch_size: int, process_index: int,
                   process_count: int, two_views: bool = False, start_step: int = 0):
    """``iter(train_dataset(...))`` positioned at ``start_step`` (its next batch is that step's).

    Its ``get_state()`` after ``k`` batches is ``{'next_index': start_step + k}``, identical to
    the state of an uninterrupted iterator at that step, so checkpoints are interchangeable.
    """
    if start_step < 0:
        raise ValueError(f"start_step={start_step} must be >= 0.")
    workers = worker_processes(data_cfg)
    if not workers:
        ds = train_dataset(data_cfg, seed=seed, global_batch_size=global_batch_size,
                           process_index=process_index, process_count=process_count,
                           two_views=two_views)
        return position_iterator(ds, start_step)
    # Worker processes: batch s is still the MapDataset's element s, so the stream starts at
    # `start_step` by slicing, and the workers take batches in turn (grain keeps their
    # order). The iterator's own state then counts from that slice: the run's position is
    # its step, so the loop checkpoints no data state in this mode.
    batches = _train_batches(_train_source(data_cfg), data_cfg, seed=seed,
                             global_batch_size=global_batch_size, process_index=process_index,
                             process_count=process_count, two_views=two_views)
    ds = batches[start_step:].to_iter_dataset(_read_options(data_cfg))
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults outside
        flags.FLAGS.mark_as_parsed()  # an absl app: a notebook, a test)
    return iter(ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers)))


# ----------------------------------------------------------------------------- evaluation

def _eval_example(index: int, *, source, size: int, crop_fraction: float,
                  interpolation: str) -> dict:
    if index >= len(source):  # Padding up to whole global batches: masked out downstream.
        return {"image": np.zeros((size, size, 3), np.float32), "label": np.int32(0),
                "mask": np.bool_(False)}
    example = source[index]
    image = augment.resize_center_crop(example["image"], size, crop_fraction=crop_fraction,
                                       interpolation=interpolation)
    return {"image": image, "label": _label(example), "mask": np.bool_(True)}


def eval_dataset_from_source(source, data_cfg, *, batch_size: int, process_index: int,
                             process_count: int) -> grain.IterDataset:
    """``eval_dataset`` over an already opened random-access source."""
    _check_process(process_index, process_count)
    batch = host_batch_size(batch_size, process_count)
    num_batches = math.ceil(len(source) / batch_size)  # The same number on every host.
    ds = grain.MapDataset.range(num_batches * batch_size).map(functools.partial(
        _eval_example, source=source, size=int(data_cfg.image_size),
        crop_fraction=float(data_cfg.get("eval_crop_fraction", 0.875)),
        interpolation=data_cfg.get("eval_interpolation", "bicubic")))
    ds = ds.batch(batch, drop_remainder=True)[process_index::process_count]
    return ds.to_iter_dataset(_read_options(data_cfg))


def eval_dataset(data_cfg, *, batch_size: int, process_index: int, process_count: int,
                 split: str | None = None) -> grain.IterDataset:
    """One ordered pass over ``split`` (default ``data_cfg.eval_split``), never dropping data.

    ``batch_size`` is the GLOBAL batch size (as ``train_dataset``'s): each process gets
    ``batch_size // process_count`` per batch. Batches hold ``'image'`` (resize + center
    crop), ``'label'`` and ``'mask'`` (False on the padding that fills the last batch).
    Concatenating the hosts' batches in process order gives examples in dataset order.
    """
    source = datasets.open_source(data_cfg, split or data_cfg.get("eval_split", "test"))
    return eval_dataset_from_source(source, data_cfg, batch_size=batch_size,
                                    process_index=process_index, process_count=process_count)
