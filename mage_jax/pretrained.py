"""A trained MAGE and its tokenizer, read back for the stages that use them frozen.

``load(pretrain_workdir)`` accepts either a pretraining run of this project (its
``config.json`` is the run's resolved config; the tokenizer is where that config says:
``tokenizer_workdir``, or ``<run>/tokenizer``) or the output of
``python -m mage_jax.convert mage ...`` (its ``config.json`` holds the converted sizes; the
checkpoint's own tokenizer is in ``<dir>/tokenizer``). Both keep the MAGE parameters under
``params["mage"]``. The model's sizes come from the files, never from the caller's preset,
so a generate or probe config cannot disagree with the weights it reads.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import ml_collections

from mage_jax import checkpointing, paths
from mage_jax.models import mage, vqgan

# MAGE's sizes that must be in a run's config.json `model` section.
_MODEL_KEYS = ("embed_dim", "depth", "num_heads", "decoder_embed_dim", "decoder_depth",
               "decoder_num_heads")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    model: mage.MAGE
    params: dict              # MAGE's parameters (host numpy arrays)
    tokenizer: vqgan.VQGAN
    tokenizer_params: dict
    image_size: int
    step: int                 # the checkpoint's step
    workdir: str
    run_config: dict          # the run's config.json, as written

    @property
    def grid(self) -> int:
        return int(round(self.model.num_tokens ** 0.5))


def _read_json(path: str, what: str) -> dict:
    if not paths.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist: {what}. Give a pretraining run's --workdir or the output "
            f"of `python -m mage_jax.convert mage --torch_checkpoint=... --output=DIR`.")
    return json.loads(paths.read_text(path))


def tokenizer_dir(run_config: dict, pretrain_workdir: str) -> str:
    """Where a run's tokenizer is: its ``tokenizer_workdir``; for a fine-tuned run, that of
    the run it started from (``init_from``); else ``<run>/tokenizer``."""
    if run_config.get("tokenizer_workdir"):
        return run_config["tokenizer_workdir"]
    if run_config.get("init_from"):
        source = _read_json(os.path.join(run_config["init_from"], "config.json"),
                            "config.init_from must hold a run or converted weights")
        return tokenizer_dir(source, run_config["init_from"])
    return os.path.join(pretrain_workdir, "tokenizer")


def load(pretrain_workdir: str, step: int | None = None, dtype: str = "float32") -> Pretrained:
    """Reads MAGE (``step``, default the latest checkpoint) and its tokenizer."""
    if not pretrain_workdir:
        raise ValueError("config.pretrain_workdir is empty: set it to a pretraining run's "
                         "workdir or to converted official weights (python -m mage_jax.convert "
                         "mage ... --output=DIR).")
    run_config = _read_json(os.path.join(pretrain_workdir, "config.json"),
                            "config.pretrain_workdir must hold a run or converted weights")
    model_section = run_config.get("model", {})
    missing = [k for k in _MODEL_KEYS if k not in model_section]
    if run_config.get("stage") != "pretrain" or missing:
        raise ValueError(
            f"{pretrain_workdir}/config.json is not a MAGE pretraining run or converted MAGE "
            f"weights (stage={run_config.get('stage')!r}, model keys missing: {missing}).")
    tok_dir = tokenizer_dir(run_config, pretrain_workdir)
    tok_config = _read_json(os.path.join(tok_dir, "config.json"),
                            "the tokenizer of this MAGE is missing")
    # Converted official weights carry no entropy temperature (a training-loss setting that
    # is not in the weights and that reading or decoding tokens does not use).
    sizes = tok_config["tokenizer"]
    tokenizer = vqgan.vqgan_from_config(sizes, entropy_temperature=sizes.get(
        "entropy_temperature", vqgan.VQGAN.entropy_temperature))
    tokenizer_params, _ = checkpointing.restore_params(tok_dir)
    params, found_step = checkpointing.restore_params(pretrain_workdir, step)
    if "mage" not in params:
        raise ValueError(f"the checkpoint in {pretrain_workdir} has no `mage` parameters "
                         f"(found {sorted(params)}).")
    mage_params = params["mage"]
    # Vocabulary and length from the weights themselves (codebook + 1000 ids + [MASK]).
    vocab = mage_params["token_emb"]["word_embeddings"].shape[0]
    num_tokens = mage_params["decoder_pos_embed"].shape[0] - 1
    codebook_size = vocab - mage.NUM_LEGACY_CLASS_IDS - 1
    if codebook_size != tokenizer.codebook_size:
        raise ValueError(
            f"MAGE in {pretrain_workdir} predicts {codebook_size} codes but the tokenizer in "
            f"{tok_dir} has {tokenizer.codebook_size}: they were not trained together.")
    section = ml_collections.ConfigDict(dict(model_section))
    section.dtype = dtype
    section.remat = False  # inference: nothing to rematerialise
    model = mage.mage_from_config(ml_collections.ConfigDict({"model": section}),
                                  codebook_size=codebook_size, num_tokens=num_tokens)
    grid = int(round(num_tokens ** 0.5))
    image_size = grid * 2 ** (len(tokenizer.ch_mult) - 1)
    return Pretrained(model=model, params=mage_params, tokenizer=tokenizer,
                      tokenizer_params=tokenizer_params, image_size=image_size,
                      step=int(found_step), workdir=pretrain_workdir, run_config=run_config)


def decode_tokens(pretrained: Pretrained, tokenizer_params, ids):
    """Token ids ``(B, L)`` -> images ``(B, H, W, 3)`` in [0, 1] (jittable)."""
    tok = pretrained.tokenizer
    images = tok.apply({"params": tokenizer_params}, ids, method=tok.decode)
    return jnp.clip(images, 0.0, 1.0)
