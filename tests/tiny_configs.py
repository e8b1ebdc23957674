"""The smallest configs that still run every part of a stage, for end-to-end tests."""
import os
import sys

from mage_jax import config_files


def load_config(name: str, arg: str = ""):
    """configs/<name>.py's get_config(arg), as --config=configs/<name>.py:<arg> gives it."""
    return config_files.load(f"{name}:{arg}")


def _tiny_run(config, total_steps: int):
    """Run settings both tiny configs share: batch 8 on one device, everything every step."""
    config.data.image_size = 16
    config.data.read_threads = 1
    config.batch_size = 8
    config.total_steps = total_steps
    config.log_every = 1
    config.checkpoint_every = 2
    config.image_summary_every = 2
    config.num_image_summaries = 2
    config.eval.num_examples = 20  # three test batches of 8, the last one half padding
    config.mesh.update(data=1, fsdp=1, tensor=1)
    return config


def tiny_tokenizer_config(total_steps: int = 4):
    config = load_config("tokenizer", "demo")
    config.tokenizer.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32,
                            embed_dim=32, codebook_size=64)
    config.discriminator.update(ch=8, ch_mult=(2,))
    # The demo trains without a GAN; the tiny config keeps it on so that every part runs.
    config.loss.update(adversarial_weight=0.1, adversarial_warmup_steps=2, r1_every=2)
    # MaskGIT's weight average too (the demo leaves it out), fast enough to tell the averaged
    # weights from the trained ones in a few steps.
    config.ema_decay = 0.9
    return _tiny_run(config, total_steps)


def tiny_pretrain_config(total_steps: int = 4, arg: str = "demo"):
    config = load_config("pretrain", arg)
    tokenizer = tiny_tokenizer_config()
    config.tokenizer_stage = tokenizer
    config.tokenizer = tokenizer.tokenizer
    config.model.update(embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=32,
                        decoder_depth=1, decoder_num_heads=2, dropout_rate=0.1)
    config.contrastive.update(proj_hidden_dim=32, proj_dim=16)
    return _tiny_run(config, total_steps)


def tiny_probe_config(pretrain_dir: str, total_steps: int = 4):
    """The probe demo on the tiny pretraining run (16 px), with both baselines."""
    config = load_config("probe", "demo")
    config.pretrain_workdir = pretrain_dir
    config = _tiny_run(config, total_steps)
    config.image_summary_every = 0
    config.data.train_split = "train[:200]"  # what cache_features reads
    return config


def tiny_fewshot_task(train_split: str = "train[:200]", test_split: str = "test[:40]"):
    """Few-shot on tiny splits: 1 and 5 shots, two seeds, batches of 8."""
    import ml_collections
    return ml_collections.ConfigDict(dict(datasets={"fashion_mnist": (train_split, test_split)},
                                          shots=(1, 5), seeds=2, batch_size=8))


def tiny_run_env() -> dict:
    """The environment of a stage run in a subprocess: one device, XLA's quick compiles (the
    tests' setting), so each start costs little."""
    return dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")


def tiny_tokenizer_command(workdir, steps: int, **overrides) -> list[str]:
    """``python -m mage_jax.main`` on a tiny tokenizer demo (batch 8, 16 px, no summaries or
    eval) for ``steps`` steps into ``workdir``; ``overrides``: more ``--config.NAME=VALUE``
    flags (e.g. ``log_every=1``, ``checkpoint_every=1``, ``keep_checkpoints=3``)."""
    settings = {"total_steps": steps, "log_every": 1, "checkpoint_every": 2,
                "image_summary_every": 0, "eval.num_examples": 0, "batch_size": 8,
                "data.image_size": 16, "tokenizer.codebook_size": 32,
                "tokenizer.ch_mult": "(1,2)", **overrides}
    return ([sys.executable, "-m", "mage_jax.main", "--config=configs/tokenizer.py:demo"]
            + [f"--config.{name}={value}" for name, value in settings.items()]
            + [f"--workdir={workdir}"])


def assert_generator_loss_is_the_weighted_sum(record: dict, loss_cfg) -> None:
    """Before the adversarial warm-up, a logged tokenizer loss is exactly the weighted sum
    of its logged terms, the perceptual one included."""
    import numpy as np
    w = loss_cfg
    expected = (w.reconstruction_weight * record["reconstruction_loss"]
                + w.codebook_weight * record["codebook_loss"]
                + w.commitment_weight * record["commitment_loss"]
                + w.entropy_weight * record["entropy_loss"]
                + w.perceptual_weight * record["perceptual_loss"])
    np.testing.assert_allclose(record["loss"], expected, rtol=1e-5)
