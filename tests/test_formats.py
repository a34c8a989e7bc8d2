"""formats.py: the ENVI / MATLAB / GeoTIFF readers, EnMAP L2A, PRISMA L2D and EMIT L2A products as distributed,
the converter and its errors, and a converted product with dead and bad bands that trains, evaluates and reads
the next product."""
import json
import os
import sys
import warnings

import numpy as np
import pytest
import tifffile
import torch

import common
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
    formats.main([hdr, "--gt", str(tmp_path / "gt.npy"), "--out", str(tmp_path / "out")])
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

def test_mat_v5_round_trip(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    cube, gt = cube_and_gt(dtype=np.uint16)
    scipy_io.savemat(tmp_path / "Indian_pines_corrected.mat", {"indian_pines_corrected": cube.transpose(1, 2, 0)})
    scipy_io.savemat(tmp_path / "Indian_pines_gt.mat", {"indian_pines_gt": gt.astype(np.float64)})  # doubles, as often
    out = tmp_path / "ip"
    ds = formats.main([str(tmp_path / "Indian_pines_corrected.mat"), "--gt", str(tmp_path / "Indian_pines_gt.mat"),
                       "--out", str(out), "--class-names", "a,b,c"])
    np.testing.assert_array_equal(tifffile.imread(out / "image.tif"), cube)
    written_gt = tifffile.imread(out / "gt.tif")
    assert written_gt.dtype == np.uint8
    np.testing.assert_array_equal(written_gt, gt)
    assert ds.num_classes == 3 and ds.class_names == ["a", "b", "c"] and ds.raw_bands == 6


def test_mat_v73_round_trip(tmp_path):
    cube, gt = cube_and_gt(dtype=np.float32)
    cube[1, 2, 3] = np.nan
    path = write_mat73(tmp_path / "houston.mat", {"hsi": cube.transpose(1, 2, 0), "labels": gt.astype(np.float64)})
    image, _ = formats.read_image(f"{path}:hsi")
    np.testing.assert_array_equal(image, cube)
    formats.main([path, "--gt", f"{path}:labels", "--out", str(tmp_path / "h")])
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
    he5, _ = write_prisma(tmp_path / "PRS_L2D_STD_x.he5")
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(DataError, match="v5.mat: reading MATLAB v5 files needs scipy, which is not installed: "
                                        "pip install -r requirements-formats.txt"):
        formats.read_image(str(tmp_path / "v5.mat"))
    with pytest.raises(DataError, match=r"v73.mat: reading MATLAB v7.3 \(HDF5\) files needs h5py"):
        formats.read_image(path73)
    with pytest.raises(DataError, match=r"x.he5: reading PRISMA \(HDF-EOS5\) files needs h5py, which is not installed: "
                                        "pip install -r requirements-formats.txt"):
        formats.read_image(he5)


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


def test_enmap_like_geotiff_converts_and_drops_its_dead_bands(tmp_path, capsys):
    src, labels, cube, gt = write_enmap_like(tmp_path / "enmap")
    ds = formats.main([src, "--gt", labels, "--value-scale", "1e-4", "--bad-bands", "0", "--out", str(tmp_path / "s")])
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


def test_converter_errors(tmp_path):
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

def test_product_with_dead_and_bad_bands_trains_evaluates_and_reads_the_next_product(tmp_path, capsys):
    src, labels, _, _ = write_enmap_like(tmp_path / "p1")
    scene = str(tmp_path / "scene1")
    formats.main([src, "--gt", labels, "--value-scale", "1e-4", "--bad-bands", "0", "--out", scene])
    pre = tmp_path / "mae"
    pretrain_mae.main(["--data", scene, "--out", str(pre), "--steps", "2", "--img-size", "16",
                       "--batch-size", "2", "--decoder-dim", "32", "--decoder-depth", "1",
                       "--workers", "0", "--backbone", "ssvit", "--spectral-patch", "1", "--size", "micro"])
    bands = torch.load(pre / "ckpt.pt", weights_only=False)["backbone"]["bands"]
    assert bands["ids"] == [1, 2, 5, 6, 7] and bands["wavelengths"] == [670.0, 920.0, 1670.0, 1920.0, 2170.0]
    out = tmp_path / "ft"
    seg = ["--data", scene, "--out", str(out), "--img-size", "16", "--batch-size", "4",
           "--steps", "3", "--eval-every", "3", "--workers", "0", "--labels-per-class", "5"]
    finetune_seg.main([*seg, "--init", str(pre / "ckpt.pt")])
    assert torch.load(out / "ckpt.pt", weights_only=False)["backbone"]["bands"] == bands
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--pictures", "1"])
    assert m["pixels"] > 0 and np.isfinite(m["oa"])
    # The next product of the sensor: band 4 is valid there, band 0 is fine too; it is read with the
    # checkpoint's five bands, not its own seven.
    src2, labels2, _, _ = write_enmap_like(tmp_path / "p2", seed=1, dead=(3,))
    scene2 = str(tmp_path / "scene2")
    formats.main([src2, "--gt", labels2, "--value-scale", "1e-4", "--out", scene2])
    capsys.readouterr()
    m2 = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", scene2, "--out", str(tmp_path / "e2")])
    assert m2["pixels"] == m["pixels"]
    assert "scene2: reading 5 of 8 bands (the checkpoint's band list); not read (0-based): 0 (420 nm), 3-4" \
        in capsys.readouterr().out
    # A product where a band the checkpoint reads is dead cannot be read with it.
    src3, labels3, _, _ = write_enmap_like(tmp_path / "p3", seed=2, dead=(3, 4, 5))
    scene3 = str(tmp_path / "scene3")
    formats.main([src3, "--gt", labels3, "--out", scene3])
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


# ----------------------------------------------------------------------------- spaceborne products as distributed

ENMAP_STEM = "ENMAP01-____L2A-DT0000001867_20220724T104526Z_008_V010302_20230628T165614Z"
ENMAP_WL = [418.2, 552.7, 681.9, 863.4, 1391.1, 1902.3, 2201.0, 2440.3]
ENMAP_FLAGS = {"CLOUD": [(1, 1), (1, 2)], "CLOUDSHADOW": [(2, 1)], "HAZE": [(3, 3)], "SNOW": [(4, 4)]}


def write_enmap_l2a(folder, size=(6, 7), gains=None, xml=True, layers=True, seed=0):
    """An EnMAP L2A product folder as DLR delivers it: SPECTRAL_IMAGE.TIF, int16 reflectance x 1e4, one band
    per plane, GDAL_NODATA -32768 (the two water-vapour bands and the corner outside the swath) and GDAL band
    metadata (wavelength, fwhm, SCALE and OFFSET items); METADATA.XML (specific/bandCharacterisation:
    wavelengthCenterOfBand, FWHMOfBand, GainOfBand, OffsetOfBand; product/bandStatistics, the empty bands at
    mean -1000000 and stdDeviation 0); uint8 quality layers, 1 = flagged. QL_PIXELMASK is written per band
    here; a single-band layer reads the same way."""
    os.makedirs(folder, exist_ok=True)
    rng, (H, W), C = np.random.default_rng(seed), size, len(ENMAP_WL)
    gains = gains or [1e-4] * C
    cube = rng.integers(300, 6000, (C, H, W)).astype(np.int16)
    cube[[4, 5]] = -32768
    cube[:, 0, :2] = -32768
    stem = os.path.join(folder, ENMAP_STEM)
    items = "".join(f'<Item name="wavelength" sample="{i}">{w}</Item><Item name="fwhm" sample="{i}">7.5</Item>'
                    f'<Item name="OFFSET" sample="{i}" role="offset">0</Item>'
                    f'<Item name="SCALE" sample="{i}" role="scale">{g}</Item>'
                    for i, (w, g) in enumerate(zip(ENMAP_WL, gains)))
    gdal = f'<GDALMetadata><Item name="wavelength_units">Nanometers</Item>{items}</GDALMetadata>'
    tifffile.imwrite(stem + "-SPECTRAL_IMAGE.TIF", cube, planarconfig="separate", photometric="minisblack",
                     extratags=[(42113, "s", 0, "-32768", True), (42112, "s", 0, gdal, True)])
    if xml:
        chars = "".join(f'<bandID number="{i + 1}"><wavelengthCenterOfBand>{w}</wavelengthCenterOfBand><FWHMOfBand>'
                        f"7.5</FWHMOfBand><GainOfBand>{g}</GainOfBand><OffsetOfBand>0</OffsetOfBand></bandID>"
                        for i, (w, g) in enumerate(zip(ENMAP_WL, gains)))
        stats = "".join(f'<bandID number="{i + 1}"><mean>{-1000000 if i in (4, 5) else 2500}</mean><stdDeviation>'
                        f"{0 if i in (4, 5) else 800}</stdDeviation></bandID>" for i in range(C))
        with open(stem + "-METADATA.XML", "w") as f:
            f.write(f'<?xml version="1.0" encoding="UTF-8"?><level_X><base><level>L2A</level></base><specific>'
                    f"<bandCharacterisation>{chars}</bandCharacterisation></specific><product><bandStatistics>"
                    f"{stats}</bandStatistics></product></level_X>")
    flagged = np.zeros((H, W), bool)
    if layers:
        for name, pixels in ENMAP_FLAGS.items():
            m = np.zeros((H, W), np.uint8)
            m[tuple(zip(*pixels))] = 1
            tifffile.imwrite(f"{stem}-QL_QUALITY_{name}.TIF", m)
            flagged |= m > 0
        pixelmask = np.zeros((C, H, W), np.uint8)
        pixelmask[2, 5, 6] = 1
        tifffile.imwrite(f"{stem}-QL_PIXELMASK.TIF", pixelmask, photometric="minisblack")
        flagged[5, 6] = True
        tifffile.imwrite(f"{stem}-QL_QUALITY_CIRRUS.TIF", np.ones((H, W), np.uint8))  # not a layer formats.py uses
        tifffile.imwrite(f"{stem}-QL_QUALITY_CLASSES.TIF", np.ones((H, W), np.uint8))
    return str(folder), cube, flagged


PRISMA_VNIR_WL = [0.0, 975.4, 951.0, 700.2, 550.7, 420.3]  # descending, the first unused, as in the files
PRISMA_SWIR_WL = [2450.1, 2000.6, 1500.3, 1000.9, 945.2, 0.0]  # the last unused


def write_prisma(path, level="2D", size=(6, 7), seed=0):
    """A PRISMA .he5 (HDF-EOS5) as ASI delivers it: root attributes Processing_Level ("1", "2B", "2C", "2D"),
    List_Cw_Vnir/Swir (descending, unused bands at 0 nm), List_Cw_*_Flags, List_Fwhm_*, L2Scale*Min/Max;
    uint16 VNIR_Cube and SWIR_Cube stored (rows, bands, cols) in HDFEOS/SWATHS/PRS_L<level>_HCO/Data Fields,
    Geolocation Fields beside them. The pixel (0, 0) is outside the scene (DN 0 in every band)."""
    h5py = pytest.importorskip("h5py")
    rng, (H, W) = np.random.default_rng(seed), size
    cubes = {d: rng.integers(1000, 60000, (H, 6, W)).astype(np.uint16) for d in ("VNIR", "SWIR")}
    for c in cubes.values():
        c[0, :, 0] = 0
    with h5py.File(path, "w") as f:
        a = f.attrs
        a["Processing_Level"], a["Product_ID"] = np.bytes_(level), np.bytes_(f"PRS_L{level}_STD")
        for det, wl in (("Vnir", PRISMA_VNIR_WL), ("Swir", PRISMA_SWIR_WL)):
            a[f"List_Cw_{det}"] = np.float32(wl)
            a[f"List_Cw_{det}_Flags"] = np.uint8([w > 0 for w in wl])
            a[f"List_Fwhm_{det}"] = np.float32([12.0 if w > 0 else 0.0 for w in wl])
        a["L2ScaleVnirMin"], a["L2ScaleVnirMax"] = np.float32(0.0), np.float32(1.0)
        a["L2ScaleSwirMin"], a["L2ScaleSwirMax"] = np.float32(-0.02), np.float32(0.8)
        swath = f"HDFEOS/SWATHS/PRS_L{level}_HCO"
        for det, c in cubes.items():
            f.create_dataset(f"{swath}/Data Fields/{det}_Cube", data=c)
            f.create_dataset(f"{swath}/Data Fields/{det}_PIXEL_L2_ERR_MATRIX", data=np.zeros_like(c, np.uint8))
        for name in ("Latitude", "Longitude"):
            f.create_dataset(f"{swath}/Geolocation Fields/{name}", data=np.zeros((H, W), np.float32))
        f.create_dataset("HDFEOS INFORMATION/StructMetadata.0", data=np.bytes_("GROUP=SwathStructure\nEND_GROUP\n"))
    return str(path), cubes


def prisma_reflectance(cubes):
    """What the PRISMA fixture should convert to: VNIR 420, 550, 700 nm (975 and 951 overlap the SWIR),
    SWIR 945 .. 2450 nm, as reflectance; NaN outside the scene."""
    v = cubes["VNIR"][:, [5, 4, 3]].astype(np.float64) / 65535
    s = -0.02 + cubes["SWIR"][:, [4, 3, 2, 1, 0]].astype(np.float64) * 0.82 / 65535
    out = np.concatenate([v, s], 1).transpose(1, 0, 2)
    out[:, 0, 0] = np.nan
    return out


def write_emit(path, size=(6, 7), bands=10, seed=0, variable="reflectance", band_parameters=True):
    """An EMIT L2A RFL NetCDF4 as LP DAAC serves it, written through h5py: netCDF dimension scales, root
    variable reflectance (downtrack, crosstrack, bands) float32 with _FillValue -9999 (the pixels off the
    swath), sensor_band_parameters (wavelengths and fwhm in nm, good_wavelengths: 0 in the water-vapour bands)
    and location (lat, lon, elev, glt_x, glt_y)."""
    h5py = pytest.importorskip("h5py")
    rng, (H, W) = np.random.default_rng(seed), size
    cube = rng.uniform(0.02, 0.6, (H, W, bands)).astype(np.float32)
    cube[0, :3] = -9999
    good = np.ones(bands, np.uint8)
    good[[3, 4]] = 0
    with h5py.File(path, "w") as f:
        f.attrs["ncei_template_version"] = "NCEI_NetCDF_Swath_Template_v2.0"
        f.attrs["geotransform"] = np.float64([-118.0, 0.0005, 0, 36.0, 0, -0.0005])
        for name, n in (("downtrack", H), ("crosstrack", W), ("bands", bands)):
            f.create_dataset(name, (n,), "f4").make_scale("This is a netCDF dimension but not a netCDF variable.")
        r = f.create_dataset(variable, data=cube, fillvalue=np.float32(-9999))
        r.attrs["_FillValue"], r.attrs["units"] = np.float32([-9999]), "unitless"
        for i, dim in enumerate(("downtrack", "crosstrack", "bands")):
            r.dims[i].attach_scale(f[dim])
        if band_parameters:
            bp = f.create_group("sensor_band_parameters")
            bp.create_dataset("wavelengths", data=np.float32(381 + 200 * np.arange(bands))).attrs["units"] = "nm"
            bp.create_dataset("fwhm", data=np.full(bands, 8.5, np.float32)).attrs["units"] = "nm"
            bp.create_dataset("good_wavelengths", data=good)
        loc = f.create_group("location")
        for name in ("lat", "lon", "elev"):
            loc.create_dataset(name, data=np.zeros((H, W), np.float64))
        for name in ("glt_x", "glt_y"):
            loc.create_dataset(name, data=np.zeros((H + 2, W + 2), np.int32))
    return str(path), cube


def valid_pixels(ds):
    """(H, W) bool: the pixels of a converted scene that data.py reads as valid."""
    _, H, W = ds.rasters[0].image.shape
    valid = ds.physical(np.asarray(ds.read(0, 0, H, 0, W)))[1]
    return np.ones((H, W), bool) if valid is None else valid


def test_enmap_l2a_product_folder_scale_bands_and_quality_layers(tmp_path, capsys):
    folder, cube, flagged = write_enmap_l2a(tmp_path / ENMAP_STEM)
    out = tmp_path / "enmap"
    with warnings.catch_warnings(record=True) as caught:  # tifffile's "reading value from closed file" is gone
        warnings.simplefilter("always")
        ds = formats.main([folder, "--out", str(out)])
    assert [str(w.message) for w in caught if "closed file" in str(w.message)] == []
    meta = json.load(open(out / "meta.json"))
    assert meta["value_scale"] == pytest.approx(1e-4) and meta["nodata"] == -32768 and meta["sensor"] == "EnMAP"
    assert meta["bad_bands"] == [4, 5] and meta["wavelengths_nm"] == ENMAP_WL and meta["fwhm_nm"] == [7.5] * 8
    assert meta["source"]["masked_pixels"] == {"cloud": 2, "cloudshadow": 1, "haze": 1, "snow": 1, "pixelmask": 1}
    expected = cube.copy()
    expected[:, flagged] = -32768  # six flagged pixels, every band
    np.testing.assert_array_equal(tifffile.imread(out / "image.tif"), expected)
    printed = capsys.readouterr().out
    assert "quality layers set to nodata: cloud 2 px, cloudshadow 1 px, haze 1 px, snow 1 px, pixelmask 1 px" in printed
    assert ds.value_scale == pytest.approx(1e-4) and ds.band_ids == [0, 1, 2, 3, 6, 7]
    outside = np.zeros((6, 7), bool)
    outside[0, :2] = True
    np.testing.assert_array_equal(valid_pixels(ds), ~(flagged | outside))
    only_cloud = formats.convert(folder, str(tmp_path / "cloud"), masks=["cloud"])
    assert only_cloud["source"]["masked_pixels"] == {"cloud": 2}
    assert (tifffile.imread(tmp_path / "cloud" / "image.tif")[:, 1, 1:3] == -32768).all()
    formats.main([folder, "--masks", "none", "--out", str(tmp_path / "none")])
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "none" / "image.tif"), cube)
    with pytest.raises(ValueError, match="--masks: unknown quality layer 'cirrus'; choose from cloud, cloudshadow"):
        formats.convert(folder, str(tmp_path / "x"), masks=["cirrus"])


