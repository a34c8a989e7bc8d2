"""Bring your own scene: the ENVI / MATLAB / GeoTIFF readers and the converter of formats.py, their
errors, and a converted product with dead and bad bands that trains, evaluates and reads the next product."""
import json
import os
import sys

import numpy as np
import pytest
import tifffile
import torch

import data
import eval as evaluation
import finetune_seg
import formats
import pretrain_mae
from data import IGNORE_INDEX, DataError

ENVI_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int16): 2, np.dtype(np.int32): 3, np.dtype(np.float32): 4,
              np.dtype(np.float64): 5, np.dtype(np.uint16): 12}


# ----------------------------------------------------------------------------- fixture writers

def write_envi(base, cube, interleave="bsq", byteorder="<", extra="", offset=0, code=None):
    """cube (C, H, W) -> the binary `base` (after `offset` leading bytes) and its ENVI header."""
    base, (C, H, W) = str(base), cube.shape
    arr = {"bsq": cube, "bil": cube.transpose(1, 0, 2), "bip": cube.transpose(1, 2, 0)}[interleave]
    with open(base, "wb") as f:
        f.write(b"\0" * offset)
        f.write(np.ascontiguousarray(arr).astype(cube.dtype.newbyteorder(byteorder)).tobytes())
    hdr = os.path.splitext(base)[0] + ".hdr"  # scene.img -> scene.hdr (scene.img.hdr works too)
    with open(hdr, "w") as f:
        f.write(f"ENVI\ndescription = {{written by a test,\n  multi-line}}\nsamples = {W}\nlines = {H}\n"
                f"bands = {C}\nheader offset = {offset}\nfile type = ENVI Standard\n"
                f"data type = {code or ENVI_CODES[cube.dtype]}\ninterleave = {interleave}\n"
                f"byte order = {0 if byteorder == '<' else 1}\n{extra}")
    return hdr


