"""mage_jax: MAGE (MAsked Generative Encoder, arXiv 2211.09117) in JAX/Flax.

Start at ``mage_jax/main.py`` (the entry point) and ``mage_jax/train/loop.py`` (one batch
from disk to a parameter update); ``configs/`` holds the experiments.
"""
