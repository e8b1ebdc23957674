"""Stage configs and presets: they build, carry the keys every stage needs and the paper's
values, take overrides (also from the command line, into the run's config.json), and the
optimiser pieces they configure (weight-decay mask, MAGE's learning-rate rule) behave.
"""
import json
import math
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from mage_jax import checkpointing, metrics, optim
from mage_jax.convert import files as convert_files
from mage_jax.models import vqgan
from mage_jax.train import pretrain
from tiny_configs import load_config, tiny_pretrain_config

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESETS = [("tokenizer", ""), ("tokenizer", "demo"), ("tokenizer", "paper"),
           ("pretrain", ""), ("pretrain", "vit_b"), ("pretrain", "vit_l"),
           ("pretrain", "contrastive"), ("pretrain", "demo"), ("pretrain", "vit_l,contrastive"),
           ("probe", "vit_b"), ("probe", "vit_l"), ("probe", "demo"),
           ("finetune", "vit_b"), ("finetune", "vit_l"), ("finetune", "demo")]
IMAGENET_TRAIN_EXAMPLES = 1_281_167


@pytest.mark.parametrize("stage, arg", PRESETS)
def test_every_preset_has_the_keys_of_a_training_stage(stage, arg):
    config = load_config(stage, arg)
    assert config.stage == stage
    for key in ("seed", "batch_size", "total_steps", "log_every", "checkpoint_every",
                "keep_checkpoints", "image_summary_every"):
        minimum = 0 if key in ("seed", "image_summary_every") else 1
        assert isinstance(config[key], int) and config[key] >= minimum, key
    for axis in ("data", "fsdp", "tensor"):
        assert isinstance(config.mesh[axis], int), axis
    for key in ("name", "data_dir", "image_size", "train_split", "crop_scale", "hflip"):
        assert key in config.data, key
    # The tokenizer's downsampling factor divides the image size: the token grid exists.
    if "tokenizer" in config:  # the stages that read a MAGE take its tokenizer from its run
        assert vqgan.token_grid(config.tokenizer, config.data.image_size) >= 1
    # Locked as main.py locks it, a misspelt key is an error, not a new field.
    config.lock()
    with pytest.raises(AttributeError, match="batch_size"):
        config.batchsize = 1


def test_pretrain_paper_values():
    config = load_config("pretrain", "vit_b")
    opt = config.optimizer
    assert (opt.b1, opt.b2, opt.weight_decay, opt.blr) == (0.9, 0.95, 0.05, 1.5e-4)
    assert (opt.warmup_epochs, opt.epochs, opt.grad_clip_norm) == (40, 1600, 3.0)
    assert config.batch_size == 4096
    steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // 4096
    assert config.total_steps == 1600 * steps_per_epoch
    m = config.masking
    assert (m.mean, m.std, m.min_ratio, m.max_ratio) == (0.55, 0.25, 0.5, 1.0)
    assert config.label_smoothing == 0.1
    assert config.data.name == "imagenet2012" and config.data.image_size == 256
    assert tuple(config.data.crop_scale) == (0.2, 1.0) and config.data.hflip
    assert config.tokenizer.codebook_size == 1024
    assert not config.contrastive.enabled and not config.train_tokenizer_if_missing


@pytest.mark.parametrize("arg, encoder, decoder", [
    ("", (768, 12, 12), (768, 8, 16)),
    ("vit_b", (768, 12, 12), (768, 8, 16)),
    ("vit_l", (1024, 24, 16), (1024, 8, 16)),
    ("vit_l,contrastive", (1024, 24, 16), (1024, 8, 16)),
])
def test_model_presets(arg, encoder, decoder):
    m = load_config("pretrain", arg).model
    assert (m.embed_dim, m.depth, m.num_heads) == encoder
    assert (m.decoder_embed_dim, m.decoder_depth, m.decoder_num_heads) == decoder
    assert m.mlp_ratio == 4.0


def test_contrastive_preset_only_adds_the_contrastive_loss():
    plain, magec = load_config("pretrain", "vit_l"), load_config("pretrain", "vit_l,contrastive")
    assert magec.contrastive.enabled and not plain.contrastive.enabled
    assert magec.contrastive.weight > 0 and magec.contrastive.temperature > 0
    assert magec.model.to_dict() == plain.model.to_dict()
    assert magec.optimizer.to_dict() == plain.optimizer.to_dict()
    assert load_config("pretrain", "contrastive").model.embed_dim == 768


