"""data.py: readers, the raster cache, band validity and statistics, the wavelength grid, splits, per-tile
augmentations, the step-indexed loaders and the batched device pipeline (run here on the CPU device: it gives
the per-tile path's values, bit for bit for the normalisation, and its distributions for the augmentations)."""
import os

import numpy as np
import pytest
import tifffile
import torch

import data
import pretrain_dino
from conftest import SENSORS, rewrite_image, sensor_scene, write_scene, write_whu
from data import IGNORE_INDEX, DataError
from models import build_backbone

CPU = torch.device("cpu")


def identity(x, d):
    return x


# ----------------------------------------------------------------------------- readers and cache

def test_whu_reader_cuts_reflectance_and_maps_labels(whu_root, cache_dir):
    ds = data.load_dataset(whu_root, "tr", cache_dir)
    assert ds.bands == 32 and ds.num_classes == 24 and len(ds.rasters) == 2
    raw = tifffile.imread(os.path.join(whu_root, "tr", "image", "S1_0001.tif"))
    lab = tifffile.imread(os.path.join(whu_root, "tr", "label", "S1_0001.tif"))
    img, y = ds.crop(1, 5, 7, 32, 32)
    # A tile is a window of the source, in float32 reflectance: no resizing, no 8-bit quantisation.
    np.testing.assert_allclose(img, raw[:, 5:37, 7:39].astype(np.float32) * 1e-4, rtol=1e-6)
    expected = lab[5:37, 7:39].astype(np.int64) - 1
    assert (y == expected).all() and (y[lab[5:37, 7:39] == 0] == IGNORE_INDEX).all()
    assert y.max() <= 23


def test_whu_splits_use_training_statistics(whu_root, cache_dir):
    tr = data.load_dataset(whu_root, "tr", cache_dir)
    val = data.load_dataset(whu_root, "val", cache_dir)
    stack = np.stack([tifffile.imread(os.path.join(whu_root, "tr", "image", f"S1_{i:04d}.tif")) for i in range(2)])
    refl = stack.astype(np.float64) * 1e-4
    np.testing.assert_allclose(tr.mean, refl.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(tr.std, refl.std(axis=(0, 2, 3)), rtol=1e-4)
    np.testing.assert_array_equal(val.mean, tr.mean)
    x = val.normalise(val.crop(0, 0, 0, 8, 8)[0])
    assert x.dtype == np.float32


def test_uint16_negatives_are_not_wrapped_and_fill_is_masked(tmp_path, cache_dir):
    root = write_whu(tmp_path / "w", splits=("tr",), tiles=1)
    path = os.path.join(root, "tr", "image", "S1_0000.tif")
    img = tifffile.imread(path)
    img[:, 0, 0] = -20      # slightly negative reflectance: a real (noisy) value
    img[3, 1, 1] = -9999    # fill value
    tifffile.imwrite(path, img.view(np.uint16))  # some distributions store int16 data as uint16
    ds = data.load_dataset(root, "tr", cache_dir)
    x, y = ds.crop(0, 0, 0, 4, 4)
    np.testing.assert_allclose(x[:, 0, 0], -20e-4, rtol=1e-5)
    assert y[1, 1] == IGNORE_INDEX
    np.testing.assert_allclose(x[:, 1, 1], ds.mean)  # invalid pixel -> band mean -> 0 after normalising


def test_scene_stats_exclude_nodata_and_are_cached(tmp_path, cache_dir, monkeypatch):
    folder = write_scene(tmp_path / "s", nodata=0)
    img = tifffile.imread(os.path.join(folder, "image.tif"))
    img[:, :3, :3] = 0
    tifffile.imwrite(os.path.join(folder, "image.tif"), img)
    ds = data.load_dataset(folder, cache_dir=cache_dir)
    valid = ~(img == 0).any(0)
    np.testing.assert_allclose(ds.mean, img[:, valid].astype(np.float64).mean(1), rtol=1e-5)
    assert (ds.crop(0, 0, 0, 3, 3)[1] == IGNORE_INDEX).all()
    monkeypatch.setattr(data.HSIDataset, "physical", lambda *a, **k: pytest.fail("stats recomputed"))
    np.testing.assert_array_equal(data.load_dataset(folder, cache_dir=cache_dir).mean, ds.mean)


def test_compressed_tifs_are_cached_uncompressed_ones_memory_mapped(tmp_path, cache_dir):
    for compress in (False, True):
        root = write_whu(tmp_path / f"w{compress}", splits=("tr",), tiles=1, compress=compress)
        ds = data.load_dataset(root, "tr", cache_dir)
        image = ds.rasters[0].image  # memory-mapped read-only (see test_rasters_hold_no_file_descriptors)
        assert not image.flags.owndata and not image.flags.writeable
        cache = data.RasterCache(root, cache_dir)
        entry = cache.manifest[os.path.abspath(ds.rasters[0].path)]
        assert (entry["npy"] is not None) == compress


def test_scene_reader(scene, cache_dir):
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    assert ds.bands == 16 and ds.num_classes == 3 and ds.class_names == ["c0", "c1", "c2"]
    labels = data.scene_labels(ds)
    assert labels.shape == (40, 40) and set(np.unique(labels)) == {IGNORE_INDEX, 0, 1, 2}


def test_several_datasets_and_band_count_check(tmp_path, cache_dir):
    a = write_scene(tmp_path / "a", bands=16, with_gt=False)
    b = write_scene(tmp_path / "b", bands=12, with_gt=False)
    dss = data.load_datasets(f"{a},{b}", cache_dir=cache_dir)
    assert [d.bands for d in dss] == [16, 12] and dss[0].num_classes == 0
    with pytest.raises(DataError, match="one band count.*16.*12"):
        data.check_same_bands(dss, "vit")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files in /proc (Linux)")
def test_rasters_hold_no_file_descriptors(tmp_path, cache_dir):
    """WHU-OHS has ~10k rasters (image + label per tile); a file descriptor per memory map would pass the
    usual limit of 1024 open files."""
    root = write_whu(tmp_path / "w", splits=("tr",), tiles=40, size=16)
    before = len(os.listdir("/proc/self/fd"))
    ds = data.load_dataset(root, "tr", cache_dir)
    assert len(os.listdir("/proc/self/fd")) - before < 5
    raw = tifffile.imread(os.path.join(root, "tr", "image", "S1_0007.tif"))
    np.testing.assert_array_equal(ds.rasters[7].image, raw)
    with pytest.raises(ValueError, match="read-only"):
        ds.rasters[7].image[0, 0, 0] = 1


def rss_file_mb():
    """Mapped file pages resident in this process (RssShmem where the file is on tmpfs)."""
    with open("/proc/self/status") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("RssFile:", "RssShmem:"))) / 1024


