"""MAGE: the ViT encoder-decoder over tokenizer tokens, its MLM head, and its loss.

One pretraining forward pass (``MAGE.__call__``), as the official ``models_mage.py``:

1. ``token_emb``: the unmasked target tokens get ``[MASK]`` at masked positions and
   ``[C0]`` (a fake class token) prepended; word + learned position embeddings,
   LayerNorm, dropout.
2. ``encoder``: only the *kept* (not dropped) positions, in positional order with
   ``[C0]`` first, go through the ViT blocks and the final ``norm``. Their count is
   static (``L + 1 - num_dropped``) so the step compiles once.
3. ``decoder``: ``decoder_embed`` the encoder output, put it back at its positions and
   fill every masked position (dropped or not) with the ``[C0]`` output
   ("pad_with_cls_token"), add learned position embeddings, ViT blocks, ``decoder_norm``.
4. ``mlm_head``: Dense -> GELU -> LayerNorm, then logits against the (gradient-stopped)
   word embedding table plus a bias. The loss and the sampler read only the logits of the
   L image positions over the codebook; ``image_logits=True`` computes only those.

Departures of the official code from the paper that we follow (the released weights
depend on them): the vocabulary is ``codebook + 1000 class ids + [MASK]`` (a leftover of
class-conditional experiments), ``[C0]`` is id ``codebook_size + 76`` (1100 for the
1024-entry codebook), and masked decoder inputs are the ``[C0]`` output, not a learned
mask token.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mage_jax import sharding
from mage_jax.models import arg_extremes
from mage_jax.models.dropout import Dropout
from mage_jax.models.gelu import gelu
from mage_jax.models.layer_norm import layer_norm
from mage_jax.models.transformer import Transformer, dense

Dtype = Any

# Legacy vocabulary layout of the official code (see module docstring).
NUM_LEGACY_CLASS_IDS = 1000
FAKE_CLASS_OFFSET = 1100 - 1024  # official: fake_class_label = codebook_size + 1100 - 1024


_ACT = ("batch", "length", "embed")


def _normal(std: float, names: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


class TokenEmbedding(nn.Module):
    """BERT-style embedding: word + learned position, LayerNorm(eps 1e-6), dropout.

    The official table has 257 position rows whatever the grid; only the first L+1
    are ever read, so ours has exactly ``num_positions`` rows (the converter slices).
    """
    vocab_size: int
    num_positions: int
    embed_dim: int
    dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-6
    explicit_layer_norm_grad: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    packed_dropout: bool = False  # mage_jax/models/dropout.py

    def setup(self):
        self.word_embeddings = self.param(
            "word_embeddings", _normal(0.02, ("vocab", "embed")),
            (self.vocab_size, self.embed_dim), self.param_dtype)
        self.position_embeddings = self.param(
            "position_embeddings", _normal(0.02, ("length", "embed")),
            (self.num_positions, self.embed_dim), self.param_dtype)
        self.norm = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm",
                               self.explicit_layer_norm_grad)
        self.dropout = Dropout(self.dropout_rate, self.packed_dropout)

    def __call__(self, ids: jax.Array, deterministic: bool) -> jax.Array:
        if ids.shape[1] != self.num_positions:
            raise ValueError(f"token sequence of length {ids.shape[1]} (with [C0]) but the "
                             f"model has {self.num_positions} positions; check num_tokens.")
        # Gather the FSDP-sharded table before the lookup (as FSDP does for any weight):
        # a lookup into an embed-sharded table yields embed-sharded rows that XLA can only
        # reshard to batch-sharded activations by replicating them.
        table = sharding.constrain(self.word_embeddings, ("vocab", None))
        x = jnp.take(table, ids, axis=0) + self.position_embeddings[None]
        x = self.norm(sharding.constrain(x.astype(self.dtype), _ACT))
        return self.dropout(x, deterministic)


class MlmHead(nn.Module):
    """Dense(D) -> exact GELU -> LayerNorm(eps 1e-5, torch default) -> tied logits + bias."""
    embed_dim: int
    vocab_size: int
    layer_norm_eps: float = 1e-5
    explicit_layer_norm_grad: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, word_embeddings: jax.Array,
                 num_logits: int | None = None) -> jax.Array:
        """Logits against the first ``num_logits`` vocabulary entries (None: all)."""
        h = dense(self.embed_dim, ("embed",), ("mlp",), self.dtype, self.param_dtype, "fc")(x)
        h = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm",
                       self.explicit_layer_norm_grad)(gelu(h))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                          (self.vocab_size,), self.param_dtype)
        # The official head reads `word_embeddings.weight.data.detach()`: the table gets
        # gradient only through the input embedding, never through the logits.
        table = jax.lax.stop_gradient(word_embeddings)[:num_logits]
        logits = jnp.einsum("bld,vd->blv", h.astype(self.dtype), table.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        logits = logits + bias[:num_logits].astype(jnp.float32)
        return sharding.constrain(logits, ("batch", "length", "vocab"))


class MAGE(nn.Module):
    """The MAGE encoder-decoder. See the module docstring for the data flow."""
    codebook_size: int
    num_tokens: int
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 768
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    dropout_rate: float = 0.1
    layer_norm_eps: float = 1e-6
    mlm_layer_norm_eps: float = 1e-5
    drop_ratio: float = 0.5  # fraction of the L image tokens dropped from the encoder input
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    # The hand-written LayerNorm backward (mage_jax/models/layer_norm.py): faster on XLA:CPU.
    explicit_layer_norm_grad: bool = False
    # jax.nn.dot_product_attention (cuDNN on GPUs); needs dropout_rate 0 to train (transformer.py).
    fused_attention: bool = False
    # Dropout masks four per threefry hash (mage_jax/models/dropout.py): faster on XLA:CPU.
    packed_dropout: bool = False

    # ---- special ids of the legacy vocabulary ----
    @property
    def vocab_size(self) -> int:
        return self.codebook_size + NUM_LEGACY_CLASS_IDS + 1

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    @property
    def fake_class_id(self) -> int:
        """[C0]. Follows the official code (codebook_size + 76), not a fresh id as in the paper."""
        return self.codebook_size + FAKE_CLASS_OFFSET

    @property
    def num_dropped(self) -> int:
        return int(math.ceil(self.num_tokens * self.drop_ratio))

    def setup(self):
        def stack(depth, heads, width, name):
            return Transformer(
                depth=depth, num_heads=heads, mlp_dim=int(width * self.mlp_ratio),
                dropout_rate=self.dropout_rate, attention_dropout_rate=self.dropout_rate,
                layer_norm_eps=self.layer_norm_eps,
                explicit_layer_norm_grad=self.explicit_layer_norm_grad, remat=self.remat,
                scan_layers=self.scan_layers, dtype=self.dtype, param_dtype=self.param_dtype,
                fused_attention=self.fused_attention,
                packed_dropout=self.packed_dropout, name=name)

        n = self.num_tokens + 1
        explicit = self.explicit_layer_norm_grad
        self.token_emb = TokenEmbedding(self.vocab_size, n, self.embed_dim, self.dropout_rate,
                                        self.layer_norm_eps, explicit, self.dtype,
                                        self.param_dtype, self.packed_dropout)
        self.encoder = stack(self.depth, self.num_heads, self.embed_dim, "encoder")
        self.norm = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, "norm",
                               explicit)
        self.decoder_embed = dense(self.decoder_embed_dim, ("embed",), ("mlp",), self.dtype,
                                   self.param_dtype, "decoder_embed")
        self.decoder_pos_embed = self.param(
            "decoder_pos_embed", _normal(0.02, ("length", "embed")),
            (n, self.decoder_embed_dim), self.param_dtype)
        self.decoder = stack(self.decoder_depth, self.decoder_num_heads, self.decoder_embed_dim,
                             "decoder")
        self.decoder_norm = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype,
                                       "decoder_norm", explicit)
        self.mlm_head = MlmHead(self.embed_dim, self.vocab_size, self.mlm_layer_norm_eps,
                                explicit, self.dtype, self.param_dtype)

    # ---- pieces ----
    @property
    def num_class_ids(self) -> int:
        """Class ids a class-conditional MAGE can use: the legacy slots minus [C0]'s."""
        return NUM_LEGACY_CLASS_IDS - 1

    def class_token_id(self, labels: jax.Array) -> jax.Array:
        """Vocabulary id of class ``labels`` (0 .. num_class_ids-1) for position 0.

        Class-conditional MAGE is our design, not the paper's: it reuses the legacy class
        slots ``codebook_size + label``, skipping the slot that [C0] occupies (label 76 of
        the official layout), so 999 classes fit.
        """
        labels = jnp.asarray(labels, jnp.int32)
        return self.codebook_size + labels + (labels >= FAKE_CLASS_OFFSET).astype(jnp.int32)

    def _with_c0(self, token_ids: jax.Array, first: jax.Array | None = None) -> jax.Array:
        """Position 0 in front: [C0], or ``first (B,)`` ids (class tokens) where given."""
        if first is None:
            first = jnp.full((token_ids.shape[0],), self.fake_class_id, token_ids.dtype)
        return jnp.concatenate([first[:, None].astype(token_ids.dtype), token_ids], axis=1)

    def _decode(self, latent, keep_rank, pad_mask, deterministic, image_logits):
        """Decoder + MLM head. ``keep_rank[b, p]``: index in ``latent`` of position p if kept;
        ``pad_mask``: positions (dropped or masked) that get the [C0] output instead;
        ``image_logits``: the head on positions 1..L against the codebook only."""
        x = sharding.constrain(self.decoder_embed(latent), _ACT)
        c0 = x[:, :1]
        # Every dropped or masked position gets the [C0] output (official
        # pad_with_cls_token=True); kept unmasked positions get their own output.
        # A gather by rank (not a scatter) keeps this friendly to batch sharding.
        x = jnp.take_along_axis(x, keep_rank[..., None], axis=1)
        x = jnp.where(pad_mask[..., None], c0, x)
        x = x + self.decoder_pos_embed[None].astype(self.dtype)
        x = self.decoder_norm(self.decoder(x, deterministic))
        if image_logits:
            # The official head computes every position against the whole vocabulary and
            # its loss keeps positions 1..L and the codebook's entries: half of the logits
            # for the paper's codebook (1024 of 2025), a fifth for the demo's (256 of
            # 1257). XLA does not prune the rest, in the forward nor in the backward.
            # Position 0 goes through the head and is sliced off after: slicing the
            # decoder output instead cost a relayout on TPU (plans: +0.4% HBM traffic).
            return self.mlm_head(x, self.token_emb.word_embeddings, self.codebook_size)[:, 1:]
        return self.mlm_head(x, self.token_emb.word_embeddings)

    # ---- entry points ----
    def __call__(self, token_ids: jax.Array, token_drop_mask: jax.Array,
                 token_all_mask: jax.Array, train: bool = False,
                 num_dropped: int | None = None,
                 first_token: jax.Array | None = None,
                 image_logits: bool = False) -> dict[str, jax.Array]:
        """Pretraining forward pass on the unmasked target tokens ``(B, L)``.

        ``token_drop_mask`` / ``token_all_mask`` are ``(B, L+1)`` booleans (position 0 is
        [C0] and False in both); every row must drop exactly ``num_dropped`` positions
        (default ``ceil(L * drop_ratio)``, a static Python int so that shapes are static).
        ``first_token (B,)``: the id at position 0 (default [C0]; a class-conditional MAGE
        passes ``class_token_id(labels)``).
        Returns ``logits (B, L+1, vocab)`` float32 (with ``image_logits``: ``(B, L,
        codebook_size)``, the part ``mage_loss`` reads, computed alone), ``encoder_output (B,
        kept, D)`` after the final norm, and ``pooled (B, D)``, its mean over the kept
        positions (for MAGE-C).
        """
        deterministic = not train
        num_dropped = self.num_dropped if num_dropped is None else int(num_dropped)
        batch, length = token_ids.shape
        for name, m in (("token_drop_mask", token_drop_mask), ("token_all_mask", token_all_mask)):
            if m.shape != (batch, length + 1):
                raise ValueError(f"{name} has shape {m.shape}; expected (batch, L+1) = "
                                 f"{(batch, length + 1)} for token_ids of shape {token_ids.shape}.")
        drop = token_drop_mask.astype(bool)
        masked = token_all_mask.astype(bool)
        _check_drop_count(drop, num_dropped)

        ids = self._with_c0(jnp.where(masked[:, 1:], self.mask_token_id, token_ids), first_token)
        x = self.token_emb(ids, deterministic)
        # Kept positions in positional order ([C0] first): a stable sort puts False first.
        num_kept = length + 1 - num_dropped
        keep_idx = jnp.argsort(drop.astype(jnp.int8), axis=1, stable=True)[:, :num_kept]
        x = sharding.constrain(jnp.take_along_axis(x, keep_idx[..., None], axis=1), _ACT)
        latent = self.norm(self.encoder(x, deterministic))

        keep_rank = jnp.clip(jnp.cumsum(~drop, axis=1) - 1, 0, num_kept - 1)
        logits = self._decode(latent, keep_rank, masked | drop, deterministic, image_logits)
        # MAGE-C pools the encoder output globally; all kept positions, [C0] included.
        pooled = jnp.mean(latent.astype(jnp.float32), axis=1)
        return dict(logits=logits, encoder_output=latent, pooled=pooled)

    def decode_step_logits(self, input_tokens: jax.Array,
                           image_logits: bool = False) -> jax.Array:
        """One iterative-decoding step (``gen_img_uncond.py``): ``(B, L+1)`` ids, [C0] first,
        [MASK] where unknown. No dropping; the decoder treats [MASK] positions as masked.
        Logits ``(B, L+1, vocab)``; with ``image_logits`` ``(B, L, codebook_size)`` only."""
        x = self.token_emb(input_tokens, True)
        latent = self.norm(self.encoder(x, True))
        keep_rank = jnp.broadcast_to(jnp.arange(input_tokens.shape[1]), input_tokens.shape)
        return self._decode(latent, keep_rank, input_tokens == self.mask_token_id, True,
                            image_logits)

    def pooled_features(self, token_ids: jax.Array) -> jax.Array:
        """Linear-probe features ``(B, D)`` from unmasked tokens ``(B, L)``: encoder blocks on
        [C0] + tokens, mean over the L image tokens, *before* any norm (the probe's
        ``global_pool`` in ``models_vit_mage.py`` applies its own fc_norm afterwards)."""
        x = self.token_emb(self._with_c0(token_ids), True)
        x = self.encoder(x, True)
        return jnp.mean(x[:, 1:].astype(jnp.float32), axis=1)


