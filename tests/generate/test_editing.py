"""Inpainting and outpainting: the token mask, the canvas, pasting, and the command."""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from mage_jax import pretrained
from mage_jax.generate import edit, editing


def test_token_mask_covers_touched_patches_dilated_by_one():
    pixels = np.zeros((1, 16, 16), bool)
    pixels[0, 5, 5] = True  # patch (1, 1) of a 4x4 grid of 4 px patches
    plain = np.asarray(editing.token_mask(jnp.asarray(pixels), 4, dilate=0)).reshape(4, 4)
    assert plain.sum() == 1 and plain[1, 1]
    dilated = np.asarray(editing.token_mask(jnp.asarray(pixels), 4)).reshape(4, 4)
    expected = np.zeros((4, 4), bool)
    expected[0:3, 0:3] = True
    np.testing.assert_array_equal(dilated, expected)
    corner = np.zeros((1, 16, 16), bool)
    corner[0, 15, 15] = True
    got = np.asarray(editing.token_mask(jnp.asarray(corner), 4)).reshape(4, 4)
    assert got.sum() == 4 and got[2:, 2:].all()  # clipped at the border


def test_box_mask_inside_outside_and_bad_box():
    inside = editing.box_mask(8, (2, 1, 6, 3))
    assert inside.sum() == 8 and inside[1, 2] and not inside[3, 2] and not inside[1, 6]
    np.testing.assert_array_equal(editing.box_mask(8, (2, 1, 6, 3), outside=True), ~inside)
    with pytest.raises(ValueError, match=r"box=\(4, 0, 2, 8\)"):
        editing.box_mask(8, (4, 0, 2, 8))


def test_canvas_and_paste():
    tokens = jnp.arange(4)[None]
    np.testing.assert_array_equal(
        editing.canvas(tokens, jnp.array([[False, True, True, False]]), 99), [[0, 99, 99, 3]])
    original, generated = jnp.zeros((1, 2, 2, 3)), jnp.ones((1, 2, 2, 3))
    region = jnp.array([[[True, False], [False, False]]])
    out = np.asarray(editing.paste(original, generated, region))
    assert out[0, 0, 0].tolist() == [1, 1, 1] and out[0, 1:].sum() == 0 and out[0, 0, 1].sum() == 0


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("edit") / "input.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_a_mask_of_another_size_is_named(image_file, tmp_path):
    mask = tmp_path / "mask.png"
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(mask)
    with pytest.raises(ValueError, match="is 10x10 but the image .* is 24x20"):
        edit.load_inputs(image_file, 16, mask_path=str(mask))
    with pytest.raises(ValueError, match="exactly one of"):
        edit.load_inputs(image_file, 16)
    with pytest.raises(ValueError, match="four integers"):
        edit.load_inputs(image_file, 16, box="1,2,3")


def test_inpainting_keeps_the_pixels_outside_the_region(pretrain_dir, image_file):
    pre = pretrained.load(pretrain_dir)
    image, region = edit.load_inputs(image_file, pre.image_size, box="4,4,12,12")
    assert image.shape == (16, 16, 3) and region.sum() == 64
    out = edit.edit_images(pre, image[None].repeat(2, 0), region[None].repeat(2, 0), seed=0,
                           num_steps=3, choice_temperature=4.5)
    assert out.dtype == np.uint8 and out.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(out[:, ~region], image[None].repeat(2, 0)[:, ~region])
    assert not np.array_equal(out[0][region], image[region])  # the region was redrawn
    outpainted, outside = edit.load_inputs(image_file, pre.image_size, box="4,4,12,12",
                                           outside=True)
    out = edit.edit_images(pre, outpainted[None], outside[None], seed=0, num_steps=3,
                           choice_temperature=4.5)
    np.testing.assert_array_equal(out[0][region], image[region])


def test_edit_command_writes_the_result(pretrain_dir, image_file, tmp_path):
    output = tmp_path / "out.png"
    subprocess.run([sys.executable, "-m", "mage_jax.generate.edit",
                    f"--pretrain_workdir={pretrain_dir}", f"--image={image_file}",
                    "--box=0,0,8,16", "--outpaint", "--num_steps=2", f"--output={output}"],
                   check=True, capture_output=True, text=True,
                   env=dict(os.environ, JAX_PLATFORMS="cpu"))
    result = np.asarray(Image.open(output))
    assert result.shape == (16, 16, 3)
