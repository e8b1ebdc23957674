"""A tiny trained MAGE shared by the generation tests."""
import jax
import pytest

from mage_jax.train import stages
from tests.tiny_configs import tiny_pretrain_config


@pytest.fixture(scope="session")
def pretrain_dir(tmp_path_factory):
    """A 2-step tiny pretraining run (its tokenizer trained first, inside the run)."""
    workdir = tmp_path_factory.mktemp("pretrain")
    config = tiny_pretrain_config(total_steps=2)
    config.tokenizer_stage.total_steps = 2
    config.eval.num_examples = 0
    config.image_summary_every = 0
    stages.run(config, str(workdir), devices=jax.devices()[:1], summarize=False)
    return str(workdir)
