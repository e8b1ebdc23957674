"""A frozen ImageNet ResNet-50 as the tokenizer's perceptual loss (MaskGIT, MAGVIT, MaskBit).

Two losses on torchvision's ``resnet50`` (IMAGENET1K_V1 weights, ``resnet50-0676ba61.pth``),
both applied to images resized to 224x224 (bilinear, antialiased, half-pixel centres) and
normalised with ImageNet's mean and std from [0, 1] pixels:

    features:  mean_{b,h,w,c} (F(x) - F(y))^2   F: the last stage's output, (B, 7, 7, 2048)
    logits:    mean_{b,k}     (f(x) - f(y))^2   f: the 1000 logits

MaskGIT's tokenizer trainer is not public. Its config (``maskgit/configs/vqgan_config.py``)
sets ``pretrained_image_model=True``, ``perceptual_loss_weight=0.1`` and
``perceptual_loss_on_logit=False``; in the sibling MAGVIT code (google-research/magvit,
``videogvt/train_lib``), that flag chooses between the squared error of a ResNet-50's last
feature map (False) and of its logits (True), at 224 px. MAGVIT's configs set True, and so
does MaskBit's VQGAN+ (markweberdev/maskbit ``modeling/modules/perceptual_loss.py``, which
also gives the torchvision preprocessing used here). The ResNet-50 weights of MaskGIT and
MAGVIT were not released; torchvision's stand in for them.

The network is torchvision's v1.5 layout, NHWC: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool
(padding 1), bottleneck stages of [3, 4, 6, 3] blocks with the stride on the 3x3 conv and a
1x1 conv + BN shortcut on each stage's first block, global average pool, fc 2048 -> 1000.
BatchNorm is in inference mode with the stored running statistics (eps 1e-5). The params
are a plain dict (:func:`load_resnet50_params`) and the losses stop gradients into them, so
the trainer may pass them as a constant.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mage_jax import weights_file

Dtype = Any

RESNET50_BLOCKS = (3, 4, 6, 3)
RESNET50_WIDTHS = (64, 128, 256, 512)  # bottleneck widths; a block outputs 4x as many
EXPANSION = 4
STEM_CHANNELS = 64
NUM_CLASSES = 1000
BN_EPS = 1e-5  # torch.nn.BatchNorm2d's default
INPUT_SIZE = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
TORCHVISION_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"

_BN_KEYS = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}


class FrozenBatchNorm(nn.Module):
    """BatchNorm with its running statistics, all four held as params (nothing is updated)."""
    eps: float = BN_EPS
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        mean = self.param("mean", nn.initializers.zeros, (c,), jnp.float32)
        var = self.param("var", nn.initializers.ones, (c,), jnp.float32)
        mul = scale * jax.lax.rsqrt(var + self.eps)
        return x * mul.astype(self.dtype) + (bias - mean * mul).astype(self.dtype)


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype) -> nn.Conv:
    pad = (kernel - 1) // 2  # torchvision's paddings: 3 for 7x7, 1 for 3x3, 0 for 1x1
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype, name=name)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (v1.5: the stride is on the 3x3 conv)."""
    width: int
    stride: int = 1
    downsample: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        bn = functools.partial(FrozenBatchNorm, dtype=self.dtype)
        y = nn.relu(bn(name="bn1")(_conv(self.width, 1, 1, "conv1", self.dtype)(x)))
        y = nn.relu(bn(name="bn2")(_conv(self.width, 3, self.stride, "conv2", self.dtype)(y)))
        y = bn(name="bn3")(_conv(self.width * EXPANSION, 1, 1, "conv3", self.dtype)(y))
        if self.downsample:
            x = bn(name="downsample_1")(
                _conv(self.width * EXPANSION, 1, self.stride, "downsample_0", self.dtype)(x))
        return nn.relu(y + x)


