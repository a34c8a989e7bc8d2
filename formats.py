"""Bring your own scene: read the formats hyperspectral scenes are kept in and write this project's scene
folder (image.tif, gt.tif, meta.json; README "Bring your own scene", docs/formats.md), which every script
reads with --data.

    python formats.py scene.hdr --gt labels.hdr --out data/my_scene                  # ENVI, BSQ/BIL/BIP
    python formats.py Indian_pines_corrected.mat --gt Indian_pines_gt.mat --out data/ip  # MATLAB v5 or v7.3
    python formats.py scene.mat:hsi --gt scene.mat:labels --out data/scene            # pick arrays by name
    python formats.py ENMAP01-____L2A-DT0000001867_..._V010302_20230628T165614Z --out data/enmap  # EnMAP L2A
    python formats.py PRS_L2D_STD_20200524103704_20200524103708_0001.he5 --out data/prisma     # PRISMA L2D
    python formats.py EMIT_L2A_RFL_001_20230316T045133_2307503_005.nc --out data/emit          # EMIT L2A

ENVI: the header's wavelength (+ units), fwhm, bbl, data ignore value, byte order, header offset and
reflectance scale factor are used. MATLAB: the 3-D array is the image (rows x cols x bands), the 2-D array of
--gt the labels. GeoTIFF: GDAL_NODATA and GDAL band metadata. The product is told by its file; it is copied in
row blocks, never whole in memory. .mat v5 needs scipy; .mat v7.3, .he5 and .nc h5py: `pip install -r
requirements-formats.txt`.
"""
import argparse
import json
import os
import re
import xml.etree.ElementTree as ET

import numpy as np
import tifffile
from tqdm import tqdm

import common
import data
from data import DataError

ENVI_DTYPES = {1: "u1", 2: "i2", 3: "i4", 4: "f4", 5: "f8", 12: "u2", 13: "u4", 14: "i8", 15: "u8"}
ENVI_DTYPE_NAMES = "1 uint8, 2 int16, 3 int32, 4 float32, 5 float64, 12 uint16, 13 uint32, 14 int64, 15 uint64"
ENVI_DATA_EXTENSIONS = ("", ".img", ".dat", ".bsq", ".bil", ".bip", ".raw", ".bin", ".envi")
WAVELENGTH_UNITS = {"nanometers": 1.0, "nanometer": 1.0, "nm": 1.0, "micrometers": 1e3, "micrometer": 1e3,
                    "microns": 1e3, "micron": 1e3, "um": 1e3, "\u00b5m": 1e3, "millimeters": 1e6, "mm": 1e6}
# GDAL band metadata items (lower-cased name -> info key, unit); GDAL >= 3.10 writes the *_um ones
GDAL_BAND_ITEMS = {"wavelength": ("wavelengths_nm", None), "central_wavelength_um": ("wavelengths_nm", "um"),
                   "fwhm": ("fwhm_nm", None), "fwhm_um": ("fwhm_nm", "um"), "scale": ("gain", 1),
                   "offset": ("offset", 1), "bbl": ("bbl", 1)}
NUMBER = r"\s*[-+]?\d*\.?\d+([eE][-+]?\d+)?\s*"
ENMAP_MASKS = {"cloud": "QL_QUALITY_CLOUD", "cloudshadow": "QL_QUALITY_CLOUDSHADOW", "haze": "QL_QUALITY_HAZE",
               "snow": "QL_QUALITY_SNOW", "pixelmask": "QL_PIXELMASK"}
PRISMA_SWATH = "HDFEOS/SWATHS/PRS_L2D_HCO"
EXTRAS = "pip install -r requirements-formats.txt"
WRITE_BLOCK_VALUES = 1 << 22  # values copied per block when writing image.tif (16 MB of float32)
BAR_MIN_VALUES = 1 << 26  # a progress bar for images larger than this


# ----------------------------------------------------------------------------- ENVI

