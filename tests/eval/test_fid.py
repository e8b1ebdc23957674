"""FID/IS pieces on hand-made cases, the file formats and their errors, and the CLI."""
import hashlib
import json

import jax.numpy as jnp
import numpy as np
import scipy.linalg
import pytest
from absl import flags
from absl.testing import flagsaver
from etils import epath
from PIL import Image

from mage_jax.eval import fid, images, inception, score

_PREFIX = "state_dict/"
BATCH_SIZE = 8  # as in tests/test_parity_inception.py: one compiled network for both


def _state_dict(fixture):
    return {k[len(_PREFIX):]: v for k, v in fixture.items() if k.startswith(_PREFIX)}


# --------------------------------------------------------------------------- resize

def test_resize_upsamples_by_the_tf1_rule():
    # TF1 (align_corners=False, as torch-fidelity reproduces it) samples output i at source
    # i * in/out = 0, 2/3, 4/3 and clamps the right neighbour: [a, a + 2/3 (b - a), b].
    x = jnp.asarray([[0.0, 30.0], [60.0, 90.0]]).reshape(1, 2, 2, 1)
    out = np.asarray(fid.resize_bilinear_tf1(x, 3, 3))[0, :, :, 0]
    row0, row2 = np.array([0.0, 20.0, 30.0]), np.array([60.0, 80.0, 90.0])
    expected = np.stack([row0, row0 + (row2 - row0) * 2 / 3, row2])
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_resize_downsamples_without_antialiasing():
    # 4 -> 2 samples sources 0 and 2 exactly; an antialiasing resize would average them.
    x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    out = np.asarray(fid.resize_bilinear_tf1(x, 2, 2))[0, :, :, 0]
    np.testing.assert_array_equal(out, [[0.0, 2.0], [8.0, 10.0]])


def test_preprocess_scales_to_inception_range():
    x = jnp.full((1, 5, 7, 3), 255, jnp.uint8)
    out = fid.preprocess(x)
    assert out.shape == (1, inception.INPUT_SIZE, inception.INPUT_SIZE, 3)
    np.testing.assert_allclose(np.asarray(out), 127 / 128)


# --------------------------------------------------------------------------- FID

