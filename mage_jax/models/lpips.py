"""LPIPS perceptual distance (Zhang et al. 2018), VGG16 variant, for the tokenizer's loss.

    d(x, y) = sum_l mean_hw( w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2 )

where f_l are VGG16 activations at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, the
normalisation is over channels, and w_l >= 0 are the learned 1x1 "lin" weights.

The network is frozen: weights come from a file (:func:`load_lpips_params`) and
:func:`perceptual_loss` stops gradients into them, so the trainer may pass them as a
constant. Key names follow the ``lpips`` package (``net.slice{1..5}.{idx}.weight`` with
torchvision's ``vgg16.features`` indices, ``lin{0..4}.model.1.weight``); torchvision's own
``features.{idx}.*`` names are accepted too, so the two released files (torchvision's VGG16
and lpips' ``weights/v0.1/vgg.pth``) can be loaded together.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mage_jax import weights_file

Dtype = Any

# The lpips package's ScalingLayer constants (v0.1), applied to inputs in [-1, 1].
LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)
VGG16_CHANNELS = (64, 128, 256, 512, 512)

# (slice, torchvision vgg16.features index) of each conv, grouped by LPIPS layer. Each
# group starts with a 2x2 max-pool (except the first) and ends at the tapped relu.
VGG16_CONVS: tuple[tuple[tuple[int, int], ...], ...] = (
    ((1, 0), (1, 2)),
    ((2, 5), (2, 7)),
    ((3, 10), (3, 12), (3, 14)),
    ((4, 17), (4, 19), (4, 21)),
    ((5, 24), (5, 26), (5, 28)),
)
_EPS = 1e-10  # lpips.normalize_tensor's epsilon


def _conv_name(slice_idx: int, feature_idx: int) -> str:
    return f"slice{slice_idx}_{feature_idx}"


def normalize_channels(f: jax.Array, eps: float = _EPS) -> jax.Array:
    """Unit-normalises NHWC features over channels (``lpips.normalize_tensor``)."""
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + eps)


def layer_distance(f0: jax.Array, f1: jax.Array, lin_kernel: jax.Array) -> jax.Array:
    """One LPIPS layer: normalise, squared difference, 1x1 lin (C -> 1), spatial mean -> (B,).

    ``lin_kernel`` is the flax kernel, shape (1, 1, C, 1) or (C,).
    """
    diff = jnp.square(normalize_channels(f0) - normalize_channels(f1))
    w = jnp.reshape(lin_kernel, (-1,)).astype(diff.dtype)
    # The lin layer is linear, so it may be applied after the spatial mean (cheaper).
    return jnp.einsum("bc,c->b", jnp.mean(diff, axis=(1, 2)), w)


class NetLin(nn.Module):
    """The learned 1x1 weights of one layer (lpips' ``NetLinLayer``, no bias, no dropout).

    LPIPS trains them clamped to be non-negative; loaded weights are used as they are.
    """
    channels: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, f0: jax.Array, f1: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(
                nn.initializers.uniform(1.0 / self.channels), ("height", "width", "conv_in", "conv_out")),
            (1, 1, self.channels, 1), self.param_dtype)
        return layer_distance(f0, f1, kernel)


class LPIPS(nn.Module):
    """LPIPS distance (B,) between NHWC images in [0, 1].

    ``channels`` are the widths of the five VGG stages (VGG16's by default; smaller values
    only make sense for tests with random weights).
    """
    channels: Sequence[int] = VGG16_CHANNELS
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        convs = {}
        for width, group in zip(self.channels, VGG16_CONVS):
            for s, idx in group:
                convs[_conv_name(s, idx)] = nn.Conv(
                    width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    param_dtype=self.param_dtype, name=_conv_name(s, idx),
                    kernel_init=nn.with_logical_partitioning(
                        nn.initializers.lecun_normal(), ("height", "width", "conv_in", "conv_out")),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))
        self.convs = convs
        self.lins = [NetLin(width, name=f"lin{i}", param_dtype=self.param_dtype)
                     for i, width in enumerate(self.channels)]

    def features(self, images: jax.Array) -> list[jax.Array]:
        """VGG16 activations at relu1_2 .. relu5_3 for NHWC images in [0, 1]."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"LPIPS expects NHWC RGB images (B, H, W, 3) in [0, 1]; got shape "
                             f"{images.shape}. Transpose NCHW inputs with x.transpose(0, 2, 3, 1).")
        if min(images.shape[1:3]) < 16:
            raise ValueError(f"LPIPS needs images of at least 16x16 (four 2x2 max-pools before "
                             f"relu5_3); got {images.shape[1]}x{images.shape[2]}. Upsample them first.")
        x = (images.astype(jnp.float32) * 2.0 - 1.0 - LPIPS_SHIFT) / LPIPS_SCALE
        x = x.astype(self.dtype)
        taps = []
        for i, group in enumerate(VGG16_CONVS):
            if i > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for s, idx in group:
                x = nn.relu(self.convs[_conv_name(s, idx)](x))
            taps.append(x.astype(jnp.float32))
        return taps

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS compares images of equal shape; got {x.shape} and {y.shape}.")
        b = x.shape[0]
        feats = self.features(jnp.concatenate([x, y], axis=0))  # one trunk pass for both
        total = jnp.zeros((b,), jnp.float32)
        for f, lin in zip(feats, self.lins):
            total = total + lin(f[:b], f[b:])
        return total