def write_mat73(path, arrays):
    """A MATLAB v7.3 file: HDF5 behind a 512-byte MATLAB header, every array stored transposed."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w", userblock_size=512) as f:
        for name, a in arrays.items():
            f.create_dataset(name, data=np.ascontiguousarray(a.T)).attrs["MATLAB_class"] = np.bytes_("double")
    with open(path, "r+b") as f:
        f.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .")
    return str(path)


def cube_and_gt(bands=6, size=12, seed=0, dtype=np.int16):
    rng = np.random.default_rng(seed)
    gt = (1 + np.arange(size)[:, None] * 3 // size + 0 * np.arange(size)).astype(np.uint8)
    gt[::4, ::3] = 0
    cube = (rng.integers(500, 4000, (4, bands))[gt].transpose(2, 0, 1) + rng.integers(0, 200, (bands, size, size)))
    return cube.astype(dtype), gt


def envi_header_extra(bands, units="Micrometers"):
    wl = ", ".join(f"{0.4 + 0.1 * i:.2f}" for i in range(bands))
    fw = ", ".join("0.01" for _ in range(bands))
    return f"wavelength units = {units}\nwavelength = {{{wl}}}\nfwhm = {{\n {fw}}}\n"


# ----------------------------------------------------------------------------- ENVI

@pytest.mark.parametrize("interleave", ["bsq", "bil", "bip"])
@pytest.mark.parametrize("byteorder", ["<", ">"])
def test_envi_round_trip(tmp_path, cache_dir, interleave, byteorder):
    cube, gt = cube_and_gt(dtype=np.int16 if byteorder == "<" else np.float32)
    hdr = write_envi(tmp_path / "scene.img", cube, interleave, byteorder, envi_header_extra(6)
                     + "bbl = {1, 1, 1, 1, 0, 1}\ndata ignore value = -9999\nreflectance scale factor = 10000\n")
    image, info = formats.read_envi(hdr)
    assert isinstance(image, np.memmap)  # read in place, never loaded whole
    np.testing.assert_array_equal(image, cube)
    np.save(tmp_path / "gt.npy", gt)
    formats.main([hdr, "--gt", str(tmp_path / "gt.npy"), "--out", str(tmp_path / "out"), "--cache-dir", cache_dir])
    written = tifffile.imread(tmp_path / "out" / "image.tif")
    assert written.dtype == cube.dtype and written.dtype.isnative
    np.testing.assert_array_equal(written, cube)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "gt.tif"), gt)
    meta = json.load(open(tmp_path / "out" / "meta.json"))
    assert meta["wavelengths_nm"] == pytest.approx([400 + 100 * i for i in range(6)])  # micrometres -> nm
    assert meta["fwhm_nm"] == pytest.approx([10.0] * 6)
    assert meta["bad_bands"] == [4] and meta["nodata"] == -9999 and meta["value_scale"] == pytest.approx(1e-4)
    ds = data.load_dataset(str(tmp_path / "out"), cache_dir=cache_dir)
    assert ds.band_ids == [0, 1, 2, 3, 5] and ds.wavelengths == pytest.approx([400, 500, 600, 700, 900])


def test_envi_header_details(tmp_path):
    cube, _ = cube_and_gt(bands=3, dtype=np.uint16)
    write_envi(tmp_path / "a.bsq", cube, offset=128, extra="; a comment = ignored\nwavelength units = Nanometers\n"
                     "wavelength = {450, 550,\n 650}\nsensor type = AVIRIS\n")
    image, info = formats.read_envi(str(tmp_path / "a.bsq"))  # the binary's path finds its header too
    np.testing.assert_array_equal(image, cube)
    assert info["wavelengths_nm"] == [450, 550, 650] and info["sensor"] == "AVIRIS" and info["bad_bands"] == []
    os.rename(tmp_path / "a.hdr", tmp_path / "a.bsq.hdr")  # the other naming convention
    np.testing.assert_array_equal(formats.read_envi(str(tmp_path / "a.bsq.hdr"))[0], cube)
    # An ENVI classification file as labels, with its class names (the first, "Unclassified", is 0).
    _, gt = cube_and_gt()
    lab_hdr = write_envi(tmp_path / "labels", gt[None], extra="classes = 4\nclass names = {Unclassified, a, b, c}\n")
    labels, names = formats.read_labels(lab_hdr)
    np.testing.assert_array_equal(labels, gt)
    assert names == ["a", "b", "c"]


def test_envi_errors(tmp_path):
    cube, _ = cube_and_gt(bands=4)
    hdr = write_envi(tmp_path / "s.dat", cube)
    with open(tmp_path / "s.dat", "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(DataError, match=r"s.dat: 1162 bytes, but s.hdr describes 12 lines x 12 samples x 4 bands of "
                                        r"int16 \(2 bytes each\) \+ 0 header bytes = 1152 bytes"):
        formats.read_envi(hdr)
    hdr = write_envi(tmp_path / "c.dat", cube, code=6)
    with pytest.raises(DataError, match="c.hdr: unknown or unsupported data type 6"):
        formats.read_envi(hdr)
    hdr = write_envi(tmp_path / "u.dat", cube, code=99)
    with pytest.raises(DataError, match="u.hdr: unknown or unsupported data type 99"):
        formats.read_envi(hdr)
    hdr = write_envi(tmp_path / "i.dat", cube)
    with open(hdr) as f:
        text = f.read().replace("interleave = bsq", "interleave = bsx")
    with open(hdr, "w") as f:
        f.write(text)
    with pytest.raises(DataError, match="i.hdr: unknown interleave 'bsx'"):
        formats.read_envi(hdr)
    hdr = write_envi(tmp_path / "w.dat", cube, extra="wavelength = {400, 500, 600}\n")
    with pytest.raises(DataError, match="w.hdr: 3 values in 'wavelength' for 4 bands"):
        formats.read_envi(hdr)
    (tmp_path / "n.hdr").write_text("not an envi header\n")
    (tmp_path / "n").write_bytes(b"")
    with pytest.raises(DataError, match="n.hdr: not an ENVI header"):
        formats.read_envi(str(tmp_path / "n.hdr"))
    (tmp_path / "lonely.hdr").write_text("ENVI\nsamples = 1\n")
    with pytest.raises(DataError, match="lonely.hdr: no binary file beside it"):
        formats.read_envi(str(tmp_path / "lonely.hdr"))


# ----------------------------------------------------------------------------- MATLAB

def test_mat_v5_round_trip(tmp_path, cache_dir):
    scipy_io = pytest.importorskip("scipy.io")
    cube, gt = cube_and_gt(dtype=np.uint16)
    scipy_io.savemat(tmp_path / "Indian_pines_corrected.mat", {"indian_pines_corrected": cube.transpose(1, 2, 0)})
    scipy_io.savemat(tmp_path / "Indian_pines_gt.mat", {"indian_pines_gt": gt.astype(np.float64)})  # doubles, as often
    out = tmp_path / "ip"
    ds = formats.main([str(tmp_path / "Indian_pines_corrected.mat"), "--gt", str(tmp_path / "Indian_pines_gt.mat"),
                       "--out", str(out), "--class-names", "a,b,c", "--cache-dir", cache_dir])
    np.testing.assert_array_equal(tifffile.imread(out / "image.tif"), cube)
    written_gt = tifffile.imread(out / "gt.tif")
    assert written_gt.dtype == np.uint8
    np.testing.assert_array_equal(written_gt, gt)
    assert ds.num_classes == 3 and ds.class_names == ["a", "b", "c"] and ds.raw_bands == 6


def test_mat_v73_round_trip(tmp_path, cache_dir):
    cube, gt = cube_and_gt(dtype=np.float32)
    cube[1, 2, 3] = np.nan
    path = write_mat73(tmp_path / "houston.mat", {"hsi": cube.transpose(1, 2, 0), "labels": gt.astype(np.float64)})
    image, _ = formats.read_image(f"{path}:hsi")
    np.testing.assert_array_equal(image, cube)
    formats.main([path, "--gt", f"{path}:labels", "--out", str(tmp_path / "h"), "--cache-dir", cache_dir])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "h" / "image.tif"), cube)
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "h" / "gt.tif"), gt)


def test_mat_picks_the_band_axis_from_the_labels(tmp_path):
    """Some .mat files hold (bands, rows, cols): with labels given, the band axis is the one they leave out."""
    scipy_io = pytest.importorskip("scipy.io")
    cube, gt = cube_and_gt(bands=5, size=8)
    gt = gt[:, :7]
    cube = cube[:, :, :7]  # (5, 8, 7)
    scipy_io.savemat(tmp_path / "x.mat", {"cube": cube, "gt": gt})
    formats.convert(f"{tmp_path / 'x.mat'}:cube", str(tmp_path / "o"), f"{tmp_path / 'x.mat'}:gt")
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "o" / "image.tif"), cube)


def test_mat_errors(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    cube, gt = cube_and_gt()
    scipy_io.savemat(tmp_path / "flat.mat", {"gt": gt, "ids": np.arange(3)})
    with pytest.raises(DataError, match=r"flat.mat: no 3-D array to use as the image; it holds gt \(12x12 uint8\), "
                                        r"ids \(1x3 int64\)"):
        formats.read_image(str(tmp_path / "flat.mat"))
    hwc = cube.transpose(1, 2, 0)  # MATLAB's rows x cols x bands
    scipy_io.savemat(tmp_path / "two.mat", {"a": hwc, "b": hwc[:, :, :3], "gt": gt, "gt2": gt})
    with pytest.raises(DataError, match=r"two.mat: several 3-D arrays: a \(12x12x6 int16\), b \(12x12x3 int16\); "
                                        r"pick one as .*two.mat:NAME"):
        formats.read_image(str(tmp_path / "two.mat"))
    with pytest.raises(DataError, match="two.mat: several 2-D arrays: gt .*gt2"):
        formats.convert(f"{tmp_path / 'two.mat'}:a", str(tmp_path / "o"), str(tmp_path / "two.mat"))
    with pytest.raises(DataError, match="two.mat: no numeric array 'c'; it holds a"):
        formats.read_image(f"{tmp_path / 'two.mat'}:c")
    scipy_io.savemat(tmp_path / "small_gt.mat", {"gt": gt[:10]})
    with pytest.raises(DataError, match=r"small_gt.mat: labels are 10x12 but the image .*two.mat:a is 12x12"):
        formats.convert(f"{tmp_path / 'two.mat'}:a", str(tmp_path / "o"), str(tmp_path / "small_gt.mat"))


def test_mat_without_the_extras_names_what_to_install(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    cube, _ = cube_and_gt()
    scipy_io.savemat(tmp_path / "v5.mat", {"a": cube})
    path73 = write_mat73(tmp_path / "v73.mat", {"a": cube})
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DataError, match="v5.mat: reading MATLAB v5 files needs scipy, which is not installed: "
                                        "pip install -r requirements-formats.txt"):
        formats.read_image(str(tmp_path / "v5.mat"))
    with pytest.raises(DataError, match=r"v73.mat: reading MATLAB v7.3 \(HDF5\) files needs h5py"):
        formats.read_image(path73)


# ----------------------------------------------------------------------------- GeoTIFF products (EnMAP L2A)

def write_enmap_like(folder, seed=0, dead=(3, 4), size=24, bands=8):
    """An EnMAP-L2A-like product: int16 reflectance x 1e4 GeoTIFF, nodata -32768 (GDAL_NODATA) in the
    water-vapour bands of every pixel and around the swath, wavelengths in METADATA.XML; labels as a TIFF."""
    os.makedirs(folder, exist_ok=True)
    cube, gt = cube_and_gt(bands, size, seed)
    cube[list(dead)] = -32768
    cube[:, :2, :] = -32768  # outside the swath
    gt[:2] = 0
    stem = os.path.join(folder, "ENMAP01-____L2A-DT0000001867_20220724T104526Z_008_V010302_20230628T165614Z")
    tifffile.imwrite(stem + "-SPECTRAL_IMAGE.TIF", cube, planarconfig="separate", photometric="minisblack",
                     extratags=[(42113, "s", 0, "-32768", True)])
    bands_xml = "".join(f'<bandID number="{i + 1}"><wavelengthCenterOfBand>{420 + 250 * i:.3f}</wavelengthCenterOfBand>'
                        f"<FWHMOfBand>7.5</FWHMOfBand></bandID>" for i in range(bands))
    with open(stem + "-METADATA.XML", "w") as f:
        f.write(f"<level_X><specific><bandCharacterisation>{bands_xml}</bandCharacterisation></specific></level_X>")
    tifffile.imwrite(os.path.join(folder, "labels.tif"), gt)
    return stem + "-SPECTRAL_IMAGE.TIF", os.path.join(folder, "labels.tif"), cube, gt


def test_enmap_like_geotiff_converts_and_drops_its_dead_bands(tmp_path, cache_dir, capsys):
    src, labels, cube, gt = write_enmap_like(tmp_path / "enmap")
    ds = formats.main([src, "--gt", labels, "--value-scale", "1e-4", "--bad-bands", "0", "--out", str(tmp_path / "s"),
                       "--cache-dir", cache_dir])
    meta = json.load(open(tmp_path / "s" / "meta.json"))
    assert meta["nodata"] == -32768 and meta["bad_bands"] == [0] and meta["fwhm_nm"] == [7.5] * 8
    assert meta["wavelengths_nm"][:2] == [420.0, 670.0]
    out = capsys.readouterr().out
    assert "dropped 3 of 8 bands (0-based) - in bad_bands 0 (420 nm); nodata or NaN in every pixel 3-4 " \
           "(1170-1420 nm) - reading 5 bands" in out
    assert ds.band_ids == [1, 2, 5, 6, 7] and ds.wavelengths == [670.0, 920.0, 1670.0, 1920.0, 2170.0]
    keep = cube[[1, 2, 5, 6, 7]][:, 2:].reshape(5, -1).astype(np.float64) * 1e-4
    np.testing.assert_allclose(ds.mean, keep.mean(1), rtol=1e-5)
    np.testing.assert_allclose(ds.std, keep.std(1), rtol=1e-4)
    x, y = ds.crop(0, 0, 0, 24, 24)
    assert x.shape == (5, 24, 24) and (y[:2] == IGNORE_INDEX).all() and (y[2:] == gt[2:].astype(int) - 1).all()


def test_converter_errors(tmp_path, cache_dir):
    cube, gt = cube_and_gt(bands=4)
    hdr = write_envi(tmp_path / "s.img", cube)
    np.save(tmp_path / "gt.npy", gt[:, :10])
    with pytest.raises(DataError, match=r"gt.npy: labels are 12x10 but the image .*s.hdr is 12x12"):
        formats.convert(hdr, str(tmp_path / "o"), str(tmp_path / "gt.npy"))
    (tmp_path / "wl.txt").write_text("0.45 0.55\n0.65\n")
    with pytest.raises(DataError, match="wl.txt: 3 wavelengths for an image with 4 bands"):
        formats.convert(hdr, str(tmp_path / "o"), wavelengths=str(tmp_path / "wl.txt"))
    np.save(tmp_path / "frac.npy", gt / 2)
    with pytest.raises(DataError, match="frac.npy: labels must be whole numbers"):
        formats.convert(hdr, str(tmp_path / "o"), str(tmp_path / "frac.npy"))
    formats.convert(hdr, str(tmp_path / "o"))
    with pytest.raises(FileExistsError, match="o: already holds a scene; pass --force"):
        formats.convert(hdr, str(tmp_path / "o"))
    (tmp_path / "wl.txt").write_text("0.45 0.55\n0.65\n0.75")
    formats.convert(hdr, str(tmp_path / "o"), wavelengths=str(tmp_path / "wl.txt"), force=True)
    assert json.load(open(tmp_path / "o" / "meta.json"))["wavelengths_nm"] == [450, 550, 650, 750]
    assert formats.parse_band_list("0-2, 7,5-5") == [0, 1, 2, 5, 7]


# ----------------------------------------------------------------------------- training on a product with dead bands

def test_product_with_dead_and_bad_bands_trains_evaluates_and_reads_the_next_product(tmp_path, cache_dir, capsys):
    src, labels, _, _ = write_enmap_like(tmp_path / "p1")
    scene = str(tmp_path / "scene1")
    formats.main([src, "--gt", labels, "--value-scale", "1e-4", "--bad-bands", "0", "--out", scene, "--cache-dir", cache_dir])
    pre = tmp_path / "mae"
    pretrain_mae.main(["--data", scene, "--out", str(pre), "--cache-dir", cache_dir, "--steps", "2", "--img-size", "16",
                       "--batch-size", "2", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
                       "--workers", "0", "--backbone", "ssvit", "--spectral-patch", "1"])
    bands = torch.load(pre / "ckpt.pt", weights_only=False)["backbone"]["bands"]
    assert bands["ids"] == [1, 2, 5, 6, 7] and bands["wavelengths"] == [670.0, 920.0, 1670.0, 1920.0, 2170.0]
    out = tmp_path / "ft"
    seg = ["--data", scene, "--out", str(out), "--cache-dir", cache_dir, "--img-size", "16", "--batch-size", "4",
           "--steps", "3", "--eval-every", "3", "--eval-batch-size", "8", "--workers", "0", "--labels-per-class", "5"]
    finetune_seg.main([*seg, "--init", str(pre / "ckpt.pt")])
    assert torch.load(out / "ckpt.pt", weights_only=False)["backbone"]["bands"] == bands
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--pictures", "1"])
    assert m["pixels"] > 0 and np.isfinite(m["oa"])
    # The next product of the sensor: band 4 is valid there, band 0 is fine too; it is read with the
    # checkpoint's five bands, not its own seven.
    src2, labels2, _, _ = write_enmap_like(tmp_path / "p2", seed=1, dead=(3,))
    scene2 = str(tmp_path / "scene2")
    formats.main([src2, "--gt", labels2, "--value-scale", "1e-4", "--out", scene2, "--cache-dir", cache_dir])
    capsys.readouterr()
    m2 = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", scene2, "--out", str(tmp_path / "e2")])
    assert m2["pixels"] == m["pixels"]
    assert "scene2: reading 5 of 8 bands (the checkpoint's band list); not read (0-based): 0 (420 nm), 3-4" \
        in capsys.readouterr().out
    # A product where a band the checkpoint reads is dead cannot be read with it.
    src3, labels3, _, _ = write_enmap_like(tmp_path / "p3", seed=2, dead=(3, 4, 5))
    scene3 = str(tmp_path / "scene3")
    formats.main([src3, "--gt", labels3, "--out", scene3, "--cache-dir", cache_dir])
    with pytest.raises(DataError, match=r"scene3: band 5 \(1670 nm\) has no valid value here .*checkpoint's band list"):
        evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", scene3, "--out", str(tmp_path / "e3")])
    # Resuming after bad_bands changed names the difference.
    pixel = [*seg, "--backbone", "pixel", "--out", str(tmp_path / "pixel"), "--steps", "1", "--eval-every", "100"]
    finetune_seg.main(pixel)
    meta = json.load(open(os.path.join(scene, "meta.json")))
    json.dump({**meta, "bad_bands": [1]}, open(os.path.join(scene, "meta.json"), "w"))
    with pytest.raises(ValueError, match=r"bands: the checkpoint reads 5 bands, the data now 5; only the checkpoint "
                                         r"reads \[1\], only the data \[0\]"):
        finetune_seg.main([*pixel, "--resume", "--steps", "2"])
