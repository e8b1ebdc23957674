"""Fashion-MNIST prepared offline by TFDS reads as if TFDS had downloaded it."""
import gzip
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mage_jax.data import fashion_mnist


def test_prepared_splits_have_official_sizes(prepared_data_dir):
    builder = tfds.builder("fashion_mnist", data_dir=prepared_data_dir)
    assert builder.is_prepared()
    assert builder.info.file_format.value == "array_record"
    assert builder.info.features["label"].num_classes == 10
    train = tfds.data_source("fashion_mnist", split="train", data_dir=prepared_data_dir,
                             download=False)
    test = tfds.data_source("fashion_mnist", split="test", data_dir=prepared_data_dir,
                            download=False)
    assert (len(train), len(test)) == (60000, 10000)
    labels = np.array([test[i]["label"] for i in range(0, 10000, 10)])
    assert labels.min() == 0 and labels.max() == 9 and len(np.unique(labels)) == 10
    image = train[123]["image"]
    assert image.shape == (28, 28, 1) and image.dtype == np.uint8


def test_examples_are_the_debian_idx_examples(prepared_data_dir, fashion_mnist_dir):
    images_file, labels_file, count = fashion_mnist.FILES["test"]
    images, labels = fashion_mnist.read_idx(os.path.join(fashion_mnist_dir, images_file),
                                            os.path.join(fashion_mnist_dir, labels_file), count)
    test = tfds.data_source("fashion_mnist", split="test", data_dir=prepared_data_dir,
                            download=False)
    flat = images.reshape(count, -1)
    for index in (0, 4321, 9999):
        example = test[index]
        matches = np.flatnonzero((flat == example["image"].reshape(1, -1)).all(axis=1))
        assert len(matches) >= 1, "a prepared image is not among the IDX images"
        assert labels[matches[0]] == example["label"]


def test_prepared_in_place_with_no_scratch_left(prepared_data_dir):
    assert fashion_mnist.is_prepared(prepared_data_dir)
    leftovers = [n for n in os.listdir(prepared_data_dir) if "incomplete" in n]
    assert leftovers == []
    assert sorted(os.listdir(os.path.join(prepared_data_dir, "fashion_mnist"))) == ["3.0.1"]


def test_prepare_again_reuses_the_dataset(prepared_data_dir, fashion_mnist_dir):
    info = os.path.join(prepared_data_dir, "fashion_mnist", "3.0.1", "dataset_info.json")
    before = os.stat(info).st_mtime_ns
    assert fashion_mnist.prepare_fashion_mnist(prepared_data_dir, fashion_mnist_dir) == \
        prepared_data_dir
    assert os.stat(info).st_mtime_ns == before


def test_prepare_without_source_files_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fashion_mnist.prepare_fashion_mnist(tmp_path / "tfds", tmp_path / "nothing_here")


def test_read_idx_refuses_a_file_with_the_wrong_count(tmp_path):
    images = tmp_path / "images.gz"
    labels = tmp_path / "labels.gz"
    with gzip.open(images, "wb") as f:
        f.write(np.array([2051, 3, 28, 28], ">u4").tobytes() + bytes(3 * 28 * 28))
    with gzip.open(labels, "wb") as f:
        f.write(np.array([2049, 3], ">u4").tobytes() + bytes([1, 2, 3]))
    got_images, got_labels = fashion_mnist.read_idx(images, labels, 3)
    assert got_images.shape == (3, 28, 28, 1) and got_labels.tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="images.gz"):
        fashion_mnist.read_idx(images, labels, 4)
