"""The linear probe: MAE's LARS, the head, the stage end to end, and its errors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mage_jax import optim, validation
from mage_jax.data import augment, datasets
from mage_jax.probe import features as features_lib
from mage_jax.probe import cached, linear, stage as probe_stage
from mage_jax.eval.accuracy import topk_correct
from mage_jax.probe.head import ProbeHead
from tests.tiny_configs import tiny_probe_config

ONE = jax.devices()[:1]


def _mae_lars_reference(params, grads_per_step, lrs, momentum, trust, wd):
    """MAE's util/lars.py step, written out in numpy: decay and trust ratio for matrices
    only, then mu = momentum * mu + g and p -= lr * mu."""
    params = {k: v.astype(np.float64).copy() for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in params.items()}
    for grads, lr in zip(grads_per_step, lrs):
        for k, p in params.items():
            g = grads[k].astype(np.float64)
            if p.ndim > 1:
                g = g + wd * p
                pn, gn = np.linalg.norm(p), np.linalg.norm(g)
                g = g * (trust * pn / gn if pn > 0 and gn > 0 else 1.0)
            mu[k] = momentum * mu[k] + g
            params[k] = p - lr * mu[k]
    return params


def test_lars_is_maes_not_optax_stock():
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(6, 4)).astype(np.float32),
              "zero": np.zeros((3, 2), np.float32),      # |p| = 0: trust ratio 1
              "bias": rng.normal(size=(4,)).astype(np.float32)}
    steps = 5
    grads = [{k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
             for _ in range(steps)]
    schedule = optax.linear_schedule(0.5, 2.0, steps)  # a changing lr tells the orders apart
    tx = optim.lars(schedule, momentum=0.9, trust_coefficient=0.001, weight_decay=0.05)
    state, p = tx.init(params), params
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = optax.apply_updates(p, updates)
    expected = _mae_lars_reference(params, grads, [float(schedule(i)) for i in range(steps)],
                                   0.9, 0.001, 0.05)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), expected[k], rtol=1e-5, atol=1e-6)
    stock = optax.lars(schedule, weight_decay=0.05, trust_coefficient=0.001, momentum=0.9)
    state, q = stock.init(params), params
    for g in grads:
        updates, state = stock.update(g, state, q)
        q = optax.apply_updates(q, updates)
    assert not np.allclose(np.asarray(q["kernel"]), expected["kernel"], rtol=1e-4)


def test_head_has_no_bn_parameters_and_small_weights():
    head = ProbeHead(num_classes=1000)
    variables = head.init(jax.random.key(0), jnp.zeros((2, 768)), train=False)
    assert set(variables["params"]) == {"head"}  # BatchNorm without scale and offset
    assert set(variables["batch_stats"]["bn"]) == {"mean", "var"}
    kernel = np.asarray(variables["params"]["head"]["kernel"])
    assert kernel.shape == (768, 1000) and abs(kernel.std() - 0.01) < 5e-4
    assert not np.any(np.asarray(variables["params"]["head"]["bias"]))
    # Training normalises by the batch: the head sees features of zero mean, unit variance.
    x = jax.random.normal(jax.random.key(1), (512, 768)) * 7.0 + 3.0
    _, updates = head.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(updates["batch_stats"]["bn"]["mean"], 0.1 * np.mean(x, 0),
                               rtol=1e-4, atol=1e-4)


def test_topk_correct():
    logits = jnp.array([[0.1, 0.5, 0.2, 0.9], [3.0, 2.0, 1.0, 0.0]])
    np.testing.assert_array_equal(topk_correct(logits, jnp.array([1, 2]), 1), [0.0, 0.0])
    np.testing.assert_array_equal(topk_correct(logits, jnp.array([1, 2]), 2), [1.0, 0.0])
    np.testing.assert_array_equal(topk_correct(logits, jnp.array([3, 0]), 1), [1.0, 1.0])


@pytest.fixture(scope="module", params=[False, True], ids=["per_step", "cached"])
def probe_run(request, pretrain_dir, tmp_path_factory):
    """The demo probe with both baselines: features of augmented views in every step (the
    paper's path) or cached once (the demo's)."""
    workdir = str(tmp_path_factory.mktemp("probe"))
    config = tiny_probe_config(pretrain_dir)
    config.cache_features = request.param
    scores = probe_stage.run(config, workdir, devices=ONE)
    return config, workdir, scores


def test_probe_demo_reports_encoder_and_baselines(probe_run):
    config, workdir, scores = probe_run
    for key in ("top1", "top5", "random_init_top1", "pixels_top1"):
        assert 0.0 <= scores[key] <= 1.0, key
        assert scores[key.replace("top1", "top5")] >= scores[key]
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    last = {k: v for r in records if r["step"] == config.total_steps for k, v in r.items()}
    assert last["step"] == config.total_steps
    assert last["random_init_top1"] == scores["random_init_top1"]
    assert last["pixels_top1"] == scores["pixels_top1"]
    for sub in config.baselines:
        assert os.path.exists(os.path.join(workdir, sub, "config.json"))
    # The eval split's first 20 images (the last batch half padding) were scored.
    assert last["test_examples"] == 20


def test_evaluate_matches_a_direct_computation(pretrain_dir):
    """top1/top5 of the stage's evaluate equal numpy's on the same head and test images."""
    config = tiny_probe_config(pretrain_dir)
    config.eval.num_examples = 13
    stage = linear.build_stage(config)
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=ONE,
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    jax.set_mesh(mesh)
    state = jax.device_get(stage.init_state(jax.random.key(3)))
    # A head that is far from its initialisation, with non-trivial running statistics.
    k1, k2, k3 = jax.random.split(jax.random.key(4), 3)
    head = state["params"]["head"]["head"]
    state["params"]["head"]["head"] = {"kernel": jax.random.normal(k1, head["kernel"].shape),
                                       "bias": jax.random.normal(k2, head["bias"].shape)}
    stats = state["batch_stats"]["bn"]
    state["batch_stats"]["bn"] = {"mean": jax.random.normal(k3, stats["mean"].shape),
                                  "var": stats["var"] * 2.0}
    frozen = stage.place_frozen(stage.frozen, mesh)
    scores, _ = stage.evaluate(state, frozen, mesh, "/tmp")

    source = datasets.open_source(config.data, config.data.eval_split)
    images = np.stack([augment.resize_center_crop(source[i]["image"], config.data.image_size,
                                                  crop_fraction=1.0, interpolation="bilinear")
                       for i in range(13)])
    labels = np.array([source[i]["label"] for i in range(13)])
    extractor, _ = linear.extractor_and_params(config, "encoder")
    feats = np.asarray(extractor.features(frozen, jnp.asarray(images)), np.float64)
    mean, var = (np.asarray(state["batch_stats"]["bn"][k], np.float64) for k in ("mean", "var"))
    w = state["params"]["head"]["head"]
    logits = ((feats - mean) / np.sqrt(var + 1e-6)) @ np.asarray(w["kernel"]) + np.asarray(
        w["bias"])
    order = np.argsort(-logits, axis=1)
    assert scores["top1"] == pytest.approx(np.mean(order[:, 0] == labels), abs=1e-6)
    assert scores["top5"] == pytest.approx(
        np.mean(np.any(order[:, :5] == labels[:, None], axis=1)), abs=1e-6)
    assert scores["test_examples"] == 13


@pytest.mark.parametrize("cache_features", [False, True])
def test_pixels_probe_learns_fashion_mnist(tmp_path, cache_features):
    """The recipe (BatchNorm, LARS, cosine) learns, on augmented views computed in the step
    and on cached features: raw pixels of Fashion-MNIST, 120 steps, far above the 10% of
    chance (a linear classifier reaches about 84% on them)."""
    config = tiny_probe_config("", total_steps=120)
    config.features, config.baselines = "pixels", ()
    config.cache_features = cache_features
    config.data.train_split = "train[:4000]"
    config.batch_size = 64
    config.optimizer.update(blr=4.0, warmup_epochs=0.0,
                            epochs=120 * 64 / config.num_train_examples)
    config.log_every = 60
    config.eval.num_examples = 500
    scores = probe_stage.run(config, str(tmp_path), devices=ONE)
    assert scores["top1"] > 0.65, scores


def test_extract_gives_every_image_once_in_dataset_order(pretrain_dir):
    """Cached features: the first 13 test images (batches of 8 on 4 devices, the last one
    padded) in order, equal to the features computed directly from the images."""
    config = tiny_probe_config(pretrain_dir)
    mesh = jax.make_mesh((4, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:4],
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    jax.set_mesh(mesh)
    extractor, frozen = linear.extractor_and_params(config, "encoder")
    frozen = extractor.place(frozen, mesh)
    feats, labels = cached.extract(extractor, frozen, config.data, "test", 8, mesh, 13)
    source = datasets.open_source(config.data, "test")
    images = np.stack([augment.resize_center_crop(source[i]["image"], 16, crop_fraction=1.0,
                                                  interpolation="bilinear") for i in range(13)])
    assert feats.shape == (13, extractor.dim)
    np.testing.assert_array_equal(labels, [source[i]["label"] for i in range(13)])
    np.testing.assert_allclose(feats, extractor.features(frozen, jnp.asarray(images)),
                               rtol=1e-4, atol=1e-4)


def test_class_count_mismatch(pretrain_dir, tmp_path):
    config = tiny_probe_config(pretrain_dir)
    config.num_classes = 1000
    with pytest.raises(validation.ConfigError, match="num_classes=1000 but fashion_mnist has 10"):
        probe_stage.run(config, str(tmp_path), devices=ONE)
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_unknown_feature_source(pretrain_dir, tmp_path):
    config = tiny_probe_config(pretrain_dir)
    config.baselines = ("random_init", "raw")
    with pytest.raises(validation.ConfigError, match="'raw'.*random_init"):
        probe_stage.run(config, str(tmp_path), devices=ONE)


def test_checkpoint_that_is_not_a_mage(pretrain_dir, tmp_path):
    config = tiny_probe_config(os.path.join(pretrain_dir, "tokenizer"))
    with pytest.raises(ValueError, match="not a MAGE pretraining run"):
        probe_stage.run(config, str(tmp_path), devices=ONE)


def test_checkpoint_without_an_encoder(pretrain_dir, tmp_path):
    """A run whose config says pretrain but whose checkpoint holds no MAGE parameters."""
    import shutil
    fake = tmp_path / "fake_run"
    shutil.copytree(os.path.join(pretrain_dir, "tokenizer"), fake)
    with open(os.path.join(pretrain_dir, "config.json")) as f:
        run_config = json.load(f)
    run_config["tokenizer_workdir"] = os.path.join(pretrain_dir, "tokenizer")
    (fake / "config.json").write_text(json.dumps(run_config))
    config = tiny_probe_config(str(fake))
    with pytest.raises(ValueError, match="has no `mage` parameters"):
        probe_stage.run(config, str(tmp_path / "probe"), devices=ONE)


def test_image_size_mismatch(pretrain_dir, tmp_path):
    config = tiny_probe_config(pretrain_dir)
    config.data.image_size = 32
    with pytest.raises(validation.ConfigError, match="image_size=16"):
        probe_stage.run(config, str(tmp_path), devices=ONE)


def test_feature_sources_have_the_documented_widths(pretrain_dir):
    config = tiny_probe_config(pretrain_dir)
    pixels, _ = linear.extractor_and_params(config, "pixels")
    assert pixels.dim == 16 * 16 * 3
    random_init, params = linear.extractor_and_params(config, "random_init")
    encoder, trained = linear.extractor_and_params(config, "encoder")
    assert random_init.dim == encoder.dim == config_embed(pretrain_dir)
    # The random encoder is not the trained one, and neither carries the decoder.
    assert "decoder" not in trained["mage"] and "mlm_head" not in trained["mage"]
    a = params["mage"]["token_emb"]["word_embeddings"]
    b = trained["mage"]["token_emb"]["word_embeddings"]
    assert a.shape == b.shape and not np.allclose(a, b)
    assert features_lib.FEATURE_SOURCES == ("encoder", "random_init", "pixels")


def config_embed(pretrain_dir):
    with open(os.path.join(pretrain_dir, "config.json")) as f:
        return json.load(f)["model"]["embed_dim"]


def test_dataset_without_labels(tmp_path):
    """A real TFDS dataset (array_record) whose examples have images only."""
    import tensorflow_datasets as tfds

    class UnlabelledImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"image": tfds.features.Image(shape=(8, 8, 3))}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(), "test": self._generate_examples()}

        def _generate_examples(self):
            for i in range(4):
                yield i, {"image": np.full((8, 8, 3), i * 40, np.uint8)}

    UnlabelledImages(data_dir=str(tmp_path / "tfds"),
                     file_format="array_record").download_and_prepare()
    config = tiny_probe_config("")
    config.features, config.baselines = "pixels", ()
    config.data.update(name="unlabelled_images", data_dir=str(tmp_path / "tfds"),
                       train_split="train")
    with pytest.raises(datasets.DatasetNotFoundError, match="no class labels"):
        probe_stage.run(config, str(tmp_path / "probe"), devices=ONE)
