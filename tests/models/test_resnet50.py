"""The ResNet-50 perceptual losses: parity with a torch functional ResNet-50, the torchvision
weight loader, the losses themselves and the tokenizer stage that uses them."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax import metrics
from mage_jax.models.resnet50 import (TORCHVISION_URL, ResNet50, features_perceptual_loss,
                                      load_resnet50_params, logits_perceptual_loss, preprocess,
                                      resnet50_outputs)
from mage_jax.train import stages, tokenizer
from tests.tiny_configs import assert_generator_loss_is_the_weighted_sum, tiny_tokenizer_config

# torchvision's resnet50: bottleneck blocks per stage, their widths (outputs are 4x).
BLOCKS = (3, 4, 6, 3)
WIDTHS = (64, 128, 256, 512)


def _torchvision_state(seed=0):
    """Random weights under torchvision's resnet50 key names and shapes (OIHW convs)."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv(name, c_out, c_in, k):
        state[name] = (rng.normal(size=(c_out, c_in, k, k))
                       * np.sqrt(2.0 / (c_in * k * k))).astype(np.float32)

    def bn(name, c, gain=1.0):
        state[f"{name}.weight"] = (gain * rng.uniform(0.5, 1.5, c)).astype(np.float32)
        state[f"{name}.bias"] = rng.normal(0.0, 0.1, c).astype(np.float32)
        state[f"{name}.running_mean"] = rng.normal(0.0, 0.2, c).astype(np.float32)
        state[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        state[f"{name}.num_batches_tracked"] = np.array(100, np.int64)  # ignored

    conv("conv1.weight", 64, 3, 7)
    bn("bn1", 64)
    c_in = 64
    for s, (blocks, width) in enumerate(zip(BLOCKS, WIDTHS)):
        for i in range(blocks):
            p = f"layer{s + 1}.{i}"
            conv(f"{p}.conv1.weight", width, c_in, 1)
            bn(f"{p}.bn1", width)
            conv(f"{p}.conv2.weight", width, width, 3)
            bn(f"{p}.bn2", width)
            conv(f"{p}.conv3.weight", 4 * width, width, 1)
            bn(f"{p}.bn3", 4 * width, gain=0.3)  # keeps the residual sums of 16 blocks tame
            if i == 0:
                conv(f"{p}.downsample.0.weight", 4 * width, c_in, 1)
                bn(f"{p}.downsample.1", 4 * width)
            c_in = 4 * width
    state["fc.weight"] = (rng.normal(size=(1000, 2048)) / np.sqrt(2048)).astype(np.float32)
    state["fc.bias"] = rng.normal(0.0, 0.1, 1000).astype(np.float32)
    return state


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """(state dict, its .npz, the params loaded from it), built once for the module."""
    state = _torchvision_state()
    path = tmp_path_factory.mktemp("resnet50") / "resnet50_random.npz"
    np.savez(path, **state)
    return state, path, load_resnet50_params(path)


def _images(seed, shape=(2, 40, 48, 3)):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


# ---- an independent ResNet-50 in torch's functional ops (NCHW), float64 ------------------

def _torch_resnet50(state, images_nhwc):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.from_numpy(v).double() for k, v in state.items()
         if not k.endswith("num_batches_tracked")}

    def bn(x, name):
        return F.batch_norm(x, t[f"{name}.running_mean"], t[f"{name}.running_var"],
                            t[f"{name}.weight"], t[f"{name}.bias"], training=False, eps=1e-5)

    x = torch.from_numpy(images_nhwc).double().permute(0, 3, 1, 2)
    x = F.relu(bn(F.conv2d(x, t["conv1.weight"], stride=2, padding=3), "bn1"))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for s, blocks in enumerate(BLOCKS):
        for i in range(blocks):
            p = f"layer{s + 1}.{i}"
            stride = 2 if s > 0 and i == 0 else 1
            y = F.relu(bn(F.conv2d(x, t[f"{p}.conv1.weight"]), f"{p}.bn1"))
            y = F.relu(bn(F.conv2d(y, t[f"{p}.conv2.weight"], stride=stride, padding=1),
                          f"{p}.bn2"))
            y = bn(F.conv2d(y, t[f"{p}.conv3.weight"]), f"{p}.bn3")
            if i == 0:
                x = bn(F.conv2d(x, t[f"{p}.downsample.0.weight"], stride=stride),
                       f"{p}.downsample.1")
            x = F.relu(y + x)
    logits = F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), t["fc.weight"], t["fc.bias"])
    return x.permute(0, 2, 3, 1).numpy(), logits.numpy()


