"""A frozen network's weights from a file: an ``.npz`` or a PyTorch state dict.

For the networks a loss or a measure reads but never trains (LPIPS, the perceptual
ResNet-50). PyTorch files are read with ``weights_only=True``, so no pickled code runs;
torch is imported only for them. Paths may be local or ``gs://``.
"""
from __future__ import annotations

import numpy as np
from etils import epath

TORCH_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")


def read(path, what: str) -> dict[str, np.ndarray]:
    """{key: float array} of ``path``; a Lightning-style ``state_dict`` entry is unwrapped.
    ``what`` names the weights in errors (e.g. "LPIPS weights")."""
    p = epath.Path(path)
    if p.suffix == ".npz":
        with p.open("rb") as f, np.load(f) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    if p.suffix not in TORCH_SUFFIXES:
        raise ValueError(f"Unsupported {what} file {path}: expected .npz or a PyTorch "
                         f"{'/'.join(TORCH_SUFFIXES)} file.")
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"Reading {path} needs PyTorch (pip install 'mage_jax[torch]'), or "
                          f"convert it to .npz with numpy.savez first.") from e
    with p.open("rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}
