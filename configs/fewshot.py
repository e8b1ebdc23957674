"""Stage `fewshot`: few-shot linear classification on the frozen MAGE encoder.

big_vision's `fewshot_lsr` protocol: the probe features (mean over the image tokens of the
last encoder block, parameter-free LayerNorm), k = 1, 5, 10, 25 examples per class drawn
from a training pool for each of several seeds, closed-form regularised least squares,
accuracy on the test split. Results in metrics.jsonl as `<dataset>_<k>shot`.

Arguments:
  (none)  ImageNet at 256 px (TFDS imagenet2012, prepared under data_dir)
  demo    Fashion-MNIST at 32 px, for the demo MAGE

    python -m mage_jax.main --config=configs/fewshot.py:demo --workdir=/tmp/fewshot \
        --config.pretrain_workdir=workdirs/demo
"""
import ml_collections

from mage_jax import config_defaults


def fewshot_task(datasets: dict, batch_size: int = 256) -> ml_collections.ConfigDict:
    """{dataset: (train_split the shots come from, test_split)}, big_vision's shots."""
    return ml_collections.ConfigDict(dict(datasets=datasets, shots=(1, 5, 10, 25), seeds=3,
                                          batch_size=batch_size))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    presets = config_defaults.parse_args(arg, known=("imagenet", "demo"))
    config = ml_collections.ConfigDict()
    config.stage = "fewshot"
    config.pretrain_workdir = ""
    config.model_dtype = "float32"
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.data = config_defaults.data_config("imagenet2012", image_size=256)
    config.fewshot = fewshot_task({"imagenet2012": ("train[:100000]", "validation")}, 1024)
    if "demo" in presets:
        # The demo MAGE's views: whole 32 px garments.
        config.data = config_defaults.demo_data_config()
        config.fewshot = fewshot_task({"fashion_mnist": ("train[:10000]", "test")})
    return config
