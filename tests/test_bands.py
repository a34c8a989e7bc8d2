"""Band validity in scene folders: bad and all-nodata bands dropped, NaN as nodata, a pixel invalid only
where a band that is read is; the band list checkpoints record and read the next product with."""
import os

import numpy as np
import pytest
import tifffile
import torch

import common
import data
import eval as evaluation
import finetune_seg
from conftest import write_scene
from data import IGNORE_INDEX, DataError


# ----------------------------------------------------------------------------- band validity in scene folders

def rewrite_image(folder, fn):
    path = os.path.join(folder, "image.tif")
    img = tifffile.imread(path)
    img = fn(img)
    tifffile.imwrite(path, img, photometric="minisblack")
    return img


def test_nan_pixels_are_ignored_in_statistics_and_labels(tmp_path, cache_dir, capsys):
    folder = write_scene(tmp_path / "f", bands=5, size=20)

    def add_nan(img):
        img = img.astype(np.float32)
        img[2, 3, 4] = np.nan       # one value of one band
        img[:, 5, 6] = np.inf       # a whole pixel, non-finite
        img[4] = np.nan             # a dead band
        return img
    img = rewrite_image(folder, add_nan)
    ds = data.load_dataset(folder, cache_dir=cache_dir)
    assert ds.band_ids == [0, 1, 2, 3] and "nodata or NaN in every pixel 4" in capsys.readouterr().out
    valid = np.isfinite(img[:4]).all(0)
    assert valid.sum() == 20 * 20 - 2
    np.testing.assert_allclose(ds.mean, img[:4, valid].astype(np.float64).mean(1), rtol=1e-5)
    x, y = ds.crop(0, 0, 0, 20, 20)
    assert np.isfinite(x).all() and y[3, 4] == IGNORE_INDEX and y[5, 6] == IGNORE_INDEX
    np.testing.assert_array_equal(x[:, 3, 4], ds.mean)
    labels = data.scene_labels(ds)
    assert (labels[~valid] == IGNORE_INDEX).all() and (labels[valid] != IGNORE_INDEX).sum() > 0


def test_pixel_is_invalid_only_where_a_kept_band_is_nodata(tmp_path, cache_dir, capsys):
    folder = write_scene(tmp_path / "s", bands=8, size=20, nodata=0, bad_bands=[6],
                         wavelengths_nm=[400 + 50 * i for i in range(8)])

    def damage(img):
        img[3] = 0          # dead band
        img[6, :10] = 0     # nodata in a bad band: does not matter
        img[1, 0, 0] = 0    # nodata in a kept band: that pixel is invalid
        return img
    img = rewrite_image(folder, damage)
    ds = data.load_dataset(folder, cache_dir=cache_dir)
    assert ds.band_ids == [0, 1, 2, 4, 5, 7] and ds.raw_bands == 6 and ds.file_bands == 8
    assert ds.wavelengths == [400, 450, 500, 600, 650, 750]
    line = [ln for ln in capsys.readouterr().out.splitlines() if "dropped" in ln]
    assert line == ["s: dropped 2 of 8 bands (0-based) - in bad_bands 6 (700 nm); nodata or NaN in every pixel 3 "
                    "(550 nm) - reading 6 bands"]
    valid = np.ones((20, 20), bool)
    valid[0, 0] = False
    np.testing.assert_allclose(ds.mean, img[[0, 1, 2, 4, 5, 7]][:, valid].astype(np.float64).mean(1), rtol=1e-5)
    _, y = ds.crop(0, 0, 0, 20, 20)
    assert y[0, 0] == IGNORE_INDEX and (y[:10] != IGNORE_INDEX).sum() > 100
    assert ds.band_info == {"ids": [0, 1, 2, 4, 5, 7], "wavelengths": [400.0, 450.0, 500.0, 600.0, 650.0, 750.0]}
    # The same line again from the cache.
    data.load_dataset(folder, cache_dir=cache_dir)
    assert "dropped 2 of 8 bands" in capsys.readouterr().out


def test_wavelengths_may_list_every_band_or_only_the_good_ones(tmp_path, cache_dir):
    good_only = write_scene(tmp_path / "g", bands=6, bad_bands=[1, 4], wavelengths_nm=[400, 600, 700, 900])
    assert data.load_dataset(good_only, cache_dir=cache_dir).wavelengths == [400, 600, 700, 900]
    wrong = write_scene(tmp_path / "w", bands=6, bad_bands=[1, 4], wavelengths_nm=[400, 600, 700])
    with pytest.raises(DataError, match=r"w.meta.json: 3 wavelengths_nm for an image with 6 bands \(4 after "
                                        r"dropping the 2 bad_bands\)"):
        data.load_dataset(wrong, cache_dir=cache_dir)
    with pytest.raises(DataError, match="x.meta.json: 7 fwhm_nm for an image with 6 bands"):
        data.load_dataset(write_scene(tmp_path / "x", bands=6, fwhm_nm=[10] * 7), cache_dir=cache_dir)


