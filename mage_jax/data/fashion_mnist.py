"""Fashion-MNIST, the embedded default dataset, prepared by TFDS with no network.

TFDS's own ``fashion_mnist`` builder downloads four IDX files from the internet. Debian's
package ``dataset-fashion-mnist`` installs the very same files under
``/usr/share/datasets/fashion-mnist``. ``prepare_fashion_mnist`` runs TFDS's builder with
its download step replaced by a read of those local files, so that afterwards
``tfds.data_source('fashion_mnist', data_dir=...)`` and ``tfds.builder('fashion_mnist', ...)``
see exactly what a download prepared with ``file_format='array_record'`` gives: same name,
version, features, splits and example order.

Why a subclass and not a ``tfds build`` call: the registered builder's ``_split_generators``
hard-codes the download URL. The subclass keeps the name ``fashion_mnist`` (TFDS derives the
on-disk directory from it) and is created with ``skip_registration=True`` so that it does not
collide with the registered ``FashionMNIST`` class, which remains the one readers use.
"""
from __future__ import annotations

import contextlib
import gzip
import os
import pathlib
import uuid

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import file_adapters
from tensorflow_datasets.image_classification import mnist as tfds_mnist

NAME = "fashion_mnist"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
APT_HINT = "apt-get install -y dataset-fashion-mnist"

# split -> (images file, labels file, number of examples). The counts are those of the
# official release; a local copy that disagrees is refused rather than silently used.
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}
IMAGE_SIZE = 28
_IMAGES_MAGIC = 2051  # IDX magic numbers: 0x0803 (uint8, 3 dims) and 0x0801 (uint8, 1 dim).
_LABELS_MAGIC = 2049


def missing_files(source_dir: str | os.PathLike) -> list[str]:
    """The IDX files that ``source_dir`` lacks (an empty list when all four are there)."""
    source_dir = pathlib.Path(source_dir)
    names = [name for images, labels, _ in FILES.values() for name in (images, labels)]
    return [name for name in names if not (source_dir / name).is_file()]


