import os

import numpy as np
import pytest
import tifffile
import torch

import data
from conftest import write_scene, write_whu
from data import IGNORE_INDEX, DataError


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
    x = val.normalize(val.crop(0, 0, 0, 8, 8)[0])
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


# ----------------------------------------------------------------------------- tiling, loading, augmentation

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
    full = ds.normalize(ds.crop(0, 0, 0, 40, 40)[0])
    for i in range(len(grid)):
        x, _, (r, y, xx) = grid[i]
        np.testing.assert_array_equal(x.numpy(), full[:, y:y + 16, xx:xx + 16])


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
    out, _ = data.Augment()(img.copy(), lab, rng, normalize=lambda x: x)
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


# ----------------------------------------------------------------------------- sparse-label splits

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
