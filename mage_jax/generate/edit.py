"""Inpaint or outpaint an image with a trained MAGE.

    python -m mage_jax.generate.edit --pretrain_workdir=workdirs/demo --image=shirt.png \
        --box=8,8,24,24 --output=inpainted.png            # regenerate the box
    python -m mage_jax.generate.edit ... --box=8,8,24,24 --outpaint --output=out.png
    python -m mage_jax.generate.edit ... --mask=mask.png --output=out.png  # white: regenerate

The image is resized (shorter side, bicubic) and center-cropped to the model's image size;
a mask PNG must have the image's own size and goes through the same crop (nearest). The
result is written at the model's size. ``--num_samples`` > 1 writes ``NAME_<i>.png``.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from etils import epath
from PIL import Image

from mage_jax import paths, pretrained, sharding
from mage_jax.generate import editing
from mage_jax.generate import sampler as sampler_lib

# The flags are defined when this file runs as the command (`_define_flags`), not on
# import: other modules of the package (the converter) define flags of the same names.
FLAGS = flags.FLAGS


def _center_square(image: Image.Image, size: int, resample) -> Image.Image:
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), resample)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_inputs(image_path: str, size: int, mask_path: str | None = None,
                box: str | None = None, outside: bool = False):
    """(image uint8 (H, W, 3), regenerate (H, W) bool) at the model's ``size``."""
    if (mask_path is None) == (box is None):
        raise ValueError("give exactly one of --mask=PNG and --box=left,top,right,bottom.")
    image = Image.open(image_path).convert("RGB")
    if mask_path is not None:
        mask = Image.open(mask_path).convert("L")
        if mask.size != image.size:
            raise ValueError(f"--mask={mask_path} is {mask.size[0]}x{mask.size[1]} but the image "
                             f"{image_path} is {image.size[0]}x{image.size[1]}: a mask must have "
                             f"its image's size.")
        region = np.asarray(_center_square(mask, size, Image.NEAREST)) > 127
        region = ~region if outside else region
    else:
        try:
            coords = tuple(int(v) for v in box.split(","))
        except ValueError:
            coords = ()
        if len(coords) != 4:
            raise ValueError(f"--box={box!r} must be four integers left,top,right,bottom.")
        region = editing.box_mask(size, coords, outside)
    if not region.any():
        raise ValueError("the region to regenerate is empty: nothing to edit.")
    pixels = np.asarray(_center_square(image, size, Image.BICUBIC), np.uint8)
    return pixels, region


def edit_images(pre: pretrained.Pretrained, images: np.ndarray, regions: np.ndarray, *,
                seed: int, num_steps: int, choice_temperature: float, mesh=None,
                first_index: int = 0) -> np.ndarray:
    """Edits ``images (B, H, W, 3) uint8`` where ``regions (B, H, W)``; returns uint8."""
    mesh = mesh or sharding.make_mesh(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    sample = sampler_lib.make_sampler(
        pre.model, lambda tp, ids: pretrained.decode_tokens(pre, tp, ids), mesh,
        num_steps=num_steps, choice_temperature=choice_temperature)
    tok = pre.tokenizer
    floats = jnp.asarray(images, jnp.float32) / 255.0
    tokens = jax.jit(lambda p, x: tok.apply({"params": p}, x, method=tok.encode))(
        pre.tokenizer_params, floats)
    regenerate = editing.token_mask(jnp.asarray(regions), pre.grid)
    ids = editing.canvas(tokens.astype(jnp.int32), regenerate, pre.model.mask_token_id)
    batch = images.shape[0]
    _, generated = sample(pre.params, pre.tokenizer_params, ids,
                          jnp.arange(first_index, first_index + batch, dtype=jnp.int32),
                          jnp.full((batch,), -1, jnp.int32), jax.random.key(seed))
    return np.asarray(editing.paste(jnp.asarray(images), generated, jnp.asarray(regions)))


def _define_flags() -> None:
    flags.DEFINE_string("pretrain_workdir", None, "A pretraining run or converted weights.")
    flags.DEFINE_string("image", None, "The image to edit (PNG/JPEG).")
    flags.DEFINE_string("mask", None, "A mask PNG of the image's size; white regenerates.")
    flags.DEFINE_string("box", None, "left,top,right,bottom in model pixels: regenerate it.")
    flags.DEFINE_bool("outpaint", False, "Regenerate outside the box/mask instead.")
    flags.DEFINE_string("output", None, "Where the edited PNG goes.")
    flags.DEFINE_integer("num_samples", 1, "Edits to draw (different seeds).")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_integer("num_steps", 12, "Decoding steps.")
    flags.DEFINE_float("choice_temperature", 4.5, "Re-masking temperature.")


def main(argv):
    del argv
    for name, value in (("pretrain_workdir", FLAGS.pretrain_workdir), ("image", FLAGS.image),
                        ("output", FLAGS.output)):
        if not value:
            raise app.UsageError(f"--{name} is required.")
    pre = pretrained.load(FLAGS.pretrain_workdir)
    image, region = load_inputs(FLAGS.image, pre.image_size, FLAGS.mask, FLAGS.box,
                                FLAGS.outpaint)
    n = FLAGS.num_samples
    edited = edit_images(pre, np.repeat(image[None], n, 0), np.repeat(region[None], n, 0),
                         seed=FLAGS.seed, num_steps=FLAGS.num_steps,
                         choice_temperature=FLAGS.choice_temperature)
    stem, ext = os.path.splitext(FLAGS.output)
    epath.Path(paths.absolute(FLAGS.output)).parent.mkdir(parents=True, exist_ok=True)
    for i, result in enumerate(edited):
        path = FLAGS.output if n == 1 else f"{stem}_{i}{ext or '.png'}"
        paths.save_image(Image.fromarray(result), path)
        print(f"wrote {path}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
