"""Optimisers from optax: schedules, clipping and the weight-decay mask, from the config."""
from __future__ import annotations

import jax
import optax

# Parameters whose last path component is one of these are not decayed: biases, norm
# scales and offsets (MAE/MAGE's "no weight decay on bias and norm" rule). Embedding
# tables and matrices are decayed.
_NO_DECAY_NAMES = ("bias", "scale")


def decay_mask(params):
    """True for parameters that get weight decay (works on boxed and plain trees)."""
    def wants_decay(path, _):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        names = [n for n in names if isinstance(n, str) and n != "value"]
        return bool(names) and names[-1] not in _NO_DECAY_NAMES
    return jax.tree_util.tree_map_with_path(wants_decay, params)


def warmup_constant(lr: float, warmup_steps: int) -> optax.Schedule:
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warmup_steps, 1)), optax.constant_schedule(lr)],
        [max(warmup_steps, 1)])


def warmup_cosine(lr: float, warmup_steps: int, decay_steps: int) -> optax.Schedule:
    """Linear warm-up to lr, then cosine to 0 at ``decay_steps`` (counted from step 0)."""
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, max(warmup_steps, 1), max(decay_steps, warmup_steps + 1), end_value=0.0)


def adamw(schedule: optax.Schedule, *, b1: float, b2: float, weight_decay: float,
          grad_clip_norm: float) -> optax.GradientTransformation:
    parts = []
    if grad_clip_norm and grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay,
                             mask=decay_mask))
    return optax.chain(*parts)


def lars(schedule: optax.Schedule, *, momentum: float = 0.9, trust_coefficient: float = 0.001,
         weight_decay: float = 0.0) -> optax.GradientTransformation:
    """LARS as MAE's ``util/lars.py`` (the official linear probe's optimiser).

    Per matrix (``ndim > 1``; biases and norm parameters are left alone): ``g += wd * p``,
    then ``g *= trust * |p| / |g|`` (1 where either norm is 0); then for every parameter
    ``mu = momentum * mu + g`` and ``p -= lr * mu``. optax's stock ``lars`` multiplies by
    the learning rate *before* the momentum, which differs whenever the lr changes
    (warm-up, cosine), so this is built from optax's own transforms in MAE's order.
    """
    def adapted(params):
        return jax.tree.map(lambda p: p.ndim > 1, params)

    return optax.chain(
        optax.masked(optax.add_decayed_weights(weight_decay), adapted),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), adapted),
        optax.trace(decay=momentum, nesterov=False),
        optax.scale_by_learning_rate(schedule))


def layer_id(path, depth: int) -> int:
    """The layer of a ViT parameter for layer-wise lr decay (BEiT's rule, as MAE and MAGE's
    ``util/lr_decay.py``): the token embedding 0, encoder block i i+1, the rest depth+1."""
    names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
    names = [n for n in names if isinstance(n, str) and n != "value"]
    if names and names[0] == "token_emb":
        return 0
    if len(names) > 1 and names[0] == "encoder" and names[1].startswith("block_"):
        return int(names[1].split("_")[1]) + 1
    return depth + 1


def scale_by_layer_decay(depth: int, decay: float) -> optax.GradientTransformation:
    """Multiplies each update by ``decay ** (depth + 1 - layer_id)``. Placed after AdamW
    (whose update already holds lr x (adam + weight decay)), it gives every layer MAE's
    ``lr_scale``, weight decay included, as torch's per-group lr does."""
    def scale(updates, params=None):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda path, u: u * decay ** (depth + 1 - layer_id(path, depth)), updates)
    return optax.stateless(scale)


def epoch_schedule(config) -> optax.Schedule:
    """The MAE-family schedule from a config: lr = ``optimizer.blr`` x batch / 256, linear
    warm-up for ``optimizer.warmup_epochs``, cosine to 0 at ``optimizer.epochs``, with
    epochs of ``num_train_examples // batch_size`` steps."""
    opt = config.optimizer
    steps_per_epoch = max(config.num_train_examples // config.batch_size, 1)
    return warmup_cosine(opt.blr * config.batch_size / 256,
                         int(opt.warmup_epochs * steps_per_epoch),
                         int(opt.epochs * steps_per_epoch))
