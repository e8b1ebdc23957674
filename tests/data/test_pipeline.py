"""The grain pipeline: batch at step s is a pure function of (seed, s, process)."""
import numpy as np
import orbax.checkpoint as ocp
import grain
import pytest

from mage_jax.data import augment
from mage_jax.data import pipeline


def _source(n=40):
    """Small in-memory source; the label is the example index, the image encodes it too."""
    rng = np.random.default_rng(123)
    return [{"image": rng.integers(0, 256, (12 + i % 3, 10, 1 + 2 * (i % 2)), dtype=np.uint8),
             "label": i} for i in range(n)]


def _train(cfg, src=None, *, seed=0, global_batch=8, process_index=0, process_count=1,
           two_views=False):
    return pipeline.train_dataset_from_source(
        src if src is not None else _source(), cfg, seed=seed, global_batch_size=global_batch,
        process_index=process_index, process_count=process_count, two_views=two_views)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_fashion_mnist_batches_and_resume(prepared_data_dir, make_data_config):
    cfg = make_data_config(data_dir=prepared_data_dir)
    kwargs = dict(seed=3, global_batch_size=8, process_index=0, process_count=1)
    uninterrupted = _take(pipeline.train_iterator(cfg, **kwargs), 8)
    batch = uninterrupted[0]
    assert set(batch) == {"image", "label"}
    assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["image"].max() > 0.5 and 0 <= batch["label"].min() and batch["label"].max() <= 9
    resumed_it = pipeline.train_iterator(cfg, start_step=5, **kwargs)
    resumed = _take(resumed_it, 3)
    for want, got in zip(uninterrupted[5:8], resumed):
        np.testing.assert_array_equal(want["image"], got["image"])
        np.testing.assert_array_equal(want["label"], got["label"])
    assert resumed_it.get_state() == {"next_index": 8}


def test_worker_processes_give_the_same_batches_from_any_step(prepared_data_dir,
                                                               make_data_config):
    """data.worker_processes: decoding and augmentation in 2 grain worker processes yield,
    pixel for pixel, the batches the threaded reader yields, from the start and from a
    resumed step; a negative count is refused."""
    cfg = make_data_config(data_dir=prepared_data_dir)
    kwargs = dict(seed=3, global_batch_size=8, process_index=0, process_count=1)
    threads = _take(pipeline.train_iterator(cfg, **kwargs), 6)
    cfg.worker_processes = 2
    for start in (0, 3):
        workers = _take(pipeline.train_iterator(cfg, start_step=start, **kwargs), 6 - start)
        for want, got in zip(threads[start:], workers):
            np.testing.assert_array_equal(want["image"], got["image"])
            np.testing.assert_array_equal(want["label"], got["label"])
    cfg.worker_processes = -1
    with pytest.raises(ValueError, match="worker_processes=-1 must be >= 0"):
        pipeline.train_iterator(cfg, **kwargs)


def test_jpeg_draft_source_hands_over_bytes_and_gives_the_same_batches(prepared_data_dir,
                                                                        make_data_config):
    """data.jpeg_draft: the TFDS source yields the stored bytes (Fashion-MNIST's PNGs) and
    the crops decode them; no crop of a 28 px image can be reduced, so the batches are the
    decoded source's pixel for pixel, one view or MAGE-C's two."""
    cfg = make_data_config(data_dir=prepared_data_dir, crop_scale=(0.5, 1.0))
    kwargs = dict(seed=5, global_batch_size=8, process_index=0, process_count=1)
    encoded_cfg = make_data_config(data_dir=prepared_data_dir, crop_scale=(0.5, 1.0),
                                   jpeg_draft=True)
    assert isinstance(pipeline._train_source(encoded_cfg)[0]["image"], bytes)
    for two_views in (False, True):
        want = _take(pipeline.train_iterator(cfg, two_views=two_views, **kwargs), 2)
        got = _take(pipeline.train_iterator(encoded_cfg, two_views=two_views, **kwargs), 2)
        for a, b in zip(want, got):
            assert set(a) == set(b)
            for key in a:
                np.testing.assert_array_equal(a[key], b[key])


def test_jpeg_draft_needs_a_tfds_source(tmp_path, make_data_config):
    from PIL import Image
    from mage_jax.data import datasets
    (tmp_path / "cat").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "cat" / "0.png")
    cfg = make_data_config(name="folder", manual_dir=str(tmp_path), jpeg_draft=True)
    with pytest.raises(ValueError, match="jpeg_draft=True needs a TFDS dataset"):
        datasets.open_source(cfg, "train", encoded=True)