@pytest.mark.skipif(not os.path.isfile("/proc/self/status"), reason="reads RssFile in /proc (Linux)")
def test_band_statistics_leave_no_mapped_pages_resident(tmp_path, cache_dir):
    """A scene's statistics read every pixel through its memory map; the pages read go back to the page
    cache block by block, so the peak RSS stays far below the file's size (the check after formats.py's
    conversion peaked at 1.86 GB for a 1.82 GB product before)."""
    folder = write_scene(tmp_path / "big", bands=64, size=512, classes=2)  # 32 MB of uint16
    before = rss_file_mb()
    ds = data.load_dataset(folder, cache_dir=cache_dir)
    assert rss_file_mb() - before < 8
    raw = tifffile.imread(os.path.join(folder, "image.tif"))
    np.testing.assert_array_equal(ds.rasters[0].image, raw)  # released pages read back from the file
    anonymous = np.arange(10.0)
    data.release(anonymous)  # not a map: untouched
    np.testing.assert_array_equal(anonymous, np.arange(10.0))
    np.save(tmp_path / "c.npy", np.zeros(4096))
    private = np.load(tmp_path / "c.npy", mmap_mode="c")
    private[0] = 1.0
    data.release(private)  # a copy-on-write map keeps its changes
    assert private[0] == 1.0



# ----------------------------------------------------------------------------- bad input

def _expect(path_fragment, fn, match):
    with pytest.raises(DataError, match=match) as e:
        fn()
    assert path_fragment in str(e.value), f"error does not name {path_fragment}: {e.value}"


