import json
import os

import numpy as np
import pytest
from PIL import Image

from unclip_jax.image_output import make_grid, save_images, to_uint8


def test_to_uint8_range():
    x = np.array([-2.0, -1.0, 0.0, 1.0, 3.0], np.float32).reshape(1, 1, 5, 1)
    assert to_uint8(x).ravel().tolist() == [0, 0, 128, 255, 255]


def test_grid_places_images():
    imgs = np.stack([np.full((4, 4, 3), i * 50, np.uint8) for i in range(5)])
    grid = make_grid(imgs, cols=3, pad=1)
    assert grid.shape == (2 * 5 + 1, 3 * 5 + 1, 3)
    assert grid[1, 1, 0] == 0 and grid[1, 6, 0] == 50 and grid[6, 6, 0] == 200
    with pytest.raises(ValueError):
        make_grid(np.zeros((0, 4, 4, 3), np.uint8))


def test_save_images_writes_pngs_grid_and_manifest(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 255, (2, 8, 8, 3), dtype=np.uint8)
    manifest = save_images(str(tmp_path), imgs, [{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}], {"steps": 3})
    assert manifest["images"][1]["file"] == "image_0001.png"
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "image_0001.png")), imgs[1])
    assert os.path.exists(tmp_path / "grid.png")
    assert json.load(open(tmp_path / "manifest.json"))["settings"] == {"steps": 3}
