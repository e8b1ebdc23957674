"""FID and IS of a set of images, or reference statistics for later FIDs.

    # Reference statistics of the real images: ImageNet validation through TFDS, resized
    # (shorter side 256, bicubic) and center-cropped to 256 px; or a folder / npz:
    python -m mage_jax.eval.score --tfds=imagenet2012:validation --image_size=256 \
        --data_dir=/data/tfds --save_stats=ref.npz \
        --inception_weights=weights-inception-2015-12-05-6726825d.pth
    python -m mage_jax.eval.score --images=DIR_OR_NPZ --save_stats=ref.npz ...
    # FID against them and IS of generated samples, printed as one JSON object:
    python -m mage_jax.eval.score --images=samples.npz --reference_stats=ref.npz \
        --inception_weights=weights-inception-2015-12-05-6726825d.pth [--splits=10]

The protocol is torch-fidelity's (``fidelity --isc --fid``, with which MAGE's numbers were
measured) with shuffling off for IS: see :mod:`mage_jax.eval.fid`. Keys of the JSON are
torch-fidelity's: ``frechet_inception_distance``, ``inception_score_mean``,
``inception_score_std``, plus ``num_images``.
"""
from __future__ import annotations

import json

from absl import app, flags

from mage_jax import paths
from mage_jax.eval import fid, images, inception

_IMAGES = flags.DEFINE_string("images", None, "Folder of PNG/JPEG images, or .npz with 'images'.")
_TFDS = flags.DEFINE_string("tfds", None, "NAME:SPLIT of a TFDS dataset instead of --images.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 256, "With --tfds: resize + center crop size.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "With --tfds: the TFDS data directory.")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "With --tfds: the manual download folder.")
_LIMIT = flags.DEFINE_integer("limit", -1, "With --tfds: only the first N images (-1: all).")
_REFERENCE = flags.DEFINE_string(
    "reference_stats", None, "Statistics .npz of the real images (from --save_stats); FID needs it.")
_WEIGHTS = flags.DEFINE_string(
    "inception_weights", None,
    f"FID InceptionV3 weights (.pth or .npz), e.g. {inception.WEIGHTS_URL}. Default: the cached "
    f"copy in {paths.cache_dir()}.")
_DOWNLOAD = flags.DEFINE_bool(
    "download_inception", False, "Download the weights into the cache if they are not there.")
_SAVE_STATS = flags.DEFINE_string("save_stats", None, "Write the images' FID statistics here.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 50, "Images per forward pass.")
_SPLITS = flags.DEFINE_integer("splits", 10, "Inception Score splits (torch-fidelity's default 10).")


def score(images_path, weights_path: str | None = None, reference_stats: str | None = None,
          save_stats: str | None = None, batch_size: int = 50, splits: int = 10,
          allow_download: bool = False) -> dict:
    """The command's work, importable: metrics as a dict (FID only with ``reference_stats``).
    ``images_path``: a folder or .npz, or an opened ``images.ImageSet`` (e.g. ``open_tfds``)."""
    if batch_size < 1:
        raise ValueError(f"--batch_size={batch_size} must be positive.")
    # Every input is checked before the network is compiled.
    image_set = (images_path if isinstance(images_path, images.ImageSet)
                 else images.open_images(images_path))
    reference = fid.load_statistics(reference_stats)[:2] if reference_stats else None
    weights = inception.inception_weights_path(weights_path, allow_download)
    variables = inception.load_inception(weights)
    metrics, stats = fid.evaluate(variables, image_set.batches(batch_size), batch_size,
                                  splits, reference)
    if save_stats:
        fid.save_statistics(save_stats, stats.mean, stats.covariance(), stats.num_images)
    return metrics


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if bool(_IMAGES.value) == bool(_TFDS.value):
        raise app.UsageError("give one of --images=DIR_OR_NPZ and --tfds=NAME:SPLIT.")
    if not _REFERENCE.value and not _SAVE_STATS.value:
        raise app.UsageError("give --reference_stats (to get FID) or --save_stats (to write "
                             "reference statistics), or both.")
    source = _IMAGES.value or images.open_tfds(_TFDS.value, _IMAGE_SIZE.value, _DATA_DIR.value,
                                               _MANUAL_DIR.value, _LIMIT.value)
    metrics = score(source, _WEIGHTS.value, _REFERENCE.value, _SAVE_STATS.value,
                    _BATCH_SIZE.value, _SPLITS.value, _DOWNLOAD.value)
    print(json.dumps(metrics, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
