"""A folder dataset with broken files: the readable ones train, the rest are passed over
deterministically and counted (`data/skipped`); nothing readable at all stops at once."""
import io
import json

import jax
import numpy as np
import pytest
from PIL import Image

from mage_jax.data import datasets, pipeline
from mage_jax.train import stages
from tests.tiny_configs import tiny_tokenizer_config


def _png_bytes(array, mode):
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _half_of_a_png():
    noise = np.random.default_rng(0).integers(0, 255, (16, 16), dtype=np.uint8)
    data = _png_bytes(noise, "L")  # noise: the pixel data is most of the file
    return data[: len(data) // 2]


def _write(root, good_per_class=6):
    """Two classes; in sorted order every other file of class `a` is broken in a new way.

    a: 0 grey, 1 corrupt bytes, 2 RGBA, 3 truncated PNG, 4 grey, 5 zero bytes, 6 RGB,
       7 text named .jpg, 8.. grey;  b: RGB only.  Pixel value = 10 * file number.
    """
    broken = {1: b"\x89PNG\r\n\x1a\n" + bytes(range(200)),
              3: _half_of_a_png(),
              5: b"",
              7: b"just some text, not a picture\n"}
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for number in range(good_per_class + len(broken)):
        path = root / "a" / f"{number:02d}.{'jpg' if number == 7 else 'png'}"
        if number in broken:
            path.write_bytes(broken[number])
            continue
        value = np.uint8(10 * number)
        if number == 2:
            array, mode = np.dstack([np.full((16, 16, 3), value), np.full((16, 16), 128)]), "RGBA"
        elif number == 6:
            array, mode = np.full((16, 16, 3), value, np.uint8), "RGB"
        else:
            array, mode = np.full((16, 16), value, np.uint8), "L"
        Image.fromarray(array.astype(np.uint8), mode).save(path)
    for number in range(good_per_class):
        Image.fromarray(np.full((16, 16, 3), 200 + number, np.uint8), "RGB").save(
            root / "b" / f"{number:02d}.png")
    return sorted(broken)


def test_unreadable_files_give_the_next_readable_one_and_are_counted(tmp_path):
    broken = _write(tmp_path / "imgs")
    source = datasets.FolderSource(tmp_path / "imgs")
    assert len(source) == 16  # every file with an image extension is listed
    for i in broken:  # a broken file yields the next file, and says it passed one over
        example = source[i]
        assert int(example[datasets.SKIPPED_KEY]) == 1
        np.testing.assert_array_equal(example["image"], source[i + 1]["image"])
    assert int(source[0][datasets.SKIPPED_KEY]) == 0
    # Grey stays one channel (the pipeline makes it RGB); RGBA and RGB become RGB.
    assert source[0]["image"].shape == (16, 16, 1)
    assert source[2]["image"].shape == (16, 16, 3) and source[2]["image"].max() == 20
    assert source[6]["image"].shape == (16, 16, 3) and source[6]["image"].min() == 60
    assert source[15]["label"] == 1 and source[15]["image"].min() == 205


def test_batches_with_skips_are_deterministic_and_resume_exactly(tmp_path, make_data_config):
    _write(tmp_path / "imgs")
    cfg = make_data_config(name="folder", manual_dir=str(tmp_path / "imgs"), image_size=16)
    source = datasets.FolderSource(tmp_path / "imgs")

    def batches(start, n):
        ds = pipeline.train_dataset_from_source(source, cfg, seed=3, global_batch_size=4,
                                                process_index=0, process_count=1)
        it = pipeline.position_iterator(ds, start)
        return [next(it) for _ in range(n)]

    straight, resumed = batches(0, 6), batches(3, 3)
    for a, b in zip(straight[3:], resumed):
        for key in ("image", "label", datasets.SKIPPED_KEY):
            np.testing.assert_array_equal(a[key], b[key])
    # One epoch (16 examples = 4 batches) passes over each of the 4 broken files once.
    assert sum(int(b[datasets.SKIPPED_KEY].sum()) for b in straight[:4]) == 4
    assert straight[0]["image"].shape == (4, 16, 16, 3)


def test_training_logs_the_skipped_count(tmp_path):
    _write(tmp_path / "imgs")
    config = tiny_tokenizer_config(total_steps=2)  # 2 steps of 8 = one epoch of 16
    config.data.update(name="folder", manual_dir=str(tmp_path / "imgs"),
                       train_split="train", eval_split="train")
    config.eval.num_examples = 0
    stages.run(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["data/skipped"] == 4
    assert records[-1]["data/skipped"] >= records[0].get("data/skipped", 0)


def test_a_folder_with_nothing_readable_stops_before_compiling(tmp_path, make_data_config):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "x.png").write_bytes(b"")
    (tmp_path / "imgs" / "a" / "y.jpg").write_bytes(b"not an image")
    cfg = make_data_config(name="folder", manual_dir=str(tmp_path / "imgs"))
    with pytest.raises(datasets.DatasetNotFoundError, match="none of the 2 files .* decodes"):
        datasets.check_dataset(cfg, "train")