def _check_drop_count(drop: jax.Array, num_dropped: int) -> None:
    """Validates the per-row drop count when the mask is concrete (outside jit)."""
    try:
        counts = np.asarray(drop).sum(axis=1)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return  # traced: the shapes are what they are; sample_masks guarantees the count.
    if np.any(counts != num_dropped):
        raise ValueError(
            f"token_drop_mask drops {sorted(set(counts.tolist()))} positions per row but the "
            f"model expects exactly num_dropped={num_dropped} in every row; pass num_dropped= "
            f"or build the masks with mage_jax.masking.sample_masks.")


def image_token_logits(logits: jax.Array, length: int, codebook_size: int) -> jax.Array:
    """The logits of the L image positions over the codebook, ``(B, L, codebook_size)``,
    from the model's whole output ``(B, L+1, vocab)`` or from that part alone (what
    ``image_logits=True`` returns)."""
    if logits.ndim == 3 and logits.shape[1] == length + 1 and logits.shape[2] >= codebook_size:
        return logits[:, 1:, :codebook_size]
    if logits.ndim == 3 and logits.shape[1:] == (length, codebook_size):
        return logits
    raise ValueError(
        f"logits have shape {logits.shape}; expected (batch, L+1, vocab) or (batch, L, "
        f"codebook_size) = (batch, {length}, {codebook_size}) for {length} image tokens.")