class ResNet50(nn.Module):
    """(last feature map (B, H/32, W/32, 2048), logits (B, num_classes)), both float32, for
    normalised NHWC images."""
    num_classes: int = NUM_CLASSES
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = x.astype(self.dtype)
        x = _conv(STEM_CHANNELS, 7, 2, "conv1", self.dtype)(x)
        x = nn.relu(FrozenBatchNorm(dtype=self.dtype, name="bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))  # pads with -inf
        for s, (blocks, width) in enumerate(zip(RESNET50_BLOCKS, RESNET50_WIDTHS)):
            for i in range(blocks):
                x = Bottleneck(width, stride=2 if (s > 0 and i == 0) else 1, downsample=i == 0,
                               dtype=self.dtype, name=f"layer{s + 1}_{i}")(x)
        features = x.astype(jnp.float32)
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(
            jnp.mean(features, axis=(1, 2)))
        return features, logits


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """NHWC images in [0, 1] -> size x size (bilinear, antialiased), ImageNet-normalised."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"the ResNet-50 perceptual loss expects NHWC RGB images (B, H, W, 3) "
                         f"in [0, 1]; got shape {images.shape}.")
    images = images.astype(jnp.float32)
    if images.shape[1:3] != (size, size):
        images = jax.image.resize(images, (images.shape[0], size, size, 3),
                                  method="bilinear", antialias=True)
    return (images - IMAGENET_MEAN) / IMAGENET_STD


def resnet50_outputs(params, images: jax.Array,
                     dtype: Dtype = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """(last feature map, logits) of already preprocessed (normalised) NHWC images."""
    params = nn.unbox(params)
    params = params.get("params", params)
    return ResNet50(num_classes=params["fc"]["bias"].shape[0], dtype=dtype).apply(
        {"params": params}, images)


def resnet50_logits(params, images: jax.Array, dtype: Dtype = jnp.float32) -> jax.Array:
    """Logits (B, 1000) of already preprocessed (normalised) NHWC images."""
    return resnet50_outputs(params, images, dtype)[1]


def _squared_error(params, x, y, output: int, dtype) -> jax.Array:
    if x.shape != y.shape:
        raise ValueError(f"the perceptual loss compares images of equal shape; got {x.shape} "
                         f"and {y.shape}.")
    params = jax.lax.stop_gradient(nn.unbox(params))  # the network is frozen
    b = x.shape[0]
    out = resnet50_outputs(params, preprocess(jnp.concatenate([x, y], axis=0)), dtype)[output]
    return jnp.mean(jnp.square(out[:b] - out[b:]))


def logits_perceptual_loss(params, x: jax.Array, y: jax.Array,
                           dtype: Dtype = jnp.float32) -> jax.Array:
    """Mean over the batch and the logits of (f(x) - f(y))^2 for NHWC images in [0, 1].

    ``x`` is the reconstruction, ``y`` the input; both are resized to 224x224 and
    normalised (:func:`preprocess`). ``dtype`` is the network's compute dtype.
    """
    return _squared_error(params, x, y, 1, dtype)


def features_perceptual_loss(params, x: jax.Array, y: jax.Array,
                             dtype: Dtype = jnp.float32) -> jax.Array:
    """Mean over the batch and the last feature map (7x7x2048 at 224 px) of (F(x) - F(y))^2,
    for NHWC images in [0, 1], preprocessed as in :func:`logits_perceptual_loss`."""
    return _squared_error(params, x, y, 0, dtype)


# ------------------------------------------------------------------------------------------
# Loading torchvision's weights.
# ------------------------------------------------------------------------------------------

def resnet50_state_shapes(num_classes: int = NUM_CLASSES) -> dict[str, tuple[int, ...]]:
    """torchvision ``resnet50().state_dict()`` key -> shape (``num_batches_tracked`` left out)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix, c):
        for k in _BN_KEYS:
            shapes[f"{prefix}.{k}"] = (c,)

    shapes["conv1.weight"] = (STEM_CHANNELS, 3, 7, 7)
    bn("bn1", STEM_CHANNELS)
    c_in = STEM_CHANNELS
    for s, (blocks, width) in enumerate(zip(RESNET50_BLOCKS, RESNET50_WIDTHS)):
        for i in range(blocks):
            p = f"layer{s + 1}.{i}"
            shapes[f"{p}.conv1.weight"] = (width, c_in, 1, 1)
            bn(f"{p}.bn1", width)
            shapes[f"{p}.conv2.weight"] = (width, width, 3, 3)
            bn(f"{p}.bn2", width)
            shapes[f"{p}.conv3.weight"] = (width * EXPANSION, width, 1, 1)
            bn(f"{p}.bn3", width * EXPANSION)
            if i == 0:
                shapes[f"{p}.downsample.0.weight"] = (width * EXPANSION, c_in, 1, 1)
                bn(f"{p}.downsample.1", width * EXPANSION)
            c_in = width * EXPANSION
    shapes["fc.weight"] = (num_classes, c_in)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def _module_path(key: str) -> tuple[tuple[str, ...], str]:
    """torch key -> (flax module path, flax param name)."""
    parts = key.split(".")
    leaf = parts[-1]
    mods = parts[:-1]
    if mods[0].startswith("layer"):  # layer1.0.downsample.1 -> layer1_0 / downsample_1
        mods = [f"{mods[0]}_{mods[1]}"] + (["_".join(mods[2:])] if len(mods) > 2 else [])
    if mods[-1] == "fc":
        return tuple(mods), {"weight": "kernel", "bias": "bias"}[leaf]
    if leaf == "weight" and (mods[-1].startswith("conv") or mods[-1] == "downsample_0"):
        return tuple(mods), "kernel"
    return tuple(mods), _BN_KEYS[leaf]


def load_resnet50_params(path, *more_paths) -> dict:
    """Plain ResNet-50 params from torchvision's state dict (``.pth``) or an ``.npz`` of it
    (several files are merged in order).

    Keys are torchvision's (``conv1.weight``, ``layer3.5.bn2.running_var``, ``fc.bias``,
    ...); ``num_batches_tracked`` entries are ignored. Raises ValueError naming every
    missing, unexpected or misshapen key.
    """
    state: dict[str, np.ndarray] = {}
    for p in (path, *more_paths):
        state.update(weights_file.read(p, f"ResNet-50 weights (torchvision's {TORCHVISION_URL})"))
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    where = ", ".join(str(p) for p in (path, *more_paths))
    expected = resnet50_state_shapes()
    missing = [k for k in expected if k not in state]
    extra = sorted(k for k in state if k not in expected)
    misshapen = [f"{k} {tuple(state[k].shape)} (expected {expected[k]})"
                 for k in expected if k in state and tuple(state[k].shape) != expected[k]]
    if missing or extra or misshapen:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {missing}")
        if extra:
            problems.append(f"{len(extra)} unexpected key(s): {extra}")
        if misshapen:
            problems.append(f"{len(misshapen)} misshapen key(s): {misshapen}")
        raise ValueError(
            f"{where} is not a torchvision ResNet-50 state dict: {'; '.join(problems)}. Use "
            f"torchvision's ImageNet weights ({TORCHVISION_URL}) or an .npz with the same keys.")

    params: dict[str, Any] = {}
    for key in expected:
        mods, name = _module_path(key)
        value = np.asarray(state[key], np.float32)
        if name == "kernel":
            value = value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        node = params
        for m in mods:
            node = node.setdefault(m, {})
        node[name] = np.ascontiguousarray(value)
    return params