def test_enmap_geotiff_alone_and_per_band_gains(tmp_path, cache_dir):
    """Without METADATA.XML the GDAL band metadata gives wavelengths and scale; gains that differ between
    bands are applied, so image.tif holds float32 reflectance with NaN for nodata and flagged pixels."""
    folder, cube, _ = write_enmap_l2a(tmp_path / "a", xml=False, layers=False)
    meta = formats.convert(os.path.join(folder, ENMAP_STEM + "-SPECTRAL_IMAGE.TIF"), str(tmp_path / "s"))
    assert meta["value_scale"] == pytest.approx(1e-4) and meta["wavelengths_nm"] == ENMAP_WL
    assert meta["bad_bands"] == [] and meta["source"].get("masked_pixels") is None
    gains = [1e-4] * 7 + [2e-4]
    folder, cube, flagged = write_enmap_l2a(tmp_path / "b", gains=gains)
    meta = formats.convert(folder, str(tmp_path / "r"))
    assert meta["value_scale"] == 1.0 and meta["nodata"] is None and meta["bad_bands"] == [4, 5]
    written = tifffile.imread(tmp_path / "r" / "image.tif")
    expected = np.where(cube == -32768, np.nan, cube * np.float32(gains)[:, None, None]).astype(np.float32)
    expected[:, flagged] = np.nan
    assert written.dtype == np.float32
    np.testing.assert_allclose(written, expected, rtol=1e-6)
    ds = data.load_dataset(str(tmp_path / "r"), cache_dir=cache_dir)
    assert ds.band_ids == [0, 1, 2, 3, 6, 7] and ds.mean[-1] == pytest.approx(np.nanmean(expected[7]), rel=1e-5)