def test_wrong_band_count(whu_root, cache_dir):
    bad = os.path.join(whu_root, "tr", "image", "S1_0001.tif")
    tifffile.imwrite(bad, np.zeros((33, 48, 48), np.int16))
    _expect("S1_0001.tif", lambda: data.load_dataset(whu_root, "tr", cache_dir), "33 bands")


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_tif(tmp_path, cache_dir, compress):
    root = write_whu(tmp_path / "w", splits=("tr",), tiles=1, compress=compress)
    bad = os.path.join(root, "tr", "image", "S1_0000.tif")
    with open(bad, "rb") as f:
        content = f.read()
    with open(bad, "wb") as f:
        f.write(content[: len(content) // 2])
    _expect("S1_0000.tif", lambda: data.load_dataset(root, "tr", cache_dir), "TIFF")


def test_corrupt_tif(whu_root, cache_dir):
    bad = os.path.join(whu_root, "tr", "label", "S1_0000.tif")
    with open(bad, "wb") as f:
        f.write(b"this is not a tiff" * 10)
    _expect("S1_0000.tif", lambda: data.load_dataset(whu_root, "tr", cache_dir), "cannot read TIFF")


def test_label_out_of_range(whu_root, cache_dir):
    bad = os.path.join(whu_root, "tr", "label", "S1_0001.tif")
    lab = tifffile.imread(bad)
    lab[0, 0] = 25
    tifffile.imwrite(bad, lab)
    _expect("S1_0001.tif", lambda: data.load_dataset(whu_root, "tr", cache_dir), "0 .unlabelled. .. 24.*25")


def test_image_label_size_mismatch(whu_root, cache_dir):
    bad = os.path.join(whu_root, "tr", "label", "S1_0000.tif")
    tifffile.imwrite(bad, np.zeros((40, 48), np.uint8))
    _expect("S1_0000.tif", lambda: data.load_dataset(whu_root, "tr", cache_dir), r"\(40, 48\).*\(48, 48\)")


def test_missing_label_file(whu_root, cache_dir):
    os.remove(os.path.join(whu_root, "tr", "label", "S1_0001.tif"))
    _expect("S1_0001.tif", lambda: data.load_dataset(whu_root, "tr", cache_dir), "missing label")


def test_empty_and_missing_folders(tmp_path, cache_dir):
    _expect("nowhere", lambda: data.load_dataset(str(tmp_path / "nowhere"), cache_dir=cache_dir), "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _expect("empty", lambda: data.load_dataset(str(empty), cache_dir=cache_dir), "neither a scene")
    (empty / "tr" / "image").mkdir(parents=True)
    (empty / "tr" / "label").mkdir()
    _expect("image", lambda: data.load_dataset(str(empty), "tr", cache_dir), "no .tif files")
    _expect("val", lambda: data.load_dataset(str(empty), "val", cache_dir), "missing folder")


def test_scene_label_out_of_range(tmp_path, cache_dir):
    folder = write_scene(tmp_path / "s", classes=3)
    gt = tifffile.imread(os.path.join(folder, "gt.tif"))
    gt[0, 0] = 7
    tifffile.imwrite(os.path.join(folder, "gt.tif"), gt)
    _expect("gt.tif", lambda: data.load_dataset(folder, cache_dir=cache_dir), "0 .unlabelled. .. 3")



# ----------------------------------------------------------------------------- band validity in scene folders

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


def test_published_band_centres_of_the_unmixing_benchmarks(tmp_path, cache_dir):
    ds = data.load_dataset(write_scene(tmp_path / "samson", bands=156, size=12, sensor="SAMSON"), cache_dir=cache_dir)
    assert ds.wavelengths[0] == 401 and ds.wavelengths[-1] == 889 and len(ds.wavelengths) == 156
    assert len(data.KNOWN_WAVELENGTHS["AVIRIS", 198]) == 198



# ----------------------------------------------------------------------------- the wavelength grid (any sensor)

def test_resampling_onto_the_grid():
    grid, points = data.GRID, data.grid_wavelengths(data.GRID)
    R, valid = data.resampling_matrix(SENSORS["a"], grid)
    assert R.shape == (216, 12) and np.allclose(R.sum(1), valid) and (R >= 0).all()
    assert valid[(points >= 400) & (points <= 1000)].all() and not valid[(points < 350) | (points > 1060)].any()
    # A gap in the sensor's bands (removed water-absorption bands) stays empty: no band is smeared over it.
    gap = np.r_[np.arange(400, 1301, 10.0), np.arange(1500, 1801, 10.0)]
    assert not data.resampling_matrix(gap, grid)[1][(points > 1320) & (points < 1480)].any()
    # A sensor finer than the grid is averaged: a linear spectrum comes out linear at the grid points.
    fine = np.arange(500, 700.01, 1.0)
    R, valid = data.resampling_matrix(fine, grid)
    inner = valid & (points > 520) & (points < 680)
    np.testing.assert_allclose(R[inner] @ (fine / 100), points[inner] / 100, rtol=1e-5)
    # Permuting bands together with their wavelengths permutes the columns: the same spectrum on the grid.
    x, perm = np.random.default_rng(0).normal(size=90), np.random.default_rng(1).permutation(90)
    wl = SENSORS["c"]
    np.testing.assert_allclose(data.resampling_matrix(wl, grid)[0] @ x, data.resampling_matrix(wl[perm], grid)[0] @ x[perm],
                               atol=1e-5)


def test_permuting_a_scenes_bands_with_its_wavelengths_leaves_the_output_unchanged(tmp_path, cache_dir):
    src = sensor_scene(tmp_path, "b")
    perm = np.random.default_rng(0).permutation(20)
    image = tifffile.imread(os.path.join(src, "image.tif"))[perm]
    other = write_scene(tmp_path / "b_permuted", bands=20, size=40, wavelengths_nm=[float(w) for w in SENSORS["b"][perm]])
    tifffile.imwrite(os.path.join(other, "image.tif"), image)
    a, b = (data.load_dataset(p, cache_dir=cache_dir, band_info=data.ANY_SENSOR) for p in (src, other))
    x = [torch.from_numpy(ds.normalise(ds.crop(0, 4, 4, 32, 32)[0]))[None] for ds in (a, b)]
    torch.testing.assert_close(x[0], x[1], atol=1e-5, rtol=1e-5)
    for name, kw in (("sst", {"spectral_patch": 8}), ("ssvit", {"spectral_patch": 12}), ("vit", {})):
        torch.manual_seed(0)
        model = build_backbone(name, "tiny", a.bands, 32, 8, wavelengths=a.input_wavelengths, **kw).eval()
        with torch.no_grad():
            out = [model.intermediate_layers(v, 1)[0][1] for v in x]
        torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=1e-4)


def test_tiles_are_drawn_in_proportion_to_each_scenes_pixels(tmp_path, cache_dir):
    big = data.load_dataset(sensor_scene(tmp_path, "a", size=60), cache_dir=cache_dir, band_info=data.ANY_SENSOR)
    small = data.load_dataset(sensor_scene(tmp_path, "b", size=20), cache_dir=cache_dir, band_info=data.ANY_SENSOR)
    tiles = data.RandomTiles([big, small], 16, 0, labels=False)
    assert np.mean([tiles[i][1] for i in range(400)]) == pytest.approx(400 / 4000, abs=0.06)



# ----------------------------------------------------------------------------- band projections, splits

def test_pca_is_fitted_on_training_pixels_only(scene, cache_dir):
    ds = data.load_scene(scene, cache_dir)
    labels = data.scene_labels(ds)
    train, _ = data.sparse_split(labels, 0, per_class=5)
    proj, explained = data.fit_pca(ds, 3, train)
    assert proj.shape == (3, 16) and np.all(np.diff(explained) <= 0)
    # Components have unit variance on the training pixels and are uncorrelated.
    img = ds.normalise(ds.crop(0, 0, 0, 40, 40)[0])
    comps = np.einsum("kc,chw->khw", proj, img)[:, train]
    np.testing.assert_allclose(np.cov(comps, bias=True), np.eye(3), atol=1e-3)
    # Test pixels do not influence the fit.
    r = ds.rasters[0]
    changed = np.where(train, np.asarray(r.image), 0).astype(r.image.dtype)
    ds.rasters[0] = data.Raster(r.path, changed, r.label)
    np.testing.assert_allclose(data.fit_pca(ds, 3, train)[0], proj, rtol=1e-4, atol=1e-5)
    ds.pca = proj
    assert ds.bands == 3 and ds.normalise(ds.crop(0, 0, 0, 8, 8)[0]).shape == (3, 8, 8)


def test_sparse_split_reproducible_disjoint_and_saved(scene, cache_dir, tmp_path):
    labels = data.scene_labels(data.load_dataset(scene, cache_dir=cache_dir))
    tr, te = data.sparse_split(labels, seed=0, per_class=5)
    tr2, te2 = data.sparse_split(labels, seed=0, per_class=5)
    assert (tr == tr2).all() and (te == te2).all()
    assert not (tr & te).any() and ((tr | te) == (labels != IGNORE_INDEX)).all()
    assert [int((labels[tr] == c).sum()) for c in range(3)] == [5, 5, 5]
    assert not (data.sparse_split(labels, seed=1, per_class=5)[0] == tr).all()
    frac, _ = data.sparse_split(labels, seed=0, fraction=0.1)
    for c in range(3):
        assert int((labels[frac] == c).sum()) == round(0.1 * (labels == c).sum())
    path = str(tmp_path / "split.npz")
    data.save_split(path, tr, te, seed=0, per_class=5)
    l_tr, l_te, info = data.load_split(path, labels.shape)
    assert (l_tr == tr).all() and (l_te == te).all() and info == {"seed": 0, "per_class": 5}
    with pytest.raises(DataError, match="split.npz"):
        data.load_split(path, (3, 3))



# ----------------------------------------------------------------------------- per-tile augmentations

def test_dihedral_keeps_image_and_label_aligned():
    rng = np.random.default_rng(0)
    lab = np.arange(64).reshape(8, 8)
    img = np.stack([lab, lab * 2]).astype(np.float32)
    for _ in range(8):
        i, l = data.dihedral([img, lab], rng)
        assert (i[0] == l).all() and (i[1] == 2 * l).all()


def test_photometric_jitter_is_spectral_and_off_by_default():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 0.5, (8, 16, 16)).astype(np.float32)
    lab = np.zeros((16, 16), np.int64)
    out, _ = data.Augment()(img.copy(), lab, rng, normalise=lambda x: x)
    np.testing.assert_array_equal(out.numpy(), img)
    bright = data.spectral_jitter(img, rng, brightness=0.3)
    ratio = bright / img
    np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-3)  # one illumination gain for all bands
    gains = data.spectral_jitter(img, rng, band_gain=0.1) / img
    assert np.ptp(gains.mean(axis=(1, 2))) > 0  # per-band gains differ


