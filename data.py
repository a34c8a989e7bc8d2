"""Hyperspectral data: readers for WHU-OHS and scene folders, band validity (bad and all-nodata bands
dropped), per-band float32 normalisation, tiling, HSI augmentations, sparse-label splits and the
step-indexed loader every trainer uses. Other file formats (ENVI, MATLAB .mat, GeoTIFF products) are
converted to scene folders by formats.py.

Reflectance is never quantised and tiles are cut, never resized: a 64x64 training tile is a 64x64 window of
the 512x512 WHU-OHS tile. Decoded rasters are cached as .npy (or the TIFF itself is memory-mapped when it
is uncompressed), so the hot loop only slices memory maps.
"""
import ctypes
import hashlib
import json
import logging
import math
import mmap
import os
import signal
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import tifffile
import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -1
WHU_SPLITS = ("tr", "val", "ts")
WHU_BANDS = 32
WHU_WAVELENGTHS = [466, 480, 500, 520, 536, 550, 566, 580, 596, 610, 626, 640, 656, 670, 686, 700, 716, 730,
                   746, 760, 776, 790, 806, 820, 836, 850, 866, 880, 896, 910, 926, 940]
WHU_CLASS_NAMES = ["paddy field", "dry farm", "woodland", "shrubbery", "sparse woodland", "other forest land",
                   "high-covered grassland", "medium-covered grassland", "low-covered grassland", "river canal",
                   "lake", "reservoir pond", "beach land", "shoal", "urban built-up", "rural settlement",
                   "other construction land", "sand", "gobi", "saline-alkali soil", "marshland", "bare land",
                   "bare rock", "ocean"]
FILL_BELOW_REFLECTANCE = -0.1  # physically impossible: such pixels are fill values, not dark targets
STATS_MAX_RASTERS = 256        # mean/std from at most this many rasters (WHU-OHS has 4822 training tiles)
STATS_BLOCK_VALUES = 1 << 22   # values per block read for statistics (bounds the memory used)
WAVELENGTH_TOLERANCE_NM = 5.0  # a checkpoint's bands and the data's may differ this much (calibration drift)
FILE_EXTENSIONS = (".hdr", ".mat", ".tif", ".tiff", ".img", ".dat", ".bsq", ".bil", ".bip", ".raw", ".npy")


class DataError(ValueError):
    """Bad input data; the message names the file or folder and the problem."""


