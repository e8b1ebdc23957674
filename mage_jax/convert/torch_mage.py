"""Official PyTorch MAGE weights -> ``mage_jax.models.mage.MAGE`` parameters.

Reads the state dict of ``models_mage.MaskedGenerativeEncoderViT`` (a released
checkpoint stores it under its ``model`` key) as numpy arrays. torch ``Linear`` weights
are ``(out, in)`` and become ``(in, out)`` kernels; the fused qkv weight becomes the
``(embed, 3, heads, head_dim)`` kernel of ``transformer.Attention``.

Keys the official model carries but never reads in its forward passes are ignored:
``cls_token``, ``pos_embed``, ``mask_token`` (decoder padding uses the [C0] output),
``decoder_pos_embed`` (the fixed sin-cos table; ``decoder_pos_embed_learned`` is used),
``patch_embed.*``, ``decoder_pred.*`` (MAE leftovers) and ``token_emb.position_ids``.
``vqgan.*`` belongs to the tokenizer converter. Any other unknown key is an error that lists
them all, so a checkpoint of another architecture is not half-loaded silently. Extra keys
of a MAGE-C checkpoint (its contrastive projection head: the official PyTorch code has no
MAGE-C model, so that head's layout is not known here and this port's
``contrastive.ProjectionMLP`` is not converted from it) are dropped only when named in
``ignore_prefixes``; the error for unknown keys says so and lists the prefixes to pass.

Sizes are inferred from shapes except the head counts, which shapes cannot tell.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging

UNUSED_KEYS = ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed",
               "token_emb.position_ids")
UNUSED_PREFIXES = ("patch_embed.", "decoder_pred.", "vqgan.")
_LEGACY_EXTRA_IDS = 1000 + 1  # class ids + [MASK] in the official vocabulary


def _to_numpy(value) -> np.ndarray:
    """float32 numpy from a numpy array or a torch tensor (any float dtype, any device)."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().float().cpu().numpy()
    return np.asarray(value, dtype=np.float32)


def _linear(sd, prefix: str) -> dict:
    return {"kernel": sd[prefix + ".weight"].T, "bias": sd[prefix + ".bias"]}


def _norm(sd, prefix: str) -> dict:
    return {"scale": sd[prefix + ".weight"], "bias": sd[prefix + ".bias"]}


def _block(sd, prefix: str, num_heads: int) -> dict:
    width = sd[prefix + ".norm1.weight"].shape[0]
    if width % num_heads:
        raise ValueError(f"{prefix}: width {width} is not divisible by num_heads={num_heads}; "
                         f"pass the head count of the checkpoint's preset.")
    head_dim = width // num_heads
    qkv_w, qkv_b = sd[prefix + ".attn.qkv.weight"], sd[prefix + ".attn.qkv.bias"]
    # torch splits the fused output as reshape(3, heads, head_dim) (models_mage.Attention).
    qkv = {"kernel": qkv_w.T.reshape(width, 3, num_heads, head_dim),
           "bias": qkv_b.reshape(3, num_heads, head_dim)}
    proj_w = sd[prefix + ".attn.proj.weight"]
    proj = {"kernel": proj_w.T.reshape(num_heads, head_dim, width),
            "bias": sd[prefix + ".attn.proj.bias"]}
    return {"norm1": _norm(sd, prefix + ".norm1"), "attn": {"qkv": qkv, "proj": proj},
            "norm2": _norm(sd, prefix + ".norm2"),
            "mlp": {"fc1": _linear(sd, prefix + ".mlp.fc1"),
                    "fc2": _linear(sd, prefix + ".mlp.fc2")}}


def _count_blocks(sd, prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(rf"{prefix}\.(\d+)\.", k))}
    if found != set(range(len(found))):
        raise ValueError(f"{prefix}.N keys are not numbered 0..n-1 (found {sorted(found)}).")
    return len(found)


