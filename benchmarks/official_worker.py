"""One timed measurement of the official PyTorch MAGE code (https://github.com/LTH14/mage).

Run by ``benchmarks/compare_official.py`` with the interpreter of a venv that has the
official code's requirements, in the user's checkout (``--repo``, also the working
directory: the official code opens ``config/vqgan.yaml`` relative to it). Nothing of that
checkout is part of this project: it is imported from ``--repo`` at run time. Prints one
line ``COMPARE_RESULT {json}``.

Run-time shims, none of which edits the checkout:

* ``.cuda()``: the official model and ``gen_img_uncond.gen_image`` call ``.cuda()`` on new
  tensors; this benchmark runs on the CPU, so ``torch.Tensor.cuda`` and
  ``torch.nn.Module.cuda`` return ``self`` (no copy, no device change).
* ``timm.optim.optim_factory.add_weight_decay`` (timm 0.3.2, main_pretrain.py) is
  ``timm.optim.param_groups_weight_decay`` in timm 1.x: the same groups (no weight decay
  on 1-D parameters and biases, frozen parameters left out).
* ``util.misc`` (``torch._six``, gone from torch 2) is not imported: the step below is
  main_pretrain.py's, written out (float32: no autocast, so the loss scaler reduces to
  ``backward``, ``clip_grad_norm_(3.0)`` as main_pretrain.py's default ``--grad_clip``,
  ``step``).
* ``gen_img_uncond.py`` parses arguments and loads a checkpoint at import; only its
  ``import`` statements and function definitions are compiled, from the file itself.
* ``np.float`` (``util/pos_embed.py``), removed in numpy 1.24, is set back to the builtin
  ``float`` it aliased.
* No VQGAN checkpoint can be downloaded: a randomly initialised taming ``VQModel`` of
  ``config/vqgan.yaml`` is saved as ``{"state_dict": ...}``, the layout
  ``VQModel.init_from_ckpt`` loads (weights do not change the cost).
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import sys
import tempfile
import time


def _shim_cuda(torch) -> None:
    # CPU-only comparison: the official code's hard-coded .cuda() becomes a no-op.
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self


def _random_vqgan_ckpt(directory: str) -> str:
    import torch
    from omegaconf import OmegaConf
    from taming.models.vqgan import VQModel
    config = OmegaConf.load("config/vqgan.yaml").model
    vqgan = VQModel(ddconfig=config.params.ddconfig, n_embed=config.params.n_embed,
                    embed_dim=config.params.embed_dim, ckpt_path=None)
    path = os.path.join(directory, "vqgan_random.ckpt")
    torch.save({"state_dict": vqgan.state_dict()}, path)
    return path


def _gen_image(repo: str):
    """``gen_img_uncond.gen_image`` without the script's module-level code."""
    path = os.path.join(repo, "gen_img_uncond.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    tree.body = [node for node in tree.body
                 if isinstance(node, (ast.Import, ast.ImportFrom, ast.FunctionDef))]
    namespace = {"__name__": "gen_img_uncond", "__file__": path}
    exec(compile(tree, path, "exec"), namespace)  # noqa: S102 (the user's checkout)
    return namespace["gen_image"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repo", required=True)
    parser.add_argument("--workload", choices=("train", "sample"), required=True)
    parser.add_argument("--model", default="mage_vit_base_patch16")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed train steps")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps or calls first")
    parser.add_argument("--repeats", type=int, default=2, help="timed gen_image calls")
    parser.add_argument("--num_iter", type=int, default=12)
    parser.add_argument("--choice_temperature", type=float, default=4.5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    repo = os.path.abspath(args.repo)
    os.chdir(repo)
    sys.path.insert(0, repo)
    import numpy as np
    import timm
    import torch
    _shim_cuda(torch)
    if "float" not in np.__dict__:  # numpy >= 1.24; util/pos_embed.py uses np.float
        np.float = float
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    import models_mage

    scratch = tempfile.mkdtemp(prefix="mage_official_")
    try:
        ckpt = _random_vqgan_ckpt(scratch)
        if args.workload == "train":  # main_pretrain.py's model arguments (its defaults)
            model = models_mage.__dict__[args.model](
                mask_ratio_mu=0.55, mask_ratio_std=0.25, mask_ratio_min=0.5,
                mask_ratio_max=1.0, vqgan_ckpt_path=ckpt)
        else:  # gen_img_uncond.py's
            model = models_mage.__dict__[args.model](
                norm_pix_loss=False, mask_ratio_mu=0.55, mask_ratio_std=0.25,
                mask_ratio_min=0.0, mask_ratio_max=1.0, vqgan_ckpt_path=ckpt)
    finally:
        for name in os.listdir(scratch):
            os.remove(os.path.join(scratch, name))
        os.rmdir(scratch)

    result = {"side": "official", "workload": args.workload, "model": args.model,
              "batch_size": args.batch_size, "threads": torch.get_num_threads(),
              "cuda_shim": True, "device": "cpu", "dtype": "float32",
              "versions": {"torch": torch.__version__, "timm": timm.__version__,
                           "numpy": np.__version__, "python": platform.python_version()},
              "cpu_affinity": len(os.sched_getaffinity(0))
              if hasattr(os, "sched_getaffinity") else os.cpu_count()}

    if args.workload == "train":
        model.train(True)
        from timm.optim import param_groups_weight_decay  # timm 0.3.2: add_weight_decay
        groups = param_groups_weight_decay(model, 0.05)
        optimizer = torch.optim.AdamW(groups, lr=1e-3 * args.batch_size / 256,
                                      betas=(0.9, 0.95))
        images = torch.rand(args.batch_size, 3, 256, 256)

        def step() -> float:
            optimizer.zero_grad()
            loss, _, _ = model(images)  # VQGAN tokenization, masking, encoder, decoder, loss
            value = loss.item()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
            optimizer.step()
            return value

        call = step
        timed = args.steps
        result["trained_params"] = int(sum(p.numel() for p in model.parameters()
                                           if p.requires_grad))
    else:
        gen_image = _gen_image(repo)
        model.eval()
        seeds = iter(range(10**6))

        def call():
            with torch.no_grad():
                return gen_image(model, bsz=args.batch_size, seed=next(seeds),
                                 num_iter=args.num_iter,
                                 choice_temperature=args.choice_temperature)

        timed = args.repeats
        result.update(num_iter=args.num_iter, choice_temperature=args.choice_temperature)

    warmup_seconds, seconds = [], []
    for i in range(args.warmup + timed):
        t0 = time.perf_counter()
        out = call()
        (warmup_seconds if i < args.warmup else seconds).append(time.perf_counter() - t0)
    if args.workload == "train":
        result["final_loss"] = out
    result.update(warmup_seconds=warmup_seconds, step_seconds=seconds,
                  images_per_sec=args.batch_size * len(seconds) / sum(seconds))
    print("COMPARE_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
