"""Stage configs by the name the command line uses, for notebooks, scripts and tests.

``load("configs/pretrain.py:demo")`` (or ``"pretrain:demo"``) returns what
``--config=configs/pretrain.py:demo`` gives ``mage_jax.main``: the file's
``get_config(arg)``. A relative path is looked up from the working directory, then in the
repository's ``configs/`` beside this package (a clone installed with ``pip install -e``).
"""
from __future__ import annotations

import importlib.util
import pathlib

import ml_collections

REPOSITORY_CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def find(name: str) -> pathlib.Path:
    """The config file for ``name``: a path, or a stage name such as ``pretrain``."""
    path = pathlib.Path(name if name.endswith(".py") else f"{name}.py")
    for candidate in (path, REPOSITORY_CONFIGS / path.name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"config file {name!r} not found here nor in {REPOSITORY_CONFIGS}: the configs live in "
        f"the repository's configs/ folder; work from a clone (`git clone ... && pip install "
        f"-e .`) or give the file's path.")


def load(spec: str) -> ml_collections.ConfigDict:
    """``"configs/<stage>.py[:args]"`` or ``"<stage>[:args]"`` -> the stage's config."""
    name, _, arg = spec.partition(":")
    path = find(name)
    module_spec = importlib.util.spec_from_file_location(f"mage_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg)