def print0(*args):
    """Print on rank 0 only (data.py does not depend on common.py)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def default_cache_dir():
    return os.environ.get("HSI_SSL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "hsi-ssl"))


# ----------------------------------------------------------------------------- reading

class RasterCache:
    """Memory-mapped rasters for one dataset folder, validated once. manifest.json remembers each file's
    size/mtime, shape and label maximum so later runs skip decoding and validation entirely."""

    def __init__(self, source, cache_dir):
        key = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:10]
        self.dir = os.path.join(cache_dir or default_cache_dir(), f"{os.path.basename(os.path.abspath(source))}-{key}")
        os.makedirs(self.dir, exist_ok=True)
        self.manifest_path = os.path.join(self.dir, "manifest.json")
        self.manifest = _read_json(self.manifest_path) or {}
        self.dirty = False

    def open(self, path, label=False):
        """(C, H, W) image or (H, W) label as a read-only memory map."""
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        st = os.stat(path)
        sig = [st.st_size, st.st_mtime_ns]
        key = os.path.abspath(path)
        entry = self.manifest.get(key)
        if entry is None or entry["sig"] != sig or (entry["npy"] and not os.path.isfile(entry["npy"])):
            entry = self._build(path, sig, label)
            self.manifest[key], self.dirty = entry, True
        if entry["npy"]:
            return without_fd(np.load(entry["npy"], mmap_mode="r")), entry
        return without_fd(tifffile.memmap(path, mode="r")), entry

    def _build(self, path, sig, label):
        try:
            with _tifffile_errors(path), tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                direct = series.axes in ("YX", "SYX", "QYX", "IYX") and _memmappable(series, path)
                arr = None if direct else series.asarray()
            if direct:
                arr = tifffile.memmap(path, mode="r")
        except DataError:
            raise
        except Exception as e:  # tifffile raises many types on corrupt or truncated files
            raise DataError(f"{path}: cannot read TIFF ({type(e).__name__}: {e})") from e
        if not label:
            if arr.ndim == 3 and series.axes.endswith("S") and series.axes != "SYX":
                arr = np.moveaxis(arr, -1, 0)  # (H, W, C) stored pixel-interleaved
            if arr.ndim != 3:
                raise DataError(f"{path}: expected a (bands, H, W) image, got shape {arr.shape}")
        elif arr.ndim != 2:
            raise DataError(f"{path}: expected a (H, W) label map, got shape {arr.shape}")
        entry = {"sig": sig, "shape": list(arr.shape), "npy": None}
        if label:
            if not np.issubdtype(arr.dtype, np.integer):
                raise DataError(f"{path}: label must be integer, got {arr.dtype}")
            entry["label_min"], entry["label_max"] = int(arr.min()), int(arr.max())
            arr = arr.astype(np.uint8) if entry["label_min"] >= 0 and entry["label_max"] < 256 else arr
        if not direct:
            npy = os.path.join(self.dir, hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16] + ".npy")
            tmp = npy + f".{os.getpid()}.tmp.npy"
            np.save(tmp, np.ascontiguousarray(arr))
            os.replace(tmp, npy)  # atomic, so concurrent DDP ranks can race safely
            entry["npy"] = npy
        return entry

    def signature(self, path):
        return self.manifest[os.path.abspath(path)]["sig"]

    def save(self):
        if self.dirty:
            _write_json(self.manifest_path, self.manifest)
            self.dirty = False


def without_fd(mm):
    """The read-only np.memmap `mm` mapped again by libc's mmap, keeping no file descriptor open: Python's
    mmap holds one per map, and WHU-OHS's ~10k rasters (image + label per tile) would pass the usual limit
    of 1024 open files. The map is released when the last array using it is gone. Where libc has no mmap
    (Windows) or the array is not C-ordered, `mm` itself."""
    libc = _libc()
    if libc is None or not mm.flags.c_contiguous or mm.size == 0:
        return mm
    start = mm.offset - mm.offset % mmap.ALLOCATIONGRANULARITY
    length = mm.offset - start + mm.nbytes
    fd = os.open(mm.filename, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    finally:
        os.close(fd)  # the map stays valid without it
    if addr is None or addr == ctypes.c_void_p(-1).value:
        raise OSError(ctypes.get_errno(), f"{mm.filename}: mmap failed")
    buffer = (ctypes.c_char * length).from_address(addr)
    weakref.finalize(buffer, libc.munmap, addr, length)
    arr = np.frombuffer(buffer, mm.dtype, mm.size, mm.offset - start).reshape(mm.shape)
    arr.flags.writeable = False
    return arr


_LIBC = []


def _libc():
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.mmap.restype = ctypes.c_void_p
            libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                  ctypes.c_int64]
            libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        except (OSError, AttributeError):
            libc = None
        _LIBC.append(libc)
    return _LIBC[0]


@contextmanager
def _tifffile_errors(path):
    """tifffile logs (rather than raises) many problems with truncated files and returns partial data;
    turn any such error into a DataError naming the file."""
    errors = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: errors.append(record.getMessage())
    logger = logging.getLogger("tifffile")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if errors:
        raise DataError(f"{path}: corrupt or truncated TIFF ({errors[0]})")


def _memmappable(series, path):
    """Uncompressed, contiguous TIFF data can be memory-mapped in place (no cache copy)."""
    offset, nbytes = series.dataoffset, series.nbytes
    if offset is None:
        return False
    if offset + nbytes > os.path.getsize(path):
        raise DataError(f"{path}: truncated TIFF (data ends at byte {offset + nbytes}, file has "
                        f"{os.path.getsize(path)})")
    return True


def _read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _write_json(path, obj):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- datasets

@dataclass
class Raster:
    path: str
    image: np.ndarray             # (C, H, W) raw values, memory-mapped
    label: np.ndarray = None      # (H, W) raw labels (0 = unlabelled, 1..K), or None


@dataclass
class HSIDataset:
    """Rasters sharing one band set and one normalisation: a scene, or a split of WHU-OHS."""
    name: str
    rasters: list
    num_classes: int
    class_names: list
    wavelengths: list = None      # nm, one per band read (band_ids), or None when unknown
    value_scale: float = None     # raw value x value_scale = reflectance; None when unknown
    nodata: float = None
    signed_view: bool = False     # WHU-OHS uint16 files hold int16 reflectance: view, never wrap
    kind: str = "scene"           # "scene" (one raster, sparse labels) or "whu" (tiles with dense labels)
    band_ids: list = None         # the file's bands that are read (0-based), bad and all-nodata ones left out
    mean: np.ndarray = field(default=None, repr=False)
    std: np.ndarray = field(default=None, repr=False)
    pca: np.ndarray = field(default=None, repr=False)  # (k, C) projection of normalised bands, see fit_pca

    @property
    def file_bands(self):
        return self.rasters[0].image.shape[0]

    @property
    def raw_bands(self):
        """Bands read from the file (bad and all-nodata ones dropped), before any PCA."""
        return self.file_bands if self.band_ids is None else len(self.band_ids)

    @property
    def bands(self):
        """Channels a model sees: the raw bands, or the principal components with PCA."""
        return self.raw_bands if self.pca is None else self.pca.shape[0]

    @property
    def band_info(self):
        """What a checkpoint records about its input (build_backbone(bands=...)), so that the next product
        of the same sensor is read with the same bands: the file's band indices and their wavelengths."""
        ids = list(range(self.file_bands)) if self.band_ids is None else [int(i) for i in self.band_ids]
        return {"ids": ids, "wavelengths": None if self.wavelengths is None else [float(w) for w in self.wavelengths]}

    def read(self, index, y0, y1, x0, x1):
        """Raw values of the bands read, (C, y1 - y0, x1 - x0), from raster `index`."""
        image = self.rasters[index].image
        if self.band_ids is None or len(self.band_ids) == image.shape[0]:
            return image[:, y0:y1, x0:x1]
        return image[np.asarray(self.band_ids), y0:y1, x0:x1]

    def physical(self, raw, out=None, per_value=False):
        """Raw values -> float32 (reflectance where the scale is known), written into `out`, and a (H, W)
        mask of valid pixels (None when all are valid, the common case, to skip the masking). A pixel is
        invalid when any band read is nodata, NaN/inf or fill (reflectance below -0.1). per_value=True:
        the mask is (C, H, W) of *invalid values* instead (None when there are none)."""
        if self.signed_view and raw.dtype == np.uint16:
            raw = raw.view(np.int16)
        out = np.empty(raw.shape, np.float32) if out is None else out
        np.copyto(out, raw, casting="unsafe")
        invalid = None
        if self.nodata is not None:
            invalid = raw == self.nodata
        if raw.dtype.kind == "f":
            nonfinite = ~np.isfinite(raw)
            invalid = nonfinite if invalid is None else invalid | nonfinite
        if self.value_scale is not None:
            out *= self.value_scale
            fill = out < FILL_BELOW_REFLECTANCE
            invalid = fill if invalid is None else invalid | fill
        if invalid is None or not invalid.any():
            return out, None
        return out, (invalid if per_value else ~invalid.any(0))

    def crop(self, index, y, x, h, w):
        """A (C, h, w) float32 window in physical units and its (h, w) int64 labels (IGNORE_INDEX where
        unlabelled or invalid). Invalid pixels, and windows reaching past the border, get the band means."""
        r = self.rasters[index]
        _, H, W = r.image.shape
        C = self.raw_bands
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
        img = np.empty((C, h, w), np.float32)
        lab = np.full((h, w), IGNORE_INDEX, np.int64)
        if (y0, x0, y1, x1) != (y, x, y + h, x + w):
            img[:] = self.mean[:, None, None]
        if y1 <= y0 or x1 <= x0:
            return img, lab
        sub = img[:, y0 - y:y1 - y, x0 - x:x1 - x]
        _, valid = self.physical(self.read(index, y0, y1, x0, x1), out=sub)
        if valid is not None:
            sub[:, ~valid] = self.mean[:, None]
        if r.label is not None:
            sub_lab = lab[y0 - y:y1 - y, x0 - x:x1 - x]
            sub_lab[:] = r.label[y0:y1, x0:x1]
            sub_lab -= 1  # raw 0 = unlabelled -> IGNORE_INDEX, raw k -> class k-1
            if valid is not None:
                sub_lab[~valid] = IGNORE_INDEX
        return img, lab

    def normalize(self, img):
        """(x - mean) / std per band, in place; with PCA then projected to (k, h, w) components."""
        img -= self.mean[:, None, None]
        img *= (1 / self.std)[:, None, None]
        if self.pca is not None:
            img = np.einsum("kc,chw->khw", self.pca, img, optimize=True).astype(np.float32)
        return img


