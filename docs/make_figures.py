"""The README's pictures from a demo run: samples drawn at the end of the demo command.

    python docs/make_figures.py --workdir=workdirs/demo --output=docs/demo_samples.png
    python docs/make_figures.py --workdir=workdirs/demo_cond --output=docs/demo_class_conditional.png

Reads ``<workdir>/generate/samples_grid.png`` (written by the generate stage that the demo
runs when it has trained) and saves it, enlarged by ``--scale`` if asked (nearest
neighbour, so pixels stay pixels), with a caption file beside it (``.txt``) holding the
run's measures.
"""
import argparse
import json
import os

from PIL import Image


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="A demo run (its generate/ folder).")
    parser.add_argument("--output", required=True, help="The PNG to write.")
    parser.add_argument("--scale", type=int, default=1, help="Nearest-neighbour enlargement.")
    args = parser.parse_args()
    generate = os.path.join(args.workdir, "generate")
    grid = os.path.join(generate, "samples_grid.png")
    if not os.path.exists(grid):
        raise SystemExit(f"{grid} does not exist: run the demo command into {args.workdir} first.")
    image = Image.open(grid)
    image.resize((image.width * args.scale, image.height * args.scale), Image.NEAREST).save(
        args.output)
    with open(os.path.join(generate, "metrics.jsonl"), encoding="utf-8") as f:
        last = [json.loads(line) for line in f if line.strip()][-1]
    caption = {k: round(v, 3) for k, v in last.items()
               if k in ("num_samples", "fd_samples", "fd_real", "fd_random_tokens", "cond_accuracy")}
    with open(os.path.splitext(args.output)[0] + ".txt", "w", encoding="utf-8") as f:
        f.write(json.dumps(caption, sort_keys=True) + "\n")
    print(f"wrote {args.output}: {caption}")


if __name__ == "__main__":
    main()
