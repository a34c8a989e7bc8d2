"""Fixtures write their own small data: a fresh clone's tests never need ../shared."""
import json
import os

import numpy as np
import pytest
import tifffile

WHU_TILE = 48  # real tiles are 512; the readers take any size


def write_whu(root, splits=("tr", "val", "ts"), tiles=2, size=WHU_TILE, seed=0, dtype=np.int16, compress=False):
    """A WHU-OHS-shaped tree: (32, size, size) reflectance x 1e4 and (size, size) uint8 labels 0..24."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for sub in ("image", "label"):
            os.makedirs(os.path.join(root, split, sub), exist_ok=True)
        for i in range(tiles):
            name = f"S1_{i:04d}.tif"
            img = rng.integers(0, 6000, (32, size, size)).astype(dtype)
            lab = rng.integers(0, 25, (size, size)).astype(np.uint8)
            tifffile.imwrite(os.path.join(root, split, "image", name), img, compression="zlib" if compress else None)
            tifffile.imwrite(os.path.join(root, split, "label", name), lab)
    return str(root)


def write_scene(folder, bands=16, size=40, classes=3, seed=0, nodata=None, with_gt=True, **meta):
    """A scene folder: (bands, size, size) uint16 image, optional gt.tif with labels 0..classes, meta.json."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    yy, xx = np.mgrid[:size, :size]
    gt = (1 + (yy * classes) // size).astype(np.uint8)  # horizontal class stripes
    gt[::7, ::5] = 0
    spectra = rng.integers(1000, 4000, (classes + 1, bands))
    img = spectra[gt].transpose(2, 0, 1) + rng.integers(0, 300, (bands, size, size))
    tifffile.imwrite(os.path.join(folder, "image.tif"), img.astype(np.uint16), compression="zlib")
    if with_gt:
        tifffile.imwrite(os.path.join(folder, "gt.tif"), gt)
    info = {"name": os.path.basename(folder), "nodata": nodata, "value_scale": None,
            "class_names": [f"c{i}" for i in range(classes)] if with_gt else [], **meta}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(info, f)
    return str(folder)


@pytest.fixture
def cache_dir(tmp_path):
    return str(tmp_path / "cache")


@pytest.fixture
def whu_root(tmp_path):
    return write_whu(tmp_path / "whu")


@pytest.fixture
def scene(tmp_path):
    return write_scene(tmp_path / "scene")