def _stack(sd, prefix: str, depth: int, num_heads: int, scan_layers: bool) -> dict:
    blocks = [_block(sd, f"{prefix}.{i}", num_heads) for i in range(depth)]
    if scan_layers:  # nn.scan layout: one "layers" subtree, leaves stacked on axis 0
        return {"layers": jax.tree.map(lambda *xs: np.stack(xs), *blocks)}
    return {f"block_{i}": b for i, b in enumerate(blocks)}


_KNOWN_KEY = re.compile(
    r"^(token_emb\.(word_embeddings|position_embeddings)\.weight|token_emb\.LayerNorm\."
    r"(weight|bias)|(decoder_)?blocks\.\d+\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|"
    r"mlp\.fc2)\.(weight|bias)|(norm|decoder_norm|decoder_embed|mlm_layer\.fc|mlm_layer\.ln)"
    r"\.(weight|bias)|decoder_pos_embed_learned|mlm_layer\.bias)$")
_MAX_LISTED = 24


def _is_mage_key(key: str) -> bool:
    return key in UNUSED_KEYS or key.startswith(UNUSED_PREFIXES) or bool(_KNOWN_KEY.match(key))


def _check_keys(sd: Mapping[str, Any], ignore_prefixes: Sequence[str] = (),
                source: str = "the MAGE state dict") -> list[str]:
    """Returns the keys to drop (matched by ``ignore_prefixes``); raises ValueError listing
    every other key that is not one of the official MaskedGenerativeEncoderViT."""
    ignore = tuple(ignore_prefixes)
    for prefix in ignore:
        clash = sorted(k for k in sd if k.startswith(prefix) and _is_mage_key(k))
        if clash:
            raise ValueError(f"ignore prefix {prefix!r} matches {clash[0]!r} ({len(clash)} keys), "
                             f"a weight of the MAGE model itself; ignore only the extra keys that "
                             f"the converter names.")
    dropped = sorted(k for k in sd if k.startswith(ignore))  # startswith(()) is False
    unknown = sorted(k for k in sd if not _is_mage_key(k) and not k.startswith(ignore))
    if not unknown:
        return dropped
    if all(k.startswith("module.") for k in sd):
        raise ValueError(f"every key of {source} starts with 'module.' (a DistributedDataParallel-"
                         f"wrapped model's state dict): strip that prefix first "
                         f"(load_torch_state_dict does when it reads a file).")
    groups = sorted({k.split(".")[0] + "." if "." in k else k for k in unknown})
    listed = ", ".join(repr(k) for k in unknown[:_MAX_LISTED])
    if len(unknown) > _MAX_LISTED:
        listed += f" and {len(unknown) - _MAX_LISTED} more"
    raise ValueError(
        f"{source} has {len(unknown)} key(s) that the official MaskedGenerativeEncoderViT does "
        f"not have: {listed}. If they are the contrastive projection head of a MAGE-C "
        f"checkpoint, mage_jax does not convert it (its MAGE-C head, "
        f"mage_jax.models.contrastive.ProjectionMLP, starts fresh when a contrastive run is "
        f"warm-started with --config.init_from; the encoder and decoder are converted in full): "
        f"drop them with --ignore_keys={','.join(groups)} (python -m mage_jax.convert mage), or "
        f"ignore_prefixes={tuple(groups)!r} (convert_mage). Otherwise the checkpoint is of "
        f"another architecture.")


