"""Data-test fixtures: Fashion-MNIST prepared offline ONCE per session, small configs."""
import ml_collections
import pytest

from mage_jax.data import fashion_mnist


@pytest.fixture(scope="session")
def fashion_mnist_dir():
    """The Debian files; the data tests need the package installed (no network here)."""
    missing = fashion_mnist.missing_files(fashion_mnist.DEFAULT_DIR)
    if missing:
        raise RuntimeError(f"{missing} missing from {fashion_mnist.DEFAULT_DIR}: "
                           f"run `{fashion_mnist.APT_HINT}`.")
    return fashion_mnist.DEFAULT_DIR


@pytest.fixture(scope="session")
def prepared_data_dir(tmp_path_factory, fashion_mnist_dir):
    """A TFDS data_dir holding fashion_mnist prepared from the Debian files (about 20 s)."""
    data_dir = tmp_path_factory.mktemp("tfds")
    fashion_mnist.prepare_fashion_mnist(data_dir, fashion_mnist_dir)
    return str(data_dir)


def _make_data_config(**overrides) -> ml_collections.ConfigDict:
    cfg = dict(name="fashion_mnist", data_dir=None, manual_dir=None,
               fashion_mnist_dir=fashion_mnist.DEFAULT_DIR, train_split="train",
               eval_split="test", image_size=32, crop_scale=(0.2, 1.0),
               crop_ratio=(3 / 4, 4 / 3), hflip=True, color_jitter=0.4, color_jitter_prob=0.8,
               grayscale_prob=0.2, read_threads=2, prefetch=2)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


@pytest.fixture
def make_data_config():
    """A factory for config.data (the fields the data layer reads) at test sizes."""
    return _make_data_config
