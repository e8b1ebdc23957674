"""Pieces every stage config shares; `configs/<stage>.py` builds on them.

A config is the whole experiment: every hyperparameter the paper or a user may want to
change lives here, and `main.py` locks it, so a misspelt ``--config.key`` fails at once.
"""
from __future__ import annotations

import ml_collections

# Where Debian's `dataset-fashion-mnist` package puts the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


def parse_args(arg: str | None, known: tuple[str, ...]) -> set[str]:
    """Splits a config argument such as ``"demo"`` or ``"vit_l,contrastive"`` into presets."""
    presets = {a.strip() for a in (arg or "").split(",") if a.strip()}
    unknown = presets - set(known)
    if unknown:
        raise ValueError(
            f"unknown config argument(s) {sorted(unknown)}; this config accepts {list(known)} "
            f"(comma separated), e.g. --config=configs/<stage>.py:{known[0]}")
    return presets


def smoke_preset(presets: set[str]) -> bool:
    """``smoke``: the demo a few steps long (an installation or notebook check); only with
    ``demo``, whose small model it shrinks the run of."""
    if "smoke" in presets and "demo" not in presets:
        raise ValueError("the `smoke` preset shortens the demo: use it as `demo,smoke`.")
    return "smoke" in presets


def data_config(name: str = "imagenet2012", image_size: int = 256) -> ml_collections.ConfigDict:
    """The input pipeline (mage_jax/data/): which TFDS dataset and MAGE's augmentation."""
    return ml_collections.ConfigDict(dict(
        name=name,                    # any TFDS image dataset, or 'folder'
        data_dir=ml_collections.FieldReference(None, field_type=str),
        manual_dir=ml_collections.FieldReference(None, field_type=str),
        fashion_mnist_dir=FASHION_MNIST_DIR,
        train_split="train",
        eval_split="validation" if name == "imagenet2012" else "test",
        image_size=image_size,
        # MAGE pretraining: RandomResizedCrop(scale=(0.2, 1)) + horizontal flip.
        crop_scale=(0.2, 1.0),
        crop_ratio=(3.0 / 4.0, 4.0 / 3.0),
        hflip=True,
        # Evaluation view: resize to image_size / eval_crop_fraction, then a central crop
        # (MAGE: 256 / 292 at 256 px).
        eval_crop_fraction=0.875,
        eval_interpolation="bicubic",
        # MAGE-C views add colour jitter and random grayscale (MoCo v3 style).
        color_jitter=0.4,
        color_jitter_prob=0.8,
        grayscale_prob=0.2,
        read_threads=2,
        prefetch=2,
        device_prefetch=2,            # batches on the devices ahead of their step (0: none)
        # Grain worker processes for decoding and augmentation (0: threads of the training
        # process only); for pod hosts with many cores per chip (benchmarks/README.md).
        worker_processes=0,
        # Training crops decode JPEGs at 1/2, 1/4 or 1/8 size where the crop is at least that
        # many times image_size on both sides (PIL's draft mode: libjpeg's DCT scaling), so
        # large photos cost a fraction of a full decode. Off: the official code decodes in
        # full, and the reduced decode filters differently (benchmarks/README.md). TFDS only.
        jpeg_draft=False,
    ))


def demo_data_config() -> ml_collections.ConfigDict:
    """The demo's data: Fashion-MNIST at 32 px, whole images (resized, never cropped: a fifth
    of a 28 px garment enlarged to 32 px is a blur whose tokens the demo tokenizer never
    saw; docs/demo.md), flipped; evaluation views resized the same way."""
    config = data_config("fashion_mnist", image_size=32)
    config.crop_scale = (1.0, 1.0)
    config.eval_crop_fraction = 1.0
    config.eval_interpolation = "bilinear"
    return config


def base_config(stage: str) -> ml_collections.ConfigDict:
    """Keys every training stage has, under the names the README documents."""
    config = ml_collections.ConfigDict()
    config.stage = stage
    config.seed = 0
    config.batch_size = 256            # global, across all hosts and devices
    config.total_steps = 100_000       # where this run stops (the schedule is separate)
    config.log_every = 100
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3
    config.image_summary_every = 1000  # 0 turns image summaries off
    config.num_image_summaries = 8
    # Scored at the end of the run on the first `num_examples` images of data.eval_split
    # (a fixed subset, so runs compare on the same images; -1: the whole split, 0: none).
    config.eval = ml_collections.ConfigDict(dict(num_examples=10_000))
    # Mesh axis sizes; their product must equal the device count (-1: "the rest").
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.data = data_config()
    return config