def _max_rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


def test_features_and_logits_match_a_torch_functional_resnet50(weights):
    state, _, params = weights
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    want_features, want_logits = _torch_resnet50(state, x)
    features, logits = jax.jit(resnet50_outputs)(params, x)
    assert features.shape == (2, 2, 2, 2048) and logits.shape == (2, 1000)
    # float32 here against float64 there, through 53 convolutions.
    assert _max_rel_err(features, want_features) < 1e-4
    assert _max_rel_err(logits, want_logits) < 1e-4
    assert np.std(want_logits) > 0.1  # the weights make the logits differ between images


@pytest.mark.parametrize("size", [(256, 256), (16, 16), (64, 64), (300, 200)])
def test_resize_matches_torch_antialiased_bilinear(size):
    torch = pytest.importorskip("torch")
    images = _images(1, (2, *size, 3))
    want = torch.nn.functional.interpolate(
        torch.from_numpy(images).permute(0, 3, 1, 2), size=224, mode="bilinear",
        antialias=True, align_corners=False).permute(0, 2, 3, 1).numpy()
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    got = np.asarray(preprocess(jnp.asarray(images))) * std + mean  # undo the normalisation
    # Measured: up to 1.3e-5 apart (300x200), the same as torch's own float32 and float64
    # results (2e-5 at 256x256): the filter weights' float32 rounding.
    np.testing.assert_allclose(got, want, atol=3e-5)


def test_loader_builds_the_modules_tree(weights):
    _, _, params = weights
    dummy = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    expected = nn.unbox(jax.eval_shape(ResNet50().init, jax.random.key(0), dummy)["params"])
    shapes = jax.tree.map(lambda a: tuple(a.shape), params)
    assert shapes == jax.tree.map(lambda a: tuple(a.shape), expected)


def test_pytorch_file_loads_like_npz(tmp_path, weights):
    torch = pytest.importorskip("torch")
    state, path, params = weights
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()},
               tmp_path / "resnet50.pth")
    jax.tree.map(np.testing.assert_array_equal, load_resnet50_params(tmp_path / "resnet50.pth"),
                 params)


def test_missing_extra_and_misshapen_keys_are_named(tmp_path):
    state = _torchvision_state()
    del state["layer3.2.bn2.running_var"]
    state["fc2.weight"] = np.zeros((3, 3), np.float32)
    state["layer4.0.downsample.0.weight"] = np.zeros((2048, 1024, 3, 3), np.float32)
    np.savez(tmp_path / "bad.npz", **state)
    with pytest.raises(ValueError, match="not a torchvision ResNet-50") as err:
        load_resnet50_params(tmp_path / "bad.npz")
    message = str(err.value)
    assert "1 missing key(s): ['layer3.2.bn2.running_var']" in message
    assert "1 unexpected key(s): ['fc2.weight']" in message
    assert "layer4.0.downsample.0.weight (2048, 1024, 3, 3)" in message
    assert TORCHVISION_URL in message


def _by_hand(params, x, y, output):
    """The documented loss, step by step: resize, normalise, run each image set, average."""
    mean = np.array([0.485, 0.456, 0.406], np.float32)
    std = np.array([0.229, 0.224, 0.225], np.float32)

    def run(images):
        resized = jax.image.resize(images, (images.shape[0], 224, 224, 3), "bilinear",
                                   antialias=True)
        return np.asarray(jax.jit(resnet50_outputs)(params, (resized - mean) / std)[output],
                          np.float64)

    return np.mean(np.square(run(x) - run(y)))