def load_datasets(spec, split="tr", cache_dir=None, bands=None):
    """`spec`: one folder or a comma-separated list; each a WHU-OHS root or a scene folder. `bands`: a
    checkpoint's band_info, to read exactly the bands it was trained on. Without it, several products of
    one sensor (same band count in the file) whose dead bands differ are all read with the bands valid in
    every one of them, so that one model reads them all."""
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    if not paths:
        raise DataError("--data is empty")
    datasets = [load_dataset(p, split, cache_dir, bands) for p in paths]
    if bands is None:
        for group in _same_file_bands(datasets):
            shared = sorted(set.intersection(*(set(datasets[i].band_info["ids"]) for i in group)))
            if all(datasets[i].band_info["ids"] == shared for i in group):
                continue
            names = ", ".join(datasets[i].name for i in group)
            if not shared:
                raise DataError(f"{spec}: {names} have no band that is valid in all of them")
            why = f"the bands valid in all of {names}"
            for i in group:
                datasets[i] = load_dataset(paths[i], split, cache_dir, {"ids": shared, "wavelengths": None}, why)
    return datasets


def _same_file_bands(datasets):
    groups = {}
    for i, ds in enumerate(datasets):
        groups.setdefault(ds.file_bands, []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def load_dataset(path, split="tr", cache_dir=None, bands=None, why="the checkpoint's band list"):
    """A WHU-OHS split or a scene folder. `bands` (a checkpoint's band_info) fixes the bands read; `why`
    says where that list comes from in the printed line."""
    if os.path.isfile(path) and path.lower().endswith(FILE_EXTENSIONS):
        raise DataError(f"{path}: a file, not a scene folder; convert it first: "
                        f"python formats.py {path} --out <scene folder> (README: Bring your own scene)")
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such folder")
    if os.path.isfile(os.path.join(path, "image.tif")):
        return load_scene(path, cache_dir, bands, why)
    if any(os.path.isdir(os.path.join(path, s)) for s in WHU_SPLITS):
        return load_whu(path, split, cache_dir, bands, why)
    raise DataError(f"{path}: neither a scene folder (image.tif) nor a WHU-OHS root (tr/ val/ ts/)")


def read_meta(path):
    """A scene's meta.json (README: Bring your own scene), its fields type-checked; {} when absent."""
    if not os.path.isfile(path):
        return {}
    try:
        meta = _read_json(path)
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    number = (int, float)
    for key, ok, what in [("nodata", lambda v: isinstance(v, number), "a number"),
                          ("value_scale", lambda v: isinstance(v, number) and v > 0, "a positive number"),
                          ("wavelengths_nm", lambda v: isinstance(v, list) and all(isinstance(x, number) for x in v),
                           "a list of numbers"),
                          ("fwhm_nm", lambda v: isinstance(v, list) and all(isinstance(x, number) for x in v),
                           "a list of numbers"),
                          ("bad_bands", lambda v: isinstance(v, list) and all(isinstance(x, int) for x in v),
                           "a list of 0-based band indices"),
                          ("class_names", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
                           "a list of strings")]:
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not ok(v)):
            raise DataError(f"{path}: {key} must be {what} or null, got {json.dumps(v)[:80]}")
    return meta


def _per_band(meta, key, meta_path, bands, bad):
    """meta[key] (wavelengths_nm, fwhm_nm) as one value per band of the file: it may list every band, or
    only the bands left after bad_bands (then the bad ones get None)."""
    v = meta.get(key)
    if v is None or len(v) == bands:
        return v
    if bad and len(v) == bands - len(bad):
        it = iter(v)
        return [None if b in bad else next(it) for b in range(bands)]
    after = f" ({bands - len(bad)} after dropping the {len(bad)} bad_bands)" if bad else ""
    raise DataError(f"{meta_path}: {len(v)} {key} for an image with {bands} bands{after}")


def load_scene(path, cache_dir=None, bands=None, why="the checkpoint's band list"):
    meta_path = os.path.join(path, "meta.json")
    meta = read_meta(meta_path)
    cache = RasterCache(path, cache_dir)
    image_path = os.path.join(path, "image.tif")
    image, _ = cache.open(image_path)
    gt_path, label, num_classes = os.path.join(path, "gt.tif"), None, 0
    names = list(meta.get("class_names") or [])
    if os.path.isfile(gt_path):
        label, entry = cache.open(gt_path, label=True)
        _check_label(gt_path, entry, image.shape[1:], len(names) or 255)
        num_classes = len(names) or entry["label_max"]
        names = names or [f"class {i + 1}" for i in range(num_classes)]
    cache.save()
    bad = sorted(set(meta.get("bad_bands") or []))
    if bad and (bad[0] < 0 or bad[-1] >= image.shape[0]):
        raise DataError(f"{meta_path}: bad_bands must be 0-based band indices 0 .. {image.shape[0] - 1}, "
                        f"got {bad[0] if bad[0] < 0 else bad[-1]}")
    wl = _per_band(meta, "wavelengths_nm", meta_path, image.shape[0], bad)
    _per_band(meta, "fwhm_nm", meta_path, image.shape[0], bad)
    ds = HSIDataset(meta.get("name") or os.path.basename(os.path.abspath(path)),
                    [Raster(image_path, image, label)], num_classes, names, wl,
                    meta.get("value_scale"), meta.get("nodata"))
    choose_bands(ds, cache, bad, bands, why)
    return ds


