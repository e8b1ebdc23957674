"""Stage `probe`: linear probe on the frozen MAGE encoder (the official main_linprobe.py).

Arguments (comma separated):
  vit_b   MAGE ViT-B on ImageNet at 256 px: blr 0.1, batch 16384, 90 epochs, 10 warm-up
          (the official README; the default)
  vit_l   MAGE ViT-L: the same with blr 0.05
  demo    the Fashion-MNIST demo model; also probes a randomly initialised encoder and the
          raw pixels under the same recipe (`random_init_top1`, `pixels_top1`)
  smoke   with demo: 512 training and 256 test images (an installation or notebook check)

The encoder, its sizes and its tokenizer come from `config.pretrain_workdir`: a pretraining
run's workdir or converted official weights (`python -m mage_jax.convert mage ...`).

    python -m mage_jax.main --config=configs/probe.py:vit_b --workdir=/tmp/probe \
        --config.pretrain_workdir=/ckpt/mage-vitb --config.data.data_dir=/data/tfds
"""
import ml_collections

from mage_jax import config_defaults

IMAGENET_TRAIN_EXAMPLES = 1_281_167


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_defaults.parse_args(arg, known=("vit_b", "vit_l", "demo", "smoke"))
    demo = "demo" in presets
    config = config_defaults.base_config("probe")
    config.pretrain_workdir = ""
    config.model_dtype = "float32"  # compute dtype of the frozen encoder and tokenizer
    # What the head reads: `encoder` (the pretrained MAGE), `random_init` (the same
    # architecture, untrained) or `pixels` (the flattened image). Each of `baselines` is
    # probed afterwards in <workdir>/<name> and reported as <name>_top1 / <name>_top5.
    config.features = "encoder"
    # False: features of a freshly augmented view in every step (the paper). True: each
    # image's features once, from its evaluation view, then the head trains on them
    # (mage_jax/probe/cached.py; far cheaper where the encoder dominates, as on CPU).
    config.cache_features = False
    config.baselines = ()
    config.num_classes = -1        # -1: the dataset's class count; else it must match
    # BatchNorm without affine parameters (eps 1e-6), then a linear layer (std 0.01).
    config.head = ml_collections.ConfigDict(dict(bn_eps=1e-6, init_std=0.01))
    # MAE's LARS: lr = blr * batch / 256, momentum 0.9, trust coefficient 0.001, no weight
    # decay; 10 warm-up epochs then a cosine to 0 at 90 epochs.
    config.optimizer = ml_collections.ConfigDict(dict(
        blr=0.05 if "vit_l" in presets else 0.1, momentum=0.9, trust_coefficient=0.001,
        weight_decay=0.0, warmup_epochs=10.0, epochs=90.0))
    config.num_train_examples = IMAGENET_TRAIN_EXAMPLES
    config.batch_size = 16384
    # Training views: RandomResizedCrop(256, scale=(0.2, 1), bicubic) + flip; evaluation:
    # resize to 292 (bicubic), center crop 256; top-1/top-5 on the whole validation split.
    config.data = config_defaults.data_config("imagenet2012", image_size=256)
    config.data.interpolation = "bicubic"
    config.eval.num_examples = -1
    config.log_every = 100
    config.checkpoint_every = 1000
    config.image_summary_every = 0

    if demo:
        # The demo MAGE (configs/pretrain.py:demo) saw whole 32 px garments, never crops:
        # the probe reads the same views. Its encoder reads ~250 images/s on 2 cores, so the
        # features of 10,000 training images are computed once (cache_features) and the
        # head trains 30 epochs on them; the test split is scored whole. blr 4.0 was the
        # best of 0.1, 1, 4 and 16 for all three feature sources (docs/demo.md).
        config.data = config_defaults.demo_data_config()
        config.data.train_split = "train[:10000]"
        config.num_train_examples = 10_000
        config.cache_features = True
        config.baselines = ("random_init", "pixels")
        config.batch_size = 256
        config.optimizer.update(blr=4.0, warmup_epochs=3.0, epochs=30.0)
        config.log_every = 100
        config.checkpoint_every = 500
    if config_defaults.smoke_preset(presets):  # the demo probe on 512 + 256 images
        config.data.train_split = "train[:512]"
        config.num_train_examples = 512
        config.eval.num_examples = 256
        config.optimizer.epochs = 10.0
    steps_per_epoch = config.num_train_examples // config.batch_size
    config.total_steps = int(config.optimizer.epochs * steps_per_epoch)
    return config
