"""Released PyTorch checkpoints -> this project's checkpoint directories (no flags).

The functions behind ``python -m mage_jax.convert`` (``__main__.py``), importable from
notebooks and scripts. The output is a directory like a training run's workdir:
``DIR/checkpoints/0`` holds ``{"params": ...}`` and ``DIR/config.json`` the sizes; a MAGE
output also carries the checkpoint's own tokenizer (the ``vqgan.*`` keys) in ``DIR/tokenizer``.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
from etils import epath

from mage_jax import checkpointing, masking, paths
from mage_jax.models import mage, vqgan
from mage_jax.convert import torch_mage, torch_tokenizer


def save_params(output: str, params, description: dict) -> None:
    epath.Path(output).mkdir(parents=True, exist_ok=True)  # a local folder or gs://
    checkpointer = checkpointing.Checkpointer(output, keep=1, async_save=False)
    if checkpointer.latest_step() is not None:
        raise FileExistsError(f"--output={output} already holds a checkpoint; choose a new directory.")
    checkpointer.save(0, {"params": params})
    checkpointer.close()
    paths.write_text(os.path.join(output, "config.json"),
                     json.dumps(description, indent=2, sort_keys=True, default=str))


def convert_tokenizer_file(path: str, output: str) -> dict:
    state_dict = torch_tokenizer.load_torch_state_dict(path)
    prefix = "vqgan." if any(k.startswith("vqgan.") for k in state_dict) else ""
    variables, sizes = torch_tokenizer.convert_tokenizer(state_dict, prefix=prefix)
    save_params(output, variables["params"], {"stage": "tokenizer", "source": path, "tokenizer": sizes})
    return sizes


def check_against_config(params, config) -> None:
    """The converted weights must be exactly the model the preset builds (e.g. vit_b)."""
    grid = vqgan.token_grid(config.tokenizer, config.data.image_size)
    model = mage.mage_from_config(config, codebook_size=config.tokenizer.codebook_size,
                                  num_tokens=grid * grid)
    tokens = jnp.zeros((1, grid * grid), jnp.int32)
    drop, masked = masking.sample_masks(jax.random.key(0), 1, grid * grid, 1.0, model.drop_ratio)
    expected = jax.eval_shape(
        lambda: model.init(jax.random.key(0), tokens, drop, masked))["params"]
    torch_mage.check_mage_params(params, expected)


def check_widths(state_dict, config, where: str = "the checkpoint") -> None:
    """Embedding widths straight from the tensor shapes, before anything is split by the
    config's head counts: a checkpoint of another size (e.g. ViT-L weights with the vit_b
    preset) then fails naming its parameter rather than with a head-count error."""
    for key, axis, field in (("token_emb.word_embeddings.weight", 1, "embed_dim"),
                             ("decoder_embed.weight", 0, "decoder_embed_dim")):
        want = int(config.model[field])
        if key in state_dict and state_dict[key].shape[axis] != want:
            raise ValueError(
                f"parameter {key} of {where} has shape {tuple(state_dict[key].shape)}, i.e. "
                f"{field}={state_dict[key].shape[axis]}, but the config has "
                f"config.model.{field}={want}: the checkpoint is an official MAGE of another "
                f"size. Pick its preset (vit_b: 768, vit_l: 1024) or set --config.model.{field}.")


def convert_mage_file(path: str, config, output: str, ignore_keys=(), *,
                      state_dict=None) -> dict:
    """``ignore_keys``: key prefixes to drop (e.g. a MAGE-C projection head); any other key
    that the official MAGE does not have is an error naming it. ``state_dict``: ``path``'s
    contents when the caller has already read them (``load_torch_state_dict``), so a
    1-2 GB release is not read twice."""
    if state_dict is None:
        state_dict = torch_tokenizer.load_torch_state_dict(path)
    check_widths(state_dict, config, path)
    params, sizes = torch_mage.convert_mage(
        state_dict, num_heads=config.model.num_heads,
        decoder_num_heads=config.model.decoder_num_heads,
        scan_layers=bool(config.model.scan_layers), ignore_prefixes=tuple(ignore_keys),
        source=str(path))
    check_against_config(params, config)
    description = {"stage": "pretrain", "source": path, "model": sizes}
    if ignore_keys:
        description["ignored_keys"] = list(ignore_keys)
    save_params(output, {"mage": params}, description)
    if any(k.startswith("vqgan.") for k in state_dict):
        tok_vars, tok_sizes = torch_tokenizer.convert_tokenizer(state_dict, prefix="vqgan.")
        save_params(os.path.join(output, "tokenizer"), tok_vars["params"],
                    {"stage": "tokenizer", "source": path, "tokenizer": tok_sizes})
    return sizes