def test_meta_and_band_errors(tmp_path, cache_dir):
    with pytest.raises(DataError, match=r"a.meta.json: bad_bands must be 0-based band indices 0 .. 5, got 6"):
        data.load_dataset(write_scene(tmp_path / "a", bands=6, bad_bands=[2, 6]), cache_dir=cache_dir)
    with pytest.raises(DataError, match="b.meta.json: nodata must be a number or null, got \"none\""):
        data.load_dataset(write_scene(tmp_path / "b", nodata="none"), cache_dir=cache_dir)
    with pytest.raises(DataError, match="c: bad_bands flags all 2 bands"):
        data.load_dataset(write_scene(tmp_path / "c", bands=2, bad_bands=[0, 1]), cache_dir=cache_dir)
    dead = write_scene(tmp_path / "d", bands=3, nodata=0)
    rewrite_image(dead, lambda img: img * 0)
    with pytest.raises(DataError, match="d: every band is nodata or NaN in every pixel"):
        data.load_dataset(dead, cache_dir=cache_dir)
    halves = write_scene(tmp_path / "h", bands=2, size=10, nodata=0)

    def split(img):
        img[0, :, :5] = 0
        img[1, :, 5:] = 0
        return img
    rewrite_image(halves, split)
    with pytest.raises(DataError, match=r"h: no valid pixels to compute band statistics from: .*bands are 0 \(50.0% "
                                        r"valid\), 1 \(50.0% valid\); list bands to leave out in bad_bands"):
        data.load_dataset(halves, cache_dir=cache_dir)
    with pytest.raises(DataError, match=r"image.tif: a file, not a scene folder; convert it first: python formats.py"):
        data.load_dataset(os.path.join(halves, "image.tif"), cache_dir=cache_dir)


def test_products_of_one_sensor_are_read_with_their_shared_bands(tmp_path, cache_dir, capsys):
    a = write_scene(tmp_path / "a", bands=6, nodata=0, with_gt=False)
    b = write_scene(tmp_path / "b", bands=6, nodata=0, with_gt=False, seed=1)
    other = write_scene(tmp_path / "c", bands=4, with_gt=False)
    rewrite_image(a, lambda img: np.where(np.arange(6)[:, None, None] == 1, 0, img))
    rewrite_image(b, lambda img: np.where(np.arange(6)[:, None, None] == 4, 0, img))
    dss = data.load_datasets(f"{a},{b},{other}", cache_dir=cache_dir)
    assert [d.band_ids for d in dss] == [[0, 2, 3, 5], [0, 2, 3, 5], [0, 1, 2, 3]]
    assert "a: reading 4 of 6 bands (the bands valid in all of a, b)" in capsys.readouterr().out


def test_check_config_ignores_band_lists_of_old_checkpoints():
    saved = {"name": "pixel", "in_chans": 4}
    common.check_config(saved, {**saved, "bands": {"ids": [0, 1, 2, 3], "wavelengths": None}}, "old.pt")
    with pytest.raises(ValueError, match=r"only the checkpoint reads \[3\], only the data \[4\]"):
        common.check_config({**saved, "bands": {"ids": [0, 1, 2, 3]}}, {**saved, "bands": {"ids": [0, 1, 2, 4]}}, "x.pt")




def test_checkpoints_record_the_bands_and_read_the_next_product_with_them(tmp_path, cache_dir, capsys):
    first = write_scene(tmp_path / "first", bands=6, size=24, nodata=0, wavelengths_nm=[500 + 100 * i for i in range(6)])
    rewrite_image(first, lambda img: np.where(np.arange(6)[:, None, None] == 2, 0, img))  # band 2 dead
    out = tmp_path / "run"
    finetune_seg.main(["--data", first, "--out", str(out), "--cache-dir", cache_dir, "--backbone", "pixel",
                       "--img-size", "16", "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--workers", "0"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["backbone"]["bands"] == {"ids": [0, 1, 3, 4, 5], "wavelengths": [500.0, 600.0, 800.0, 900.0, 1000.0]}
    # The next product: band 2 valid, band 5 a little off in wavelength. It is read with the checkpoint's bands.
    nxt = write_scene(tmp_path / "next", bands=6, size=24, nodata=0, seed=1,
                      wavelengths_nm=[500, 600, 700, 800, 900, 1010])
    capsys.readouterr()
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", nxt, "--out", str(tmp_path / "e")])
    printed = capsys.readouterr().out
    assert m["pixels"] > 0 and "next: reading 5 of 6 bands (the checkpoint's band list); not read (0-based): 2 " \
        "(700 nm)" in printed
    assert "warning: next: band 5 is at 1010.0 nm but the checkpoint's is at 1000.0 nm" in printed
    # Data of another sensor (fewer bands than the checkpoint reads) is read with its own bands, and the
    # band count check names the mismatch.
    with pytest.raises(ValueError, match="checkpoint was trained on 5 bands but other has 4 bands"):
        evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", write_scene(tmp_path / "other", bands=4, size=24),
                         "--out", str(tmp_path / "o")])