@pytest.mark.parametrize("loss_fn, output", [(features_perceptual_loss, 0),
                                             (logits_perceptual_loss, 1)])
def test_loss_is_the_mean_squared_difference_of_the_outputs(weights, loss_fn, output):
    _, _, params = weights
    x, y = _images(2), _images(3)
    loss = jax.jit(loss_fn)
    assert float(loss(params, x, x)) == 0.0
    got = float(loss(params, x, y))
    assert got > 0
    np.testing.assert_allclose(got, _by_hand(params, x, y, output), rtol=1e-4)


def test_frozen_params_get_no_gradient_but_the_reconstruction_does(weights):
    _, _, params = weights
    x, y = _images(4, (1, 32, 32, 3)), _images(5, (1, 32, 32, 3))
    gp, gx = jax.jit(jax.grad(logits_perceptual_loss, argnums=(0, 1)))(params, x, y)
    assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree.leaves(gp))
    assert np.all(np.isfinite(gx)) and float(np.abs(gx).max()) > 0


# ---- the tokenizer stage ---------------------------------------------------------------

def test_tokenizer_stage_adds_the_weighted_term(tmp_path, weights):
    _, path, _ = weights
    config = tiny_tokenizer_config(total_steps=1)
    config.loss.update(perceptual_kind="resnet50_features", perceptual_weights=str(path),
                       perceptual_weight=0.1)  # the demo has it off
    config.update(image_summary_every=0)
    config.eval.num_examples = 0
    stages.run(config, str(tmp_path / "run"), devices=jax.devices()[:1])
    record = metrics.read_metrics(str(tmp_path / "run"))[-1]
    assert record["perceptual_loss"] > 0
    assert_generator_loss_is_the_weighted_sum(record, config.loss)


def test_tokenizer_step_uses_the_kinds_loss(weights):
    """One train step's perceptual_loss is the kind's loss of that step's reconstruction (the
    logits here; the run above has the features): a mix-up of the kinds shows."""
    _, path, _ = weights
    config = tiny_tokenizer_config()
    config.loss.update(perceptual_kind="resnet50_logits", perceptual_weights=str(path),
                       perceptual_weight=0.1)
    stage = tokenizer.build_stage(config)
    state = nn.unbox(stage.init_state(jax.random.key(0)))
    images = _images(6, (2, config.data.image_size, config.data.image_size, 3))
    model, _ = tokenizer.build_models(config)
    recon, _ = model.apply({"params": state["params"]}, images, train=True)
    want = float(jax.jit(logits_perceptual_loss)(stage.frozen, recon, images))
    _, step_metrics = jax.jit(stage.train_step)(state, {"image": images}, jax.random.key(1),
                                                stage.frozen)
    np.testing.assert_allclose(float(step_metrics["perceptual_loss"]), want, rtol=1e-4)


def test_unknown_kind_is_refused_before_compiling(tmp_path):
    config = tiny_tokenizer_config()
    config.loss.perceptual_kind = "vgg"
    with pytest.raises(ValueError, match=r"perceptual_kind='vgg' is not one of"):
        stages.run(config, str(tmp_path), devices=jax.devices()[:1])
    assert not (tmp_path / "checkpoints").exists()


def test_missing_weights_file_is_announced_with_what_to_get(caplog):
    config = tiny_tokenizer_config()
    config.loss.update(perceptual_kind="resnet50_features", perceptual_weight=0.1,
                       perceptual_weights=None)
    with caplog.at_level("WARNING"):
        stage = tokenizer.build_stage(config)
    assert stage.frozen is None
    assert "perceptual (ResNet-50 features) term is OFF" in caplog.text
    assert TORCHVISION_URL in caplog.text


def test_paper_preset_uses_maskgits_feature_loss():
    from tests.tiny_configs import load_config
    assert load_config("tokenizer", "paper").loss.perceptual_kind == "resnet50_features"
    assert load_config("tokenizer", "demo").loss.perceptual_kind == "lpips"  # (off there)
    assert set(tokenizer.PERCEPTUAL_KINDS) == {"resnet50_features", "resnet50_logits", "lpips"}
