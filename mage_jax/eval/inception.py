"""The FID InceptionV3 (``pt_inception-2015-12-05``) as a flax module, and its weights.

This is the network pytorch-fid and torch-fidelity build from the TensorFlow graph FID was
defined with, not torchvision's InceptionV3: BatchNorm eps 1e-3, average pools that do not
count padding (TensorFlow's), a max pool in the last block's pool branch (a quirk of that
graph), and a 1008-way ``fc``. Inference only: BatchNorm uses the stored running
statistics. Layout NHWC; inputs are already resized to 299x299 and scaled to [-1, 1]
(:mod:`mage_jax.eval.fid` does that).

Module and parameter names follow torch-fidelity's attribute names, so a state dict key
``Mixed_7c.branch_pool.bn.running_var`` is the flax variable
``batch_stats/Mixed_7c/branch_pool/bn/var`` and the loader is a rename plus a transpose.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import urllib.request
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import traverse_util

from mage_jax import paths

# torch-fidelity's copy of the weights; the hex after the last '-' starts the SHA-256.
WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
INPUT_SIZE = 299
POOL3_SIZE = 2048
NUM_CLASSES = 1008
# FID is a difference of large numbers: keep accelerators from using bf16/TF32 passes.
_PRECISION = jax.lax.Precision.HIGHEST


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, running statistics) -> ReLU."""
    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] = (1, 1)
    padding: Sequence[int] = (0, 0)  # symmetric, per spatial axis, as torch's Conv2d

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, tuple(self.kernel_size), tuple(self.strides),
                    padding=[(p, p) for p in self.padding], use_bias=False,
                    precision=_PRECISION, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x):
    # TensorFlow's average pool divides by the number of real (unpadded) inputs.
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv2d(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv2d(c7, **row, name="branch7x7_2")(b7)
        b7 = BasicConv2d(192, **col, name="branch7x7_3")(b7)
        bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_2")(bd)
        bd = BasicConv2d(c7, **row, name="branch7x7dbl_3")(bd)
        bd = BasicConv2d(c7, **col, name="branch7x7dbl_4")(bd)
        bd = BasicConv2d(192, **row, name="branch7x7dbl_5")(bd)
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x):
        b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv2d(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
        b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv2d(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class FIDInceptionE(nn.Module):
    """FIDInceptionE_1 (``pool="avg"``, Mixed_7b) and FIDInceptionE_2 (``pool="max"``, Mixed_7c)."""
    pool: str

    @nn.compact
    def __call__(self, x):
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3_2a")(b3),
                              BasicConv2d(384, **col, name="branch3x3_2b")(b3)], axis=-1)
        bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([BasicConv2d(384, **row, name="branch3x3dbl_3a")(bd),
                              BasicConv2d(384, **col, name="branch3x3dbl_3b")(bd)], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3(x)
        else:  # the 2015 graph max-pools here (pytorch-fid's FIDInceptionE_2)
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """(N, 299, 299, 3) in [-1, 1] -> (pool3 (N, 2048), logits_unbiased (N, 1008)).

    ``logits_unbiased`` is ``pool3 @ fc.weight.T`` without the bias: what torch-fidelity
    feeds the Inception Score. ``fc.bias`` is loaded (the file has it) but unused.
    """

    @nn.compact
    def __call__(self, x):
        x = BasicConv2d(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = FIDInceptionA(32, name="Mixed_5b")(x)
        x = FIDInceptionA(64, name="Mixed_5c")(x)
        x = FIDInceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
            x = FIDInceptionC(c7, name=name)(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = FIDInceptionE("avg", name="Mixed_7b")(x)
        x = FIDInceptionE("max", name="Mixed_7c")(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        kernel = _FC(name="fc")()
        return pool3, jnp.dot(pool3, kernel, precision=_PRECISION)


class _FC(nn.Module):
    """Holds ``fc`` (kernel = weight.T, bias) so both load, without applying the bias."""

    @nn.compact
    def __call__(self):
        self.param("bias", nn.initializers.zeros, (NUM_CLASSES,))
        return self.param("kernel", nn.initializers.lecun_normal(), (POOL3_SIZE, NUM_CLASSES))


# --------------------------------------------------------------------------- weights

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}


def _torch_key(path: tuple[str, ...]) -> str:
    return ".".join(path[1:-1] + (_LEAF_TO_TORCH[path[-1]],))  # path[0]: params / batch_stats


def _torch_to_flax_axes(path: tuple[str, ...], ndim: int) -> tuple[int, ...]:
    if path[-1] == "kernel":  # conv (out, in, kh, kw) -> (kh, kw, in, out); fc (out, in) -> (in, out)
        return (2, 3, 1, 0) if ndim == 4 else (1, 0)
    return tuple(range(ndim))


def expected_variables() -> dict:
    """Shapes of the flax variables (params and batch_stats), without computing anything."""
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0), x)


def convert_state_dict(state_dict: dict, source: str = "the state dict") -> dict:
    """A pytorch-fid / torch-fidelity state dict -> flax variables of :class:`FIDInceptionV3`.

    Raises ValueError naming every missing, unexpected or wrongly shaped key.
    """
    # BatchNorm's step counter is bookkeeping, not a weight; some exports carry it.
    given = {k: v for k, v in state_dict.items() if not k.endswith(".num_batches_tracked")}
    flat = traverse_util.flatten_dict(expected_variables())
    wanted = {_torch_key(path): path for path in flat}
    torch_shapes = {k: tuple(flat[p].shape[i] for i in np.argsort(_torch_to_flax_axes(p, flat[p].ndim)))
                    for k, p in wanted.items()}
    missing = sorted(set(wanted) - set(given))
    extra = sorted(set(given) - set(wanted))
    bad_shapes = [f"{k}: {np.shape(given[k])} (expected {shape})" for k, shape in
                  sorted(torch_shapes.items()) if k in given and np.shape(given[k]) != shape]
    if missing or extra or bad_shapes:
        def some(keys):
            return f"{keys[:10]}{' ...' if len(keys) > 10 else ''} ({len(keys)})"
        raise ValueError(
            f"{source} is not the FID InceptionV3 (pt_inception-2015-12-05) state dict: missing "
            f"keys {some(missing)}, unexpected keys {some(extra)}, wrong shapes {some(bad_shapes)}. "
            f"Expected torch-fidelity's {os.path.basename(WEIGHTS_URL)} ({WEIGHTS_URL}) or a "
            f"file with the same key names.")
    out = {p: np.ascontiguousarray(np.asarray(given[k], np.float32).transpose(
        _torch_to_flax_axes(p, flat[p].ndim))) for k, p in wanted.items()}
    return traverse_util.unflatten_dict(out)


def read_state_dict(path) -> dict[str, np.ndarray]:
    """A ``.pth`` (torch, weights only) or an ``.npz`` with ``state_dict/<name>`` keys."""
    path = epath.Path(path)  # a local file or gs://...
    if not path.is_file():
        raise FileNotFoundError(f"InceptionV3 weights file {path} does not exist.")
    if path.suffix == ".npz":
        with path.open("rb") as f, np.load(f) as data:
            return {k[len("state_dict/"):]: data[k] for k in data.files if k.startswith("state_dict/")}
    from mage_jax.convert.torch_tokenizer import load_torch_state_dict  # lazy: torch is optional
    return load_torch_state_dict(path)


def load_inception(path) -> dict:
    """Flax variables of :class:`FIDInceptionV3` from a weights file."""
    return convert_state_dict(read_state_dict(path), source=str(path))


# --------------------------------------------------------------------------- the file

def sha256_prefix_from_name(filename: str) -> str:
    """torch hub's convention: ``name-<hex>.ext`` names the start of the file's SHA-256."""
    match = re.fullmatch(r".*-([0-9a-f]+)\.[^-]*", os.path.basename(filename))
    if not match:
        raise ValueError(f"{filename} carries no '-<sha256 prefix>.' in its name.")
    return match.group(1)


def check_sha256_prefix(path, prefix: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise ValueError(f"{path} has SHA-256 {digest.hexdigest()}, which does not start with "
                         f"{prefix}: the file is corrupt or not the expected weights.")


def inception_weights_path(path: str | None = None, allow_download: bool = False,
                           cache_dir=None, setting: str = "--inception_weights",
                           download_setting: str = "--download_inception") -> epath.Path:
    """The weights file to use: ``path`` if given, else the cached copy, else a download.

    ``setting`` and ``download_setting`` name how the caller's user sets ``path`` and
    ``allow_download`` (flags or config keys), so the error on a machine without the file
    says exactly what to do.
    """
    if path:
        if not epath.Path(path).is_file():
            raise FileNotFoundError(f"{setting}={path} does not exist.")
        return epath.Path(path)
    cached = epath.Path(cache_dir or paths.cache_dir()) / os.path.basename(WEIGHTS_URL)
    if cached.is_file():
        return cached
    if not allow_download:
        raise FileNotFoundError(
            f"no FID InceptionV3 weights: download {WEIGHTS_URL} (torch-fidelity's copy of "
            f"pt_inception-2015-12-05) and set {setting}=PATH, or put it at {cached}, or "
            f"set {download_setting} to download it there.")
    cached.parent.mkdir(parents=True, exist_ok=True)
    # Download beside the target and rename once verified: a cached file is always whole.
    with tempfile.NamedTemporaryFile(dir=cached.parent, delete=False) as tmp:
        with urllib.request.urlopen(WEIGHTS_URL) as response:
            shutil.copyfileobj(response, tmp)
    try:
        check_sha256_prefix(tmp.name, sha256_prefix_from_name(WEIGHTS_URL))
    except ValueError:
        os.unlink(tmp.name)
        raise
    os.replace(tmp.name, cached)
    return cached
