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

from absl import app, flags
from ml_collections import config_flags

from mage_jax.convert.files import convert_mage_file, convert_tokenizer_file

_CKPT = flags.DEFINE_string("torch_checkpoint", None, "PyTorch .pth/.ckpt file to convert.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory to write the converted checkpoint to.")
_IGNORE = flags.DEFINE_list(
    "ignore_keys", [], "For `mage`: comma-separated key prefixes to drop, e.g. the contrastive "
    "projection head of a MAGE-C checkpoint (the error for unknown keys names them).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "For `mage`: the pretrain config (preset) the weights must fit.")


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
