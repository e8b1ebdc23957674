"""Image sets to score: a folder of PNG/JPEG files or an ``.npz``, as uint8 NHWC batches.

Everything that can be wrong with a set (no images, mixed sizes, a float array, NCHW
layout) is checked when it is opened, before any network is compiled.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np
from etils import epath
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
NPZ_KEY = "images"


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """``num_images`` images of ``shape`` (H, W, 3): ``files``, ``array`` or ``read(i)``."""
    source: str
    num_images: int
    shape: tuple[int, int, int]
    files: tuple[epath.Path, ...] = ()
    array: np.ndarray | None = None
    read: Callable[[int], np.ndarray] | None = None

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, self.num_images, batch_size):
            if self.array is not None:
                yield self.array[start:start + batch_size]
            elif self.read is not None:
                stop = min(start + batch_size, self.num_images)
                yield np.stack([self.read(i) for i in range(start, stop)])
            else:
                yield np.stack([_read_rgb(f) for f in self.files[start:start + batch_size]])


def _read_rgb(path) -> np.ndarray:
    # torch-fidelity converts every file to RGB (grey or RGBA files score as colour).
    with epath.Path(path).open("rb") as f, Image.open(f) as image:
        return np.asarray(image.convert("RGB"), np.uint8)


def _size(path) -> tuple[int, int]:
    with epath.Path(path).open("rb") as f, Image.open(f) as image:  # reads the header only
        return image.size


def open_folder(path) -> ImageSet:
    """The folder's PNG/JPEG files (not subfolders), in sorted name order."""
    root = epath.Path(path)  # a local folder or one in a bucket (gs://...)
    files = tuple(sorted(p for p in root.iterdir()
                         if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"{root} holds no {'/'.join(IMAGE_EXTENSIONS)} files; point --images "
                         f"at the folder of images itself (subfolders are not searched).")
    size = _size(files[0])
    for f in files[1:]:
        other = _size(f)
        if other != size:
            raise ValueError(
                f"images in {root} differ in size: {files[0].name} is {size[0]}x{size[1]}, "
                f"{f.name} is {other[0]}x{other[1]} (width x height). Resize them "
                f"to one size first (e.g. the generator's output size).")
    return ImageSet(str(root), len(files), (size[1], size[0], 3), files=files)


def open_npz(path) -> ImageSet:
    """An ``.npz`` whose ``images`` entry is uint8 (N, H, W, 3)."""
    with epath.Path(path).open("rb") as f, np.load(f) as data:
        if NPZ_KEY not in data.files:
            raise ValueError(f"{path} has no '{NPZ_KEY}' entry (it has {data.files}); save the "
                             f"images with np.savez(path, {NPZ_KEY}=uint8 array (N, H, W, 3)).")
        images = data[NPZ_KEY]
    if images.dtype != np.uint8:
        raise ValueError(f"{path}['{NPZ_KEY}'] has dtype {images.dtype}; FID/IS take uint8 pixels "
                         f"in [0, 255] (for floats in [0, 1]: "
                         f"np.clip(np.round(x * 255), 0, 255).astype(np.uint8)).")
    if images.ndim != 4 or images.shape[-1] != 3:
        hint = (" It looks like NCHW: np.transpose(x, (0, 2, 3, 1))."
                if images.ndim == 4 and images.shape[1] == 3 else "")
        raise ValueError(f"{path}['{NPZ_KEY}'] has shape {images.shape}; expected (N, H, W, 3) "
                         f"RGB images.{hint}")
    if len(images) == 0:
        raise ValueError(f"{path}['{NPZ_KEY}'] holds no images.")
    return ImageSet(str(path), len(images), tuple(images.shape[1:]), array=images)


def open_tfds(spec: str, image_size: int, data_dir: str | None = None,
              manual_dir: str | None = None, limit: int = -1) -> ImageSet:
    """``name:split`` of a TFDS dataset (or ``folder`` with ``manual_dir``), each image's
    shorter side resized to ``image_size`` (bicubic) and center-cropped: the reference
    images of MAGE's FID (ImageNet validation at 256 px). ``limit`` > 0: the first images."""
    from mage_jax import config_defaults
    from mage_jax.data import augment, datasets
    name, _, split = spec.partition(":")
    if not name or not split:
        raise ValueError(f"--tfds={spec!r} must be NAME:SPLIT, e.g. imagenet2012:validation.")
    data_cfg = config_defaults.data_config(name, image_size=image_size)
    data_cfg.update(data_dir=data_dir, manual_dir=manual_dir)
    datasets.check_dataset(data_cfg, split)  # names the preparation command when missing
    source = datasets.open_source(data_cfg, split)
    count = len(source) if limit <= 0 else min(limit, len(source))

    def read(index: int) -> np.ndarray:
        view = augment.resize_center_crop(source[index]["image"], image_size,
                                          crop_fraction=1.0, interpolation="bicubic")
        return np.clip(np.round(view * 255.0), 0, 255).astype(np.uint8)
    return ImageSet(f"{name}:{split}", count, (image_size, image_size, 3), read=read)


def open_images(path) -> ImageSet:
    """A folder or an ``.npz`` file, by what ``path`` is."""
    p = epath.Path(path)
    if p.is_dir():
        return open_folder(p)
    if p.is_file() and p.suffix == ".npz":
        return open_npz(p)
    raise FileNotFoundError(f"--images={path} is neither a folder of images nor an .npz file.")
