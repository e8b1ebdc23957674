"""Converts released PyTorch checkpoints into this project's checkpoints.

    python -m mage_jax.convert tokenizer --torch_checkpoint=vqgan_jax_strongaug.ckpt --output=DIR
    python -m mage_jax.convert mage --torch_checkpoint=mage-vitb-1600.pth \
        --config=configs/pretrain.py:vit_b --output=DIR

The output is a directory like a training run's workdir: `DIR/checkpoints/0` holds
``{"params": ...}`` and `DIR/config.json` the sizes. A tokenizer output is what
``--config.tokenizer_workdir`` takes; a MAGE output also carries the checkpoint's own
tokenizer (the ``vqgan.*`` keys) in `DIR/tokenizer`.

Released weights and the official trainer's ``checkpoint-*.pth`` (model, optimizer, epoch,
scaler, args) both convert; only the ``model`` entry is used, and a DDP ``module.`` prefix is
stripped. Keys that are not in the official MAGE (e.g. a MAGE-C checkpoint's contrastive
projection head) stop the conversion with their names; ``--ignore_keys=PREFIX.,...`` drops
them (the error says which prefixes to pass).
"""
from __future__ import annotations

import json
import os

from absl import app, flags
from ml_collections import config_flags

import jax
import jax.numpy as jnp

from mage_jax import checkpointing, masking
from mage_jax.models import mage, vqgan
from mage_jax.convert import torch_mage, torch_tokenizer

_CKPT = flags.DEFINE_string("torch_checkpoint", None, "PyTorch .pth/.ckpt file to convert.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the converted checkpoint to.")
_IGNORE = flags.DEFINE_list(
    "ignore_keys", [], "For `mage`: comma-separated key prefixes to drop, e.g. the contrastive "
    "projection head of a MAGE-C checkpoint (the error for unknown keys names them).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "For `mage`: the pretrain config (preset) the weights must fit.")


def save_params(output: str, params, description: dict) -> None:
    os.makedirs(output, exist_ok=True)
    checkpointer = checkpointing.Checkpointer(output, keep=1, async_save=False)
    if checkpointer.latest_step() is not None:
        raise FileExistsError(f"--output={output} already holds a checkpoint; choose a new directory.")
    checkpointer.save(0, {"params": params})
    checkpointer.close()
    with open(os.path.join(output, "config.json"), "w", encoding="utf-8") as f:
        json.dump(description, f, indent=2, sort_keys=True, default=str)


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


def convert_mage_file(path: str, config, output: str, ignore_keys=()) -> dict:
    """``ignore_keys``: key prefixes to drop (e.g. a MAGE-C projection head); any other key
    that the official MAGE does not have is an error naming it."""
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


def main(argv):
    if len(argv) != 2 or argv[1] not in ("tokenizer", "mage"):
        raise app.UsageError("usage: python -m mage_jax.convert {tokenizer|mage} "
                             "--torch_checkpoint=FILE --output=DIR [--config=configs/pretrain.py:vit_b] "
                             "[--ignore_keys=PREFIX.,...]")
    if not _CKPT.value or not _OUTPUT.value:
        raise app.UsageError("--torch_checkpoint and --output are required.")
    if argv[1] == "tokenizer":
        if _IGNORE.value:
            raise app.UsageError("--ignore_keys is for `mage`: the tokenizer converter reads "
                                 "only the tokenizer's own keys.")
        sizes = convert_tokenizer_file(_CKPT.value, _OUTPUT.value)
    else:
        if _CONFIG.value is None:
            raise app.UsageError("`mage` needs --config=configs/pretrain.py:<preset> "
                                 "(vit_b or vit_l): the number of heads is not in the weights.")
        sizes = convert_mage_file(_CKPT.value, _CONFIG.value, _OUTPUT.value, _IGNORE.value)
    print(f"wrote {_OUTPUT.value}: {sizes}")


if __name__ == "__main__":
    app.run(main)