def read_idx(images_path: str | os.PathLike, labels_path: str | os.PathLike,
             num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """Reads one gzip'd IDX image/label file pair: uint8 (N, 28, 28, 1) and int64 (N,)."""
    with gzip.open(images_path, "rb") as f:
        header = np.frombuffer(f.read(16), dtype=">u4")
        pixels = np.frombuffer(f.read(), dtype=np.uint8)
    with gzip.open(labels_path, "rb") as f:
        label_header = np.frombuffer(f.read(8), dtype=">u4")
        labels = np.frombuffer(f.read(), dtype=np.uint8)
    expected_header = [_IMAGES_MAGIC, num_examples, IMAGE_SIZE, IMAGE_SIZE]
    if header.tolist() != expected_header or pixels.size != num_examples * IMAGE_SIZE ** 2:
        raise ValueError(
            f"{images_path}: IDX header {header.tolist()} with {pixels.size} pixel bytes, "
            f"expected header {expected_header} (the official Fashion-MNIST file); "
            f"reinstall it with `{APT_HINT}`.")
    if label_header.tolist() != [_LABELS_MAGIC, num_examples] or labels.size != num_examples:
        raise ValueError(
            f"{labels_path}: IDX header {label_header.tolist()} with {labels.size} labels, "
            f"expected header {[_LABELS_MAGIC, num_examples]}; reinstall it with `{APT_HINT}`.")
    images = pixels.reshape(num_examples, IMAGE_SIZE, IMAGE_SIZE, 1)
    return images, labels.astype(np.int64)


class _LocalFashionMNIST(tfds_mnist.FashionMNIST, skip_registration=True):
    """TFDS's FashionMNIST builder, reading the IDX files from a local directory."""

    name = NAME  # Same name (and inherited VERSION/_info) as the registered builder.
    # No source file to locate and no download checksums to check. (TFDS would otherwise
    # look up this module's resource path, which needs the optional `importlib_resources`.)
    code_path = None

    def __init__(self, *, source_dir: str | os.PathLike, **kwargs):
        self._source_dir = pathlib.Path(source_dir)
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the files are already on this machine.
        return [
            tfds.core.SplitGenerator(
                name=split,
                gen_kwargs=dict(images_path=self._source_dir / images,
                                labels_path=self._source_dir / labels, num_examples=count))
            for split, (images, labels, count) in FILES.items()
        ]

    def _generate_examples(self, images_path, labels_path, num_examples):
        images, labels = read_idx(images_path, labels_path, num_examples)
        for index in range(num_examples):
            # The index is the key, as in TFDS's builder: the same order as a download.
            yield index, {"image": images[index], "label": labels[index]}


@contextlib.contextmanager
def _prepare_lock(data_dir: str):
    """An exclusive lock while preparing, so concurrent processes prepare only once.

    Only local directories are locked (flock). Elsewhere (gs://) each process prepares into
    its own temporary directory and renames it into place; one that finds the dataset
    already there discards its copy.
    """
    if "://" in data_dir:
        yield
        return
    import fcntl  # POSIX only; imported here so that importing this module stays portable.
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{NAME}.prepare.lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
    """The TFDS data_dir that ``None`` stands for ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    return os.fspath(data_dir) if data_dir else tfds.core.constants.get_default_data_dir()


def is_prepared(data_dir: str | os.PathLike) -> bool:
    """Whether ``fashion_mnist`` in ``data_dir`` can be read with ``tfds.data_source``."""
    builder = tfds.builder(NAME, data_dir=os.fspath(data_dir))
    return builder.is_prepared() and (
        file_adapters.FileFormat.ARRAY_RECORD in builder.info.available_file_formats())


def prepare_fashion_mnist(data_dir: str | os.PathLike | None = None,
                          source_dir: str | os.PathLike = DEFAULT_DIR) -> str:
    """Prepares ``fashion_mnist`` (array_record) in ``data_dir`` from local IDX files.

    Idempotent, and safe when several processes call it at once: it is built in a private
    temporary directory and renamed into place, under a file lock on local disks. Returns
    the resolved data_dir.

    Why array_record only: ``tfds.data_source`` (random access, what grain needs) cannot read
    tfrecord, and in TFDS 4.9 a registered builder ignores ``alternative_file_formats``, so
    one format must serve. The price: ``tfds.load``/``as_dataset`` cannot read array_record
    ("`.as_dataset()` not implemented for ArrayRecord files"); use ``tfds.data_source``.
    """
    data_dir = resolve_data_dir(data_dir)
    if is_prepared(data_dir):
        return data_dir
    missing = missing_files(source_dir)
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files {missing} are missing from {source_dir!s}. Install them with "
            f"`{APT_HINT}` (or set config.data.fashion_mnist_dir to a directory holding the "
            f"four official *-ubyte.gz files); {NAME} is then prepared in {data_dir} on first use.")
    with _prepare_lock(data_dir):
        if is_prepared(data_dir):  # Another process finished while we waited for the lock.
            return data_dir
        scratch = epath.Path(data_dir) / f".{NAME}.incomplete.{uuid.uuid4().hex}"
        try:
            builder = _LocalFashionMNIST(source_dir=source_dir, data_dir=os.fspath(scratch))
            builder.download_and_prepare(
                file_format="array_record",
                # Keeps TFDS from looking for a ready-made copy on the network.
                download_config=tfds.download.DownloadConfig(try_download_gcs=False))
            for split, (_, _, count) in FILES.items():
                got = builder.info.splits[split].num_examples
                if got != count:
                    raise ValueError(f"{NAME} prepared from {source_dir} has {got} {split} "
                                     f"examples, expected {count}; reinstall with `{APT_HINT}`.")
            final = epath.Path(data_dir) / NAME / str(builder.version)
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():
                if is_prepared(data_dir):  # A concurrent process (unlocked remote) won.
                    return data_dir
                if (final / "dataset_info.json").exists():  # Someone's dataset: never delete.
                    raise ValueError(
                        f"{final} holds {NAME} in a format tfds.data_source cannot read "
                        f"(tfrecord?); delete it and {NAME} is prepared again as array_record.")
                final.rmtree()  # Files without metadata: a crashed copy, not a dataset.
            try:
                epath.Path(builder.data_dir).rename(final)
            except OSError:
                if not is_prepared(data_dir):  # Not a lost race (unlocked remote data_dir).
                    raise
        finally:
            if scratch.exists():
                scratch.rmtree()
    return data_dir