def lpips_channels(params: Mapping[str, Any]) -> tuple[int, ...]:
    """The stage widths of a (plain) LPIPS params dict, read from its lin kernels."""
    params = params.get("params", params)
    return tuple(int(params[f"lin{i}"]["kernel"].shape[-2]) for i in range(len(VGG16_CONVS)))


def lpips_distance(lpips_params, x: jax.Array, y: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """Per-sample LPIPS distance (B,); ``lpips_params`` is a plain dict (boxed is unboxed).

    ``dtype`` is the trunk's compute dtype (e.g. bfloat16); distances are float32.
    """
    params = nn.unbox(lpips_params)
    params = params.get("params", params)
    params = jax.lax.stop_gradient(params)  # the perceptual network is frozen
    return LPIPS(channels=lpips_channels(params), dtype=dtype).apply({"params": params}, x, y)


def perceptual_loss(lpips_params, x: jax.Array, y: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """Batch-mean LPIPS distance: the tokenizer's perceptual loss (weight 0.1 in MaskGIT)."""
    return jnp.mean(lpips_distance(lpips_params, x, y, dtype))


def random_lpips_params(seed: int = 0, channels: Sequence[int] = VGG16_CHANNELS) -> dict:
    """Random plain LPIPS params (tests, smoke runs): He-scaled convs, non-negative lins.

    Drawn with numpy: a frozen network never needs flax's jax.random initialisers, which
    compile one kernel per parameter shape.
    """
    rng = np.random.default_rng(seed)
    dummy = jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32)
    shapes = nn.unbox(jax.eval_shape(LPIPS(channels=tuple(channels)).init,
                                     jax.random.key(0), dummy, dummy)["params"])
    params = {}
    for name, leaves in shapes.items():
        k = leaves["kernel"].shape
        if name.startswith("lin"):
            params[name] = {"kernel": rng.uniform(0.0, 2.0 / k[2], size=k).astype(np.float32)}
        else:
            fan_in = k[0] * k[1] * k[2]
            params[name] = {"kernel": (rng.normal(size=k) * np.sqrt(2.0 / fan_in)).astype(np.float32),
                            "bias": (0.1 * rng.normal(size=k[-1])).astype(np.float32)}
    return params


# ------------------------------------------------------------------------------------------
# Loading the PyTorch weights.
# ------------------------------------------------------------------------------------------

def load_lpips_params(path, *more_paths) -> dict:
    """Plain LPIPS params from one or more weight files (merged in order).

    Accepts ``.npz`` or PyTorch ``.pth`` files keyed like an ``lpips.LPIPS(net='vgg')``
    state dict. Torchvision VGG16 keys ``features.{idx}.{weight,bias}`` are mapped to
    ``net.slice{k}.{idx}``; other keys (``scaling_layer.*``, ``classifier.*``) are ignored.
    Raises ValueError naming any missing key.
    """
    state: dict[str, np.ndarray] = {}
    for p in (path, *more_paths):
        state.update(weights_file.read(p, "LPIPS weights"))
    for key in list(state):
        if key.startswith("features."):
            _, idx, kind = key.split(".", 2)
            for group in VGG16_CONVS:
                for s, i in group:
                    if str(i) == idx:
                        state.setdefault(f"net.slice{s}.{i}.{kind}", state[key])

    wanted = [f"net.slice{s}.{i}.{kind}" for g in VGG16_CONVS for s, i in g
              for kind in ("weight", "bias")]
    wanted += [f"lin{i}.model.1.weight" for i in range(len(VGG16_CONVS))]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise ValueError(
            f"LPIPS weights in {[str(p) for p in (path, *more_paths)]} lack {len(missing)} key(s): "
            f"{missing}. Expected lpips-package names (net.slice{{1..5}}.{{idx}}.weight/bias, "
            f"lin{{0..4}}.model.1.weight); pass both the VGG16 trunk and the lin weights files.")

    params: dict[str, Any] = {}
    for group in VGG16_CONVS:
        for s, i in group:
            w = state[f"net.slice{s}.{i}.weight"]
            if w.ndim != 4 or w.shape[2:] != (3, 3):
                raise ValueError(f"net.slice{s}.{i}.weight has shape {w.shape}; expected (out, in, 3, 3).")
            params[_conv_name(s, i)] = {
                "kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0), np.float32),  # OIHW -> HWIO
                "bias": np.asarray(state[f"net.slice{s}.{i}.bias"], np.float32).reshape(-1),
            }
    for i in range(len(VGG16_CONVS)):
        w = state[f"lin{i}.model.1.weight"]
        if w.ndim != 4 or w.shape[0] != 1 or w.shape[2:] != (1, 1):
            raise ValueError(f"lin{i}.model.1.weight has shape {w.shape}; expected (1, C, 1, 1).")
        params[f"lin{i}"] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0), np.float32)}

    # Stage widths must chain: each lin matches its stage's last conv, each conv its input.
    c_in = 3
    for li, group in enumerate(VGG16_CONVS):
        for s, i in group:
            k = params[_conv_name(s, i)]["kernel"]
            if k.shape[2] != c_in:
                raise ValueError(f"net.slice{s}.{i}.weight takes {k.shape[2]} input channels but the "
                                 f"previous layer gives {c_in}: the weights file is inconsistent.")
            c_in = k.shape[3]
        if params[f"lin{li}"]["kernel"].shape[2] != c_in:
            raise ValueError(f"lin{li}.model.1.weight has {params[f'lin{li}']['kernel'].shape[2]} "
                             f"channels but VGG stage {li + 1} gives {c_in}.")
    return params