def test_random_resized_crop_full_scale_is_identity():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(4, 16, 16)).astype(np.float32)
    lab = rng.integers(0, 3, (16, 16))
    out, out_lab = data.random_resized_crop(img, lab, rng, 16, scale=(1, 1), ratio=(1, 1))
    np.testing.assert_allclose(out, img, atol=1e-6)
    assert (out_lab == lab).all()


def reflectance_tile(seed=0, C=12, S=16):
    rng = np.random.default_rng(seed)
    spectrum = rng.uniform(0.05, 0.6, (C, 1, 1))
    return (spectrum * rng.uniform(0.7, 1.3, (1, S, S)) + rng.normal(0, 0.01, (C, S, S))).astype(np.float32)


def test_a_gain_of_g_multiplies_reflectance_by_g():
    img = reflectance_tile()
    out = data.spectral_jitter(img, np.random.default_rng(1), brightness=0.3)
    g = out / img
    np.testing.assert_allclose(g, g.flat[0], rtol=1e-5)  # one gain for every band and pixel
    assert 0.7 <= g.flat[0] <= 1.3 and abs(g.flat[0] - 1) > 1e-3
    u = torch.rand(3, 2 + img.shape[0])
    x = torch.from_numpy(img)[None].repeat(3, 1, 1, 1)
    batch = data.batch_jitter(x, u, 0.3, 0.0, 0.0, torch.tensor([True, False, True]))
    expected = 0.7 + 0.6 * u[:, 0]
    torch.testing.assert_close(batch / x, expected.view(3, 1, 1, 1).expand_as(x).where(
        torch.tensor([True, False, True]).view(3, 1, 1, 1), 1.0))


