"""Stage `finetune`: the pretrained MAGE encoder with a classification head, end to end.

Arguments (comma separated):
  vit_b   MAGE ViT-B on ImageNet at 256 px, the official README's recipe: batch 1024,
          blr 2.5e-4, 100 epochs (5 warm-up), layer decay 0.65, drop-path 0.1, weight
          decay 0.05, Mixup 0.8 / CutMix 1.0, label smoothing 0.1 (the default)
  vit_l   MAGE ViT-L: 50 epochs, layer decay 0.75, drop-path 0.2
  demo    the Fashion-MNIST demo model, a few hundred steps

The encoder, its sizes and its tokenizer come from `config.pretrain_workdir`.

    python -m mage_jax.main --config=configs/finetune.py:vit_b --workdir=/tmp/ft \
        --config.pretrain_workdir=/ckpt/mage-vitb --config.data.data_dir=/data/tfds
"""
import ml_collections

from mage_jax import config_defaults

IMAGENET_TRAIN_EXAMPLES = 1_281_167
FASHION_MNIST_TRAIN_EXAMPLES = 60_000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_defaults.parse_args(arg, known=("vit_b", "vit_l", "demo"))
    large, demo = "vit_l" in presets, "demo" in presets
    config = config_defaults.base_config("finetune")
    config.pretrain_workdir = ""
    config.num_classes = -1          # -1: the dataset's class count; else it must match
    config.model = ml_collections.ConfigDict(dict(
        drop_path=0.2 if large else 0.1, dtype="float32", remat=False))
    # MAE's AdamW: lr = blr * batch / 256, (0.9, 0.999), no decay on biases and norms,
    # layer-wise lr decay; warm-up then cosine (to 0; MAE's floor is 1e-6).
    config.optimizer = ml_collections.ConfigDict(dict(
        blr=2.5e-4, b1=0.9, b2=0.999, weight_decay=0.05, layer_decay=0.75 if large else 0.65,
        warmup_epochs=5.0, epochs=50.0 if large else 100.0))
    config.label_smoothing = 0.1
    config.mixup = ml_collections.ConfigDict(dict(
        mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, prob=1.0))
    config.num_train_examples = IMAGENET_TRAIN_EXAMPLES
    config.batch_size = 1024
    # Training views (MAGE's util/datasets.py: timm's create_transform): RandomResizedCrop
    # (256, scale=(0.2, 1), bicubic) + flip, RandAugment rand-m9-mstd0.5-inc1; random
    # erasing off (the README's --reprob 0); evaluation: resize 292 (bicubic), crop 256.
    config.data = config_defaults.data_config("imagenet2012", image_size=256)
    config.data.interpolation = "bicubic"
    config.data.update(rand_augment_ops=2, rand_augment_magnitude=9.0, rand_augment_std=0.5,
                       random_erasing=0.0)
    config.eval.num_examples = -1
    config.image_summary_every = 0
    if demo:
        # The demo MAGE's whole 32 px garments (it never saw crops).
        config.data = config_defaults.demo_data_config()
        config.data.update(rand_augment_ops=2, rand_augment_magnitude=9.0,
                           rand_augment_std=0.5, random_erasing=0.0)
        config.num_train_examples = FASHION_MNIST_TRAIN_EXAMPLES
        config.batch_size = 64
        config.total_steps = 300
        config.optimizer.update(blr=1e-3, warmup_epochs=0.02,
                                epochs=300 * 64 / FASHION_MNIST_TRAIN_EXAMPLES)
        config.log_every = 50
        config.checkpoint_every = 300
        config.eval.num_examples = 2000
    else:
        steps_per_epoch = config.num_train_examples // config.batch_size
        config.total_steps = int(config.optimizer.epochs * steps_per_epoch)
    return config
