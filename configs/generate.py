"""Stage `generate`: sample images from a trained MAGE by iterative decoding.

Arguments (comma separated):
  vit_b   MAGE ViT-B at 256 px: 50,000 samples, 20 steps, choice temperature 6.0 (the
          official README's settings for the paper's FID/IS; the default)
  vit_l   MAGE ViT-L, the same settings
  demo    the Fashion-MNIST demo model: 1,000 samples, 12 steps, temperature 4.5
  smoke   with demo: 32 samples (to check an installation or a notebook)

The model, its sizes and its tokenizer come from `config.pretrain_workdir`: a pretraining
run's workdir or converted official weights (`python -m mage_jax.convert mage ...`).

    python -m mage_jax.main --config=configs/generate.py:vit_b --workdir=/tmp/gen \
        --config.pretrain_workdir=/ckpt/mage-vitb
"""
import ml_collections

from mage_jax import config_defaults


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_defaults.parse_args(arg, known=("vit_b", "vit_l", "demo", "smoke"))
    config = ml_collections.ConfigDict()
    config.stage = "generate"
    config.seed = 0
    config.pretrain_workdir = ""
    config.checkpoint_step = -1     # -1: the latest checkpoint of the run
    config.dtype = "float32"        # compute dtype of MAGE and the tokenizer while sampling
    config.num_samples = 50_000     # the paper's FID/IS protocol
    config.batch_size = 256         # global, across hosts and devices
    config.sampling = ml_collections.ConfigDict(dict(
        num_steps=20,               # official README (the script's default is 12)
        choice_temperature=6.0,     # official README (the script's default is 4.5)
        # -1: unconditional ([C0] at position 0, the paper); a label >= 0: that class; -2:
        # classes 0..num_classes-1 in turn. Classes need a class-conditional MAGE.
        class_label=-1,
        num_classes=0,
        guidance_scale=0.0,         # classifier-free guidance, class-conditional MAGE only
    ))
    config.save_png = True          # samples/000000.png ... beside samples.npz
    config.num_grid = 64            # samples in samples_grid.png and TensorBoard
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # FID and IS (torch-fidelity's protocol, mage_jax/eval/fid.py) when reference_stats is
    # set: statistics of the real images from `python -m mage_jax.eval.score --save_stats`,
    # and the standard pt_inception-2015-12-05 weights (a path, the cache, or download).
    config.fid = ml_collections.ConfigDict(dict(
        reference_stats="",
        inception_weights="",
        download=False,
        splits=10,
        batch_size=50,
    ))
    # Frechet distances in the feature space of a small classifier trained on the model's
    # own dataset (offline; mage_jax/generate/measures.py): fd_samples, fd_real (floor),
    # fd_random_tokens (ceiling), cond_accuracy for class-conditional samples.
    config.classifier_measures = ml_collections.ConfigDict(dict(
        enabled=False,
        num_classes=10,
        train_steps=400,
        cache_dir="",               # where the trained classifier is kept ("": beside the data)
    ))

    if "demo" in presets:
        config.num_samples = 1000
        config.batch_size = 100
        config.sampling.update(num_steps=12, choice_temperature=4.5)
        config.classifier_measures.enabled = True
    if config_defaults.smoke_preset(presets):  # 32 samples, a briefly trained classifier
        config.update(num_samples=32, batch_size=32, num_grid=16)
        config.classifier_measures.train_steps = 20
    return config
