"""Where images come from: any TFDS image dataset (array_record), or a folder of images.

``check_dataset`` runs before anything is compiled and says exactly how to get a missing
dataset; ``open_source`` returns a random-access source (``len`` + ``__getitem__`` giving
``{'image': uint8 HWC, 'label': int}``) for grain. Random access is what makes the input
pipeline deterministic and resumable: the example at any step is read directly.

Fashion-MNIST, the embedded default, is prepared on first use from Debian's
``dataset-fashion-mnist`` files (see ``fashion_mnist.py``).
"""
from __future__ import annotations

import difflib
import importlib.util
import os
import shlex

import numpy as np
from etils import epath

from mage_jax.data import augment
from mage_jax.data import fashion_mnist

FOLDER = "folder"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")


class DatasetNotFoundError(ValueError):
    """The configured dataset or split is not available; the message says how to get it."""


# ----------------------------------------------------------------------------- folder source

def folder_root(manual_dir, split: str) -> epath.Path:
    """``manual_dir/<split>`` when it exists (the ImageNet layout: train/, val/), else
    ``manual_dir`` itself, whose class subfolders then serve every split."""
    if not manual_dir:
        raise DatasetNotFoundError(
            "config.data.name='folder' reads config.data.manual_dir, which is not set; set it to "
            "a directory whose class subfolders hold the images (e.g. root/cat/1.png).")
    root = epath.Path(manual_dir)  # a local folder or gs://bucket/folder
    return root / split if (root / split).is_dir() else root


# What PIL raises for a file it cannot read as an image: not an image (UnidentifiedImageError,
# an OSError), truncated or corrupt data (OSError, SyntaxError from some plugins), an
# impossible header (ValueError). PIL's decompression-bomb guard is not caught: it stops.
_UNREADABLE = (OSError, SyntaxError, ValueError)
SKIPPED_KEY = "data_skipped"  # per example: the unreadable files passed over to reach it


def decode_image(path: str) -> np.ndarray:
    """One file -> uint8 (H, W, 1) for grey images, (H, W, 3) for everything else (RGBA,
    palette and CMYK images are converted to RGB). Raises what PIL raises if unreadable."""
    from PIL import Image  # Imported lazily: only folder datasets need it here.
    with epath.Path(path).open("rb") as f, Image.open(f) as img:
        img.load()  # decode now: a truncated file fails here, not later
        image = np.asarray(augment.l_or_rgb(img), dtype=np.uint8)
    return image[..., None] if image.ndim == 2 else image


def _with_scheme(walked_dir, root) -> str:
    """epath's walk over fsspec (gcsfs) yields ``bucket/dir`` without ``gs://``; put it back."""
    walked, root = os.fspath(walked_dir), os.fspath(root)
    scheme = root.split("://")[0] + "://" if "://" in root else ""
    return walked if not scheme or walked.startswith(scheme) else scheme + walked


class FolderSource:
    """Random access to ``root/<class>/<...>/<image>``; labels index the sorted class names.

    The same layout as torchvision's ImageFolder (which the official MAGE code reads
    ImageNet with), decoded with PIL: 1-channel images stay (H, W, 1), others become RGB.
    A file that does not decode (corrupt, truncated, empty, not an image) is passed over:
    example ``i`` is then the next readable file after it, so which image each index gives,
    and so every batch, depends on the files alone (a resumed run sees the same batches),
    and ``data_skipped`` in the example counts the files passed over (the training loop
    logs their sum as ``data/skipped``).
    """

    def __init__(self, root):
        self.root = epath.Path(root)  # a local folder or gs://bucket/folder
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir()) \
            if self.root.is_dir() else []
        self._files: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            # Folder by folder, then by name (and so every batch) as before on local disks.
            walked = sorted((_with_scheme(d, self.root), files)
                            for d, _, files in (self.root / name).walk())
            for dirpath, filenames in walked:
                self._files.extend((os.path.join(dirpath, f), label) for f in sorted(filenames)
                                   if f.lower().endswith(IMAGE_EXTENSIONS))
        if not self._files:
            raise DatasetNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in class subfolders of {self.root}; "
                "config.data.manual_dir must hold one subfolder per class (root/<class>/<img>).")

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict:
        for skipped in range(len(self._files)):
            path, label = self._files[(index + skipped) % len(self._files)]
            try:
                image = decode_image(path)
            except _UNREADABLE:
                continue
            return {"image": image, "label": label, SKIPPED_KEY: np.int32(skipped)}
        raise DatasetNotFoundError(
            f"none of the {len(self._files)} files under {self.root} decodes as an image (all "
            f"are corrupt, empty or not images); point config.data.manual_dir at readable ones.")

    def first_readable(self) -> int:
        """Index of the first file that decodes (cheap for a healthy folder: the first);
        raises DatasetNotFoundError when none does."""
        return int(self[0][SKIPPED_KEY])

    def __repr__(self) -> str:
        return f"FolderSource({str(self.root)!r}, {len(self)} images, {len(self.classes)} classes)"