def mage_loss(logits: jax.Array, target_tokens: jax.Array, token_all_mask: jax.Array,
              codebook_size: int, label_smoothing: float = 0.1, ratio_groups=None):
    """Label-smoothed cross-entropy on masked positions, as the official ``forward_loss``.

    ``logits``: the model's ``(B, L+1, vocab)`` or its ``image_logits`` ``(B, L,
    codebook_size)``. Only the first ``codebook_size`` logits of positions 1..L take part
    (so the smoothing term spreads over image tokens only, timm
    ``LabelSmoothingCrossEntropy``); the per-position loss is averaged over the masked
    positions (dropped ones included).
    ``ratio_groups`` (static ints, one per example; ``mage_jax.masking.ratio_groups``):
    each group is one official GPU, whose loss is the mean over its own masked positions,
    and the loss is the mean of the groups' losses (DDP averages the GPUs' gradients);
    groups masked at different ratios weigh alike, not by their masked counts. None: one
    group. Loss, ``nll`` and ``masked_accuracy`` are reduced alike.
    Returns ``(loss, metrics)``.
    """
    logits = image_token_logits(logits, target_tokens.shape[1], codebook_size)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, target_tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]
    smooth = -jnp.mean(logp, axis=-1)
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    weight = token_all_mask[:, 1:].astype(jnp.float32)
    correct = (arg_extremes.argmax(logp) == target_tokens).astype(jnp.float32)
    groups = np.zeros(weight.shape[0], np.int32) if ratio_groups is None else np.asarray(
        ratio_groups, np.int32)
    if groups.shape != (weight.shape[0],):
        raise ValueError(f"ratio_groups has shape {groups.shape}; expected ({weight.shape[0]},).")
    num_groups = int(groups.max()) + 1

    def group_mean(values):
        sums = jax.ops.segment_sum(jnp.sum(values * weight, axis=1), groups, num_groups)
        counts = jax.ops.segment_sum(jnp.sum(weight, axis=1), groups, num_groups)
        return jnp.mean(sums / jnp.maximum(counts, 1.0))

    loss = group_mean(per_token)
    metrics = dict(loss=loss, nll=group_mean(nll), masked_accuracy=group_mean(correct),
                   mask_fraction=jnp.sum(weight) / weight.size)
    return loss, metrics