@pytest.mark.parametrize("spread", [0.1, 0.25])
def test_jitter_stays_within_the_tiles_own_spread_and_never_goes_negative(spread):
    """Strong jitter, bounded: no band's tile mean moves by more than `spread` of its within-tile std, and
    reflectance stays >= 0 - on both the per-tile and the batched path."""
    tiles = np.stack([reflectance_tile(s) for s in range(8)])
    tiles[:, :, :2] = 0.001  # dark pixels: strong contrast would push them below zero
    per_tile = np.stack([data.spectral_jitter(t, np.random.default_rng(i), 0.5, 0.8, 0.3, spread)
                         for i, t in enumerate(tiles)])
    x = torch.from_numpy(tiles)
    batch = data.batch_jitter(x, torch.rand(8, 2 + x.shape[1]), 0.5, 0.8, 0.3, torch.ones(8, dtype=torch.bool),
                              spread).numpy()
    std = tiles.std(axis=(2, 3))
    for out in (per_tile, batch):
        shift = np.abs(out.mean(axis=(2, 3)) - tiles.mean(axis=(2, 3)))
        assert (shift <= spread * std * (1 + 1e-4) + 1e-7).all()
        assert (out >= -1e-6).all()
    unbounded = data.spectral_jitter(tiles[0], np.random.default_rng(0), 0.5, 0.0, 0.3)
    assert (np.abs(unbounded.mean(axis=(1, 2)) - tiles[0].mean(axis=(1, 2))) > std[0]).any()  # the bound acts



# ----------------------------------------------------------------------------- loaders

def test_random_tiles_are_a_function_of_the_index(scene, cache_dir):
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    tiles = data.RandomTiles([ds], 16, seed=3, augment=data.Augment(True, (0.3, 1.0)))
    a, b = tiles[5], tiles[5]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (16, 16, 16) and a[1].shape == (16, 16) and a[0].dtype == torch.float32
    assert not torch.equal(tiles[6][0], a[0])


def test_random_tiles_pad_small_rasters(tmp_path, cache_dir):
    ds = data.load_dataset(write_scene(tmp_path / "s", size=10), cache_dir=cache_dir)
    x, y, _ = data.RandomTiles([ds], 16)[0]
    assert x.shape == (16, 16, 16) and (y[10:] == IGNORE_INDEX).all() and (x[:, 10:] == 0).all()


def test_step_batches_resume_where_they_stopped():
    full = iter(data.StepBatches(4, 0, rank=1, world=2))
    seen = [next(full) for _ in range(5)]
    resumed = iter(data.StepBatches(4, 3, rank=1, world=2))
    assert next(resumed) == seen[3]
    other_rank = iter(data.StepBatches(4, 0, rank=0, world=2))
    assert not set(next(other_rank)) & set(seen[0])


def test_grid_windows_cover_with_overlap():
    wins = data.grid_windows(100, 70, 32, 8)
    covered = np.zeros((100, 70), int)
    for y, x in wins:
        assert 0 <= y <= 68 and 0 <= x <= 38
        covered[y:y + 32, x:x + 32] += 1
    assert covered.min() >= 1
    ys = sorted({y for y, _ in wins})
    assert ys[-1] == 68 and all(b - a <= 24 for a, b in zip(ys, ys[1:]))
    assert data.grid_windows(20, 20, 32, 8) == [(0, 0)]


def test_grid_tiles_reassemble_the_scene(scene, cache_dir):
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    grid = data.GridTiles(ds, 16, 4)
    full = ds.normalise(ds.crop(0, 0, 0, 40, 40)[0])
    for i in range(len(grid)):
        x, _, (r, y, xx) = grid[i]
        np.testing.assert_array_equal(x.numpy(), full[:, y:y + 16, xx:xx + 16])


def test_loader_batches_fit_small_shared_memory(scene, cache_dir, monkeypatch, capsys):
    """With little /dev/shm the workers ship a batch in chunks that fit (the same batch arrives); with
    too little, the error says what to do."""
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    tiles = data.RandomTiles([ds], 16, 0, data.Augment(flips=True), labels=False)
    item = data.nbytes(tiles[0])
    monkeypatch.setattr(data, "shm_free_bytes", lambda: 2 * 2 * data.PREFETCH * 3 * item)  # chunks of 3 fit
    chunked = iter(data.StepLoader(tiles, 8, 5, 0, 1, 2, torch.device("cpu")))
    whole = iter(data.StepLoader(tiles, 8, 5, 0, 1, 0, torch.device("cpu")))
    for _ in range(2):
        a, b = next(chunked), next(whole)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert "chunks of 3" in capsys.readouterr().out
    monkeypatch.setattr(data, "shm_free_bytes", lambda: item)
    with pytest.raises(data.DataError, match="--shm-size.*--workers 0"):
        data.StepLoader(tiles, 8, 0, 0, 1, 2, torch.device("cpu"))



# ----------------------------------------------------------------------------- the device pipeline

def test_raw_windows_finished_on_the_device_equal_crop_and_normalise(tmp_path, cache_dir):
    """nodata pixels, windows past a small raster's border, uint16 values above 32767 (shipped as int16 bit
    patterns), WHU-OHS int16-in-uint16 with fill values, float data with NaN: all as crop() makes them."""
    small = write_scene(tmp_path / "small", size=12, nodata=0)
    img = tifffile.imread(os.path.join(small, "image.tif"))
    img[:, :3, :3] = 0
    img[2, 5, 5] = 40000
    tifffile.imwrite(os.path.join(small, "image.tif"), img)
    whu = write_whu(tmp_path / "whu", splits=("tr",), tiles=2, dtype=np.uint16)
    tile = os.path.join(whu, "tr", "image", "S1_0000.tif")
    raw = tifffile.imread(tile).view(np.int16)
    raw[4, 7, 7] = -9999  # fill
    tifffile.imwrite(tile, raw.view(np.uint16))
    floats = write_scene(tmp_path / "floats", size=24)
    img = tifffile.imread(os.path.join(floats, "image.tif")).astype(np.float32)
    img[1, 4, 4] = np.nan
    tifffile.imwrite(os.path.join(floats, "image.tif"), img)
    for spec, transport in ((small, np.int16), (whu, np.int16), (floats, np.float32), (f"{small},{floats}", np.float32)):
        datasets = data.load_datasets(spec, "tr", cache_dir)
        raw_tiles = data.RandomTiles(datasets, 16, 3, labels=False, raw=True)
        cpu_tiles = data.RandomTiles(datasets, 16, 3, labels=False)
        assert raw_tiles.transport == transport
        normalise = data.DeviceNormalise(datasets, CPU)
        windows, info = (torch.stack(t) for t in zip(*(raw_tiles[i] for i in range(12))))
        expected = torch.stack([cpu_tiles[i][0] for i in range(12)])
        got = normalise(normalise.physical(windows, info), info[:, 0])
        assert torch.equal(got, expected), spec


