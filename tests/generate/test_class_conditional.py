"""Class-conditional MAGE: class ids, fine-tuning from a run, guided sampling."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax import pretrained, sharding
from mage_jax.generate import sampler
from mage_jax.models.mage import MAGE
from mage_jax.train import pretrain, stages
from tests.tiny_configs import load_config, tiny_pretrain_config


def test_class_ids_skip_c0_and_mask():
    model = MAGE(codebook_size=1024, num_tokens=256)
    ids = np.asarray(model.class_token_id(jnp.array([0, 75, 76, 998])))
    np.testing.assert_array_equal(ids, [1024, 1099, 1101, 2023])
    assert model.num_class_ids == 999
    every = np.asarray(model.class_token_id(jnp.arange(999)))
    assert len(set(every.tolist())) == 999
    assert model.fake_class_id not in every and model.mask_token_id not in every


def _conditional_config(pretrain_dir, total_steps=3):
    config = tiny_pretrain_config(total_steps, arg="demo,class_conditional")
    config.init_from = pretrain_dir
    config.train_tokenizer_if_missing = False
    config.eval.num_examples = 0
    config.image_summary_every = 0
    return config


def test_fine_tuning_starts_from_the_pretrained_weights(pretrain_dir, tmp_path):
    config = _conditional_config(pretrain_dir)
    assert pretrain.tokenizer_workdir(config, str(tmp_path)).startswith(pretrain_dir)
    stage = pretrain.build_stage(config, str(tmp_path), jax.devices()[:1])
    with jax.set_mesh(sharding.make_mesh(config.mesh, jax.devices()[:1])):
        state = jax.jit(lambda r: nn.unbox(stage.init_state(r)))(jax.random.key(0))
        started = stage.warm_start(state)
    source = pretrained.load(pretrain_dir).params
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(started["params"]["mage"]),
                 source)


def test_bad_class_count_and_model_size_are_named(pretrain_dir, tmp_path):
    config = _conditional_config(pretrain_dir)
    config.class_conditional.num_classes = 1000
    with pytest.raises(ValueError, match="num_classes=1000"):
        stages.run(config, str(tmp_path / "a"), devices=jax.devices()[:1])
    config = _conditional_config(pretrain_dir)
    config.model.embed_dim = 64
    with pytest.raises(ValueError, match="init_from=.* parameter"):
        stages.run(config, str(tmp_path / "b"), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def conditional_dir(pretrain_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("conditional")
    stages.run(_conditional_config(pretrain_dir), str(workdir), devices=jax.devices()[:1],
               summarize=False)
    return str(workdir)


def test_guidance_mixes_conditional_and_unconditional_logits(conditional_dir):
    pre = pretrained.load(conditional_dir)
    ids = jnp.full((2, pre.model.num_tokens), pre.model.mask_token_id, jnp.int32)
    ids = ids.at[:, :3].set(5)
    labels = jnp.array([3, -1])
    cond = sampler.logits_fn_for(pre.model, pre.params, labels, 0.0)(ids)
    uncond = sampler.logits_fn_for(pre.model, pre.params, jnp.array([-1, -1]), 0.0)(ids)
    guided = sampler.logits_fn_for(pre.model, pre.params, labels, 2.0)(ids)
    np.testing.assert_allclose(guided, 3.0 * cond - 2.0 * uncond, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(guided[1], uncond[1], rtol=1e-5, atol=1e-4)  # no label
    assert not np.allclose(cond[0], uncond[0])  # the class token changes the prediction


def test_generate_classes_in_turn_with_guidance(conditional_dir, tmp_path):
    from mage_jax.generate import stage as generate
    config = load_config("generate", "demo")
    config.update(pretrain_workdir=conditional_dir, num_samples=4, batch_size=4, num_grid=4)
    config.sampling.update(num_steps=3, class_label=-2, num_classes=2, guidance_scale=1.0)
    config.mesh.data = 1
    generate.run(config, str(tmp_path / "guided"), devices=jax.devices()[:1])
    guided = np.load(tmp_path / "guided" / "samples.npz")["images"]
    config.sampling.update(class_label=-1, guidance_scale=0.0)
    generate.run(config, str(tmp_path / "plain"), devices=jax.devices()[:1])
    plain = np.load(tmp_path / "plain" / "samples.npz")["images"]
    assert guided.shape == plain.shape == (4, 16, 16, 3)
    assert not np.array_equal(guided, plain)