def test_prisma_l2d_joins_vnir_and_swir_in_wavelength_order(tmp_path):
    path, cubes = write_prisma(tmp_path / "PRS_L2D_STD_20200524103704_20200524103708_0001.he5")
    ds = formats.main([path, "--out", str(tmp_path / "p")])
    meta = json.load(open(tmp_path / "p" / "meta.json"))
    assert meta["wavelengths_nm"] == pytest.approx([420.3, 550.7, 700.2, 945.2, 1000.9, 1500.3, 2000.6, 2450.1])
    assert meta["fwhm_nm"] == [12.0] * 8 and meta["sensor"] == "PRISMA" and meta["value_scale"] == 1.0
    written = tifffile.imread(tmp_path / "p" / "image.tif")
    assert written.dtype == np.float32 and written.shape == (8, 6, 7)
    np.testing.assert_allclose(written, prisma_reflectance(cubes), rtol=1e-6, atol=1e-7)
    assert ds.band_ids == list(range(8)) and valid_pixels(ds).sum() == 6 * 7 - 1 and not valid_pixels(ds)[0, 0]


def test_emit_l2a_reflectance_with_bad_wavelengths_and_fill(tmp_path):
    path, cube = write_emit(tmp_path / "EMIT_L2A_RFL_001_20230316T045133_2307503_005.nc")
    ds = formats.main([path, "--out", str(tmp_path / "e")])
    meta = json.load(open(tmp_path / "e" / "meta.json"))
    assert meta["bad_bands"] == [3, 4] and meta["nodata"] == -9999 and meta["value_scale"] == 1.0
    assert meta["wavelengths_nm"][:2] == [381, 581] and meta["fwhm_nm"] == [8.5] * 10 and meta["sensor"] == "EMIT"
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "e" / "image.tif"), cube.transpose(2, 0, 1))
    assert ds.band_ids == [0, 1, 2, 5, 6, 7, 8, 9] and valid_pixels(ds).sum() == 6 * 7 - 3