def test_demo_contrastive_crops_its_views_and_plain_demo_does_not():
    assert tuple(load_config("pretrain", "demo").data.crop_scale) == (1.0, 1.0)
    magec = load_config("pretrain", "demo,contrastive")
    assert magec.contrastive.enabled and tuple(magec.data.crop_scale) == (0.6, 1.0)
    assert magec.total_steps == 2000 and magec.batch_size == 32


def test_tokenizer_paper_values():
    config = load_config("tokenizer", "paper")
    assert config.to_dict() == load_config("tokenizer", "").to_dict()
    opt = config.optimizer
    assert (opt.b1, opt.b2, opt.lr) == (0.0, 0.99, 1e-4)
    loss = config.loss
    assert (loss.perceptual_weight, loss.adversarial_weight, loss.r1_weight) == (0.1, 0.1, 10.0)
    assert (loss.commitment_weight, loss.entropy_weight) == (0.25, 0.1)
    # MaskGIT starts the GAN at once, with R1 at every step, after a 2,000-step lr warm-up.
    assert (loss.adversarial_warmup_steps, loss.r1_every, opt.warmup_steps) == (0, 1, 2000)
    disc = config.discriminator
    assert (disc.kind, disc.filters, disc.channel_multiplier, disc.blur_resample) == (
        "maskgit", 512, 1, True)
    assert load_config("tokenizer", "demo").discriminator.kind == "stylegan2_mbstd"
    assert config.tokenizer.entropy_temperature == 0.01
    assert (config.tokenizer.codebook_size, config.tokenizer.embed_dim) == (1024, 256)
    assert config.data.image_size == 256
    factor = config.data.image_size // vqgan.token_grid(config.tokenizer, config.data.image_size)
    assert factor == 16
    # The pretrain config reads the same tokenizer.
    assert load_config("pretrain", "").tokenizer.to_dict() == config.tokenizer.to_dict()


def test_demos_use_fashion_mnist():
    tokenizer = load_config("tokenizer", "demo")
    mage = load_config("pretrain", "demo")
    for data in (tokenizer.data, mage.data, mage.tokenizer_stage.data):
        assert data.name == "fashion_mnist"
        assert data.fashion_mnist_dir == "/usr/share/datasets/fashion-mnist"
    assert mage.train_tokenizer_if_missing
    assert mage.tokenizer.to_dict() == tokenizer.tokenizer.to_dict()
    assert mage.data.image_size == tokenizer.data.image_size
    assert mage.num_train_examples == 60_000


def test_overrides_take_effect_and_follow_references():
    config = load_config("pretrain", "demo")
    config.lock()
    config.batch_size = 16
    config.optimizer.blr = 2e-4
    assert config.batch_size == 16 and config.optimizer.blr == 2e-4
    # A tokenizer trained first reads MAGE's dataset, image size and tokenizer sizes: one
    # override moves both stages, while its own augmentation and schedule stay its own.
    config.data.image_size = 48
    config.data.data_dir = "/data/tfds"
    config.tokenizer.codebook_size = 512
    config.data.crop_scale = (0.5, 1.0)
    tok = pretrain.tokenizer_stage_config(config)
    assert tok.data.image_size == 48 and tok.data.data_dir == "/data/tfds"
    assert tok.tokenizer.codebook_size == 512 and tok.stage == "tokenizer"
    assert tok.data.crop_scale == config.tokenizer_stage.data.crop_scale == (1.0, 1.0)
    with pytest.raises(TypeError):
        config.batch_size = "many"