def load_whu(root, split="tr", cache_dir=None, bands=None, why="the checkpoint's band list"):
    if split not in WHU_SPLITS:
        raise DataError(f"{root}: WHU-OHS split must be one of {WHU_SPLITS}, got {split!r}")
    cache = RasterCache(root, cache_dir)
    ds = _whu_split(root, split, cache)
    # Every split is normalised with the training split's statistics (and reads the training split's bands).
    stats_from = ds if split == "tr" else _whu_split(root, "tr", cache)
    choose_bands(stats_from, cache, (), bands, why)
    for attr in ("band_ids", "wavelengths", "mean", "std"):
        setattr(ds, attr, getattr(stats_from, attr))
    cache.save()
    return ds


def _whu_split(root, split, cache):
    img_dir, lab_dir = os.path.join(root, split, "image"), os.path.join(root, split, "label")
    for d in (img_dir, lab_dir):
        if not os.path.isdir(d):
            raise DataError(f"{d}: missing folder (expected WHU-OHS layout {split}/image and {split}/label)")
    names = sorted(f for f in os.listdir(img_dir) if f.lower().endswith((".tif", ".tiff")))
    if not names:
        raise DataError(f"{img_dir}: no .tif files")
    rasters = []
    for name in names:
        img_path, lab_path = os.path.join(img_dir, name), os.path.join(lab_dir, name)
        image, _ = cache.open(img_path)
        if image.shape[0] != WHU_BANDS:
            raise DataError(f"{img_path}: {image.shape[0]} bands, WHU-OHS has {WHU_BANDS}")
        if not os.path.isfile(lab_path):
            raise DataError(f"{lab_path}: missing label for {img_path}")
        label, entry = cache.open(lab_path, label=True)
        _check_label(lab_path, entry, image.shape[1:], len(WHU_CLASS_NAMES))
        rasters.append(Raster(img_path, image, label))
    return HSIDataset(f"whu-ohs/{split}", rasters, len(WHU_CLASS_NAMES), WHU_CLASS_NAMES, WHU_WAVELENGTHS,
                      value_scale=1e-4, signed_view=True, kind="whu")


def _check_label(path, entry, image_hw, num_classes):
    if tuple(entry["shape"]) != tuple(image_hw):
        raise DataError(f"{path}: label is {tuple(entry['shape'])} but the image is {tuple(image_hw)}")
    if entry["label_min"] < 0 or entry["label_max"] > num_classes:
        raise DataError(f"{path}: label values must be 0 (unlabelled) .. {num_classes}, "
                        f"found {entry['label_min']} .. {entry['label_max']}")


# ----------------------------------------------------------------------------- band validity and statistics

def choose_bands(ds, cache, bad_bands=(), bands=None, why="the checkpoint's band list"):
    """Decide which of the file's bands ds reads and their per-band mean/std over valid pixels; sets
    ds.band_ids, ds.wavelengths (of those bands), ds.mean and ds.std. Cached beside the rasters.

    Without `bands`: every band except those flagged in `bad_bands` and those with no valid value at all
    (nodata, NaN or fill in every pixel: a dead band, normal in a product, not an error), and one printed
    line names the dropped bands. A pixel is then invalid only when a band that is read is invalid there.
    With `bands` (a checkpoint's band_info): exactly those bands; one of them without a valid value is an
    error, and wavelengths more than WAVELENGTH_TOLERANCE_NM away from the checkpoint's get a warning."""
    C, bad = ds.file_bands, sorted(set(bad_bands))
    if bands is not None and not all(0 <= i < C for i in bands["ids"]):
        # Another sensor: read the data's own bands; the caller's band count check says what does not fit.
        print0(f"warning: {ds.name}: {why} reads bands up to {max(bands['ids'])}, but this data has {C}; "
               "reading its own bands")
        bands = None
    own = [b for b in range(C) if b not in set(bad)]  # before dropping dead bands
    if bands is None and not own:
        raise DataError(f"{ds.name}: bad_bands flags all {C} bands")
    ids = own if bands is None else [int(i) for i in bands["ids"]]
    rasters = list(range(len(ds.rasters)))
    if len(rasters) > STATS_MAX_RASTERS:
        rasters = sorted(np.random.default_rng(0).choice(len(rasters), STATS_MAX_RASTERS, replace=False).tolist())
    paths = [ds.rasters[i].path for i in rasters]

    def cache_path(ids, auto):
        key = [cache.signature(p) for p in paths] + paths + [ds.value_scale, ds.nodata, ids, auto]
        return os.path.join(cache.dir, f"bands-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]}.json")
    path = cache_path(own, True)
    cached = _read_json(path) if own else None
    if bands is not None and (cached is None or cached["band_ids"] != ids):  # not the data's own band list
        path = cache_path(ids, False)
        cached = _read_json(path)
    if cached is None:
        cached = _band_stats(ds, rasters, ids, bands is None, why)
        _write_json(path, cached)
    wl_all = ds.wavelengths
    ds.band_ids = cached["band_ids"]
    ds.wavelengths = None if wl_all is None else [wl_all[i] for i in ds.band_ids]
    if ds.wavelengths is not None and None in ds.wavelengths:  # a bad band the checkpoint reads has none
        ds.wavelengths = None
    std = np.asarray(cached["std"], np.float32)
    ds.mean, ds.std = np.asarray(cached["mean"], np.float32), np.where(std > 0, std, 1).astype(np.float32)
    _report_bands(ds, C, bad, cached, wl_all, bands, why)