def test_product_errors_are_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    l1, _ = write_prisma(tmp_path / "PRS_L1_STD_OFFL_20200524103704_20200524103708_0001.he5", level="1")
    with pytest.raises(DataError, match=r"PRS_L1_STD_OFFL_.*he5: a PRISMA L1 file \(Processing_Level 1, swaths "
                                        r"PRS_L1_HCO\), not L2D; formats.py reads L2D"):
        formats.read_image(l1)
    l2d, _ = write_prisma(tmp_path / "PRS_L2D_STD_1.he5")
    with open(l2d, "rb") as f:
        (tmp_path / "PRS_L2D_STD_cut.he5").write_bytes(f.read()[:3000])
    with pytest.raises(DataError, match=r"PRS_L2D_STD_cut.he5: cannot read PRISMA \(HDF-EOS5\) file .*truncated"):
        formats.read_image(str(tmp_path / "PRS_L2D_STD_cut.he5"))
    h5py = pytest.importorskip("h5py")
    with h5py.File(l2d, "a") as f:
        del f.attrs["List_Cw_Swir"]
    with pytest.raises(DataError, match="PRS_L2D_STD_1.he5: no List_Cw_Swir \\(a PRISMA L2D file has them\\)"):
        formats.read_image(l2d)
    nowl, _ = write_emit(tmp_path / "EMIT_L2A_RFL_nowl.nc", band_parameters=False)
    with pytest.raises(DataError, match="EMIT_L2A_RFL_nowl.nc: no sensor_band_parameters/wavelengths"):
        formats.read_image(nowl)
    rad, _ = write_emit(tmp_path / "EMIT_L1B_RAD_001.nc", variable="radiance")
    with pytest.raises(DataError, match=r"EMIT_L1B_RAD_001.nc: no 3-D 'reflectance' variable \(an EMIT L1B radiance"):
        formats.read_image(rad)
    l1c = tmp_path / "l1c"
    write_enmap_l2a(l1c, layers=False)
    os.rename(l1c / f"{ENMAP_STEM}-SPECTRAL_IMAGE.TIF", l1c / f"{ENMAP_STEM.replace('L2A', 'L1C')}-SPECTRAL_IMAGE.TIF")
    with pytest.raises(DataError, match=r"L1C-DT.*SPECTRAL_IMAGE.TIF: an EnMAP L1C product \(radiance\)"):
        formats.read_image(str(l1c))
    with pytest.raises(DataError, match=r"QL_QUALITY_SNOW.TIF: no such file \(--masks snow\); the product's quality "
                                        "layers: none"):
        formats.read_image(write_enmap_l2a(tmp_path / "bare", layers=False)[0], masks=["snow"])
    plain = write_envi(tmp_path / "plain.img", cube_and_gt(bands=3)[0])
    with pytest.raises(DataError, match="--masks: .*plain.hdr is not an EnMAP product"):
        formats.read_image(plain, masks=["cloud"])
    with pytest.raises(DataError, match=r"empty: no \*-SPECTRAL_IMAGE.TIF in this folder"):
        os.makedirs(tmp_path / "empty")
        formats.read_image(str(tmp_path / "empty"))
    # Through the command line: one line on stderr, exit status 2, no traceback.
    monkeypatch.setattr(sys, "argv", ["formats.py"])
    with pytest.raises(SystemExit) as exit_:
        common.run_cli(lambda: formats.main([l1, "--out", str(tmp_path / "o")]))
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "not L2D" in err


