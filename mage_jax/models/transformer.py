"""The pre-norm ViT block shared by MAGE's encoder and decoder, and a stack of them.

The block is the timm ``Block`` that the official MAGE code builds (``models_mage.py``):
``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``, with a fused qkv projection that has
a bias, scale ``head_dim ** -0.5``, exact (erf) GELU and dropout after the attention
softmax, after the output projection and after each MLP layer.

Parameter names follow the PyTorch ones (``norm1``, ``attn/qkv``, ``attn/proj``,
``norm2``, ``mlp/fc1``, ``mlp/fc2``) so that ``convert/torch_mage.py`` reads as a
table. The qkv kernel is stored as ``(embed, 3, heads, head_dim)`` rather than
``(embed, 3 * embed)``: the heads axis is then a real tensor axis that the ``tensor``
mesh axis can split without reshapes (Megatron-style), and ``embed`` is split by FSDP.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mage_jax import sharding
from mage_jax.models import dense_grad
from mage_jax.models.dropout import Dropout
from mage_jax.models.gelu import gelu
from mage_jax.models.layer_norm import layer_norm

Dtype = Any

_ACT = ("batch", "length", "embed")


class Linear(nn.Module):
    """A dense layer over the trailing ``num_in`` axes with a multi-axis output.

    Like ``nn.DenseGeneral``, but its kernel initialiser sees the full kernel shape:
    DenseGeneral initialises a flattened 2-D kernel and reshapes it, which breaks a
    logically-partitioned initialiser whose names have the final rank.
    """
    features: tuple
    names_in: tuple
    names_out: tuple
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n_in = len(self.names_in)
        in_shape = x.shape[x.ndim - n_in:]
        # torch's xavier_uniform_ on the (out, in) matrix: fans are the flattened sizes
        # (e.g. fan_out = 3 * embed for qkv), whatever the number of kernel axes.
        kernel_init = nn.initializers.variance_scaling(
            1.0, "fan_avg", "uniform", in_axis=tuple(range(n_in)),
            out_axis=tuple(range(n_in, n_in + len(self.features))))
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(kernel_init, self.names_in + self.names_out),
            tuple(in_shape) + tuple(self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.names_out),
                          tuple(self.features), self.param_dtype)
        return dense_grad.dense(x.astype(self.dtype), kernel.astype(self.dtype),
                                bias.astype(self.dtype), n_in)


def dense(features, names_in: tuple, names_out: tuple, dtype: Dtype, param_dtype: Dtype,
          name: str) -> Linear:
    """A ``Linear`` with xavier-uniform kernel and zero bias (the official init), named axes."""
    features = features if isinstance(features, tuple) else (features,)
    return Linear(features, names_in, names_out, dtype, param_dtype, name=name)


class Attention(nn.Module):
    """Multi-head self-attention; logits and softmax always in float32.

    The official code disables autocast around ``q @ k^T`` and the softmax, so under
    bf16 compute we do the same: only the projections and ``attn @ v`` run in ``dtype``.

    ``fused``: ``jax.nn.dot_product_attention`` instead (cuDNN's flash attention on
    NVIDIA GPUs, XLA's elsewhere), for speed on accelerators. It has no attention
    dropout, so training with it needs ``attention_dropout_rate`` 0 (the paper's
    pretraining uses 0.1), and its softmax runs in ``dtype`` with float32 accumulation.
    """
    num_heads: int
    attention_dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    fused: bool = False
    packed_dropout: bool = False  # mage_jax/models/dropout.py

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(
                f"Attention width {width} is not divisible by num_heads={self.num_heads}; "
                f"pick num_heads dividing the embedding width.")
        head_dim = width // self.num_heads
        qkv = dense((3, self.num_heads, head_dim), ("embed",), ("qkv", "heads", "kv"),
                    self.dtype, self.param_dtype, "qkv")(x)
        qkv = sharding.constrain(qkv, ("batch", "length", "qkv", "heads", "kv"))
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if self.fused:
            if self.attention_dropout_rate and not deterministic:
                raise ValueError(
                    f"fused attention has no attention dropout, but the rate is "
                    f"{self.attention_dropout_rate}: set --config.model.dropout_rate=0 or "
                    f"--config.model.fused_attention=False.")
            out = jax.nn.dot_product_attention(q.astype(self.dtype), k.astype(self.dtype),
                                               v.astype(self.dtype))
            out = sharding.constrain(out, ("batch", "length", "heads", "kv"))
            return dense(width, ("heads", "kv"), ("embed",), self.dtype, self.param_dtype,
                         "proj")(out)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
        weights = jax.nn.softmax(logits * head_dim ** -0.5, axis=-1)
        weights = Dropout(self.attention_dropout_rate, self.packed_dropout)(weights, deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), v.astype(self.dtype))
        out = sharding.constrain(out, ("batch", "length", "heads", "kv"))
        return dense(width, ("heads", "kv"), ("embed",), self.dtype, self.param_dtype, "proj")(out)


class Mlp(nn.Module):
    """fc1 -> exact GELU (torch ``nn.GELU`` is the erf form, not tanh) -> fc2."""
    hidden_dim: int
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    packed_dropout: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        width = x.shape[-1]
        h = dense(self.hidden_dim, ("embed",), ("mlp",), self.dtype, self.param_dtype, "fc1")(x)
        h = sharding.constrain(gelu(h), ("batch", "length", "mlp"))
        h = Dropout(self.dropout_rate, self.packed_dropout)(h, deterministic)
        h = dense(width, ("mlp",), ("embed",), self.dtype, self.param_dtype, "fc2")(h)
        return Dropout(self.dropout_rate, self.packed_dropout)(h, deterministic)


def drop_path(x: jax.Array, rate: float, module: nn.Module, deterministic: bool) -> jax.Array:
    """Stochastic depth (timm ``DropPath``): a whole residual branch is dropped for an
    example with probability ``rate``, and kept branches are scaled by ``1 / (1 - rate)``."""
    if deterministic or rate == 0.0:
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(module.make_rng("dropout"), keep, shape)
    return x * mask.astype(x.dtype) / keep


class Block(nn.Module):
    """One pre-norm ViT block (timm ``Block`` with qkv bias; drop-path for fine-tuning)."""
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-6
    explicit_layer_norm_grad: bool = False  # mage_jax/models/layer_norm.py
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    drop_path_rate: float = 0.0
    fused_attention: bool = False
    packed_dropout: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        x = sharding.constrain(x, _ACT)
        y = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm1",
                       self.explicit_layer_norm_grad)(x)
        y = Attention(self.num_heads, self.attention_dropout_rate, self.dtype, self.param_dtype,
                      self.fused_attention, self.packed_dropout, name="attn")(y, deterministic)
        y = Dropout(self.dropout_rate, self.packed_dropout)(y, deterministic)  # timm proj_drop
        x = x + drop_path(y, self.drop_path_rate, self, deterministic)
        y = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm2",
                       self.explicit_layer_norm_grad)(x)
        y = Mlp(self.mlp_dim, self.dropout_rate, self.dtype, self.param_dtype,
                self.packed_dropout, name="mlp")(
            y, deterministic)
        return sharding.constrain(x + drop_path(y, self.drop_path_rate, self, deterministic), _ACT)


class _ScanBlock(Block):
    """``Block`` with the ``(carry, x) -> (carry, y)`` signature that ``nn.scan`` wants."""

    def __call__(self, x: jax.Array, deterministic: bool):  # type: ignore[override]
        return super().__call__(x, deterministic), None


class Transformer(nn.Module):
    """``depth`` blocks: plain (``block_0`` ...), rematerialised, and/or scanned.

    ``scan_layers`` compiles one block and loops it (compile time independent of depth);
    its parameters are stacked on a leading layer axis under ``layers``, which carries
    no logical name (never sharded). ``remat`` recomputes each block's activations in
    the backward pass to save memory. All four combinations compute the same function.
    """
    depth: int
    num_heads: int
    mlp_dim: int
    dropout_rate: float = 0.1
    attention_dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-6
    explicit_layer_norm_grad: bool = False
    remat: bool = False
    scan_layers: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # Stochastic depth rising linearly from 0 at the first block to this at the last
    # (timm's rule); fine-tuning only. Scanned blocks share one rate, so it needs plain ones.
    drop_path_rate: float = 0.0
    fused_attention: bool = False  # jax.nn.dot_product_attention (see Attention)
    packed_dropout: bool = False  # dropout.py: four masks per hash (XLA:CPU)

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if self.drop_path_rate and self.scan_layers:
            raise ValueError(f"drop_path_rate={self.drop_path_rate} needs scan_layers=False: "
                             f"each block has its own rate.")
        block_cls = _ScanBlock if self.scan_layers else Block
        if self.remat:
            # argnum 2 is `deterministic` (self counts as 0): a Python bool, so static.
            block_cls = nn.remat(block_cls, static_argnums=(2,), prevent_cse=not self.scan_layers)
        elif self.scan_layers:
            # A scanned block keeps, stacked over the layers, every residual its backward
            # pass names: f32 and bf16 copies of the attention probabilities, the MLP's
            # activations before and after GELU, each dropout mask. Unrolled, XLA
            # recomputes such cheap elementwise values instead; across a loop it cannot
            # (ViT-L, 64 images per v5p chip: 66 GiB of temporaries scanned against 26
            # unrolled, mage_jax/plan). Keeping only the outputs of the weight matmuls and
            # recomputing the rest gives the scanned block the unrolled one's footprint.
            block_cls = nn.remat(block_cls, static_argnums=(2,), prevent_cse=False,
                                 policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
        kwargs = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                      dropout_rate=self.dropout_rate,
                      attention_dropout_rate=self.attention_dropout_rate,
                      layer_norm_eps=self.layer_norm_eps,
                      explicit_layer_norm_grad=self.explicit_layer_norm_grad, dtype=self.dtype,
                      param_dtype=self.param_dtype, fused_attention=self.fused_attention,
                      packed_dropout=self.packed_dropout)
        if self.scan_layers:
            scanned = nn.scan(
                block_cls, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,), length=self.depth,
                metadata_params={nn.PARTITION_NAME: None})
            x, _ = scanned(**kwargs, name="layers")(x, deterministic)
            return x
        for i in range(self.depth):
            rate = self.drop_path_rate * i / max(self.depth - 1, 1)
            x = block_cls(**kwargs, drop_path_rate=rate, name=f"block_{i}")(x, deterministic)
        return x