def read_envi_header(path):
    """An ENVI .hdr as {lower-case key: str, or list of str for {...} values}."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ENVI header ({e.strerror})") from e
    if not text.lstrip().startswith("ENVI"):
        raise DataError(f"{path}: not an ENVI header (it must start with 'ENVI')")
    header = {}
    for m in re.finditer(r"^\s*([^=\n]+?)\s*=\s*(\{[^}]*\}|[^\n]*)", text[text.index("ENVI") + 4:], re.M):
        key, value = m.group(1).strip().lower(), m.group(2).strip()
        if key.startswith(";"):  # a comment line
            continue
        if value.startswith("{"):
            inner = value[1:-1].strip()
            header[key] = inner if key == "description" else [v.strip() for v in inner.split(",") if v.strip()]
        else:
            header[key] = value
    return header


def envi_files(path):
    """(header, binary) for an ENVI header or its binary file."""
    if path.lower().endswith(".hdr"):
        hdr, base = path, path[:-4]
        for ext in ENVI_DATA_EXTENSIONS + tuple(e.upper() for e in ENVI_DATA_EXTENSIONS[1:]):
            if os.path.isfile(base + ext):
                return hdr, base + ext
        raise DataError(f"{hdr}: no binary file beside it (looked for {os.path.basename(base)} with extension "
                        f"{', '.join(e or '(none)' for e in ENVI_DATA_EXTENSIONS)})")
    for hdr in (path + ".hdr", os.path.splitext(path)[0] + ".hdr", os.path.splitext(path)[0] + ".HDR"):
        if os.path.isfile(hdr):
            return hdr, path
    raise DataError(f"{path}: no ENVI header ({os.path.basename(path)}.hdr) beside it")


def _number(header, key, hdr, kind=int, default=None):
    """header[key] as an int (kind=int) or a float; `default` when absent, an error when required."""
    v = header.get(key)
    if v is None:
        if default is None:
            raise DataError(f"{hdr}: '{key}' is missing")
        return default
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = None
    if x is None or (kind is int and not x.is_integer()):
        raise DataError(f"{hdr}: '{key} = {v}' is not {'an integer' if kind is int else 'a number'}")
    return int(x) if kind is int else x


def _numbers(header, key, hdr, count):
    v = header.get(key)
    if v is None:
        return None
    try:
        values = [float(x) for x in (v if isinstance(v, list) else [v])]
    except ValueError:
        raise DataError(f"{hdr}: '{key}' holds a value that is not a number") from None
    if len(values) != count:
        raise DataError(f"{hdr}: {len(values)} values in '{key}' for {count} bands")
    return values


def to_nm(values, units, where):
    """Wavelengths (or FWHMs) in `units` -> nm; unknown units: micrometres when every value is below 100."""
    if values is None:
        return None
    factor = WAVELENGTH_UNITS.get((units or "").strip().lower())
    if factor is None:
        factor = 1e3 if max(values) < 100 else 1.0
        if units and units.strip().lower() not in ("unknown", "index", ""):
            raise DataError(f"{where}: unknown wavelength units {units!r} (nanometers or micrometers)")
    return [round(v * factor, 6) for v in values]


def read_envi(path):
    """An ENVI image (header or binary path) -> ((C, H, W) read-only memory map, info for meta.json)."""
    hdr, binary = envi_files(path)
    h = read_envi_header(hdr)
    samples, lines, bands = (_number(h, k, hdr) for k in ("samples", "lines", "bands"))
    if min(samples, lines, bands) < 1:
        raise DataError(f"{hdr}: samples, lines and bands must be positive, got {samples}, {lines}, {bands}")
    offset = _number(h, "header offset", hdr, default=0)
    code = _number(h, "data type", hdr)
    if code not in ENVI_DTYPES:
        raise DataError(f"{hdr}: unknown or unsupported data type {code} (supported: {ENVI_DTYPE_NAMES})")
    order = _number(h, "byte order", hdr, default=0)
    if order not in (0, 1):
        raise DataError(f"{hdr}: byte order must be 0 (little-endian) or 1 (big-endian), got {order}")
    dtype = np.dtype(("<" if order == 0 else ">") + ENVI_DTYPES[code])
    interleave = str(h.get("interleave", "bsq")).strip().lower()
    shapes = {"bsq": (bands, lines, samples), "bil": (lines, bands, samples), "bip": (lines, samples, bands)}
    if interleave not in shapes:
        raise DataError(f"{hdr}: unknown interleave {h['interleave']!r} (bsq, bil or bip)")
    expected, actual = offset + samples * lines * bands * dtype.itemsize, os.path.getsize(binary)
    if actual != expected:
        raise DataError(f"{binary}: {actual} bytes, but {os.path.basename(hdr)} describes {lines} lines x {samples} "
                        f"samples x {bands} bands of {dtype.name} ({dtype.itemsize} bytes each) + {offset} header "
                        f"bytes = {expected} bytes")
    raw = np.memmap(binary, dtype=dtype, mode="r", offset=offset, shape=shapes[interleave])
    cube = {"bsq": raw, "bil": raw.transpose(1, 0, 2), "bip": raw.transpose(2, 0, 1)}[interleave]  # (C, H, W)
    units = h.get("wavelength units")
    bbl = _numbers(h, "bbl", hdr, bands)
    nodata = _number(h, "data ignore value", hdr, float) if "data ignore value" in h else None
    scale = _number(h, "reflectance scale factor", hdr, float) if "reflectance scale factor" in h else None
    names = h.get("class names")
    if isinstance(names, list) and names and names[0].lower() in ("unclassified", "background", "unlabeled",
                                                                   "unlabelled", "none"):
        names = names[1:]
    info = {"sensor": h.get("sensor type"),
            "wavelengths_nm": to_nm(_numbers(h, "wavelength", hdr, bands), units, hdr),
            "fwhm_nm": to_nm(_numbers(h, "fwhm", hdr, bands), units, hdr),
            "bad_bands": [i for i, v in enumerate(bbl) if v == 0] if bbl else [],
            "nodata": _clean_nodata(nodata, dtype), "value_scale": 1 / scale if scale else None,
            "class_names": names if isinstance(names, list) else None}
    return cube, info


def _clean_nodata(v, dtype):
    if v is None or np.isnan(v):
        return None  # NaN is always treated as nodata
    return int(v) if dtype.kind in "iu" and float(v).is_integer() else float(v)


# ----------------------------------------------------------------------------- MATLAB

def _extra(module, path, what):
    try:
        return __import__(module)
    except ImportError:
        raise DataError(f"{path}: reading {what} files needs {module}, which is not installed: {EXTRAS}") from None


def _is_hdf5(path):
    with open(path, "rb") as f:
        head = f.read(520)
    return head.startswith(b"\x89HDF\r\n\x1a\n") or head[512:520] == b"\x89HDF\r\n\x1a\n"


def mat_variables(path):
    """{name: numeric array} of a .mat file, in MATLAB's axis order (rows, cols, ...): v5 through scipy,
    v7.3 (HDF5, whose arrays are stored transposed) through h5py."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if _is_hdf5(path):
        with _h5open(path, "MATLAB v7.3 (HDF5)") as f:
            return {k: np.asarray(v[()]).T for k, v in f.items()
                    if hasattr(v, "dtype") and v.dtype.kind in "biuf" and not k.startswith("#")}
    _extra("scipy", path, "MATLAB v5")
    import scipy.io
    try:
        m = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, ... on files that are not MATLAB
        raise DataError(f"{path}: cannot read .mat file ({type(e).__name__}: {e})") from e
    return {k: v for k, v in m.items() if not k.startswith("__") and isinstance(v, np.ndarray) and v.dtype.kind in "biuf"}


