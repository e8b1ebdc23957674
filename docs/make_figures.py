"""The README's pictures from a demo run.

    python docs/make_figures.py --workdir=workdirs/demo --output=docs/demo_samples.png
    python docs/make_figures.py --workdir=workdirs/demo_cond --output=docs/demo_class_conditional.png
    python docs/make_figures.py --kind=reconstructions --workdir=workdirs/demo \
        --output=docs/demo_reconstructions.png --scale=3
    python docs/make_figures.py --kind=inpainting --workdir=workdirs/demo \
        --output=docs/demo_inpainting.png --scale=3

``samples``: ``<workdir>/generate/samples_grid.png`` (written by the generate stage that the
demo runs when it has trained), with a caption file beside it (``.txt``) holding the run's
measures. ``reconstructions``: the first 8 test images (top) and their tokenizer
reconstructions (bottom). ``inpainting``: 4 test images, the region to regenerate greyed
out, the inpainted result, then the outpainted one (everything but the centre regenerated).
The last two are computed here by ``mage_jax.inference`` (the notebooks' functions).
Pictures are enlarged by ``--scale`` (nearest neighbour, so pixels stay pixels).
"""
import argparse
import json
import os

import numpy as np
from PIL import Image


def _samples(workdir: str, output: str) -> Image.Image:
    generate = os.path.join(workdir, "generate")
    grid = os.path.join(generate, "samples_grid.png")
    if not os.path.exists(grid):
        raise SystemExit(f"{grid} does not exist: run the demo command into {workdir} first.")
    with open(os.path.join(generate, "metrics.jsonl"), encoding="utf-8") as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    caption = {k: round(v, 3) for k, v in last.items()
               if k in ("num_samples", "fd_samples", "fd_real", "fd_random_tokens", "cond_accuracy")}
    with open(os.path.splitext(output)[0] + ".txt", "w", encoding="utf-8") as f:
        f.write(json.dumps(caption, sort_keys=True) + "\n")
    print(f"caption: {caption}")
    return Image.open(grid)


def _reconstructions(workdir: str, seed: int) -> Image.Image:
    from mage_jax import inference
    pre = inference.load(workdir)
    images, _ = inference.images_from_dataset(pre, 8)
    _, reconstructions = inference.reconstruct(pre, images)
    return Image.fromarray(inference.grid(np.concatenate([images, reconstructions]), 8))


def _inpainting(workdir: str, seed: int) -> Image.Image:
    from mage_jax import inference
    pre = inference.load(workdir)
    images, _ = inference.images_from_dataset(pre, 4)
    s = pre.image_size
    box = (s // 4, s // 4, 3 * s // 4, 3 * s // 4)
    masked = images.copy()
    masked[:, box[1]:box[3], box[0]:box[2]] = 128
    inpainted = inference.edit(pre, images, box, seed=seed)
    outpainted = inference.edit(pre, images, box, outpaint=True, seed=seed)
    rows = np.concatenate([images, masked, inpainted, outpainted])
    return Image.fromarray(inference.grid(rows, 4))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="A demo pretraining run.")
    parser.add_argument("--output", required=True, help="The PNG to write.")
    parser.add_argument("--kind", default="samples",
                        choices=("samples", "reconstructions", "inpainting"))
    parser.add_argument("--scale", type=int, default=1, help="Nearest-neighbour enlargement.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the edits.")
    args = parser.parse_args()
    if args.kind == "samples":
        image = _samples(args.workdir, args.output)
    else:
        image = {"reconstructions": _reconstructions, "inpainting": _inpainting}[args.kind](
            args.workdir, args.seed)
    image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST).save(
        args.output)
    print(f"wrote {args.output} ({image.width * args.scale}x{image.height * args.scale})")


if __name__ == "__main__":
    main()