def test_frechet_distance_of_identical_statistics_is_zero():
    x = np.random.default_rng(0).normal(size=(50, 6))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2.0, 5), rng.uniform(0.5, 2.0, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    actual = fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    np.testing.assert_allclose(actual, expected, rtol=1e-10)


def _low_rank_fid(a, b):
    """FID of two small feature sets in closed form, without a matrix square root.

    With A, B the centred features / sqrt(n - 1), sigma_a = A^T A and sigma_b = B^T B, and
    the nonzero eigenvalues of sigma_a sigma_b are the squared singular values of A B^T:
    tr (sigma_a sigma_b)^(1/2) is the nuclear norm of A B^T.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ca, cb = (a - a.mean(0)) / np.sqrt(len(a) - 1), (b - b.mean(0)) / np.sqrt(len(b) - 1)
    diff = a.mean(0) - b.mean(0)
    return diff @ diff + np.sum(ca * ca) + np.sum(cb * cb) - 2 * np.linalg.norm(ca @ cb.T, "nuc")


def test_frechet_distance_of_singular_covariances():
    # Fewer images than features (as in any small evaluation): both covariances singular.
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(10, 48)), 0.5 + 2.0 * rng.normal(size=(12, 48))
    actual = fid.frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    np.testing.assert_allclose(actual, _low_rank_fid(a, b), rtol=1e-6)


def test_frechet_distance_matches_the_matrix_square_root_form():
    # Full (non-diagonal) covariances: the eigenvalue trace equals tr(sqrtm(s1 s2)).
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 6)) @ rng.normal(size=(6, 6))
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)
    np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), expected, rtol=1e-9)


def test_frechet_distance_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="different sizes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_running_statistics_match_np_cov_over_uneven_batches():
    # A large common offset: a naive sum-of-squares would lose the small spread.
    x = 1e3 + np.random.default_rng(2).normal(size=(37, 4)).astype(np.float32)
    running = fid.RunningStatistics(feature_size=4)
    for start, stop in ((0, 1), (1, 11), (11, 11), (11, 30), (30, 37)):
        running.update(x[start:stop])
    assert running.num_images == 37
    np.testing.assert_allclose(running.mean, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(running.covariance(), np.cov(x.astype(np.float64), rowvar=False),
                               rtol=1e-9, atol=1e-12)


def test_running_statistics_need_two_images_and_the_right_width():
    running = fid.RunningStatistics(feature_size=4)
    running.update(np.ones((1, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        running.covariance()
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        running.update(np.ones((2, 5)))


# --------------------------------------------------------------------------- IS

def test_inception_score_of_confident_uniform_predictions_is_the_class_count():
    logits = 50.0 * np.eye(7)  # each image sure of its own class; every class once
    np.testing.assert_allclose(fid.inception_score(logits, splits=1), (7.0, 0.0), atol=1e-9)


def test_inception_score_of_identical_predictions_is_one():
    logits = np.tile(np.random.default_rng(3).normal(size=(1, 9)), (12, 1))
    np.testing.assert_allclose(fid.inception_score(logits, splits=3), (1.0, 0.0), atol=1e-12)


def test_inception_score_splits_are_consecutive_chunks():
    # First half diverse (score 5), second half identical (score 1): shuffling would mix them.
    logits = np.concatenate([50.0 * np.eye(5), np.zeros((5, 5))])
    mean, std = fid.inception_score(logits, splits=2)
    np.testing.assert_allclose((mean, std), (3.0, 2.0), atol=1e-9)
    with pytest.raises(ValueError, match="splits=11"):
        fid.inception_score(logits, splits=11)


# --------------------------------------------------------------------------- files

# --------------------------------------------------------------------------- hosts

def _host_parts(count: int, hosts: int, rng) -> list[np.ndarray]:
    """Global indices as a pod holds them: each host a few rows of every batch of 8."""
    order = rng.permutation(count)
    return [np.sort(order[h::hosts]) for h in range(hosts)]


def test_statistics_merged_from_hosts_equal_those_of_all_rows():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(40, 6)) * [1, 2, 3, 4, 5, 6] + 10.0
    states = []
    for rows in _host_parts(40, 3, rng):
        stats = fid.RunningStatistics(6)
        stats.update(features[rows[:5]])
        stats.update(features[rows[5:]])
        states.append(stats.state())
    states.append(fid.RunningStatistics(6).state())  # a host that holds no sample
    stacked = {k: np.stack([s[k] for s in states]) for k in states[0]}
    merged = fid.RunningStatistics.merged(stacked)
    assert merged.num_images == 40
    np.testing.assert_allclose(merged.mean, features.mean(axis=0), rtol=1e-13)
    np.testing.assert_allclose(merged.covariance(), np.cov(features, rowvar=False), rtol=1e-12)


def test_inception_score_summed_from_hosts_equals_the_direct_one():
    """Rows scattered over hosts by global index give torch-fidelity's score of the rows in
    global order (consecutive splits), not of each host's rows."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(23, 7)) * 3.0
    logits[:8, 0] += 6.0  # splits differ, so a wrong split assignment changes the score
    want = fid.inception_score(logits, splits=4)
    states = []
    for rows in _host_parts(23, 3, rng):
        sums = fid.InceptionScoreSums(23, 4, 7)
        sums.update(logits[rows], rows)
        states.append(sums.state())
    stacked = {k: np.stack([s[k] for s in states]) for k in states[0]}
    got = fid.InceptionScoreSums.summed(stacked, 23, 4).score()
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert abs(fid.inception_score(logits[rng.permutation(23)], splits=4)[0] - want[0]) > 1e-3


def test_inception_score_sums_refuse_missing_or_out_of_range_rows():
    sums = fid.InceptionScoreSums(10, 2, 3)
    sums.update(np.zeros((9, 3)), np.arange(9))
    with pytest.raises(ValueError, match=r"images per split \[5, 4\] differ from the expected \[5, 5\]"):
        sums.score()
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 10\)"):
        sums.update(np.zeros((1, 3)), np.array([10]))


def test_gather_on_one_process_keeps_every_bit():
    from mage_jax.eval import hosts
    x = np.array([1.0 + 2.0 ** -52, np.pi, -1e-300])
    got = hosts.gather({"x": x, "count": np.float64(3)})
    assert got["x"].shape == (1, 3) and got["x"].dtype == np.float64
    np.testing.assert_array_equal(got["x"][0], x)
    assert got["count"].shape == (1,)  # a scalar per process


def test_statistics_file_round_trip_and_feature_size_check(tmp_path):
    x = np.random.default_rng(4).normal(size=(10, 16))
    mu, sigma = x.mean(0), np.cov(x, rowvar=False)
    path = tmp_path / "stats.npz"
    fid.save_statistics(path, mu, sigma, num_images=10)
    loaded_mu, loaded_sigma, n = fid.load_statistics(path, feature_size=16)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)
    assert n == 10
    with pytest.raises(ValueError, match="16-d features"):
        fid.load_statistics(path)  # FID's 2048-d pool3
    np.savez(tmp_path / "other.npz", mean=mu)
    with pytest.raises(ValueError, match="lacks"):
        fid.load_statistics(tmp_path / "other.npz", feature_size=16)