# ----------------------------------------------------------------------------- TFDS

def _split_names(split: str) -> list[str]:
    """The split names in a TFDS split spec such as 'train[:90%]+validation'."""
    return [part.split("[")[0].strip() for part in split.split("+")]


def _build_command(name: str, data_dir: str, manual_dir=None) -> str:
    """How to prepare ``name`` as array_record: the tfds CLI, and plain Python (the CLI
    imports apache_beam at start-up, which a minimal install lacks)."""
    cli = f"tfds build {name} --data_dir={shlex.quote(data_dir)} --file_format=array_record"
    cli += f" --manual_dir={shlex.quote(str(manual_dir))}" if manual_dir else ""
    config = f"manual_dir={str(manual_dir)!r}" if manual_dir else ""
    python = (f"import tensorflow_datasets as tfds; tfds.builder({name!r}, data_dir={data_dir!r})"
              f".download_and_prepare(file_format='array_record', "
              f"download_config=tfds.download.DownloadConfig({config}))")
    hint = f"{cli}\nor, without apache_beam installed,\n  python -c \"{python}\""
    if importlib.util.find_spec("importlib_resources") is None:
        hint = "pip install importlib_resources  (TFDS needs it to prepare datasets), then\n  " + hint
    return hint


def _how_to_get(name: str, data_dir: str, data_cfg) -> str:
    if name.split(":")[0] == "imagenet2012":
        manual = data_cfg.get("manual_dir") or "<manual_dir>"
        return (f"ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar and "
                f"ILSVRC2012_img_val.tar in {manual} (config.data.manual_dir), then run\n  "
                + _build_command(name, data_dir, manual))
    return f"prepare it with\n  {_build_command(name, data_dir, data_cfg.get('manual_dir'))}"


def _tfds_builder(name: str, data_dir: str):
    import tensorflow_datasets as tfds
    try:
        return tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        # Community datasets would be looked up on the network: local names only.
        close = difflib.get_close_matches(
            name, tfds.list_builders(with_community_datasets=False), n=5)
        raise DatasetNotFoundError(
            f"config.data.name={name!r} is not a TFDS dataset"
            + (f" (did you mean {', '.join(close)}?)" if close else "")
            + f"; see https://www.tensorflow.org/datasets/catalog, or use name='{FOLDER}' with "
            "manual_dir pointing at a folder of class subfolders.") from None


def _check_prepared_builder(builder, name: str, data_dir: str, split: str, data_cfg) -> None:
    from tensorflow_datasets.core import file_adapters
    if builder.info.file_format != file_adapters.FileFormat.ARRAY_RECORD:
        if name == fashion_mnist.NAME:
            fix = (f"delete {builder.data_dir}; it is then prepared again as array_record on "
                   "first use")
        else:
            fix = f"delete {builder.data_dir} and prepare it again with\n  " + _build_command(
                name, data_dir, data_cfg.get("manual_dir"))
        raise DatasetNotFoundError(
            f"{name} in {builder.data_dir} is stored as {builder.info.file_format.value}, but the "
            f"input pipeline needs random access (file_format='array_record'): {fix}.")
    available = list(builder.info.splits.keys())
    unknown = [s for s in _split_names(split) if s not in available]
    if unknown:
        raise DatasetNotFoundError(
            f"split {split!r} of {name}: no split {unknown}; available: {available}.")