def test_products_are_converted_in_row_blocks(tmp_path, monkeypatch):
    """The image is copied a few rows at a time (the 1.8 GB figure: docs/formats.md); the result is an
    uncompressed, contiguous TIFF that data.py maps in place."""
    path, cube = write_emit(tmp_path / "EMIT_L2A_RFL_001_20230316T045133_2307503_005.nc", size=(12, 7))
    monkeypatch.setattr(formats, "WRITE_BLOCK_VALUES", 10 * 7 * 5)  # 5 rows of 10 bands x 7 px
    spans, real = [], formats.Blocks.__getitem__
    monkeypatch.setattr(formats.Blocks, "__getitem__",
                        lambda self, key: spans.append(key[1].indices(self.shape[1])[:2]) or real(self, key))
    formats.convert(path, str(tmp_path / "s"))
    assert spans == [(0, 5), (5, 10), (10, 12)]
    with tifffile.TiffFile(tmp_path / "s" / "image.tif") as tif:
        assert tif.series[0].dataoffset is not None and tif.pages[0].compression == 1
        np.testing.assert_array_equal(tif.series[0].asarray(), cube.transpose(2, 0, 1))
    # A product whose data cannot be read past row 5: one error naming it, and no half-written scene.
    real_read_emit = formats.read_emit

    def cut_after_5_rows(path):
        cube, info = real_read_emit(path)
        read = cube.read

        def read_rows(y0, y1):
            if y0 >= 5:
                raise OSError("Can't synchronously read data (inflate() failed)")  # h5py's on a damaged chunk
            return read(y0, y1)
        cube.read = read_rows
        return cube, info
    monkeypatch.setattr(formats, "read_emit", cut_after_5_rows)
    with pytest.raises(DataError, match=r"EMIT_L2A_RFL_.*\.nc: cannot read rows 5-9"):
        formats.convert(path, str(tmp_path / "cut"))
    assert os.listdir(tmp_path / "cut") == []


@pytest.mark.parametrize("product", ["enmap", "prisma", "emit"])
def test_a_converted_product_trains(tmp_path, product):
    size = (10, 11)
    src = {"enmap": lambda: write_enmap_l2a(tmp_path / ENMAP_STEM, size=size)[0],
           "prisma": lambda: write_prisma(tmp_path / "PRS_L2D_STD_20200524103704_0001.he5", size=size)[0],
           "emit": lambda: write_emit(tmp_path / "EMIT_L2A_RFL_001_20230316T045133_2307503_005.nc", size=size)[0]}
    scene = str(tmp_path / "scene")
    ds = formats.main([src[product](), "--out", scene])
    pretrain_mae.main(["--data", scene, "--out", str(tmp_path / "mae"), "--steps", "2",
                       "--size", "micro", "--img-size", "8", "--patch-size", "4", "--batch-size", "2",
                       "--decoder-dim", "32", "--decoder-depth", "1", "--workers", "0"])
    ckpt = torch.load(tmp_path / "mae" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["backbone"]["bands"]["ids"] == ds.band_ids
    assert ckpt["backbone"]["bands"]["wavelengths"] == pytest.approx(ds.wavelengths)
