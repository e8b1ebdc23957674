"""check_dataset's errors say how to get the data; open_source reads TFDS and folders."""
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from mage_jax.data import datasets


def test_missing_debian_files_name_the_apt_command(tmp_path, make_data_config):
    cfg = make_data_config(data_dir=str(tmp_path / "tfds"),
                           fashion_mnist_dir=str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.DatasetNotFoundError) as err:
        datasets.check_dataset(cfg, "train")
    message = str(err.value)
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert str(tmp_path / "tfds") in message and isinstance(err.value, ValueError)


def test_unprepared_fashion_mnist_with_debian_files_passes(tmp_path, make_data_config):
    datasets.check_dataset(make_data_config(data_dir=str(tmp_path)), "test")
    with pytest.raises(datasets.DatasetNotFoundError, match="validation.*available.*train"):
        datasets.check_dataset(make_data_config(data_dir=str(tmp_path)), "validation")


def test_unknown_dataset_is_named(tmp_path, make_data_config):
    with pytest.raises(datasets.DatasetNotFoundError, match="no_such_dataset_xyz"):
        datasets.check_dataset(make_data_config(name="no_such_dataset_xyz",
                                                data_dir=str(tmp_path)), "train")


def test_unprepared_datasets_give_the_build_command(tmp_path, make_data_config):
    with pytest.raises(datasets.DatasetNotFoundError) as err:
        datasets.check_dataset(make_data_config(name="cifar10", data_dir=str(tmp_path)), "train")
    assert f"tfds build cifar10 --data_dir={tmp_path}" in str(err.value)
    assert "--file_format=array_record" in str(err.value)
    cfg = make_data_config(name="imagenet2012", data_dir=str(tmp_path), manual_dir="/tars")
    with pytest.raises(datasets.DatasetNotFoundError) as err:
        datasets.check_dataset(cfg, "validation")
    assert "ILSVRC2012_img_train.tar" in str(err.value) and "--manual_dir=/tars" in str(err.value)


def test_prepared_split_check(prepared_data_dir, make_data_config):
    cfg = make_data_config(data_dir=prepared_data_dir)
    datasets.check_dataset(cfg, "train[:10%]+test")
    with pytest.raises(datasets.DatasetNotFoundError, match=r"validation.*\['train', 'test'\]"):
        datasets.check_dataset(cfg, "validation")
    source = datasets.open_source(cfg, "test")
    assert len(source) == 10000 and source[0]["image"].shape == (28, 28, 1)


def test_tfrecord_dataset_asks_for_array_record(prepared_data_dir, tmp_path, make_data_config):
    # The metadata of a tfrecord-prepared copy is enough: check_dataset reads nothing else.
    src = os.path.join(prepared_data_dir, "fashion_mnist", "3.0.1")
    dst = tmp_path / "fashion_mnist" / "3.0.1"
    dst.mkdir(parents=True)
    for name in ("dataset_info.json", "features.json", "label.labels.txt"):
        shutil.copy(os.path.join(src, name), dst / name)
    info = json.loads((dst / "dataset_info.json").read_text())
    info["fileFormat"] = "tfrecord"
    (dst / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(datasets.DatasetNotFoundError, match="array_record"):
        datasets.check_dataset(make_data_config(data_dir=str(tmp_path)), "train")


def _write_folder(root):
    """Two classes ('b_rgb' sorts after 'a_gray'), images with pixel value = image number."""
    for cls, mode, count in (("a_gray", "L", 2), ("b_rgb", "RGB", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            shape = (12, 10) if mode == "L" else (12, 10, 3)
            Image.fromarray(np.full(shape, 10 * i + (100 if mode == "RGB" else 0), np.uint8),
                            mode).save(root / cls / f"{i}.png")
    (root / "b_rgb" / "notes.txt").write_text("not an image")


def test_folder_source(tmp_path, make_data_config):
    _write_folder(tmp_path / "imgs")
    cfg = make_data_config(name="folder", manual_dir=str(tmp_path / "imgs"))
    datasets.check_dataset(cfg, "train")
    source = datasets.open_source(cfg, "train")
    assert len(source) == 5
    assert [source[i]["label"] for i in range(5)] == [0, 0, 1, 1, 1]
    assert source[1]["image"].shape == (12, 10, 1) and source[1]["image"].max() == 10
    assert source[4]["image"].shape == (12, 10, 3) and source[4]["image"].min() == 120


def test_folder_split_subfolder_and_errors(tmp_path, make_data_config):
    _write_folder(tmp_path / "root" / "val")
    cfg = make_data_config(name="folder", manual_dir=str(tmp_path / "root"))
    assert len(datasets.open_source(cfg, "val")) == 5
    (tmp_path / "empty").mkdir()
    with pytest.raises(datasets.DatasetNotFoundError, match="class subfolders"):
        datasets.check_dataset(make_data_config(name="folder", manual_dir=str(tmp_path / "empty")),
                               "train")
    with pytest.raises(datasets.DatasetNotFoundError, match="manual_dir"):
        datasets.check_dataset(make_data_config(name="folder"), "train")