def _png(path, size, value=0):
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def test_folder_reader_reads_sorted_rgb_batches(tmp_path):
    for i in range(3):
        _png(tmp_path / f"{2 - i}.png", (5, 4), value=10 * (2 - i))
    Image.fromarray(np.full((4, 5), 30, np.uint8)).save(tmp_path / "3.jpg", quality=100)  # grey
    (tmp_path / "notes.txt").write_text("not an image")
    image_set = images.open_images(tmp_path)
    assert image_set.num_images == 4 and image_set.shape == (4, 5, 3)
    batches = list(image_set.batches(3))
    assert [b.shape for b in batches] == [(3, 4, 5, 3), (1, 4, 5, 3)]
    assert [int(b[0, 0, 0]) for b in batches[0]] == [0, 10, 20] and batches[1].dtype == np.uint8


def test_folder_reader_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no"):
        images.open_images(tmp_path)
    _png(tmp_path / "a.png", (8, 8))
    _png(tmp_path / "b.png", (8, 6))
    with pytest.raises(ValueError, match="differ in size: a.png is 8x8, b.png is 8x6"):
        images.open_images(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither"):
        images.open_images(tmp_path / "missing.npz")


@pytest.mark.parametrize("array, match", [
    (np.zeros((2, 4, 4, 3), np.float32), "dtype float32"),
    (np.zeros((2, 4, 4, 1), np.uint8), r"shape \(2, 4, 4, 1\)"),
    (np.zeros((4, 4, 3), np.uint8), r"shape \(4, 4, 3\)"),
    (np.zeros((2, 3, 4, 4), np.uint8), "NCHW"),
    (np.zeros((0, 4, 4, 3), np.uint8), "no images"),
])
def test_npz_reader_errors(tmp_path, array, match):
    np.savez(tmp_path / "x.npz", images=array)
    with pytest.raises(ValueError, match=match):
        images.open_images(tmp_path / "x.npz")


def test_npz_reader_missing_key(tmp_path):
    np.savez(tmp_path / "x.npz", samples=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="no 'images' entry.*samples"):
        images.open_images(tmp_path / "x.npz")


# --------------------------------------------------------------------------- weights

def test_weights_loader_names_missing_extra_and_misshapen_keys(inception_fixture):
    state = _state_dict(inception_fixture)
    variables = inception.convert_state_dict(dict(state, **{"fc.num_batches_tracked": np.int64(0)}))
    assert variables["params"]["fc"]["kernel"].shape == state["fc.weight"].shape[::-1]
    np.testing.assert_array_equal(  # OIHW -> HWIO
        variables["params"]["Conv2d_1a_3x3"]["conv"]["kernel"],
        state["Conv2d_1a_3x3.conv.weight"].astype(np.float32).transpose(2, 3, 1, 0))
    assert variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"].dtype == np.float32

    broken = {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
    with pytest.raises(ValueError, match=r"missing keys \['Mixed_7c.branch_pool.bn.running_var'\]"):
        inception.convert_state_dict(broken, source="broken.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \['AuxLogits.fc.weight'\]"):
        inception.convert_state_dict(dict(state, **{"AuxLogits.fc.weight": np.zeros(3)}))
    with pytest.raises(ValueError, match=r"fc.weight: \(10, 2048\) \(expected \(1008, 2048\)\)"):
        inception.convert_state_dict(dict(state, **{"fc.weight": np.zeros((10, 2048))}))


def test_weights_read_from_pth_and_npz(tmp_path, inception_fixture):
    torch = pytest.importorskip("torch")
    state = {k: v for k, v in _state_dict(inception_fixture).items() if k.startswith("Conv2d_1a")}
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "w.pth")
    np.savez(tmp_path / "w.npz", **{_PREFIX + k: v for k, v in state.items()}, other=np.zeros(1))
    for name in ("w.pth", "w.npz"):
        read = inception.read_state_dict(tmp_path / name)
        assert sorted(read) == sorted(state)
        np.testing.assert_array_equal(read["Conv2d_1a_3x3.bn.bias"], state["Conv2d_1a_3x3.bn.bias"])


def test_checksum_of_a_local_file(tmp_path):
    assert inception.sha256_prefix_from_name(inception.WEIGHTS_URL) == "6726825d"
    content = b"not really inception weights"
    prefix = hashlib.sha256(content).hexdigest()[:8]
    path = tmp_path / f"weights-test-{prefix}.pth"
    path.write_bytes(content)
    inception.check_sha256_prefix(path, inception.sha256_prefix_from_name(path.name))
    path.write_bytes(content + b"!")
    with pytest.raises(ValueError, match=f"does not start with {prefix}"):
        inception.check_sha256_prefix(path, prefix)
    with pytest.raises(ValueError, match="no '-<sha256 prefix>.'"):
        inception.sha256_prefix_from_name("weights.pth")


def test_weights_path_without_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="releases/download.*config.eval.weights=PATH"):
        inception.inception_weights_path(None, cache_dir=tmp_path, setting="config.eval.weights")
    with pytest.raises(FileNotFoundError, match="--inception_weights=.*nope.pth does not exist"):
        inception.inception_weights_path(str(tmp_path / "nope.pth"))
    cached = tmp_path / inception.WEIGHTS_URL.rsplit("/", 1)[1]
    cached.write_bytes(b"x")
    found = inception.inception_weights_path(None, cache_dir=tmp_path)
    assert found == cached and isinstance(found, epath.Path)  # one type, given or cached