def convert_mage(state_dict: Mapping[str, Any], *, num_heads: int, decoder_num_heads: int,
                 scan_layers: bool = False, ignore_prefixes: Sequence[str] = (),
                 source: str = "the MAGE state dict") -> tuple[dict, dict]:
    """Returns ``(params, model_kwargs)``: plain (unboxed) float32 params for
    ``MAGE(**model_kwargs)`` (``scan_layers`` picks the stacked layout).

    ``ignore_prefixes``: extra keys to drop, e.g. a MAGE-C checkpoint's projection head,
    which the error for unknown keys names. ``source`` names the input in errors.
    """
    dropped = set(_check_keys(state_dict, ignore_prefixes, source))
    if dropped:
        logging.info("%s: ignoring %d key(s) under %s: %s", source, len(dropped),
                     ", ".join(map(repr, ignore_prefixes)), ", ".join(sorted(dropped)))
    sd = {k: _to_numpy(v) for k, v in state_dict.items()
          if not k.startswith(UNUSED_PREFIXES) and k not in UNUSED_KEYS and k not in dropped}
    word = sd["token_emb.word_embeddings.weight"]
    vocab, embed_dim = word.shape
    dec_pos = sd["decoder_pos_embed_learned"].reshape(-1, sd["decoder_pos_embed_learned"].shape[-1])
    num_positions, decoder_embed_dim = dec_pos.shape
    pos = sd["token_emb.position_embeddings.weight"]
    if pos.shape[0] < num_positions:
        raise ValueError(f"token_emb.position_embeddings has {pos.shape[0]} rows but the decoder "
                         f"has {num_positions} positions; the state dict is inconsistent.")
    depth = _count_blocks(sd, "blocks")
    decoder_depth = _count_blocks(sd, "decoder_blocks")
    mlp_ratio = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    dec_ratio = sd["decoder_blocks.0.mlp.fc1.weight"].shape[0] / decoder_embed_dim
    if mlp_ratio != dec_ratio:
        raise ValueError(f"encoder mlp_ratio {mlp_ratio} != decoder mlp_ratio {dec_ratio}: "
                         f"MAGE uses one mlp_ratio for both.")
    model_kwargs = dict(
        codebook_size=vocab - _LEGACY_EXTRA_IDS, num_tokens=num_positions - 1,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads,
        decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
        decoder_num_heads=decoder_num_heads,
        mlp_ratio=int(mlp_ratio) if float(mlp_ratio).is_integer() else mlp_ratio,
        scan_layers=scan_layers)
    params = {
        "token_emb": {
            "word_embeddings": word,
            # The official table has 257 rows for any grid; only the first L+1 are read.
            "position_embeddings": pos[:num_positions],
            "norm": _norm(sd, "token_emb.LayerNorm"),
        },
        "encoder": _stack(sd, "blocks", depth, num_heads, scan_layers),
        "norm": _norm(sd, "norm"),
        "decoder_embed": _linear(sd, "decoder_embed"),
        "decoder_pos_embed": dec_pos,
        "decoder": _stack(sd, "decoder_blocks", decoder_depth, decoder_num_heads, scan_layers),
        "decoder_norm": _norm(sd, "decoder_norm"),
        "mlm_head": {"fc": _linear(sd, "mlm_layer.fc"), "norm": _norm(sd, "mlm_layer.ln"),
                     "bias": sd["mlm_layer.bias"].reshape(-1)},
    }
    return params, model_kwargs


def check_mage_params(params, expected_abstract) -> None:
    """Raises ValueError at the first path whose presence or shape differs.

    ``expected_abstract``: e.g. ``jax.eval_shape(model.init, ...)['params']`` (boxed or not).
    """
    expected = nn.unbox(expected_abstract)
    got = dict(jax.tree_util.tree_flatten_with_path(nn.unbox(params))[0])
    want = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    hint = ("the checkpoint is an official MAGE of another size: pick the matching preset "
            "(e.g. vit_b for MAGE ViT-B, vit_l for ViT-L) and the same scan_layers setting, "
            "and the tokenizer whose codebook/grid it was trained with")
    for path, leaf in want.items():
        name = jax.tree_util.keystr(path)
        if path not in got:
            raise ValueError(f"parameter {name} {tuple(leaf.shape)} is missing from the converted "
                             f"checkpoint; {hint}.")
        if tuple(np.shape(got[path])) != tuple(leaf.shape):
            raise ValueError(f"parameter {name}: checkpoint shape {tuple(np.shape(got[path]))}, "
                             f"model expects {tuple(leaf.shape)}; {hint}.")
    for path in got:
        if path not in want:
            raise ValueError(f"checkpoint parameter {jax.tree_util.keystr(path)} has no place in "
                             f"the model; {hint}.")
