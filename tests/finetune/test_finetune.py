"""Fine-tuning: Mixup/CutMix, layer-wise lr decay, drop-path, and the stage end to end."""
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax import metrics, optim, pretrained, validation
from mage_jax.finetune import mixup, stage as finetune
from mage_jax.models import transformer
from tests.tiny_configs import load_config

ONE = jax.devices()[:1]


def test_label_smoothing_values():
    t = mixup.smooth_one_hot(jnp.array([2]), 5, 0.1)
    np.testing.assert_allclose(t, [[0.02, 0.02, 0.92, 0.02, 0.02]], rtol=1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_mixup_and_cutmix_targets_follow_the_pixels(seed):
    """Whichever of the two is drawn, every pixel is lam * own + (1 - lam) * mirrored with
    the lam that weights the targets (CutMix: the pasted area's complement)."""
    b, h, w, classes = 4, 8, 8, 5
    own = jnp.arange(b, dtype=jnp.float32)[:, None, None, None] * jnp.ones((b, h, w, 3))
    labels = jnp.arange(b) % classes
    images, targets = mixup.mixup_cutmix(jax.random.key(seed), own, labels, classes)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    mirrored = own[::-1]
    # Per pixel the weight of the image's own content (images 0 and 3 differ by 3).
    own_weight = (images[0, :, :, 0] - mirrored[0, 0, 0, 0]) / (
        own[0, 0, 0, 0] - mirrored[0, 0, 0, 0])
    lam = float(jnp.mean(own_weight))
    expected = lam * mixup.smooth_one_hot(labels, classes, 0.1) + (1 - lam) * \
        mixup.smooth_one_hot(labels[::-1], classes, 0.1)
    np.testing.assert_allclose(targets, expected, atol=1e-5)
    values = np.unique(np.round(np.asarray(own_weight), 5))
    assert len(values) == 1 or set(values) <= {0.0, 1.0}  # Mixup: one weight; CutMix: a box


def test_cutmix_only_pastes_a_box():
    own = jnp.zeros((2, 16, 16, 1)).at[1].set(1.0)
    images, targets = mixup.mixup_cutmix(jax.random.key(0), own, jnp.array([0, 1]), 2,
                                         mixup_alpha=0.0, label_smoothing=0.0)
    pasted = np.asarray(images[0, :, :, 0])
    rows, cols = np.nonzero(pasted)
    assert pasted.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    np.testing.assert_allclose(targets[0, 1], pasted.mean(), atol=1e-6)


def test_no_mixing_gives_smoothed_labels():
    x = jnp.ones((2, 4, 4, 3))
    images, targets = mixup.mixup_cutmix(jax.random.key(0), x, jnp.array([0, 1]), 3,
                                         mixup_alpha=0.0, cutmix_alpha=0.0)
    assert images is x
    np.testing.assert_allclose(targets, mixup.smooth_one_hot(jnp.array([0, 1]), 3, 0.1))


def test_layer_decay_scales_as_beit():
    params = {"token_emb": {"w": jnp.ones(2)}, "encoder": {"block_0": {"w": jnp.ones(2)},
                                                            "block_2": {"w": jnp.ones(2)}},
              "fc_norm": {"scale": jnp.ones(2)}, "head": {"kernel": jnp.ones(2)}}
    tx = optim.scale_by_layer_decay(depth=3, decay=0.5)
    out, _ = tx.update(params, tx.init(params), params)
    assert float(out["token_emb"]["w"][0]) == 0.5 ** 4
    assert float(out["encoder"]["block_0"]["w"][0]) == 0.5 ** 3
    assert float(out["encoder"]["block_2"]["w"][0]) == 0.5 ** 1
    assert float(out["head"]["kernel"][0]) == float(out["fc_norm"]["scale"][0]) == 1.0


def test_drop_path_drops_whole_examples_and_rescales():
    class Branch(nn.Module):
        @nn.compact
        def __call__(self, x, deterministic):
            return transformer.drop_path(x, 0.25, self, deterministic)

    x = jnp.ones((4000, 3, 2))
    y = Branch().apply({}, x, False, rngs={"dropout": jax.random.key(0)})
    per_example = np.asarray(y).reshape(4000, -1)
    np.testing.assert_allclose(np.unique(per_example), [0.0, 1 / 0.75], rtol=1e-6)
    assert np.all(per_example.min(1) == per_example.max(1))  # all or nothing per example
    assert abs(np.mean(per_example[:, 0] == 0) - 0.25) < 0.03
    assert Branch().apply({}, x, True) is x


def _config(pretrain_dir):
    config = load_config("finetune", "demo")
    config.pretrain_workdir = pretrain_dir
    config.data.image_size = 16
    config.data.read_threads = 1
    config.batch_size = 8
    config.total_steps = 3
    config.log_every = 1
    config.checkpoint_every = 3
    config.eval.num_examples = 20
    config.mesh.update(data=1)
    return config


def test_finetune_warm_starts_trains_and_scores(pretrain_dir, tmp_path):
    config = _config(pretrain_dir)
    stage = finetune.build_stage(config)
    fresh = jax.jit(lambda r: nn.unbox(stage.init_state(r)))(jax.random.key(0))
    started = stage.warm_start(fresh)
    pre = pretrained.load(pretrain_dir)
    for name in ("token_emb", "encoder"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(started["params"][name]),
                     pre.params[name])
    assert "decoder" not in started["params"]
    np.testing.assert_array_equal(started["params"]["head"]["kernel"],
                                  fresh["params"]["head"]["kernel"])

    finetune.run(config, str(tmp_path), devices=ONE)
    records = metrics.read_metrics(str(tmp_path))
    last = {k: v for r in records if r["step"] == 3 for k, v in r.items()}
    assert 0.0 <= last["top1"] <= last["top5"] <= 1.0 and last["test_examples"] == 20
    assert np.isfinite(last["loss"])


def test_finetune_bad_input(pretrain_dir, tmp_path):
    config = _config(pretrain_dir)
    config.num_classes = 100
    with pytest.raises(validation.ConfigError, match="num_classes=100 but fashion_mnist has 10"):
        finetune.run(config, str(tmp_path), devices=ONE)
    config = _config(pretrain_dir)
    config.data.image_size = 32
    with pytest.raises(validation.ConfigError, match="reads 16 px images"):
        finetune.run(config, str(tmp_path), devices=ONE)
    assert not os.path.exists(tmp_path / "checkpoints")
