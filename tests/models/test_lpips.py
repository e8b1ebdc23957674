"""LPIPS: weight loading in the lpips key layout, metric properties, numpy re-implementation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mage_jax.models.lpips import (LPIPS_SCALE, LPIPS_SHIFT, VGG16_CONVS, layer_distance,
                                   load_lpips_params, lpips_distance, perceptual_loss,
                                   random_lpips_params)

# Small stage widths keep the numpy reference fast; loading must not assume VGG16's widths.
WIDTHS = (4, 5, 6, 6, 7)


def _torch_layout_state(seed=0, widths=WIDTHS):
    """Random weights under lpips-package names, PyTorch layouts (OIHW, lin (1, C, 1, 1))."""
    rng = np.random.default_rng(seed)
    state, c_in = {}, 3
    for width, group in zip(widths, VGG16_CONVS):
        for s, idx in group:
            state[f"net.slice{s}.{idx}.weight"] = (
                rng.normal(size=(width, c_in, 3, 3)) * np.sqrt(2.0 / (9 * c_in))).astype(np.float32)
            state[f"net.slice{s}.{idx}.bias"] = (0.1 * rng.normal(size=width)).astype(np.float32)
            c_in = width
    for i, width in enumerate(widths):
        state[f"lin{i}.model.1.weight"] = rng.uniform(0, 1, size=(1, width, 1, 1)).astype(np.float32)
    state["scaling_layer.shift"] = LPIPS_SHIFT[None, :, None, None]  # extra keys are ignored
    return state


@pytest.fixture(scope="module")
def state_and_path(tmp_path_factory):
    state = _torch_layout_state()
    path = tmp_path_factory.mktemp("lpips") / "lpips_vgg_random.npz"
    np.savez(path, **state)
    return state, path


def _images(seed, shape=(2, 20, 16, 3)):
    return np.random.default_rng(seed).uniform(size=shape).astype(np.float32)


# ---- an independent numpy LPIPS, written from the paper / lpips package formulas ----------

def _np_conv3x3_relu(x, w_oihw, b):
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, w = x.shape[1:3]
    out = np.zeros(x.shape[:3] + (w_oihw.shape[0],))
    for i in range(3):
        for j in range(3):
            out += np.einsum("nhwc,oc->nhwo", xp[:, i:i + h, j:j + w], w_oihw[:, :, i, j])
    return np.maximum(out + b, 0.0)


def _np_maxpool(x):
    n, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _np_lpips(state, x, y):
    def feats(im):
        h = (im.astype(np.float64) * 2 - 1 - LPIPS_SHIFT) / LPIPS_SCALE
        out = []
        for k, group in enumerate(VGG16_CONVS):
            if k:
                h = _np_maxpool(h)
            for s, idx in group:
                h = _np_conv3x3_relu(h, state[f"net.slice{s}.{idx}.weight"], state[f"net.slice{s}.{idx}.bias"])
            out.append(h)
        return out
    total = 0.0
    for k, (a, b) in enumerate(zip(feats(x), feats(y))):
        na = a / (np.sqrt((a ** 2).sum(-1, keepdims=True)) + 1e-10)
        nb = b / (np.sqrt((b ** 2).sum(-1, keepdims=True)) + 1e-10)
        w = state[f"lin{k}.model.1.weight"].reshape(-1)
        total = total + (((na - nb) ** 2) @ w).mean(axis=(1, 2))
    return total


# ---- tests -------------------------------------------------------------------------------

def test_load_converts_layouts(state_and_path):
    state, path = state_and_path
    params = load_lpips_params(path)
    np.testing.assert_array_equal(params["slice3_12"]["kernel"],
                                  state["net.slice3.12.weight"].transpose(2, 3, 1, 0))
    assert params["lin4"]["kernel"].shape == (1, 1, WIDTHS[4], 1)
    ref = random_lpips_params(0, WIDTHS)  # same tree and shapes as the module's own init
    assert jax.tree.structure(ref) == jax.tree.structure(params)
    assert jax.tree.map(np.shape, ref) == jax.tree.map(np.shape, params)


def test_distance_matches_numpy_reimplementation(state_and_path):
    state, path = state_and_path
    params = load_lpips_params(path)
    x, y = _images(1), _images(2)
    got = jax.jit(lpips_distance)(params, x, y)
    np.testing.assert_allclose(got, _np_lpips(state, x, y), rtol=2e-4)


def test_metric_properties(state_and_path):
    params = load_lpips_params(state_and_path[1])
    dist = jax.jit(lpips_distance)
    x, y = _images(3), _images(4)
    np.testing.assert_allclose(dist(params, x, x), 0.0, atol=1e-7)
    np.testing.assert_allclose(dist(params, x, y), dist(params, y, x), rtol=1e-6)
    assert np.all(np.asarray(dist(params, x, y)) > 1e-4)
    np.testing.assert_allclose(jax.jit(perceptual_loss)(params, x, y), np.mean(dist(params, x, y)),
                               rtol=1e-6)


def test_layer_distance_matches_numpy():
    rng = np.random.default_rng(5)
    f0, f1 = rng.normal(size=(2, 3, 4, 6)), rng.normal(size=(2, 3, 4, 6))
    w = rng.uniform(size=6)
    n0 = f0 / (np.linalg.norm(f0, axis=-1, keepdims=True) + 1e-10)
    n1 = f1 / (np.linalg.norm(f1, axis=-1, keepdims=True) + 1e-10)
    expected = np.einsum("bhwc,c->bhw", (n0 - n1) ** 2, w).mean(axis=(1, 2))
    got = layer_distance(jnp.asarray(f0, jnp.float32), jnp.asarray(f1, jnp.float32),
                         jnp.asarray(w.reshape(1, 1, 6, 1), jnp.float32))
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # Scaling features per pixel does not change the distance (unit-normalised over channels).
    got_scaled = layer_distance(jnp.asarray(f0 * 7.0, jnp.float32), jnp.asarray(f1, jnp.float32),
                                jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got_scaled, expected, rtol=1e-5)


def test_frozen_params_get_no_gradient_but_images_do(state_and_path):
    params = load_lpips_params(state_and_path[1])
    x, y = _images(6), _images(7)
    gp, gx = jax.jit(jax.grad(perceptual_loss, argnums=(0, 1)))(params, x, y)
    assert all(float(np.abs(g).max()) == 0.0 for g in jax.tree.leaves(gp))
    assert np.all(np.isfinite(gx)) and float(np.abs(gx).max()) > 0


def test_missing_keys_are_named(tmp_path):
    state = _torch_layout_state()
    del state["lin3.model.1.weight"], state["net.slice2.7.bias"]
    path = tmp_path / "partial.npz"
    np.savez(path, **state)
    with pytest.raises(ValueError, match=r"lack 2 key") as err:
        load_lpips_params(path)
    assert "lin3.model.1.weight" in str(err.value) and "net.slice2.7.bias" in str(err.value)


def test_torchvision_trunk_and_lin_file_merge(tmp_path, state_and_path):
    state, path = state_and_path
    trunk = {"features." + ".".join(k.split(".")[2:]): v for k, v in state.items() if k.startswith("net.")}
    trunk["classifier.0.weight"] = np.zeros((2, 2), np.float32)
    lins = {k: v for k, v in state.items() if k.startswith("lin")}
    np.savez(tmp_path / "vgg16.npz", **trunk)
    np.savez(tmp_path / "lins.npz", **lins)
    merged = load_lpips_params(tmp_path / "vgg16.npz", tmp_path / "lins.npz")
    direct = load_lpips_params(path)
    jax.tree.map(np.testing.assert_array_equal, merged, direct)


def test_pytorch_file_loads_like_npz(tmp_path, state_and_path):
    torch = pytest.importorskip("torch")  # optional extra: mage_jax[torch]
    state, path = state_and_path
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "lpips.pth")
    jax.tree.map(np.testing.assert_array_equal, load_lpips_params(tmp_path / "lpips.pth"),
                 load_lpips_params(path))


def test_inconsistent_widths_and_small_images_are_rejected(tmp_path, state_and_path):
    state = dict(_torch_layout_state())
    state["lin2.model.1.weight"] = np.ones((1, 3, 1, 1), np.float32)
    np.savez(tmp_path / "bad.npz", **state)
    with pytest.raises(ValueError, match=r"lin2.model.1.weight has 3 channels"):
        load_lpips_params(tmp_path / "bad.npz")
    params = load_lpips_params(state_and_path[1])
    with pytest.raises(ValueError, match=r"at least 16x16"):
        lpips_distance(params, _images(0, (1, 8, 8, 3)), _images(1, (1, 8, 8, 3)))


def test_weights_file_of_another_kind_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"Unsupported LPIPS weights file .*w\.txt: expected "
                                         r"\.npz or a PyTorch \.pth"):
        load_lpips_params(str(tmp_path / "w.txt"))
