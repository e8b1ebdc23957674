"""The linear probe's head and its measures (MAE's ``main_linprobe.py``, which MAGE uses)."""
from __future__ import annotations

import flax.linen as nn
import jax


class ProbeHead(nn.Module):
    """BatchNorm without affine parameters (eps 1e-6), then a linear layer.

    The BatchNorm is a parameter-free whitening of the frozen features (MAE: "a BN layer
    without affine transformation", which makes the probe insensitive to the features'
    scale, so one learning rate suits every encoder). Running statistics are torch's
    momentum 0.1 (flax's 0.9). On a mesh the batch statistics are global (torch's DDP
    probe normalises each GPU's batch separately); at probe batch sizes the two agree.
    The weight is normal with std 0.01 (MAE's ``trunc_normal_(std=0.01)`` truncates at
    +-2 in absolute terms, i.e. never), the bias zero.
    """
    num_classes: int
    bn_eps: float = 1e-6
    init_std: float = 0.01

    @nn.compact
    def __call__(self, features: jax.Array, train: bool) -> jax.Array:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=self.bn_eps,
                         use_bias=False, use_scale=False, name="bn")(features)
        return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(self.init_std),
                        name="head")(x)

