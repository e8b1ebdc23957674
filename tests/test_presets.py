"""The real-size pretrain presets build and take a training step, checked abstractly.

``jax.eval_shape`` traces init and one train step (tokenizer, masking, MAGE, loss, AdamW)
at the preset's true sizes (ViT-B/L at 256 px, the 1024-code tokenizer) without compiling
or allocating anything, so a shape or wiring error in a preset shows up here in seconds.
The frozen tokenizer is abstract too (``pretrain.make_stage`` reads no checkpoint).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from mage_jax import sharding
from mage_jax.models import vqgan
from mage_jax.train import pretrain
from tiny_configs import load_config

BATCH = 8


def _count(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _block_params(width: int, mlp_ratio: float) -> int:
    """One pre-norm ViT block: qkv + proj + fc1 + fc2 (weights and biases) + two LayerNorms."""
    hidden = int(width * mlp_ratio)
    return (width * 3 * width + 3 * width) + (width * width + width) \
        + (width * hidden + hidden) + (hidden * width + width) + 2 * 2 * width


@functools.lru_cache(maxsize=None)
def _abstract_step(preset: str):
    """(config, stage, boxed init state, state, state after one step, step metrics), abstract."""
    config = load_config("pretrain", preset)
    config.batch_size = BATCH
    size = config.data.image_size
    tok_model = vqgan.vqgan_from_config(config.tokenizer)
    tok_params = nn.unbox(jax.eval_shape(
        tok_model.init, jax.random.key(0),
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)))["params"]
    stage = pretrain.make_stage(config, tok_params)
    boxed = jax.eval_shape(stage.init_state, jax.random.key(0))
    state = nn.unbox(boxed)
    image = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)
    batch = {"image": image, "image2": image} if stage.two_views else {"image": image}
    new_state, step_metrics = jax.eval_shape(
        lambda s, b, t: stage.train_step(s, b, jax.random.key(1), t), state, batch,
        stage.frozen)
    return config, stage, boxed, state, new_state, step_metrics


@pytest.fixture(scope="module", params=["vit_b", "vit_l", "contrastive", "vit_l,contrastive"])
def abstract_step(request):
    return (request.param,) + _abstract_step(request.param)


def test_preset_sizes_at_256px(abstract_step):
    preset, config, stage, _, state, _, _ = abstract_step
    assert config.data.image_size == 256 and config.tokenizer.codebook_size == 1024
    assert stage.two_views == ("contrastive" in preset)
    mage = state["params"]["mage"]
    grid = vqgan.token_grid(config.tokenizer, 256)
    assert grid == 16
    # [C0] + 256 tokens; vocabulary = 1024 codes + 1000 legacy class ids + [MASK].
    assert mage["decoder_pos_embed"].shape == (1 + grid * grid, config.model.decoder_embed_dim)
    assert mage["token_emb"]["word_embeddings"].shape == (1024 + 1000 + 1, config.model.embed_dim)


def test_encoder_parameter_counts(abstract_step):
    preset, config, _, _, state, _, _ = abstract_step
    encoder = state["params"]["mage"]["encoder"]
    counts = {name: _count(block) for name, block in encoder.items()}
    assert len(set(counts.values())) == 1, counts
    per_block = counts["block_0"]
    assert per_block == _block_params(config.model.embed_dim, config.model.mlp_ratio)
    if "vit_l" in preset:
        assert len(encoder) == 24 and 12.5e6 < per_block < 12.7e6
        assert 300e6 < _count(encoder) < 305e6  # ViT-L's ~304M, less its embeddings
    else:
        assert len(encoder) == 12 and 7.0e6 < per_block < 7.2e6
        assert 84e6 < _count(encoder) < 86e6  # ViT-B's ~86M, less its embeddings
    decoder = state["params"]["mage"]["decoder"]
    assert _count(decoder) == config.model.decoder_depth * _block_params(
        config.model.decoder_embed_dim, config.model.mlp_ratio)


def test_one_train_step(abstract_step):
    preset, _, _, _, state, new_state, step_metrics = abstract_step
    assert step_metrics["loss"].shape == () and step_metrics["loss"].dtype == jnp.float32
    for name in ("reconstruction_loss", "masked_accuracy", "mask_ratio", "lr", "grad_norm"):
        assert step_metrics[name].shape == (), name
    assert ("contrastive_loss" in step_metrics) == ("contrastive" in preset)
    if "contrastive" in preset:
        assert step_metrics["contrastive_loss"].shape == ()
        assert "projection" in state["params"]
    # The step returns the state it was given, leaf for leaf (so the loop can donate it).
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype) or pytest.fail(str(a)),
                 new_state, state)


def _axes(spec_entry):
    if spec_entry is None:
        return ()
    return (spec_entry,) if isinstance(spec_entry, str) else tuple(spec_entry)


def test_vit_l_shardings_on_a_data_fsdp_tensor_mesh():
    _, _, boxed, _, _, _ = _abstract_step("vit_l")
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=2, tensor=2)),
                              jax.devices()[:8])
    shardings = sharding.logical_shardings(boxed, mesh)
    block = shardings["params"]["mage"]["encoder"]["block_0"]
    spec = lambda s: [_axes(e) for e in s.spec] + [()] * 4
    # Kernels: the embed dim over fsdp, mlp / heads over tensor (Megatron-style).
    assert spec(block["mlp"]["fc1"]["kernel"])[:2] == [("fsdp",), ("tensor",)]
    assert spec(block["mlp"]["fc2"]["kernel"])[:2] == [("tensor",), ("fsdp",)]
    assert spec(block["attn"]["qkv"]["kernel"])[:4] == [("fsdp",), (), ("tensor",), ()]
    assert spec(block["attn"]["proj"]["kernel"])[:3] == [("tensor",), (), ("fsdp",)]
    assert spec(block["norm1"]["scale"])[:1] == [()]  # norms are replicated
    # Each device holds a quarter of the fc1 kernel (fsdp x tensor = 4).
    assert block["mlp"]["fc1"]["kernel"].shard_shape((1024, 4096)) == (512, 2048)
    # Adam's moments are sharded like their parameters.
    fc1 = "['encoder']['block_0']['mlp']['fc1']['kernel']"
    moments = [s for path, s in jax.tree_util.tree_flatten_with_path(shardings["opt_state"])[0]
               if jax.tree_util.keystr(path).endswith(fc1)]
    assert len(moments) == 2  # mu and nu
    assert all(m.spec == block["mlp"]["fc1"]["kernel"].spec for m in moments)