@pytest.mark.parametrize("overrides", [{}, {"total_steps": 3000}, {"batch_size": 64}])
def test_the_demo_cosine_ends_with_the_run_whatever_its_length(overrides):
    config = load_config("pretrain", "demo")
    for key, value in overrides.items():
        setattr(config, key, value)  # what --config.total_steps=... does
    schedule = optim.epoch_schedule(config)
    end = config.total_steps
    peak = float(schedule(60))  # past the warm-up
    assert float(schedule(end // 2)) == pytest.approx(peak / 2, rel=0.05)
    assert float(schedule(end - 20)) > 0 and float(schedule(end)) < 1e-4 * peak
    # The class-conditional fine-tune keeps its own, shorter schedule.
    cond = load_config("pretrain", "demo,class_conditional")
    cond.total_steps = 300
    assert float(optim.epoch_schedule(cond)(300)) < 1e-4 * float(optim.epoch_schedule(cond)(20))


# ------------------------------------------------------------------- optimiser pieces

def test_decay_mask_on_the_real_model():
    config = tiny_pretrain_config(arg="demo,contrastive")
    boxed = jax.eval_shape(pretrain.make_stage(config).init_state, jax.random.key(0))["params"]
    for tree in (boxed, nn.unbox(boxed)):
        mask = {jax.tree_util.keystr(p): v
                for p, v in jax.tree_util.tree_flatten_with_path(optim.decay_mask(tree))[0]}
        mask = {k.replace(".value", ""): v for k, v in mask.items()}
        assert mask["['mage']['token_emb']['word_embeddings']"] is True
        assert mask["['mage']['token_emb']['position_embeddings']"] is True
        assert mask["['mage']['decoder_pos_embed']"] is True
        assert mask["['mage']['encoder']['block_0']['attn']['qkv']['kernel']"] is True
        assert mask["['mage']['mlm_head']['fc']['kernel']"] is True
        assert mask["['mage']['mlm_head']['bias']"] is False
        assert mask["['mage']['encoder']['block_0']['norm1']['scale']"] is False
        assert mask["['mage']['encoder']['block_0']['mlp']['fc1']['bias']"] is False
        assert mask["['mage']['decoder_norm']['bias']"] is False
        for name, decayed in mask.items():
            assert decayed == (not name.endswith(("['bias']", "['scale']"))), name


def test_adamw_decays_matrices_and_embeddings_only():
    params = {"dense": {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 2.0)},
              "norm": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)},
              "embedding": jnp.full((4, 2), 2.0)}
    tx = optim.adamw(optax.constant_schedule(0.1), b1=0.9, b2=0.95, weight_decay=0.5,
                     grad_clip_norm=3.0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    # Zero gradients: only decoupled weight decay moves a parameter, by lr * wd * value.
    np.testing.assert_allclose(new["dense"]["kernel"], 2.0 - 0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_allclose(new["embedding"], 1.9, rtol=1e-6)
    for kept in (new["dense"]["bias"], new["norm"]["scale"], new["norm"]["bias"]):
        np.testing.assert_array_equal(kept, 2.0)


def _mage_lr(step, blr, batch, warmup_epochs, epochs, examples):
    """MAGE's rule, written out: lr = blr * batch / 256, linear warm-up, then half-cosine."""
    steps_per_epoch = examples // batch
    peak, warmup, total = blr * batch / 256, warmup_epochs * steps_per_epoch, epochs * steps_per_epoch
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("batch", [4096, 1024])
def test_pretrain_learning_rate_schedule(batch):
    config = load_config("pretrain", "vit_b")
    config.batch_size = batch
    opt = config.optimizer
    schedule = optim.epoch_schedule(config)
    steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // batch
    warmup, total = 40 * steps_per_epoch, 1600 * steps_per_epoch
    peak = 1.5e-4 * batch / 256
    for step in (0, 1, warmup // 3, warmup - 1, warmup, warmup + 1, (warmup + total) // 2,
                 total - 100, total):
        want = _mage_lr(step, opt.blr, batch, opt.warmup_epochs, opt.epochs,
                        config.num_train_examples)
        np.testing.assert_allclose(float(schedule(step)), want, rtol=1e-4, atol=peak * 1e-6,
                                   err_msg=f"step {step}")
    assert float(schedule(warmup)) == pytest.approx(peak, rel=1e-6)
    assert float(schedule(total)) == pytest.approx(0.0, abs=peak * 1e-6)


# ---------------------------------------------------- the command line and config.json

@pytest.fixture(scope="module")
def random_tokenizer_dir(tmp_path_factory):
    """A tokenizer checkpoint in the format `python -m mage_jax.convert tokenizer` writes,
    with random weights: enough to tokenize, without training one."""
    config = tiny_pretrain_config()
    model = vqgan.vqgan_from_config(config.tokenizer)
    size = config.data.image_size
    abstract = nn.unbox(jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32),
                          abstract["params"])
    out = tmp_path_factory.mktemp("tokenizer") / "random"
    convert_files.save_params(str(out), params, {"stage": "tokenizer",
                                               "tokenizer": config.tokenizer.to_dict()})
    return out


def test_command_line_override_reaches_the_run_and_its_config_json(random_tokenizer_dir, tmp_path):
    config_file = tmp_path / "tiny_pretrain.py"
    config_file.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from tiny_configs import tiny_pretrain_config\n\n"
        "def get_config():\n"
        "    config = tiny_pretrain_config(total_steps=3)\n"
        f"    config.tokenizer_workdir = {str(random_tokenizer_dir)!r}\n"
        "    config.train_tokenizer_if_missing = False\n"
        "    config.image_summary_every = 0\n"
        "    return config\n")
    workdir = tmp_path / "run"
    env = dict(os.environ, XLA_FLAGS="")  # one CPU device: the tiny config's 1x1x1 mesh
    result = subprocess.run(
        [sys.executable, "-m", "mage_jax.main", f"--config={config_file}",
         "--config.batch_size=4", "--config.total_steps=1", "--config.model.depth=2",
         "--config.optimizer.blr=3e-4", f"--workdir={workdir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((workdir / "config.json").read_text())
    assert written["stage"] == "pretrain"
    assert written["batch_size"] == 4 and written["total_steps"] == 1
    assert written["model"]["depth"] == 2 and written["optimizer"]["blr"] == 3e-4
    assert written["tokenizer_workdir"] == str(random_tokenizer_dir)
    # What ran is what config.json says: one step, a checkpoint there, depth-2 encoder.
    assert [r["step"] for r in metrics.read_metrics(str(workdir))] == [1]
    params, step = checkpointing.restore_params(str(workdir))
    assert step == 1 and sorted(params["mage"]["encoder"]) == ["block_0", "block_1"]


def test_tokenizer_schedules_constant_and_cosine():
    from mage_jax.train import tokenizer as tokenizer_stage
    paper = load_config("tokenizer", "paper").optimizer
    constant = tokenizer_stage._schedule(paper)  # MaskGIT: warm-up, then constant
    assert float(constant(paper.warmup_steps // 2)) == pytest.approx(paper.lr / 2, rel=1e-3)
    assert float(constant(10 ** 6)) == pytest.approx(paper.lr)
    demo = load_config("tokenizer", "demo")
    cosine = tokenizer_stage._schedule(demo.optimizer)
    assert demo.optimizer.decay_steps == demo.total_steps  # follows --config.total_steps
    half = (demo.optimizer.warmup_steps + demo.total_steps) / 2
    assert float(cosine(int(half))) == pytest.approx(demo.optimizer.lr / 2, rel=1e-2)
    assert float(cosine(demo.total_steps)) == pytest.approx(0.0, abs=1e-9)
    bad = ml_collections.ConfigDict(dict(demo.optimizer.to_dict(), schedule="linear"))
    with pytest.raises(ValueError, match="schedule='linear'"):
        tokenizer_stage._schedule(bad)


@pytest.mark.parametrize("arg, blr", [("vit_b", 0.1), ("vit_l", 0.05)])
def test_probe_paper_values(arg, blr):
    """The official README's linear probe: blr 0.1 (ViT-L 0.05), batch 16384, 90 epochs
    with 10 of warm-up, LARS without weight decay, crops of (0.2, 1) bicubic, eval 292/256."""
    c = load_config("probe", arg)
    assert c.optimizer.blr == blr and c.batch_size == 16384
    assert (c.optimizer.epochs, c.optimizer.warmup_epochs) == (90.0, 10.0)
    assert (c.optimizer.momentum, c.optimizer.trust_coefficient, c.optimizer.weight_decay) == (
        0.9, 0.001, 0.0)
    assert c.total_steps == 90 * (IMAGENET_TRAIN_EXAMPLES // 16384)
    assert tuple(c.data.crop_scale) == (0.2, 1.0) and c.data.interpolation == "bicubic"
    assert int(256 / c.data.eval_crop_fraction) == 292 and not c.cache_features
    assert c.eval.num_examples == -1 and c.features == "encoder"


@pytest.mark.parametrize("arg, epochs, decay, drop_path", [("vit_b", 100.0, 0.65, 0.1),
                                                          ("vit_l", 50.0, 0.75, 0.2)])
def test_finetune_paper_values(arg, epochs, decay, drop_path):
    c = load_config("finetune", arg)
    assert (c.optimizer.epochs, c.optimizer.layer_decay, c.model.drop_path) == (
        epochs, decay, drop_path)
    assert (c.optimizer.blr, c.batch_size, c.optimizer.weight_decay) == (2.5e-4, 1024, 0.05)
    assert (c.mixup.mixup_alpha, c.mixup.cutmix_alpha, c.label_smoothing) == (0.8, 1.0, 0.1)
    assert c.optimizer.warmup_epochs == 5.0 and (c.optimizer.b1, c.optimizer.b2) == (0.9, 0.999)
    # MAGE's util/datasets.py: crops of (0.2, 1), bicubic, rand-m9-mstd0.5-inc1, --reprob 0.
    assert tuple(c.data.crop_scale) == (0.2, 1.0) and c.data.interpolation == "bicubic"
    assert (c.data.rand_augment_ops, c.data.rand_augment_magnitude, c.data.rand_augment_std,
            c.data.random_erasing) == (2, 9.0, 0.5, 0.0)