def check_dataset(data_cfg, split: str) -> None:
    """Raises ``DatasetNotFoundError`` (with how to get it) unless ``split`` can be read.

    Cheap: reads directory listings and TFDS metadata only (no TF graph, nothing compiled),
    so a run fails in seconds, not after compiling the model.
    """
    name = data_cfg.name
    if name == FOLDER:
        root = folder_root(data_cfg.get("manual_dir"), split)
        if not root.is_dir():
            raise DatasetNotFoundError(
                f"config.data.manual_dir={str(root)!r} is not a directory; point it at a folder "
                "of class subfolders (root/<class>/<image>).")
        if not any(p.is_dir() for p in root.iterdir()):
            raise DatasetNotFoundError(
                f"{root} has no class subfolders; the folder dataset reads root/<class>/<image>.")
        FolderSource(root).first_readable()  # nothing readable: say so before compiling
        return
    data_dir = fashion_mnist.resolve_data_dir(data_cfg.get("data_dir"))
    builder = _tfds_builder(name, data_dir)
    if builder.is_prepared():
        _check_prepared_builder(builder, name, data_dir, split, data_cfg)
        return
    if name == fashion_mnist.NAME:
        source_dir = data_cfg.get("fashion_mnist_dir") or fashion_mnist.DEFAULT_DIR
        missing = fashion_mnist.missing_files(source_dir)
        if missing:
            raise DatasetNotFoundError(
                f"fashion_mnist is not prepared in {data_dir} and its source files {missing} are "
                f"missing from {source_dir} (config.data.fashion_mnist_dir). Install them with\n"
                f"  {fashion_mnist.APT_HINT}\nand fashion_mnist then prepares itself (offline, "
                f"about 20 s) in {data_dir} on first use.")
        unknown = [s for s in _split_names(split) if s not in fashion_mnist.FILES]
        if unknown:
            raise DatasetNotFoundError(f"split {split!r} of fashion_mnist: no split {unknown}; "
                                       f"available: {list(fashion_mnist.FILES)}.")
        return
    raise DatasetNotFoundError(
        f"dataset {name!r} is not prepared in data_dir={data_dir} (config.data.data_dir): "
        + _how_to_get(name, data_dir, data_cfg))


def check_encoded_source(data_cfg) -> None:
    """``data.jpeg_draft`` reads the stored bytes of a TFDS dataset; a folder source decodes
    each file as it reads it (to pass over the unreadable ones), so it cannot hand them on."""
    if data_cfg.name == FOLDER:
        raise ValueError(
            "config.data.jpeg_draft=True needs a TFDS dataset (array_record); a folder dataset "
            "decodes every file as it reads it. Set --config.data.jpeg_draft=False, or build "
            "the dataset with TFDS (tfds build --manual_dir=... --file_format=array_record).")


def open_source(data_cfg, split: str, encoded: bool = False):
    """A random-access source of ``{'image': uint8 HWC, 'label': int}`` for ``split``.

    TFDS datasets are read with ``tfds.data_source`` (array_record); fashion_mnist is
    prepared first if needed. ``name='folder'`` reads images under ``manual_dir``.
    ``encoded``: a TFDS source whose ``'image'`` is the stored bytes (JPEG, PNG), for an
    augmentation that decodes them itself (``augment.random_resized_crop_encoded``).
    """
    check_dataset(data_cfg, split)
    if encoded:
        check_encoded_source(data_cfg)
    if data_cfg.name == FOLDER:
        return FolderSource(folder_root(data_cfg.get("manual_dir"), split))
    import tensorflow_datasets as tfds
    data_dir = fashion_mnist.resolve_data_dir(data_cfg.get("data_dir"))
    if data_cfg.name == fashion_mnist.NAME:
        fashion_mnist.prepare_fashion_mnist(
            data_dir, data_cfg.get("fashion_mnist_dir") or fashion_mnist.DEFAULT_DIR)
    decoders = {"image": tfds.decode.SkipDecoding()} if encoded else None
    return tfds.data_source(data_cfg.name, split=split, data_dir=data_dir, download=False,
                            decoders=decoders)


def num_classes(data_cfg, split: str) -> int:
    """How many classes the labels of ``split`` have (the probe and few-shot stages need
    labels): the class subfolders of a folder dataset, the ``label`` ClassLabel of a TFDS
    one. Raises ``DatasetNotFoundError`` for a dataset without class labels."""
    source = open_source(data_cfg, split)
    if isinstance(source, FolderSource):
        return len(source.classes)
    features = source.dataset_info.features
    label = features["label"] if "label" in features else None
    count = getattr(label, "num_classes", None)
    if not count:
        raise DatasetNotFoundError(
            f"dataset {data_cfg.name!r} has no class labels (its features: {sorted(features)}); "
            f"classification needs a labelled dataset with a `label` ClassLabel feature, e.g. "
            f"imagenet2012, fashion_mnist, cifar10, or a folder of class subfolders.")
    return int(count)