def _listing(arrays):
    return ", ".join(f"{k} ({'x'.join(map(str, v.shape))} {v.dtype})" for k, v in arrays.items()) or "nothing numeric"


def read_mat(path, var=None, ndim=3):
    """(name, array) of the `ndim`-D array of a .mat file: `var`, or the only one there is."""
    arrays = mat_variables(path)
    if var is not None:
        if var not in arrays:
            raise DataError(f"{path}: no numeric array {var!r}; it holds {_listing(arrays)}")
        a = arrays[var]
        if a.ndim != ndim and np.squeeze(a).ndim != ndim:
            raise DataError(f"{path}: {var} is {'x'.join(map(str, a.shape))}, expected a {ndim}-D array")
        return var, a if a.ndim == ndim else np.squeeze(a)
    found = {k: v for k, v in arrays.items() if v.ndim == ndim}
    if not found:
        raise DataError(f"{path}: no {ndim}-D array to use as the {'image' if ndim == 3 else 'labels'}; "
                        f"it holds {_listing(arrays)}")
    if len(found) > 1:
        raise DataError(f"{path}: several {ndim}-D arrays: {_listing(found)}; pick one as {path}:NAME")
    return next(iter(found.items()))


def mat_cube(a, gt_shape=None):
    """A MATLAB (rows, cols, bands) array -> (C, H, W). With labels given, the band axis is the one the
    labels' shape leaves out (the last one when several or none fit)."""
    for axis in (2, 0, 1) if gt_shape is not None else ():
        if tuple(np.delete(a.shape, axis)) == tuple(gt_shape):
            return np.moveaxis(a, axis, 0)
    return np.moveaxis(a, -1, 0)


# ----------------------------------------------------------------------------- streamed cubes

class Blocks:
    """A (C, H, W) cube read in row blocks, never whole: cube[:, y0:y1] is read(y0, y1), a (C, y1 - y0, W)
    array. The product readers return it for HDF5 files and for values they scale."""
    ndim = 3

    def __init__(self, path, shape, dtype, read, close=lambda: None):
        self.path, self.shape, self.dtype, self.read, self.close = path, tuple(shape), np.dtype(dtype), read, close

    def __getitem__(self, key):
        y0, y1, _ = key[1].indices(self.shape[1])
        try:
            return self.read(y0, y1)
        except (OSError, RuntimeError) as e:  # h5py's errors on truncated or corrupt data
            raise DataError(f"{self.path}: cannot read rows {y0}-{y1 - 1} ({e})") from e

    def __del__(self):
        self.close()


def scaled(cube, gain, offset, nodata=None):
    """Float32 raw x gain + offset per band (one gain and offset per band), in row blocks; nodata -> NaN."""
    g, o = (np.asarray(v, np.float32)[:, None, None] for v in (gain, offset))

    def read(y0, y1):
        raw = np.asarray(cube[:, y0:y1])
        out = raw.astype(np.float32) * g + o
        if nodata is not None:
            out[raw == nodata] = np.nan
        data.release(cube)
        return out
    return Blocks(getattr(cube, "path", "image"), cube.shape, np.float32, read)


def apply_gain(cube, info, path):
    """Per-band gain/offset (EnMAP GainOfBand/OffsetOfBand, GDAL scale/offset): one gain and no offset becomes
    value_scale (integers kept: half the size of float32); other sets are applied (float32, nodata -> NaN)."""
    gain, offset = info.pop("gain", None), info.pop("offset", None)
    offset = offset or [0.0] * len(gain or [])
    if gain is None or (set(gain) == {1.0} and not any(offset)):  # GDAL's default: no scale at all
        return cube
    if len(gain) != cube.shape[0] or len(offset) != cube.shape[0]:
        raise DataError(f"{path}: {len(gain)} gains and {len(offset)} offsets for {cube.shape[0]} bands")
    if len(set(gain)) == 1 and not any(offset):
        info["value_scale"] = gain[0]
        return cube
    nodata, info["nodata"], info["value_scale"] = info.get("nodata"), None, 1.0
    return scaled(cube, gain, offset, nodata)