def test_any_sensor_windows_resampled_on_the_device_equal_crop_and_normalise(tmp_path, cache_dir):
    """--any-sensor on the device: sensors of 12, 20 and 90 bands mixed in a batch travel padded to 90 bands
    and are resampled onto the grid batched; per tile, crop() and normalise() give the same, up to float
    rounding. Sensor a (padded) has nodata 0 and windows past its border: padding with zeros would mark
    all of its pixels invalid. A PCA projection goes the same way."""
    wl = {n: [float(w) for w in SENSORS[n]] for n in "abc"}
    a = write_scene(tmp_path / "a", bands=12, size=12, nodata=0, wavelengths_nm=wl["a"])
    img = tifffile.imread(os.path.join(a, "image.tif"))
    img[:, :3, :3] = 0
    tifffile.imwrite(os.path.join(a, "image.tif"), img)
    spec = ",".join([a] + [write_scene(tmp_path / n, bands=len(wl[n]), size=24, wavelengths_nm=wl[n]) for n in "bc"])
    datasets = data.load_datasets(spec, "tr", cache_dir, data.ANY_SENSOR)
    pca = data.load_dataset(write_scene(tmp_path / "p", bands=8, size=24), cache_dir=cache_dir)
    pca.pca = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    for sets, bands in ((datasets, 216), ([pca], 3)):
        raw_tiles = data.RandomTiles(sets, 16, 3, labels=False, raw=True)
        cpu_tiles = data.RandomTiles(sets, 16, 3, labels=False)
        windows, info = (torch.stack(t) for t in zip(*(raw_tiles[i] for i in range(24))))
        assert set(info[:, 0].tolist()) == set(range(len(sets)))  # every sensor in the batch (seed 3)
        assert windows.shape[1] == max(ds.raw_bands for ds in sets)
        normalise = data.DeviceNormalise(sets, CPU)
        got = normalise(normalise.physical(windows, info), info[:, 0])
        expected = torch.stack([cpu_tiles[i][0] for i in range(24)])
        assert got.shape == (24, bands, 16, 16)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_band_copies_leave_the_jitter_of_the_real_bands_unchanged():
    """The padding of a sensor with fewer bands (copies of its last band) changes nothing in the spectral
    jitter of its real bands: the contrast bound is a min over bands (zeros would force it to 0)."""
    x = 0.1 + torch.rand(6, 5, 8, 8)
    padded = torch.cat([x, x[:, -1:].expand(-1, 3, -1, -1)], 1)
    u, apply = torch.rand(6, 2 + 8), torch.ones(6, dtype=torch.bool)
    for spread in (None, 0.25):
        torch.testing.assert_close(data.batch_jitter(padded, u, 0.2, 0.5, 0.05, apply, spread)[:, :5],
                                   data.batch_jitter(x, u[:, :7], 0.2, 0.5, 0.05, apply, spread))


def coordinates(n, size=64):
    """(n, 2, size, size): each pixel's row and column index, to read crop boxes off the output."""
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    return torch.stack([ys, xs])[None].expand(n, -1, -1, -1).contiguous()


def test_identity_at_scale_one_and_the_eight_flips():
    x = torch.randn(8, 3, 16, 16)
    w, h, cx, cy = data.full_boxes(8, CPU)
    torch.testing.assert_close(data.resample(x, (w, h, cx, cy), None, 16), x, atol=1e-5, rtol=0)
    u = data.crop_boxes(torch.rand(8, 2 * data.CROP_TRIES + 2), (1.0, 1.0), (1.0, 1.0))
    torch.testing.assert_close(data.resample(x, u, None, 16), x, atol=1e-5, rtol=0)
    turned = data.resample(x, (w, h, cx, cy), torch.arange(8), 16)
    found = set()
    for i in range(8):
        flips = [torch.rot90(x[i], k, (1, 2)) for k in range(4)] + [torch.rot90(x[i], k, (1, 2)).flip(2) for k in range(4)]
        found |= {j for j, f in enumerate(flips) if torch.allclose(turned[i], f, atol=1e-5)}
    assert found == set(range(8))


