"""The notebooks' functions (mage_jax/inference.py, config_files.py) on a tiny trained MAGE:
each gives what the stage it wraps computes."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mage_jax import config_files, inference, pretrained
from mage_jax import main as mage_main
from mage_jax.generate import stage as generate
from mage_jax.probe import features as features_lib
from tests.tiny_configs import load_config


@pytest.fixture(scope="module")
def pre(pretrain_dir):
    return inference.load(pretrain_dir)


@pytest.fixture(scope="module")
def images(pre):
    return inference.images_from_dataset(pre, 6)


def test_images_from_dataset_reads_the_runs_own_data(pre):
    images, labels = inference.images_from_dataset(pre, 300, split="test")  # 2 batches
    assert images.shape == (300, 16, 16, 3) and images.dtype == np.uint8
    assert labels.shape == (300,) and set(np.unique(labels)) <= set(range(10))
    first, first_labels = inference.images_from_dataset(pre, 6, split="test")
    np.testing.assert_array_equal(first, images[:6])
    np.testing.assert_array_equal(first_labels, labels[:6])


def test_reconstruct_is_encode_then_decode(pre, images):
    images, _ = images
    ids, out = inference.reconstruct(pre, images)
    tok = pre.tokenizer
    want_ids = tok.apply({"params": pre.tokenizer_params}, jnp.asarray(images) / 255.0,
                         method=tok.encode)
    np.testing.assert_array_equal(ids, want_ids)
    want = np.clip(np.asarray(pretrained.decode_tokens(pre, pre.tokenizer_params, want_ids))
                   * 255, 0, 255)
    # uint8 as the official script writes it (truncated). The two decodes are compiled
    # apart, so a value a hair from a level boundary may land on either side of it: exact
    # everywhere else, and never more than that one level off.
    fraction = want % 1.0
    clear = (np.minimum(fraction, 1 - fraction) > 1e-3) | (want == 0) | (want == 255)
    assert clear.mean() > 0.99
    np.testing.assert_array_equal(out[clear], want.astype(np.uint8)[clear])
    assert np.abs(out.astype(np.int32) - want.astype(np.int32)).max() <= 1


def test_samples_are_the_generate_stages(pre, pretrain_dir, tmp_path):
    """Sample i depends on (seed, i) only: the same images as the generate stage, any count,
    any number of devices (the batch is padded to the mesh and cut back)."""
    config = load_config("generate", "demo")
    config.update(pretrain_workdir=pretrain_dir, num_samples=5, batch_size=5, seed=3)
    config.sampling.update(num_steps=4, choice_temperature=2.0)
    config.classifier_measures.enabled = False
    config.mesh.update(data=1)
    generate.run(config, str(tmp_path), devices=jax.devices()[:1])
    with np.load(tmp_path / "samples.npz") as f:
        staged = f["images"]
    ours = inference.sample(pre, 5, num_steps=4, choice_temperature=2.0, seed=3,
                            mesh_=inference.mesh(jax.devices()[:4]))
    np.testing.assert_array_equal(ours, staged)
    np.testing.assert_array_equal(
        inference.sample(pre, 2, num_steps=4, choice_temperature=2.0, seed=3), staged[:2])


def test_class_labels_need_a_class_conditional_model(pre):
    assert not inference.is_class_conditional(pre)
    with pytest.raises(ValueError, match="not a class-conditional MAGE"):
        inference.sample(pre, 2, labels=[0, 1])


@pytest.mark.parametrize("outpaint", [False, True])
def test_edit_keeps_every_pixel_it_does_not_regenerate(pre, images, outpaint):
    images, _ = images
    box = (4, 4, 12, 12)
    edited = inference.edit(pre, images, box, outpaint=outpaint, num_steps=4)
    inside = np.zeros((16, 16), bool)
    inside[4:12, 4:12] = True
    kept = inside if outpaint else ~inside
    np.testing.assert_array_equal(edited[:, kept], images[:, kept])
    assert np.any(edited[:, ~kept] != images[:, ~kept])


def test_pooled_features_are_the_probes(pre, images):
    images, labels = images
    got = inference.pooled_features(pre, images, batch_size=4)  # two batches
    extractor = features_lib.FeatureExtractor("encoder", pre.model, pre.tokenizer,
                                              pre.image_size)
    want = extractor.features({"mage": pre.params, "tokenizer": pre.tokenizer_params},
                              jnp.asarray(images) / 255.0)
    np.testing.assert_allclose(got, want, atol=1e-5)
    pool = inference.images_from_dataset(pre, 200, split="train")
    scores = inference.fewshot(pre, pool, (images, labels), shots=(1, 2), seeds=(0,))
    assert list(scores) == ["1shot", "2shot"]
    assert all(0.0 <= v <= 1.0 and v * 6 == round(v * 6) for v in scores.values())


def test_grid_places_images_row_by_row():
    images = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 3, 1), np.uint8)
    picture = inference.grid(images, 3)
    assert picture.shape == (4, 9, 1)
    assert picture[0, 0, 0] == 0 and picture[0, 3, 0] == 1 and picture[2, 3, 0] == 4
    assert picture[2, 6, 0] == 0  # the padding of the last row


def test_config_files_load_the_command_lines_configs(tmp_path):
    demo = config_files.load("configs/pretrain.py:demo")
    assert demo.to_dict() == config_files.load("pretrain:demo").to_dict()
    smoke = config_files.load("pretrain:demo,smoke")
    assert smoke.total_steps < demo.total_steps
    assert smoke.tokenizer_stage.total_steps < demo.tokenizer_stage.total_steps
    with pytest.raises(ValueError, match="demo,smoke"):
        config_files.load("probe:smoke")
    with pytest.raises(FileNotFoundError, match="nothere"):
        config_files.load("nothere:demo")


def test_a_run_leaves_no_global_mesh_behind(pretrain_dir, tmp_path):
    """main.run (the notebooks' way to train) puts JAX's mesh back as it found it."""
    config = load_config("generate", "demo")
    config.update(pretrain_workdir=pretrain_dir, num_samples=8, batch_size=8)
    config.sampling.num_steps = 2
    config.classifier_measures.enabled = False
    config.mesh.update(data=-1)  # every device the test process has
    before = jax.sharding.get_abstract_mesh()
    mage_main.run(config, str(tmp_path / "gen"))
    assert os.path.exists(tmp_path / "gen" / "samples.npz")
    assert jax.sharding.get_abstract_mesh() == before


def test_make_figures_draws_the_readme_tour_from_a_run(pre, pretrain_dir, tmp_path):
    """docs/make_figures.py (the README's pictures): inputs, greyed box, inpainted and
    outpainted rows; each edit keeps what it does not regenerate."""
    import subprocess
    import sys
    output = tmp_path / "inpainting.png"
    subprocess.run([sys.executable, "docs/make_figures.py", "--kind=inpainting",
                    f"--workdir={pretrain_dir}", f"--output={output}", "--scale=2"],
                   cwd=os.path.dirname(os.path.dirname(__file__)), check=True,
                   env=dict(os.environ, XLA_FLAGS=""))
    picture = np.asarray(Image.open(output))[::2, ::2]  # undo the nearest-neighbour x2
    assert picture.shape == (4 * 16, 4 * 16, 3)
    images, _ = inference.images_from_dataset(pre, 4)
    rows = [picture[16 * r:16 * (r + 1)].reshape(16, 4, 16, 3).transpose(1, 0, 2, 3)
            for r in range(4)]
    np.testing.assert_array_equal(rows[0], images)
    assert np.all(rows[1][:, 4:12, 4:12] == 128)                            # the box, greyed
    np.testing.assert_array_equal(rows[2][:, :4], images[:, :4])            # inpainted: outside kept
    np.testing.assert_array_equal(rows[3][:, 4:12, 4:12], images[:, 4:12, 4:12])  # outpainted