def _band_stats(ds, rasters, ids, auto, why):
    """Scan the rasters: mean/std of the bands `ids` over valid pixels; with `auto`, bands without a valid
    value are dropped first (then a second scan)."""
    s1, s2, n, good, total = _scan(ds, rasters, ids)
    dead = [b for b, g in zip(ids, good) if g == 0]
    if dead and not auto:
        raise DataError(f"{ds.name}: band{'s' if len(dead) > 1 else ''} {_describe(dead, ds.wavelengths)} "
                        f"{'have' if len(dead) > 1 else 'has'} no valid value here (nodata or NaN in every pixel), "
                        f"but this data is read with {why}, which includes {'them' if len(dead) > 1 else 'it'}")
    if dead:
        ids = [b for b in ids if b not in set(dead)]
        if not ids:
            raise DataError(f"{ds.name}: every band is nodata or NaN in every pixel (nodata = {ds.nodata})")
        s1, s2, n, good, total = _scan(ds, rasters, ids)
    if n == 0:
        worst = np.argsort(good, kind="stable")[:5]
        raise DataError(f"{ds.name}: no valid pixels to compute band statistics from: every pixel is nodata or NaN "
                        "in at least one band; the sparsest bands are "
                        + ", ".join(f"{ids[i]} ({100 * good[i] / total:.1f}% valid)" for i in worst)
                        + "; list bands to leave out in bad_bands (meta.json)")
    median = np.median(good)
    sparse = [b for b, g in zip(ids, good) if g < 0.5 * median]  # nearly dead: they mask most pixels
    mean = s1 / n
    std = np.sqrt(np.maximum(s2 / n - mean ** 2, 0))
    return {"band_ids": ids, "dead": dead, "sparse": sparse, "mean": mean.tolist(), "std": std.tolist(),
            "pixels": int(n), "of_pixels": int(total)}