# --------------------------------------------------------------------------- the command

def _run_score(**values):
    """``python -m mage_jax.eval.score --key=value ...`` in this process; flags restored after."""
    was_parsed = flags.FLAGS.is_parsed()
    with flagsaver.flagsaver():
        argv = flags.FLAGS(["score"] + [f"--{k}={v}" for k, v in values.items()])
        try:
            score.main(argv)
        finally:
            if not was_parsed:
                flags.FLAGS.unparse_flags()


def test_score_command_on_a_tiny_npz(tmp_path, inception_fixture, capsys):
    fixture = inception_fixture
    n = min(6, len(fixture["inputs/images_a"]), len(fixture["inputs/images_b"]))
    np.savez(tmp_path / "weights.npz", **{k: v for k, v in fixture.items() if k.startswith(_PREFIX)})
    np.savez(tmp_path / "a.npz", images=fixture["inputs/images_a"][:n])
    np.savez(tmp_path / "b.npz", images=fixture["inputs/images_b"][:n])
    common = dict(inception_weights=tmp_path / "weights.npz", batch_size=BATCH_SIZE, splits=2)
    _run_score(images=tmp_path / "b.npz", save_stats=tmp_path / "ref.npz", **common)
    _run_score(images=tmp_path / "a.npz", reference_stats=tmp_path / "ref.npz", **common)
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["num_images"] == n

    # The same numbers from torch-fidelity's features of these images (float64 statistics).
    pool_a, pool_b = fixture["features/pool_a"][:n], fixture["features/pool_b"][:n]
    np.testing.assert_allclose(metrics["frechet_inception_distance"],
                               _low_rank_fid(pool_a, pool_b), rtol=1e-3)
    expected_is = fid.inception_score(fixture["features/logits_unbiased_a"][:n], 2)
    np.testing.assert_allclose(metrics["inception_score_mean"], expected_is[0], rtol=1e-5)
    mu, sigma, saved_n = fid.load_statistics(tmp_path / "ref.npz")
    assert saved_n == n
    np.testing.assert_allclose(mu, pool_b.astype(np.float64).mean(0), atol=1e-4)
    np.testing.assert_allclose(sigma, np.cov(pool_b.astype(np.float64), rowvar=False), atol=1e-4)


def test_tfds_reference_images_are_resized_center_crops():
    from mage_jax import config_defaults
    from mage_jax.data import datasets
    image_set = images.open_tfds("fashion_mnist:test", 28, limit=5)
    assert image_set.num_images == 5 and image_set.shape == (28, 28, 3)
    batch = next(image_set.batches(5))
    raw = datasets.open_source(config_defaults.data_config("fashion_mnist", 28), "test")
    # At the native size nothing is resized or cropped: the raw pixels, grey as RGB.
    for i in range(5):
        np.testing.assert_array_equal(batch[i], np.repeat(raw[i]["image"].reshape(28, 28, 1), 3, -1))
    small = next(images.open_tfds("fashion_mnist:test", 16, limit=2).batches(2))
    assert small.shape == (2, 16, 16, 3) and small.dtype == np.uint8
    with pytest.raises(ValueError, match="NAME:SPLIT"):
        images.open_tfds("fashion_mnist", 16)