def _h5open(path, what):
    h5py = _extra("h5py", path, what)
    try:
        return h5py.File(path, "r")
    except OSError as e:  # truncated or not HDF5
        raise DataError(f"{path}: cannot read {what} file ({e})") from e


def _text(v):
    v = np.ravel(v)[0] if isinstance(v, np.ndarray) else v
    return (v.decode(errors="replace") if isinstance(v, bytes) else str(v)).strip()


# ----------------------------------------------------------------------------- GeoTIFF and EnMAP L2A

def read_tiff(path):
    """A (GeoTIFF) image -> ((C, H, W) memory map, info): nodata from GDAL_NODATA, wavelength, fwhm, scale,
    offset, bbl from the GDAL band metadata. A compressed file is decoded to a temporary memory map on disk."""
    try:
        with tifffile.TiffFile(path) as tif:
            series, tags = tif.series[0], tif.pages[0].tags
            axes, cube = series.axes, series.asarray(out="memmap")
            # read while the file is open: tifffile loads a long GDAL_METADATA value only when asked
            nodata, gdal = (str(tags[k].value).strip("\x00 ") if k in tags else None for k in (42113, 42112))
    except Exception as e:  # tifffile raises many types on corrupt files
        raise DataError(f"{path}: cannot read TIFF ({type(e).__name__}: {e})") from e
    if cube.ndim != 3:
        raise DataError(f"{path}: expected a (bands, H, W) or (H, W, bands) image, got shape {cube.shape}")
    if axes.endswith("S") and axes != "SYX":
        cube = np.moveaxis(cube, -1, 0)
    info = _gdal_bands(gdal, cube.shape[0], path) if gdal else {}
    try:
        info["nodata"] = _clean_nodata(float(nodata), cube.dtype) if nodata else None
    except ValueError:
        info["nodata"] = None
    return cube, info


def _gdal_bands(text, bands, path):
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return {}
    items, units = {}, None
    for item in root.iter("Item"):
        name, sample = (item.get("name") or "").lower(), item.get("sample")
        if sample is None and name == "wavelength_units":
            units = item.text
        elif sample is not None and name in GDAL_BAND_ITEMS and re.fullmatch(NUMBER, item.text or ""):
            items.setdefault(name, {})[int(sample)] = float(item.text)
    out = {}
    for name, values in items.items():
        key, unit = GDAL_BAND_ITEMS[name]
        if sorted(values) == list(range(bands)):
            v = [values[i] for i in range(bands)]
            out[key] = v if unit == 1 else to_nm(v, unit or units, path)
    if "bbl" in out:
        out["bad_bands"] = [i for i, v in enumerate(out.pop("bbl")) if v == 0]
    return out