def test_crop_area_statistics_match_the_per_tile_path():
    """Both paths crop the same box geometry: the side of the box, read from coordinate images, has the
    same distribution (area share U(scale), aspect ratio within 3/4..4/3)."""
    n, rng = 1500, np.random.default_rng(0)
    img, lab = coordinates(1)[0].numpy(), np.zeros((64, 64), np.int64)
    for scale in ((0.2, 1.0), (0.05, 0.32)):
        cpu = torch.stack([torch.from_numpy(data.random_resized_crop(img, lab, rng, 64, scale)[0]) for _ in range(n)])
        rnd = data.StepRandom(0, 0, 0, 1, n, CPU)
        dev = data.augment_on_device(data.Augment(crop_scale=scale), coordinates(n), torch.zeros(n, dtype=torch.long),
                                     rnd, identity)
        sides = [(v.amax((2, 3)) - v.amin((2, 3)) + 1) / 64 for v in (cpu, dev)]  # (n, 2): h, w shares
        areas = [s.prod(1).numpy() for s in sides]
        ratios = [(s[:, 1] / s[:, 0]).numpy() for s in sides]
        np.testing.assert_allclose(np.quantile(areas[1], [0.1, 0.5, 0.9]), np.quantile(areas[0], [0.1, 0.5, 0.9]),
                                   atol=0.03)
        assert abs(areas[1].mean() - areas[0].mean()) < 0.02
        assert ratios[1].min() > 0.7 and ratios[1].max() < 1.4
        np.testing.assert_allclose(np.quantile(ratios[1], [0.1, 0.9]), np.quantile(ratios[0], [0.1, 0.9]), atol=0.04)


def test_blur_jitter_and_solarize_are_the_per_tile_functions():
    x = torch.rand(5, 3, 16, 16)
    sigma = torch.tensor([0.0, 0.1, 0.7, 1.3, 2.0])
    blurred = data.batch_blur(x, sigma, 2.0)
    for i, s in enumerate(sigma.tolist()):
        expected = x[i].numpy() if s == 0 else data.gaussian_blur(x[i].numpy(), s)
        np.testing.assert_allclose(blurred[i].numpy(), expected, atol=1e-6)
    u = torch.rand(5, 2 + 3)
    apply = torch.tensor([True, False, True, True, False])
    jittered = data.batch_jitter(x, u, 0.2, 0.2, 0.05, apply)
    assert torch.equal(jittered[~apply], x[~apply])
    ratio = jittered[0].mean((1, 2)) / x[0].mean((1, 2))  # the contrast keeps band means: only the gains remain
    assert ((ratio > 0.8 * 0.95 - 1e-5) & (ratio < 1.2 * 1.05 + 1e-5)).all() and ratio.std() > 0
    z = torch.randn(4, 3, 8, 8)
    solar = data.batch_solarize(z, torch.tensor([True, False, True, False]))
    assert (solar[0] <= 0).all() and torch.equal(solar[1], z[1])
    np.testing.assert_array_equal(solar[2].numpy(), data.spectral_solarize(z[2].numpy()))


def test_multicrop_on_the_device_matches_the_per_tile_statistics(tmp_path, cache_dir):
    """The same 256 tiles multi-cropped both ways: per-band means and stds of the normalised views, the
    share of solarized second global views, and the blur/zoom-sensitive mean gradient agree (over seeds 0-5 the
    largest differences were 0.13, 7%, 4% and 0.04 against these tolerances of 0.1, 10%, 8% and 0.07;
    seed 0, used here: 0.05, 5%, 1.4%, 0.02)."""
    ds = data.load_dataset(write_scene(tmp_path / "s", bands=6, size=64, seed=3, value_scale=1e-4),
                           cache_dir=cache_dir)  # reflectance: the spectral jitter applies
    crops, n = data.MultiCrop(32, 16, 3, global_solarize_p=(0.0, 0.2)), 256
    per_tile = data.RandomTiles([ds], 32, 0, crops, labels=False)
    views = [torch.stack(v) for v in zip(*(per_tile[i][0] for i in range(n)))]
    cpu = data.view_major(views)
    raw_tiles = data.RandomTiles([ds], 32, 0, labels=False, raw=True)
    raw, info = (torch.stack(t) for t in zip(*(raw_tiles[i] for i in range(n))))
    normalise = data.DeviceNormalise([ds], CPU)
    dev = data.augment_on_device(crops, normalise.physical(raw, info), info[:, 0], data.StepRandom(0, 0, 0, 1, n, CPU),
                                 normalise)
    for a, b in zip(cpu, dev):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_allclose(b.mean((0, 2, 3)), a.mean((0, 2, 3)), atol=0.1)
        np.testing.assert_allclose(b.std((0, 2, 3)), a.std((0, 2, 3)), rtol=0.1)
        grad = [(v[..., 1:] - v[..., :-1]).abs().mean().item() for v in (a, b)]
        assert grad[1] == pytest.approx(grad[0], rel=0.08)
    solarized = [(v[n:].amax((1, 2, 3)) <= 0).float().mean().item() for v in (cpu[0], dev[0])]
    assert solarized[1] == pytest.approx(solarized[0], abs=0.07) and 0.1 < solarized[1] < 0.3


