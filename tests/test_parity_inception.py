"""Parity with torch-fidelity's FID/IS on the reference fixture (shared/reference).

The fixture (``INCEPTION_FIXTURE``, default ``../shared/reference/inception_fid_tiny.npz``)
holds the FID InceptionV3 with random weights, two image sets and torch-fidelity's
outputs for them. Counts, image sizes and the IS splits come from the fixture, so any file
of the same format must pass.
"""
import re

import numpy as np
import pytest

from mage_jax.eval import fid, inception

_PREFIX = "state_dict/"
# Any batch size works (the last batch is padded); tests/eval/test_fid.py uses the same one
# on the same images so that the compiled network is shared within a process.
BATCH_SIZE = 8


def _splits(meta) -> int:
    match = re.search(r"splits\s*=\s*(\d+)", str(meta.get("inception_score", "")))
    assert match, f"the fixture's meta names no IS splits: {meta}"
    return int(match.group(1))


@pytest.fixture(scope="module")
def variables(inception_fixture):
    state_dict = {k[len(_PREFIX):]: v for k, v in inception_fixture.items() if k.startswith(_PREFIX)}
    return inception.convert_state_dict(state_dict, source="the inception fixture")


@pytest.fixture(scope="module")
def features(inception_fixture, variables):
    """{set: (pool3, logits_unbiased)} computed by the JAX port."""
    out = {}
    for name in ("a", "b"):
        images = inception_fixture[f"inputs/images_{name}"]
        batches = (images[i:i + BATCH_SIZE] for i in range(0, len(images), BATCH_SIZE))
        parts = list(fid.extract_features(variables, batches, BATCH_SIZE))
        out[name] = tuple(np.concatenate(p) for p in zip(*parts))
    return out


@pytest.mark.parametrize("key, name, index", [
    ("features/pool_a", "a", 0), ("features/pool_b", "b", 0), ("features/logits_unbiased_a", "a", 1)])
def test_features(inception_fixture, features, key, name, index):
    actual, reference = features[name][index], inception_fixture[key]
    assert actual.shape == reference.shape, (key, actual.shape, reference.shape)
    error = float(np.max(np.abs(actual - reference)))
    assert error < 1e-4, f"{key}: max abs error {error}"


def test_fid_end_to_end(inception_fixture, features):
    stats = {}
    for name in ("a", "b"):
        running = fid.RunningStatistics()
        for i in range(0, len(features[name][0]), BATCH_SIZE):
            running.update(features[name][0][i:i + BATCH_SIZE])
        stats[name] = (running.mean, running.covariance())
    fid_ab = fid.frechet_distance(*stats["a"], *stats["b"])
    reference = float(inception_fixture["metrics/fid_ab"])
    assert abs(fid_ab - reference) <= 1e-4 * abs(reference), (fid_ab, reference)


def test_inception_score(inception_fixture, features):
    splits = _splits(inception_fixture["meta"])
    mean, _ = fid.inception_score(features["a"][1], splits)
    reference = float(inception_fixture["metrics/inception_score_a"])
    assert abs(mean - reference) <= 1e-4 * abs(reference), (mean, reference)
    # The score of the reference logits themselves isolates the IS code from the network.
    np.testing.assert_allclose(
        fid.inception_score(inception_fixture["features/logits_unbiased_a"], splits)[0],
        reference, rtol=1e-9)