def _get(model_cfg, name, default):
    return model_cfg.get(name, default) if hasattr(model_cfg, "get") else getattr(
        model_cfg, name, default)


def mage_from_config(config, codebook_size: int, num_tokens: int) -> MAGE:
    """Builds ``MAGE`` from ``config.model``; ``codebook_size`` and ``num_tokens`` (L, the
    squared token grid) come from the tokenizer."""
    m = config.model
    dtype = jnp.dtype(_get(m, "dtype", "float32"))
    return MAGE(
        codebook_size=int(codebook_size), num_tokens=int(num_tokens),
        embed_dim=int(m.embed_dim), depth=int(m.depth), num_heads=int(m.num_heads),
        decoder_embed_dim=int(m.decoder_embed_dim), decoder_depth=int(m.decoder_depth),
        decoder_num_heads=int(m.decoder_num_heads), mlp_ratio=float(_get(m, "mlp_ratio", 4.0)),
        dropout_rate=float(_get(m, "dropout_rate", 0.1)),
        layer_norm_eps=float(_get(m, "layer_norm_eps", 1e-6)),
        mlm_layer_norm_eps=float(_get(m, "mlm_layer_norm_eps", 1e-5)),
        drop_ratio=float(_get(m, "drop_ratio", 0.5)),
        remat=bool(_get(m, "remat", False)), scan_layers=bool(_get(m, "scan_layers", False)),
        explicit_layer_norm_grad=bool(_get(m, "explicit_layer_norm_grad", False)),
        fused_attention=bool(_get(m, "fused_attention", False)),
        packed_dropout=bool(_get(m, "packed_dropout", False)),
        dtype=dtype, param_dtype=jnp.dtype(_get(m, "param_dtype", "float32")))