def test_no_spectral_jitter_where_the_scene_has_no_value_scale(tmp_path, cache_dir, capsys):
    """Sensor counts (value_scale null) get no jitter on either path: the views equal those of a multi-crop
    without jitter, draw for draw; a reflectance scene does get it. The trainer says so."""
    counts = data.load_dataset(write_scene(tmp_path / "counts", bands=6, size=40), cache_dir=cache_dir)
    refl = data.load_dataset(write_scene(tmp_path / "refl", bands=6, size=40, value_scale=1e-4), cache_dir=cache_dir)
    on, off = data.MultiCrop(16, 8, 2, contrast=0.5, brightness=0.3), data.MultiCrop(16, 8, 2, jitter_p=0.0)
    for ds, same in ((counts, True), (refl, False)):
        a, b = (data.RandomTiles([ds], 16, 0, m, labels=False)[3][0] for m in (on, off))
        assert all(torch.equal(u, v) for u, v in zip(a, b)) == same
        raw, info = (torch.stack(t) for t in zip(*(data.RandomTiles([ds], 16, 0, labels=False, raw=True)[i]
                                                    for i in range(4))))
        normalise = data.DeviceNormalise([ds], CPU)
        rnd = lambda: data.StepRandom(0, 0, 0, 1, 4, CPU)  # noqa: E731 - the same draws for both
        a, b = (data.augment_on_device(m, normalise.physical(raw, info), info[:, 0], rnd(), normalise) for m in (on, off))
        assert all(torch.equal(u, v) for u, v in zip(a, b)) == same
    pretrain_dino.multi_crop(pretrain_dino.parse_args([]), [counts, refl])
    assert "notice: no spectral jitter on counts:" in capsys.readouterr().out


def test_one_process_and_two_draw_the_same_augmentations(tmp_path, cache_dir):
    """A sample's augmentation depends on (seed, step, place in the global batch), not on the
    process count: rank r of 2 with batch 4 gets global samples 4r..4r+3 of the 1-process batch of 8."""
    ds = data.load_dataset(write_scene(tmp_path / "s", bands=6, size=40, value_scale=1e-4), cache_dir=cache_dir)
    for augment in (data.Augment(True, (0.2, 1.0)), data.MultiCrop(16, 8, 2)):
        def batch(rank, world, B):
            return next(data.augmented_batches([ds], 16, augment, 5, B, 3, rank, world, 0, CPU, on_device=True))
        one, two = batch(0, 1, 8), [batch(r, 2, 4) for r in range(2)]
        for i, full in enumerate([one] if torch.is_tensor(one) else one):
            parts = [p if torch.is_tensor(p) else p[i] for p in two]
            views = full.shape[0] // 8
            joined = torch.cat([p.view(views, 4, *p.shape[1:]) for p in parts], 1).flatten(0, 1)
            assert torch.equal(full, joined)


def test_step_random_is_exact_on_resume():
    a = data.StepRandom(1, 7, 1, 2, 3, CPU)
    b = data.StepRandom(1, 7, 1, 2, 3, CPU)
    assert torch.equal(a.uniform(4), b.uniform(4)) and torch.equal(a.views(2, 3), b.views(2, 3))
    assert not torch.equal(data.StepRandom(1, 8, 1, 2, 3, CPU).uniform(4), data.StepRandom(1, 7, 1, 2, 3, CPU).uniform(4))



# ----------------------------------------------------------------------------- iBOT masks

def reference_block_mask(h, w, num_masked, rng, min_block=4, aspect=(0.3, 1 / 0.3)):
    """The plain one-mask-at-a-time BEiT block mask the batched data.block_masks replaced: random
    rectangles first, then single patches to the exact count."""
    mask = np.zeros((h, w), bool)
    for _ in range(100):
        left = num_masked - int(mask.sum())
        if left < min_block:
            break
        area = rng.uniform(min_block, left)
        ar = np.exp(rng.uniform(np.log(aspect[0]), np.log(aspect[1])))
        bh, bw = int(round(np.sqrt(area * ar))), int(round(np.sqrt(area / ar)))
        if 0 < bh <= h and 0 < bw <= w:
            top, lft = int(rng.integers(h - bh + 1)), int(rng.integers(w - bw + 1))
            new = bh * bw - int(mask[top:top + bh, lft:lft + bw].sum())
            if 0 < new <= left:
                mask[top:top + bh, lft:lft + bw] = True
    left = num_masked - int(mask.sum())
    if left > 0:
        mask.ravel()[rng.choice(np.flatnonzero(~mask.ravel()), left, replace=False)] = True
    return mask


def neighbour_share(masks):
    """Share of masked patches with a masked 4-neighbour: ~1 for blocks, ~ratio for scattered patches."""
    m = np.pad(np.asarray(masks, bool), ((0, 0), (1, 1), (1, 1)))
    core = m[:, 1:-1, 1:-1]
    near = m[:, :-2, 1:-1] | m[:, 2:, 1:-1] | m[:, 1:-1, :-2] | m[:, 1:-1, 2:]
    return (core & near).sum() / core.sum()


def test_ibot_masks_ratio_share_and_blocks():
    rng = np.random.default_rng(0)
    for _ in range(20):
        counts = data.ibot_mask_counts(8, 64, rng, (0.1, 0.5), 0.5)
        assert (counts == 0).sum() == 4
        assert ((counts[counts > 0] >= 0.1 * 64 - 1) & (counts[counts > 0] <= 0.5 * 64 + 1)).all()
    # The batched device version masks exactly the counts, in blocks like the reference.
    counts = torch.from_numpy(rng.integers(6, 33, 400))
    masks = data.block_masks(counts, 8, 8, torch.rand(400, 10, 4), torch.rand(400, 64))
    assert torch.equal(masks.sum(1), counts)
    reference = np.stack([reference_block_mask(8, 8, int(c), rng) for c in counts])
    assert neighbour_share(masks.view(-1, 8, 8).numpy()) == pytest.approx(neighbour_share(reference), abs=0.03)
    scattered = data.random_subsets(counts, torch.rand(400, 64)).view(-1, 8, 8).numpy()
    assert neighbour_share(scattered) < neighbour_share(reference) - 0.1