def test_processes_split_the_global_batch(make_data_config):
    cfg = make_data_config()
    whole = _take(iter(_train(cfg)), 3)
    halves = [_take(iter(_train(cfg, process_index=p, process_count=2)), 3) for p in (0, 1)]
    for step in range(3):
        first, second = halves[0][step], halves[1][step]
        assert first["image"].shape[0] == second["image"].shape[0] == 4
        assert not set(first["label"]) & set(second["label"])  # Disjoint examples.
        # In process order they are exactly the single-process global batch, pixels included.
        np.testing.assert_array_equal(np.concatenate([first["label"], second["label"]]),
                                      whole[step]["label"])
        np.testing.assert_array_equal(np.concatenate([first["image"], second["image"]]),
                                      whole[step]["image"])


def test_epochs_are_permutations_in_a_new_order(make_data_config):
    batches = _take(iter(_train(make_data_config(), global_batch=8)), 10)  # 2 epochs of 40.
    labels = np.concatenate([b["label"] for b in batches])
    first, second = labels[:40], labels[40:]
    assert sorted(first) == list(range(40)) and sorted(second) == list(range(40))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(40))


def test_seed_determines_the_batches(make_data_config):
    cfg = make_data_config()
    a, b, c = (_take(iter(_train(cfg, seed=s)), 2) for s in (5, 5, 6))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
        np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(a[0]["label"], c[0]["label"])
    assert not np.array_equal(a[1]["image"], c[1]["image"])


def test_state_round_trip_and_orbax(make_data_config, tmp_path):
    ds = _train(make_data_config())
    it = iter(ds)
    _take(it, 3)
    state = it.get_state()
    assert state == {"next_index": 3}
    expected = _take(it, 2)
    restored = iter(ds)
    restored.set_state(state)
    for want, got in zip(expected, _take(restored, 2)):
        np.testing.assert_array_equal(want["image"], got["image"])
    # The API the trainer uses: grain's orbax args inside a Composite.
    it = pipeline.position_iterator(ds, 3)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    fresh = iter(ds)
    manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    np.testing.assert_array_equal(next(fresh)["image"], expected[0]["image"])


def test_two_views(make_data_config):
    batch = next(iter(_train(make_data_config(), two_views=True)))
    assert batch["image"].shape == batch["image2"].shape == (8, 32, 32, 3)
    assert batch["image2"].dtype == np.float32 and 0 <= batch["image2"].min()
    assert batch["image2"].max() <= 1
    assert not np.array_equal(batch["image"], batch["image2"])
    plain = next(iter(_train(make_data_config())))
    np.testing.assert_array_equal(plain["label"], batch["label"])  # Same examples.


def test_bad_batch_sizes_are_explained(make_data_config):
    with pytest.raises(ValueError, match="global batch size 10 .* 4 processes"):
        _train(make_data_config(), global_batch=10, process_count=4)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _train(make_data_config(), _source(6), global_batch=8)


def test_eval_pads_the_last_batch_and_keeps_order(make_data_config):
    cfg = make_data_config(image_size=8)
    src = _source(10)
    per_process = [list(pipeline.eval_dataset_from_source(
        src, cfg, batch_size=4, process_index=p, process_count=2)) for p in (0, 1)]
    assert [len(b) for b in per_process] == [3, 3]  # ceil(10 / 4) on every host.
    labels, masks, images = [], [], []
    for step in range(3):
        for p in (0, 1):
            batch = per_process[p][step]
            assert batch["image"].shape == (2, 8, 8, 3) and batch["mask"].dtype == np.bool_
            labels.append(batch["label"]), masks.append(batch["mask"])
            images.append(batch["image"])
    labels, masks, images = map(np.concatenate, (labels, masks, images))
    np.testing.assert_array_equal(masks, np.arange(12) < 10)
    np.testing.assert_array_equal(labels[:10], np.arange(10))
    assert not images[10:].any()
    np.testing.assert_array_equal(images[7], augment.resize_center_crop(src[7]["image"], 8))


def test_eval_dataset_on_fashion_mnist(prepared_data_dir, make_data_config):
    cfg = make_data_config(data_dir=prepared_data_dir, image_size=16)
    batches = list(pipeline.eval_dataset(cfg, batch_size=4096, process_index=1, process_count=2))
    assert len(batches) == 3 and batches[0]["image"].shape == (2048, 16, 16, 3)
    # Process 1 holds test examples 2048..4095 and 6144..8191; its last batch is all padding.
    assert [int(b["mask"].sum()) for b in batches] == [2048, 2048, 0]
    assert 0.0 <= batches[0]["image"].min() and batches[0]["image"].max() <= 1.0


def test_folder_dataset_through_the_pipeline(tmp_path, make_data_config):
    from PIL import Image
    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            image = np.full((20, 24, 3), 40 * i, np.uint8)
            Image.fromarray(image).save(tmp_path / cls / f"{i}.png")
    cfg = make_data_config(name="folder", manual_dir=str(tmp_path), image_size=8)
    batch = next(pipeline.train_iterator(cfg, seed=0, global_batch_size=8, process_index=0,
                                         process_count=1))
    assert sorted(batch["label"].tolist()) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert batch["image"].shape == (8, 8, 8, 3)