def _scan(ds, rasters, ids):
    """Sums over the valid pixels of the bands `ids`, their count, each band's count of valid values and
    the number of pixels scanned."""
    view = replace(ds, band_ids=ids, pca=None)
    s1, s2, good = np.zeros(len(ids)), np.zeros(len(ids)), np.zeros(len(ids), np.int64)
    n = total = 0
    for i in rasters:
        _, H, W = ds.rasters[i].image.shape
        rows = max(1, STATS_BLOCK_VALUES // (len(ids) * W))  # row blocks bound the memory used
        for y in range(0, H, rows):
            x, invalid = view.physical(np.asarray(view.read(i, y, min(y + rows, H), 0, W)), per_value=True)
            total += x.shape[1] * x.shape[2]
            if invalid is None:
                good += x.shape[1] * x.shape[2]
                v = x.reshape(x.shape[0], -1)
            else:
                good += (~invalid).sum((1, 2))
                v = x[:, ~invalid.any(0)]
            v = v.astype(np.float64)
            s1, s2, n = s1 + v.sum(1), s2 + (v * v).sum(1), n + v.shape[1]
    return s1, s2, n, good, total


def _report_bands(ds, C, bad, cached, wl_all, bands, why):
    """The one printed line about dropped bands (and warnings about nearly dead or shifted bands)."""
    kept = set(cached["band_ids"])
    if bands is None:
        parts = [f"in bad_bands {_describe(bad, wl_all)}"] if bad else []
        parts += [f"nodata or NaN in every pixel {_describe(cached['dead'], wl_all)}"] if cached["dead"] else []
        if parts:
            print0(f"{ds.name}: dropped {C - len(kept)} of {C} bands (0-based) - {'; '.join(parts)} - "
                   f"reading {len(kept)} bands")
    elif len(kept) < C:
        print0(f"{ds.name}: reading {len(kept)} of {C} bands ({why}); not read (0-based): "
               f"{_describe([b for b in range(C) if b not in kept], wl_all)}")
    if cached["sparse"]:
        print0(f"warning: {ds.name}: band(s) {_describe(cached['sparse'], wl_all)} are valid in less than half as "
               f"many pixels as the typical band; only {100 * cached['pixels'] / cached['of_pixels']:.1f}% of the "
               "pixels are valid. List such bands in bad_bands (meta.json) to keep the other pixels")
    theirs = None if bands is None else bands.get("wavelengths")
    if theirs is not None and ds.wavelengths is not None:
        shift = np.abs(np.asarray(theirs, float) - np.asarray(ds.wavelengths, float))
        if shift.max() > WAVELENGTH_TOLERANCE_NM:
            i = int(shift.argmax())
            print0(f"warning: {ds.name}: band {ds.band_ids[i]} is at {ds.wavelengths[i]:.1f} nm but the checkpoint's "
                   f"is at {theirs[i]:.1f} nm: is this the same sensor?")


def _describe(ids, wavelengths=None):
    """[3, 4, 5, 9] -> '3-5 (1350-1370 nm), 9 (1400 nm)': runs of band indices with their wavelengths."""
    runs = []
    for b in sorted(ids):
        if runs and b == runs[-1][1] + 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    out = []
    for a, b in runs:
        text = f"{a}" if a == b else f"{a}-{b}"
        if wavelengths is not None and wavelengths[a] is not None and wavelengths[b] is not None:
            text += f" ({wavelengths[a]:.0f} nm)" if a == b else f" ({wavelengths[a]:.0f}-{wavelengths[b]:.0f} nm)"
        out.append(text)
    return ", ".join(out)


def check_same_bands(datasets, backbone):
    counts = {d.name: d.bands for d in datasets}
    if len(set(counts.values())) > 1:
        raise DataError(f"backbone '{backbone}' needs one band count, but the datasets differ: {counts}")
    return datasets[0].bands


def display_bands(ds, false_colour=False):
    """Three band indices: true colour (670/566/480 nm) or false colour (840/670/566 nm, vegetation
    red); spread over the bands when wavelengths are unknown."""
    if ds.wavelengths:
        wl = np.asarray(ds.wavelengths)
        return [int(np.abs(wl - t).argmin()) for t in ((840, 670, 566) if false_colour else (670, 566, 480))]
    c = ds.raw_bands
    return [c - 1, c // 2, c // 4] if false_colour else [3 * c // 4, c // 2, c // 4]


def fit_pca(ds, components, mask=None, max_pixels=200_000, seed=0):
    """The study's band reduction: a (components, C) projection of the normalised bands onto their
    leading principal components, each scaled to unit variance, fitted on training pixels only (the
    pixels where mask (H, W) is True for a scene's split; a sample of all pixels of a training set
    otherwise). Returns (projection, explained variance share of each component)."""
    if not 0 < components <= ds.raw_bands:
        raise DataError(f"{ds.name}: --pca {components} must be between 1 and the {ds.raw_bands} bands")
    rng = np.random.default_rng(seed)
    rasters = rng.permutation(len(ds.rasters))[:64]  # WHU-OHS: a sample of the training tiles
    rows = []
    for i in rasters:
        H, W = ds.rasters[i].image.shape[1:]
        where = np.flatnonzero(mask) if mask is not None else np.arange(H * W)
        where = rng.choice(where, min(len(where), max_pixels // len(rasters)), replace=False)
        img = (ds.crop(i, 0, 0, H, W)[0] - ds.mean[:, None, None]) / ds.std[:, None, None]
        rows.append(img.reshape(img.shape[0], -1)[:, where].T)
    x = np.concatenate(rows).astype(np.float64)
    if len(x) < components:
        raise DataError(f"{ds.name}: {len(x)} training pixels cannot fit {components} components")
    x -= x.mean(0)
    eigval, eigvec = np.linalg.eigh(x.T @ x / len(x))
    order = np.argsort(eigval)[::-1][:components]
    projection = (eigvec[:, order] / np.sqrt(np.maximum(eigval[order], 1e-12))).T
    return projection.astype(np.float32), eigval[order] / eigval.sum()


# ----------------------------------------------------------------------------- augmentations

def dihedral(arrays, rng):
    """The same random rot90 / flip on the last two axes of every array."""
    k, flip = int(rng.integers(4)), rng.random() < 0.5
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(-2, -1))
        out.append(np.ascontiguousarray(a[..., ::-1] if flip else a))
    return out


def random_resized_crop(img, lab, rng, out_size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """Crop a random region (area fraction in `scale`) and resize it to out_size: bilinear for the
    image, nearest for labels. An augmentation only: tiles themselves are always cut, never resized."""
    _, H, W = img.shape
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        h, w = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
        if 0 < h <= H and 0 < w <= W:
            break
    else:
        h, w = H, W
    y, x = int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1))
    t = torch.from_numpy(np.ascontiguousarray(img[:, y:y + h, x:x + w]))[None]
    img = F.interpolate(t, size=(out_size, out_size), mode="bilinear", align_corners=False,
                        antialias=h > out_size or w > out_size)[0].numpy()
    lt = torch.from_numpy(np.ascontiguousarray(lab[y:y + h, x:x + w]))[None, None].float()
    lab = F.interpolate(lt, size=(out_size, out_size), mode="nearest")[0, 0].long().numpy()
    return img, lab


def spectral_jitter(img, rng, brightness=0.0, contrast=0.0, band_gain=0.0):
    """Photometric jitter that makes sense for reflectance: a global illumination gain, a small per-band
    gain (calibration / atmosphere), and contrast around each band's spatial mean. No hue or grey-scale
    tricks: bands are not colours. Works in physical units, before normalisation."""
    C = img.shape[0]
    gain = rng.uniform(1 - brightness, 1 + brightness) * rng.uniform(1 - band_gain, 1 + band_gain, C)
    c = rng.uniform(1 - contrast, 1 + contrast)
    mean = img.mean(axis=(1, 2), keepdims=True)
    return ((mean + c * (img - mean)) * gain[:, None, None]).astype(np.float32)


def gaussian_blur(img, sigma):
    """Spatial Gaussian blur of every band, (C, H, W) float32; reflect padding."""
    radius = min(int(np.ceil(3 * sigma)), (min(img.shape[1:]) - 1) // 2)
    if radius < 1:
        return img
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = torch.from_numpy((k / k.sum()).astype(np.float32))
    x = torch.from_numpy(np.ascontiguousarray(img))[:, None]  # (C, 1, H, W): bands as a batch
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
    return x[:, 0].numpy()


def spectral_solarize(x, threshold=0.0):
    """Solarize for normalised HSI: values above the threshold (the band mean at 0) are mirrored below it,
    inverting bright parts of every band's range as RGB solarize inverts bright pixels."""
    return np.where(x > threshold, 2 * threshold - x, x).astype(np.float32)


@dataclass
class Augment:
    """The HSI augmentations every trainer uses; all off by default. Called on a tile in physical units,
    returns the normalised tensor and its labels."""
    flips: bool = False
    crop_scale: tuple = None      # random resized crop area range, None = off
    brightness: float = 0.0
    contrast: float = 0.0
    band_gain: float = 0.0

    def __call__(self, img, lab, rng, normalize):
        if self.flips:
            img, lab = dihedral([img, lab], rng)
        if self.crop_scale is not None:
            img, lab = random_resized_crop(img, lab, rng, img.shape[-1], self.crop_scale)
        if self.brightness or self.contrast or self.band_gain:
            img = spectral_jitter(img, rng, self.brightness, self.contrast, self.band_gain)
        return torch.from_numpy(normalize(img)), torch.from_numpy(lab)


DIHEDRAL = torch.tensor([[[a, 0], [0, b]] for a in (1, -1) for b in (1, -1)]
                        + [[[0, a], [b, 0]] for a in (1, -1) for b in (1, -1)], dtype=torch.float32)  # (8, 2, 2)


def batch_augment(x, generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flips=True):
    """MAE's augmentation on the device, for when CPU workers cannot feed the GPU: per sample a random
    resized crop and a random rot90/flip, as one affine resampling of the batch (B, C, H, W) (bilinear,
    border padding). Same distributions as `random_resized_crop` and `dihedral`, different draws."""
    B, dev = x.shape[0], x.device
    u = torch.rand(B, 4, generator=generator, device=dev)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    w, h = (area * log_r.exp()).sqrt().clamp(max=1), (area / log_r.exp()).sqrt().clamp(max=1)  # side fractions
    theta = torch.zeros(B, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 1, 1] = w, h
    theta[:, 0, 2], theta[:, 1, 2] = (2 * u[:, 2] - 1) * (1 - w), (2 * u[:, 3] - 1) * (1 - h)
    if flips:
        k = torch.randint(0, 8, (B,), generator=generator, device=dev)
        theta[:, :, :2] = theta[:, :, :2] @ DIHEDRAL.to(dev)[k]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class MultiCrop:
    """DINO's multi-crop for HSI: 2 global and n_local local views of one tile, each a random resized crop
    with flips, spectral jitter (p=0.8) and blur; the second global view may be spectrally solarized.
    Returns ((2, C, G, G), (n_local, C, L, L)) normalised views."""
    global_size: int = 64
    local_size: int = 32
    n_local: int = 4
    global_scale: tuple = (0.32, 1.0)
    local_scale: tuple = (0.05, 0.32)
    brightness: float = 0.2
    contrast: float = 0.2
    band_gain: float = 0.05
    blur_sigma: tuple = (0.1, 2.0)

    def view(self, img, lab, rng, normalize, size, scale, blur_p, solarize_p):
        v, _ = random_resized_crop(img, lab, rng, size, scale)
        v = dihedral([v], rng)[0]
        if rng.random() < 0.8:
            v = spectral_jitter(v, rng, self.brightness, self.contrast, self.band_gain)
        if rng.random() < blur_p:
            v = gaussian_blur(v, rng.uniform(*self.blur_sigma))
        v = normalize(np.ascontiguousarray(v, dtype=np.float32))
        if rng.random() < solarize_p:
            v = spectral_solarize(v)
        return torch.from_numpy(v)

    def __call__(self, img, lab, rng, normalize):
        g = [self.view(img, lab, rng, normalize, self.global_size, self.global_scale, 1.0, 0.0),
             self.view(img, lab, rng, normalize, self.global_size, self.global_scale, 0.1, 0.2)]
        local = [self.view(img, lab, rng, normalize, self.local_size, self.local_scale, 0.5, 0.0)
                 for _ in range(self.n_local)]
        local = torch.stack(local) if local else torch.zeros(0, img.shape[0], self.local_size, self.local_size)
        return (torch.stack(g), local), torch.from_numpy(lab)


def block_mask(h, w, num_masked, rng, min_block=4, aspect=(0.3, 1 / 0.3)):
    """BEiT-style block-wise mask of exactly num_masked of the h x w patches: random rectangles first,
    then single patches to reach the exact count (small grids rarely fit the last block)."""
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


def ibot_masks(batch, h, w, rng, ratio=(0.1, 0.5), probability=0.5):
    """(batch, h*w) bool: a `probability` share of the images masked, their ratios stratified over
    `ratio` (one draw per equal-width bin, as DINOv2 does), the other images unmasked; order shuffled."""
    n = h * w
    n_masked = int(batch * probability)
    edges = np.linspace(*ratio, n_masked + 1)
    masks = [block_mask(h, w, int(round(n * rng.uniform(edges[i], edges[i + 1]))), rng).ravel()
             for i in range(n_masked)]
    masks += [np.zeros(n, bool)] * (batch - n_masked)
    return np.stack(masks)[rng.permutation(batch)]


def spectral_masks(n, groups, rng, ratio=(0.1, 0.5), probability=0.5):
    """(n, groups) boolean iBOT masks over band-group tokens: a `probability` share of the rows hides a
    random subset of round(U(ratio) * groups) groups (at least one), the others hide nothing."""
    masks = np.zeros((n, groups), dtype=bool)
    for row in np.flatnonzero(rng.random(n) < probability):
        k = max(1, int(round(rng.uniform(*ratio) * groups)))
        masks[row, rng.choice(groups, size=k, replace=False)] = True
    return masks


# ----------------------------------------------------------------------------- tiling

class RandomTiles(torch.utils.data.Dataset):
    """Random size x size windows cut from all rasters of all datasets (rasters drawn in proportion to
    their area), passed through `augment` (Augment, MultiCrop: anything mapping (img, lab, rng, normalize)
    to (x, y)). Item i is a pure function of (seed, i), so any number of workers and any resume point
    give the same samples."""

    def __init__(self, datasets, size, seed=0, augment=None, min_labelled=0):
        self.datasets, self.size, self.seed, self.augment = datasets, size, seed, augment or Augment()
        self.min_labelled = min_labelled
        self.index = [(d, r) for d, ds in enumerate(datasets) for r in range(len(ds.rasters))]
        areas = np.array([np.prod(datasets[d].rasters[r].image.shape[1:]) for d, r in self.index], float)
        self.cum = np.cumsum(areas / areas.sum())

    def __len__(self):
        return 2 ** 62  # endless: the step-indexed sampler decides what is read

    def __getitem__(self, i):
        rng = np.random.default_rng((self.seed, i))
        for _ in range(100):  # redraw windows without labels when labels are asked for
            d, r = self.index[min(int(np.searchsorted(self.cum, rng.random())), len(self.index) - 1)]
            ds = self.datasets[d]
            _, H, W = ds.rasters[r].image.shape
            y, x = int(rng.integers(max(H - self.size, 0) + 1)), int(rng.integers(max(W - self.size, 0) + 1))
            img, lab = ds.crop(r, y, x, self.size, self.size)
            if (lab != IGNORE_INDEX).sum() >= self.min_labelled:
                break
        x, y = self.augment(img, lab, rng, ds.normalize)
        return x, y, d


def grid_windows(H, W, size, overlap):
    """Top-left corners of size x size windows covering H x W with at least `overlap` px overlap; the
    last row/column is aligned with the border. Images smaller than a window get one (padded) window."""
    stride = size - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the window {size}")

    def starts(n):
        if n <= size:
            return [0]
        return sorted(set(list(range(0, n - size, stride)) + [n - size]))
    return [(y, x) for y in starts(H) for x in starts(W)]


class GridTiles(torch.utils.data.Dataset):
    """Deterministic overlapping windows over every raster (or the listed ones), for evaluation: yields
    the normalised window, its labels and where it came from (raster index, y, x)."""

    def __init__(self, ds, size, overlap, rasters=None):
        self.ds, self.size = ds, size
        rasters = range(len(ds.rasters)) if rasters is None else rasters
        self.items = [(r, y, x) for r in rasters for y, x in grid_windows(*ds.rasters[r].image.shape[1:], size, overlap)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        r, y, x = self.items[i]
        img, lab = self.ds.crop(r, y, x, self.size, self.size)
        return torch.from_numpy(self.ds.normalize(img)), torch.from_numpy(lab), torch.tensor([r, y, x])


class StepBatches(torch.utils.data.Sampler):
    """Batch indices by step: step s, rank r reads items [(s*world + r)*B, ... + B). Resuming at step s
    reads exactly what the uninterrupted run would have read."""

    def __init__(self, batch_size, start_step=0, rank=0, world=1):
        self.B, self.start, self.rank, self.world = batch_size, start_step, rank, world

    def __iter__(self):
        step = self.start
        while True:
            base = (step * self.world + self.rank) * self.B
            yield list(range(base, base + self.B))
            step += 1


def step_loader(dataset, batch_size, start_step, rank, world, workers, device):
    """workers=None: 4 per process on GPU; none on CPU, where workers only steal the model's cores."""
    workers = (4 if device.type == "cuda" else 0) if workers is None else workers
    # Own generator: otherwise creating the iterator draws from the global torch RNG, which would make a
    # resumed run's masks differ from the uninterrupted run's.
    return torch.utils.data.DataLoader(dataset, batch_sampler=StepBatches(batch_size, start_step, rank, world),
                                       generator=torch.Generator(),
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       persistent_workers=workers > 0, prefetch_factor=4 if workers else None)


# ----------------------------------------------------------------------------- sparse-label splits

def sparse_split(labels, seed, per_class=None, fraction=None):
    """Train/test masks over labelled pixels: `per_class` pixels (at most half of a small class) or a
    `fraction` (at least one) of each class go to train, every other labelled pixel to test.
    labels: (H, W) int with IGNORE_INDEX for unlabelled."""
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of per_class and fraction")
    rng = np.random.default_rng(seed)
    train = np.zeros(labels.shape, bool)
    flat = labels.ravel()
    for c in np.unique(flat[flat != IGNORE_INDEX]):
        idx = np.flatnonzero(flat == c)
        n = min(per_class, len(idx) // 2) if per_class is not None else max(1, round(fraction * len(idx)))
        train.ravel()[rng.choice(idx, n, replace=False)] = True
    return train, (labels != IGNORE_INDEX) & ~train


def save_split(path, train, test, **info):
    np.savez_compressed(path, train=train, test=test, info=json.dumps(info))


def load_split(path, shape):
    """(train mask, test mask, info) of a split saved by save_split; info holds e.g. the kept `classes`."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no saved split")
    z = np.load(path)
    if z["train"].shape != tuple(shape):
        raise DataError(f"{path}: split is {z['train'].shape} but the scene is {tuple(shape)}")
    return z["train"], z["test"], json.loads(str(z["info"]))


def scene_labels(ds):
    """The scene's (H, W) int64 labels with IGNORE_INDEX for unlabelled pixels."""
    r = ds.rasters[0]
    if r.label is None:
        raise DataError(f"{ds.name}: scene has no gt.tif, so it has no labels to split")
    return ds.crop(0, 0, 0, *r.image.shape[1:])[1]


def select_classes(ds, classes):
    """A copy of a one-raster scene with only `classes` (0-based ids, in this order) labelled, renumbered
    0..len(classes)-1; pixels of other classes become unlabelled. The class count follows."""
    r = ds.rasters[0]
    lut = np.zeros(max(ds.num_classes, int(np.max(r.label))) + 1, np.uint8)
    lut[np.asarray(classes, np.int64) + 1] = np.arange(1, len(classes) + 1)
    return HSIDataset(**{**ds.__dict__, "rasters": [Raster(r.path, r.image, lut[np.asarray(r.label)])],
                         "num_classes": len(classes), "class_names": [ds.class_names[c] for c in classes]})


def scene_split(ds, seed, per_class=None, fraction=None, min_class_pixels=0):
    """The sparse-label protocol of a scene: only classes with at least `min_class_pixels` labelled
    (valid) pixels take part (e.g. 400: Lee & Kwon's 9 Indian Pines classes), then `sparse_split`.
    Returns (dataset with the kept classes renumbered, train mask, test mask, kept class ids or None)."""
    classes = None
    if min_class_pixels:
        counts = np.bincount(scene_labels(ds).ravel() + 1, minlength=ds.num_classes + 1)[1:]
        classes = [c for c in range(ds.num_classes) if counts[c] >= min_class_pixels]
        if not classes:
            raise DataError(f"{ds.name}: no class has {min_class_pixels} labelled pixels (largest: {counts.max()})")
        ds = select_classes(ds, classes)
    train, test = sparse_split(scene_labels(ds), seed, per_class, fraction)
    return ds, train, test, classes


def with_labels(ds, mask):
    """A copy of a one-raster scene whose labels outside `mask` are unlabelled (e.g. the train split)."""
    r = ds.rasters[0]
    label = np.where(mask, np.asarray(r.label), 0).astype(np.uint8)
    return HSIDataset(**{**ds.__dict__, "rasters": [Raster(r.path, r.image, label)]})


# ----------------------------------------------------------------------------- pictures

def render_bands(img, bands, ref=None):
    """(C, H, W) tensor -> (3, H, W) in [0, 1] from three bands, each stretched between its 2nd and
    98th percentile (of `ref` when given, so a prediction is shown on the same scale as its input)."""
    rgb = img[list(bands)].float()
    ref = rgb if ref is None else ref[list(bands)].float()
    lo = ref.flatten(1).quantile(0.02, dim=1)[:, None, None]
    hi = ref.flatten(1).quantile(0.98, dim=1)[:, None, None]
    return ((rgb - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