def read_enmap_xml(path):
    """{wavelengths_nm, fwhm_nm, gain, offset, bad_bands} of an EnMAP METADATA.XML: specific/bandCharacterisation,
    and product/bandStatistics, where mean -1000000 with standard deviation 0 marks a band left empty."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"{path}: not valid XML ({e})") from e
    bands = sorted((b for b in root.iter("bandID") if b.findtext("wavelengthCenterOfBand")),
                   key=lambda b: int(b.get("number", 0)))
    if not bands:
        raise DataError(f"{path}: no bandID/wavelengthCenterOfBand elements (an EnMAP METADATA.XML has them)")

    def column(tag):
        v = [b.findtext(tag) for b in bands]
        try:
            return [float(x) for x in v] if all(v) else None
        except ValueError:
            raise DataError(f"{path}: a {tag} that is not a number") from None
    empty = [int(b.get("number", 0)) - 1 for b in root.iterfind("product/bandStatistics/bandID")
             if b.findtext("mean", "").strip() == "-1000000" and b.findtext("stdDeviation", "").strip() == "0"]
    return {"wavelengths_nm": column("wavelengthCenterOfBand"), "fwhm_nm": column("FWHMOfBand"),
            "gain": column("GainOfBand"), "offset": column("OffsetOfBand"), "bad_bands": empty}


def read_enmap(path, masks=None):
    """An EnMAP L2A product folder or its SPECTRAL_IMAGE GeoTIFF -> (cube, info): the GeoTIFF as read_tiff
    reads it, METADATA.XML's wavelengths, FWHM, gains/offsets and empty bands over the GDAL metadata, and the
    quality layers `masks` (names of ENMAP_MASKS; default: every one the product has) as flagged pixels."""
    if os.path.isdir(path):
        found = sorted(n for n in os.listdir(path) if re.search(r"SPECTRAL_IMAGE\w*\.TIFF?$", n, re.I))
        if len(found) != 1:
            raise DataError(f"{path}: {'no' if not found else 'several'} *-SPECTRAL_IMAGE.TIF in this folder "
                            f"(an EnMAP L2A product folder has one){': ' + ', '.join(found) if found else ''}")
        path = os.path.join(path, found[0])
    level = re.search(r"_(L1B|L1C|L2A)-", os.path.basename(path))
    if level and level.group(1) != "L2A":
        raise DataError(f"{path}: an EnMAP {level.group(1)} product (radiance); formats.py reads L2A (reflectance)")
    stem = path[:re.search(r"-?SPECTRAL_IMAGE[^/\\]*$", path, re.I).start()]
    cube, info = read_tiff(path)
    xml = next((stem + s for s in ("-METADATA.XML", "-METADATA.xml") if os.path.isfile(stem + s)), None)
    if xml:
        info.update({k: v for k, v in read_enmap_xml(xml).items() if v})
    counts, flagged = {}, np.zeros(cube.shape[1:], bool)
    for name in ENMAP_MASKS if masks is None else masks:
        if name not in ENMAP_MASKS:
            raise ValueError(f"--masks: unknown quality layer {name!r}; choose from {', '.join(ENMAP_MASKS)} or none")
        layer = f"{stem}-{ENMAP_MASKS[name]}.TIF"
        if os.path.isfile(layer):
            m = _flags(layer, cube.shape[1:])
            counts[name], flagged = int(m.sum()), flagged | m
        elif masks is not None:
            raise DataError(f"{layer}: no such file (--masks {name}); the product's quality layers: "
                            + (", ".join(n for n, s in ENMAP_MASKS.items() if os.path.isfile(f"{stem}-{s}.TIF"))
                               or "none"))
    info.update(sensor="EnMAP", masks=counts, flagged=flagged if flagged.any() else None)
    return cube, info


def _flags(path, shape):
    """(H, W) bool: the pixels a quality layer flags (any value above 0, in any of its bands)."""
    try:
        m = np.asarray(tifffile.imread(path))
    except Exception as e:  # tifffile raises many types on corrupt files
        raise DataError(f"{path}: cannot read TIFF ({type(e).__name__}: {e})") from e
    if m.shape[-2:] != tuple(shape):
        raise DataError(f"{path}: shape {m.shape}, but the image is {shape[0]}x{shape[1]} px")
    return (m.reshape(-1, *shape) > 0).any(0)


# ----------------------------------------------------------------------------- PRISMA L2D and EMIT L2A

def read_prisma(path):
    """A PRISMA L2D .he5 (HDF-EOS5) -> (Blocks of float32 reflectance, info). VNIR_Cube and SWIR_Cube are
    (rows, bands, cols) uint16; reflectance = L2Scale<Det>Min + DN x (Max - Min) / 65535; bands with centre
    wavelength 0 (or List_Cw_<Det>_Flags 0) are unused and left out; pixels with DN 0 in every band lie
    outside the scene and become NaN. The detectors overlap around 950 nm: VNIR bands at or above the SWIR's
    shortest wavelength are left out (prismaread's default, join_priority "SWIR"), one band per wavelength."""
    f = _h5open(path, "PRISMA (HDF-EOS5)")
    level, swaths = _text(f.attrs.get("Processing_Level", "?")), list(f.get("HDFEOS/SWATHS", {}))
    if PRISMA_SWATH not in f:
        raise DataError(f"{path}: a PRISMA L{level.lstrip('L')} file (Processing_Level {level}, swaths "
                        f"{', '.join(swaths) or 'none'}), not L2D; formats.py reads L2D surface reflectance "
                        f"({PRISMA_SWATH})" if swaths else f"{path}: not a PRISMA product (no HDFEOS/SWATHS)")
    dets = []
    for det in ("Vnir", "Swir"):
        cube = f.get(f"{PRISMA_SWATH}/Data Fields/{det.upper()}_Cube")
        keys = [f"List_Cw_{det}", f"List_Fwhm_{det}", f"L2Scale{det}Min", f"L2Scale{det}Max"]
        missing = [k for k in keys if k not in f.attrs] + ([] if cube is not None else [f"{det.upper()}_Cube"])
        if missing:
            raise DataError(f"{path}: no {', '.join(missing)} (a PRISMA L2D file has them)")
        wl, fwhm, lo, hi = (np.ravel(f.attrs[k]).astype(float) for k in keys)
        flags = np.ravel(f.attrs.get(f"List_Cw_{det}_Flags", np.ones_like(wl)))
        if cube.ndim != 3 or not len(wl) == len(fwhm) == len(flags) == cube.shape[1]:
            raise DataError(f"{path}: {det.upper()}_Cube is {'x'.join(map(str, cube.shape))} (rows, bands, "
                            f"cols) but List_Cw_{det} has {len(wl)} wavelengths")
        dets.append(dict(cube=cube, wl=wl, fwhm=fwhm, keep=(wl > 0) & (flags != 0), lo=lo[0], hi=hi[0]))
    vnir, swir = dets
    if vnir["cube"].shape[::2] != swir["cube"].shape[::2]:
        raise DataError(f"{path}: VNIR_Cube and SWIR_Cube differ in size: {vnir['cube'].shape}, {swir['cube'].shape}")
    vnir["keep"] &= vnir["wl"] < swir["wl"][swir["keep"]].min(initial=np.inf)
    for d in dets:  # the bands kept, by wavelength (the files list them descending)
        d["ids"] = np.flatnonzero(d["keep"])[np.argsort(d["wl"][d["keep"]])]

    def read(y0, y1):
        dn = [d["cube"][y0:y1][:, d["ids"]] for d in dets]  # (k, bands, W) each
        out = np.concatenate([np.float32(d["lo"]) + x.astype(np.float32) * np.float32((d["hi"] - d["lo"]) / 65535)
                              for x, d in zip(dn, dets)], 1).transpose(1, 0, 2)
        out[:, np.logical_and(*[(x == 0).all(1) for x in dn])] = np.nan
        return out
    info = {"sensor": "PRISMA", "value_scale": 1.0, "nodata": None,
            "wavelengths_nm": [round(float(d["wl"][i]), 4) for d in dets for i in d["ids"]],
            "fwhm_nm": [round(float(d["fwhm"][i]), 4) for d in dets for i in d["ids"]]}
    shape = (len(info["wavelengths_nm"]), vnir["cube"].shape[0], vnir["cube"].shape[2])
    return Blocks(path, shape, np.float32, read, f.close), info


def read_emit(path):
    """An EMIT L2A reflectance NetCDF -> (Blocks, info): `reflectance` (downtrack, crosstrack, bands) float32
    in swath geometry (not orthorectified: the location group's GLT is not applied), its _FillValue (-9999)
    as nodata, sensor_band_parameters' wavelengths, fwhm and good_wavelengths (0 -> bad_bands)."""
    f = _h5open(path, "EMIT (NetCDF4)")
    r, bp = f.get("reflectance"), f.get("sensor_band_parameters")
    if r is None or r.ndim != 3:
        raise DataError(f"{path}: no 3-D 'reflectance' variable{' (an EMIT L1B radiance file?)' * ('radiance' in f)}"
                        "; formats.py reads EMIT L2A reflectance (EMIT_L2A_RFL_*.nc)")
    if bp is None or "wavelengths" not in bp:
        raise DataError(f"{path}: no sensor_band_parameters/wavelengths (an EMIT L2A file has them)")
    wl = np.ravel(bp["wavelengths"][()]).astype(float)
    if len(wl) != r.shape[2]:
        raise DataError(f"{path}: {len(wl)} wavelengths for {r.shape[2]} bands of reflectance")
    units = _text(bp["wavelengths"].attrs.get("units", "nm"))
    good = np.ravel(bp["good_wavelengths"][()]) if "good_wavelengths" in bp else np.ones(len(wl))
    fwhm = to_nm(np.ravel(bp["fwhm"][()]).astype(float).tolist(), units, path) if "fwhm" in bp else None
    fill = float(np.ravel(r.attrs.get("_FillValue", [-9999]))[0])
    H, W, C = r.shape
    info = {"sensor": "EMIT", "value_scale": 1.0, "nodata": _clean_nodata(fill, r.dtype),
            "wavelengths_nm": to_nm(wl.tolist(), units, path), "fwhm_nm": fwhm,
            "bad_bands": [int(i) for i in np.flatnonzero(good == 0)]}
    return Blocks(path, (C, H, W), r.dtype, lambda y0, y1: r[y0:y1].transpose(2, 0, 1), f.close), info


def read_wavelengths(path):
    """(wavelengths_nm, fwhm_nm or None) from an ENVI header, an EnMAP METADATA.XML, or a text file of
    numbers (one per band; whitespace, comma or newline separated; micrometres when all are below 100)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    if path.lower().endswith(".hdr"):
        h = read_envi_header(path)
        wl = h.get("wavelength")
        if wl is None:
            raise DataError(f"{path}: the header has no 'wavelength'")
        n = len(wl) if isinstance(wl, list) else 1
        return (to_nm(_numbers(h, "wavelength", path, n), h.get("wavelength units"), path),
                to_nm(_numbers(h, "fwhm", path, n), h.get("wavelength units"), path) if "fwhm" in h else None)
    if path.lower().endswith(".xml"):
        x = read_enmap_xml(path)
        return x["wavelengths_nm"], x["fwhm_nm"]
    with open(path) as f:
        tokens = re.split(r"[\s,;]+", f.read().strip())
    try:
        values = [float(t) for t in tokens if t]
    except ValueError:
        raise DataError(f"{path}: expected numbers (one wavelength per band)") from None
    return to_nm(values, None, path), None


# ----------------------------------------------------------------------------- any format

def split_var(spec):
    """'file.mat:name' -> ('file.mat', 'name'); anything else -> (spec, None)."""
    path, sep, var = spec.rpartition(":")
    if sep and path and var and os.path.isfile(path) and not os.path.isfile(spec) and re.fullmatch(r"\w+", var):
        return path, var
    return spec, None


def read_image(spec, gt_shape=None, masks=None):
    """An image in any supported format -> ((C, H, W) array, memory map or Blocks, info for meta.json).
    The product is told by the file: a folder or *SPECTRAL_IMAGE*.TIF is EnMAP, .he5 PRISMA, .nc EMIT."""
    path, var = split_var(spec)
    ext = os.path.splitext(path)[1].lower()
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    enmap = os.path.isdir(path) or (ext in (".tif", ".tiff") and "SPECTRAL_IMAGE" in os.path.basename(path).upper())
    if var is not None and ext != ".mat":
        raise DataError(f"{spec}: ':{var}' picks an array of a .mat file, but this is a {ext or 'file'}")
    if masks and not enmap:
        raise DataError(f"--masks: {path} is not an EnMAP product; quality layers are read from EnMAP L2A products")
    if ext == ".mat":
        return mat_cube(read_mat(path, var, 3)[1], gt_shape), {}
    readers = {".tif": read_tiff, ".tiff": read_tiff, ".he5": read_prisma, ".nc": read_emit,
               ".npy": lambda p: (np.load(p, mmap_mode="r"), {})}
    cube, info = read_enmap(path, masks) if enmap else readers.get(ext, read_envi)(path)
    if cube.ndim != 3:
        raise DataError(f"{path}: expected a (bands, H, W) array, got shape {cube.shape}")
    return apply_gain(cube, info, path), info


def read_labels(spec):
    """Labels (0 = unlabelled, 1..K) in any supported format -> (H, W) uint8/uint16. Float labels must hold
    whole numbers; NaN becomes 0 (unlabelled)."""
    path, var = split_var(spec)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    names = None
    if ext == ".mat":
        var, labels = read_mat(path, var, 2)
        spec = f"{path}:{var}"
    elif ext in (".tif", ".tiff"):
        try:
            labels = np.squeeze(tifffile.imread(path))
        except Exception as e:  # tifffile raises many types on corrupt files
            raise DataError(f"{path}: cannot read TIFF ({type(e).__name__}: {e})") from e
    elif ext == ".npy":
        labels = np.load(path)
    else:
        cube, info = read_envi(path)
        labels, names = np.asarray(cube)[0] if cube.shape[0] == 1 else cube, info.get("class_names")
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise DataError(f"{spec}: labels must be a 2-D (H, W) array, got shape {labels.shape}")
    if labels.dtype.kind == "f":
        labels = np.where(np.isnan(labels), 0, labels)
        if not np.array_equal(labels, np.round(labels)):
            raise DataError(f"{spec}: labels must be whole numbers (0 = unlabelled, 1..K), found fractions")
    if labels.dtype.kind not in "biuf":
        raise DataError(f"{spec}: labels must be numbers, got {labels.dtype}")
    lo, hi = labels.min(), labels.max()
    if lo < 0 or hi > 65535:
        raise DataError(f"{spec}: label values must be 0 (unlabelled) .. K, found {lo:g} .. {hi:g}")
    return labels.astype(np.uint8 if hi < 256 else np.uint16), names


def parse_band_list(text):
    """'0-3,103,150-162' -> [0, 1, 2, 3, 103, 150, ..., 162] (0-based band indices)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise ValueError(f"--bad-bands: {part!r} is not a band index or a range like 103-107")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        out += range(a, b + 1)
    return sorted(set(out))


# ----------------------------------------------------------------------------- writing a scene folder

def write_image(path, cube, flagged=None, fill=None):
    """(C, H, W) -> an uncompressed, memory-mappable image.tif in native byte order. Copied in row blocks
    with plain file writes (a BIP/BIL or big-endian binary is re-ordered, a product streamed), so neither the
    source nor the output is ever whole in memory; pixels `flagged` (H, W) get the value `fill`."""
    dtype = cube.dtype.newbyteorder("=")
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise DataError(f"{path}: cannot store {cube.dtype} pixels (complex?)")
    dtype = np.dtype(np.uint8) if dtype.kind == "b" else np.dtype(np.float32) if dtype == np.float16 else dtype
    C, H, W = cube.shape
    offset = tifffile.imwrite(path, shape=(C, H, W), dtype=dtype, photometric="minisblack", returnoffset=True)[0]
    rows = max(1, WRITE_BLOCK_VALUES // (C * W))
    with open(path, "r+b") as f, tqdm(total=H, unit="row", disable=C * H * W < BAR_MIN_VALUES) as bar:
        for y in range(0, H, rows):
            block = np.array(cube[:, y:y + rows], dtype)  # (C, k, W)
            if flagged is not None:
                block[:, flagged[y:y + rows]] = fill
            for c in range(C):  # band c's rows y.. are contiguous in the (C, H, W) file
                f.seek(offset + (c * H + y) * W * dtype.itemsize)
                f.write(block[c].tobytes())
            data.release(cube)
            bar.update(block.shape[1])


def _absolute(spec):
    if spec is None:
        return None
    path, var = split_var(spec)
    return os.path.abspath(path) + (f":{var}" if var else "")


def convert(src, out, gt=None, name=None, wavelengths=None, bad_bands=(), nodata=None, value_scale=None,
            class_names=None, sensor=None, force=False, masks=None):
    """Write the scene folder `out` (image.tif, gt.tif when labels are given, meta.json) from `src`;
    returns the meta.json written. Options override what the source file says; `masks`: EnMAP quality layers
    (None: all the product has)."""
    labels, label_names = read_labels(gt) if gt else (None, None)
    cube, info = read_image(src, None if labels is None else labels.shape, masks)
    C, H, W = cube.shape
    if labels is not None and labels.shape != (H, W):
        raise DataError(f"{gt}: labels are {labels.shape[0]}x{labels.shape[1]} but the image {src} is {H}x{W}")
    flagged = info.get("flagged")
    meta = {"name": name or os.path.basename(os.path.abspath(out)), "sensor": sensor or info.get("sensor"),
            "source": {"image": _absolute(src), "gt": _absolute(gt), **({"masked_pixels": info["masks"]}
                                                                       if info.get("masks") else {})},
            "nodata": nodata if nodata is not None else info.get("nodata"),
            "value_scale": value_scale if value_scale is not None else info.get("value_scale"),
            "wavelengths_nm": info.get("wavelengths_nm"), "fwhm_nm": info.get("fwhm_nm"),
            "bad_bands": sorted(set(info.get("bad_bands") or []) | set(bad_bands)),
            "class_names": class_names or label_names or []}
    if flagged is not None and meta["nodata"] is None and cube.dtype.kind != "f":
        meta["nodata"] = int(np.iinfo(cube.dtype).min)  # flagged pixels need a value that says "missing"
    if wavelengths:
        meta["wavelengths_nm"], fwhm = read_wavelengths(wavelengths)
        meta["fwhm_nm"] = fwhm or None
    for key in ("wavelengths_nm", "fwhm_nm"):
        if meta[key] is not None and len(meta[key]) != C:
            raise DataError(f"{wavelengths or src}: {len(meta[key])} {key.split('_')[0]} for an image with {C} bands")
    if meta["bad_bands"] and meta["bad_bands"][-1] >= C:
        raise DataError(f"--bad-bands: band {meta['bad_bands'][-1]} does not exist; {src} has bands 0 .. {C - 1}")
    if labels is not None and meta["class_names"] and labels.max() > len(meta["class_names"]):
        raise DataError(f"{gt}: labels go up to {labels.max()} but {len(meta['class_names'])} class names are given")
    files = [os.path.join(out, f) for f in ("image.tif", "gt.tif", "meta.json")]
    if not force and any(os.path.exists(f) for f in files):
        raise FileExistsError(f"{out}: already holds a scene; pass --force to replace it")
    os.makedirs(out, exist_ok=True)
    for f in files:
        if os.path.exists(f):
            os.remove(f)
    try:
        write_image(files[0], cube, flagged, np.nan if meta["nodata"] is None else meta["nodata"])
        if labels is not None:
            tifffile.imwrite(files[1], labels)
        with open(files[2], "w") as f:
            json.dump(meta, f, indent=1)
    except BaseException:  # a truncated product, an interrupt: no half-written scene is left behind
        for f in files:
            if os.path.exists(f):
                os.remove(f)
        raise
    return meta


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="image: ENVI header or binary, .mat[:VAR] (the 3-D array unless VAR), GeoTIFF, .npy, "
                   "EnMAP L2A folder or SPECTRAL_IMAGE.TIF, PRISMA L2D .he5, EMIT L2A .nc")
    p.add_argument("--gt", default=None, help="labels FILE[:VAR] (0 = unlabelled, 1..K): .mat (the 2-D array unless "
                   "VAR; may be the image's file), ENVI classification, TIFF or .npy")
    p.add_argument("--out", required=True, help="scene folder to write")
    p.add_argument("--name", default=None, help="scene name (default: the folder's name)")
    p.add_argument("--wavelengths", default=None, help="band centres from an ENVI .hdr, an EnMAP METADATA.XML or a "
                   "text file of numbers (one per band, nm or micrometres)")
    p.add_argument("--bad-bands", default="", help="0-based bands to leave out, e.g. 103-107,149-162,219 (added to "
                   "the ones the file flags)")
    p.add_argument("--nodata", type=float, default=None, help="value of missing pixels (default: the file's)")
    p.add_argument("--value-scale", type=float, default=None, help="raw value x this = reflectance, e.g. 1e-4 "
                   "(default: the file's scale, if it has one)")
    p.add_argument("--masks", default=None, help="EnMAP quality layers whose flagged pixels become nodata, "
                   f"comma-separated: {', '.join(ENMAP_MASKS)}; or none (default: every one the product has)")
    p.add_argument("--class-names", default=None, help="comma-separated, or a text file with one name per line")
    p.add_argument("--sensor", default=None)
    p.add_argument("--force", action="store_true", help="replace the scene already in --out")
    common.add_debug_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    names = args.class_names
    if names and os.path.isfile(names):
        with open(names) as f:
            names = [line.strip() for line in f if line.strip()]
    elif names:
        names = [n.strip() for n in names.split(",")]
    nodata = args.nodata
    if nodata is not None and nodata.is_integer():
        nodata = int(nodata)
    masks = args.masks and [m for m in re.split(r"[,\s]+", args.masks.lower()) if m not in ("", "none")]
    meta = convert(args.src, args.out, args.gt, args.name, args.wavelengths, parse_band_list(args.bad_bands), nodata,
                   args.value_scale, names, args.sensor, args.force, masks)
    masked = meta["source"].get("masked_pixels")
    if masked:
        print(f"{args.out}: quality layers set to nodata: " + ", ".join(f"{k} {v} px" for k, v in masked.items()))
    ds = data.load_dataset(args.out)  # checks the scene and reports dropped bands
    H, W = ds.rasters[0].image.shape[1:]
    labelled = 0 if ds.rasters[0].label is None else int((np.asarray(ds.rasters[0].label) > 0).sum())
    wl = f", {ds.wavelengths[0]:.0f}-{ds.wavelengths[-1]:.0f} nm" if ds.wavelengths else ", wavelengths unknown"
    print(f"{args.out}: {H}x{W} px, {ds.file_bands} bands ({ds.raw_bands} read{wl}), "
          f"{ds.num_classes} classes, {labelled} labelled pixels; nodata {meta['nodata']}, "
          f"value_scale {meta['value_scale']}")
    return ds


if __name__ == "__main__":
    common.run_cli(main)
