"""One file layer for every run path: ``etils.epath``, so ``gs://bucket/run`` works wherever
a local directory does (workdirs, the runs later stages read, weights, samples, statistics).

Which library talks to the bucket is epath's choice: TensorFlow's ``tf.io.gfile`` when
TensorFlow is importable (an install requirement of this package, so on every pod worker),
else fsspec's ``gcsfs``; ``EPATH_USE_TF=false`` picks gcsfs (the storage tests do, to reach
the emulator: TensorFlow's GCS endpoint is compiled in). Orbax goes through epath too, and
its arrays through tensorstore. Local paths stay plain files, written as before.

Object stores differ from a disk in two ways this code cares about: an object cannot be
appended to (metrics.py rewrites metrics.jsonl whole) and there is no ``flock``
(workdir_lock.py keeps a lease there instead).
"""
from __future__ import annotations

import os
import pathlib

from etils import epath


def is_remote(path) -> bool:
    """``gs://...`` and other URLs (anything epath opens that is not a local file)."""
    return "://" in os.fspath(path)


def absolute(path) -> str:
    """A local path made absolute; a URL as it is (``os.path.abspath`` would mangle it)."""
    return os.fspath(path) if is_remote(path) else os.path.abspath(path)


def write_text(path, text: str) -> None:
    """Writes ``text`` to ``path`` (a file or an object), making its directory first."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def read_text(path) -> str:
    return epath.Path(path).read_text(encoding="utf-8")


def exists(path) -> bool:
    return epath.Path(path).exists()


def save_image(image, path) -> None:
    """Saves a PIL image (format from the file name's extension) to a file or an object."""
    path = epath.Path(path)
    with path.open("wb") as f:
        image.save(f, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG") or "PNG")


def cache_dir() -> pathlib.Path:
    """Where downloaded and converted weights are kept: ``$MAGE_JAX_CACHE``, else
    ``$XDG_CACHE_HOME/mage_jax`` (``~/.cache/mage_jax``)."""
    root = os.environ.get("MAGE_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "mage_jax")
    return pathlib.Path(root).expanduser()
