"""Hyperspectral data in the order it flows: files and cache, scenes and bands, the wavelength grid, splits,
per-tile augmentations, the step-indexed loaders; last, the augmentations batched on the device (a GPU needs
several times the tiles/s CPU workers augment: BENCHMARKS.md). formats.py converts other formats to scene
folders. Reflectance is never quantised and tiles are cut, never resized; decoded rasters are cached as .npy
(an uncompressed TIFF is memory-mapped in place), so the hot loop only slices memory maps.
"""
import ctypes
import functools
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
import torch.nn.functional as F

from common import DataError, print0

# ----------------------------------------------------------------------------- constants

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
CROP_TRIES = 10                # a random resized crop redraws its box this often until it fits
PREFETCH = 2                   # batches in flight per loader worker


# ----------------------------------------------------------------------------- files and cache

class RasterCache:
    """Memory-mapped rasters of one dataset folder, validated once: manifest.json remembers each file's
    size/mtime, shape and label range, so later runs neither decode nor validate again."""

    def __init__(self, source, cache_dir):
        home = os.path.join(os.path.expanduser("~"), ".cache", "hsi-ssl")
        key = hashlib.sha1(os.path.abspath(source).encode()).hexdigest()[:10]
        self.dir = os.path.join(cache_dir or os.environ.get("HSI_SSL_CACHE", home),
                                f"{os.path.basename(os.path.abspath(source))}-{key}")
        os.makedirs(self.dir, exist_ok=True)
        self.manifest_path = os.path.join(self.dir, "manifest.json")
        self.manifest = _read_json(self.manifest_path) or {}
        self.dirty = False

    def open(self, path, label=False):
        """(C, H, W) image or (H, W) label as a read-only memory map (holding no file descriptor)."""
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such file")
        st = os.stat(path)
        sig, key = [st.st_size, st.st_mtime_ns], os.path.abspath(path)
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
                offset = series.dataoffset  # None: compressed or scattered, so decoded into the cache
                direct = series.axes in ("YX", "SYX", "QYX", "IYX") and offset is not None
                if direct and offset + series.nbytes > os.path.getsize(path):
                    raise DataError(f"{path}: truncated TIFF (data ends at byte {offset + series.nbytes}, file has "
                                    f"{os.path.getsize(path)})")
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

    def save(self):
        if self.dirty:
            _write_json(self.manifest_path, self.manifest)
            self.dirty = False


def without_fd(mm):
    """The read-only np.memmap `mm` mapped again by libc's mmap, keeping no file descriptor open: Python's
    mmap holds one per map, and WHU-OHS's ~10k rasters would pass the usual limit of 1024 open files. The
    map goes with the last array using it. `mm` itself where libc has no mmap (Windows) or it is not C-ordered."""
    libc = _LIBC
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
    _MAPPED[id(buffer)] = buffer
    arr = np.frombuffer(buffer, mm.dtype, mm.size, mm.offset - start).reshape(mm.shape)
    arr.flags.writeable = False
    return arr


try:  # for without_fd
    _LIBC = ctypes.CDLL(None, use_errno=True)
    _LIBC.mmap.restype = ctypes.c_void_p
    _LIBC.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    _LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    _LIBC.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # no libc mmap (Windows)
    _LIBC = None
_MAPPED = weakref.WeakValueDictionary()  # without_fd's buffers, by id, for release


def release(a):
    """Drop the pages of the memory-mapped array `a` (np.memmap or without_fd's) from this process: pages
    read through a map count as resident (peak RSS would grow to the file's size) until released; the page
    cache keeps them. Anything else: nothing to do."""
    if not hasattr(mmap, "MADV_DONTNEED"):  # Windows
        return
    if getattr(a, "_mmap", None) is not None:
        if a.mode != "c":  # a private map's changes would be lost
            a._mmap.madvise(mmap.MADV_DONTNEED)
        return
    while a is not None and not isinstance(a, ctypes.Array):  # without_fd's array -> its mapped buffer
        a = getattr(a, "base", None)
    if a is not None and _MAPPED.get(id(a)) is a:  # never other memory: DONTNEED zeroes anonymous pages
        _LIBC.madvise(ctypes.addressof(a), ctypes.sizeof(a), mmap.MADV_DONTNEED)


@contextmanager
def _tifffile_errors(path):
    """tifffile logs (rather than raises) many problems of truncated files and returns partial data."""
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


def _read_json(path):
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)


def _write_json(path, obj):
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)  # atomic: concurrent ranks never read half a file


# ----------------------------------------------------------------------------- scenes and bands

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
    fwhm: list = None             # nm, one per band read, or None when unknown
    grid: dict = None             # the common wavelength grid the bands are resampled onto (attach_grid)
    grid_matrix: np.ndarray = field(default=None, repr=False)  # (G, C) resampling weights, see attach_grid

    @property
    def file_bands(self):
        return self.rasters[0].image.shape[0]

    @property
    def raw_bands(self):
        """Bands read from the file (bad and all-nodata ones dropped), before any projection."""
        return self.file_bands if self.band_ids is None else len(self.band_ids)

    @property
    def bands(self):
        """Channels a model sees: the raw bands, the principal components or the grid's points."""
        if self.grid is not None:
            return self.grid["count"]
        return self.raw_bands if self.pca is None else self.pca.shape[0]

    @property
    def input_wavelengths(self):
        return grid_wavelengths(self.grid).tolist() if self.grid is not None else self.wavelengths

    @property
    def band_info(self):
        """What a checkpoint records (build_backbone(bands=...)) so that the next product of the same sensor
        is read with the same bands: the file's band indices and wavelengths, or the grid and this sensor's."""
        if self.grid is not None:
            return {"grid": dict(self.grid), "sensors": {self.name: [float(w) for w in self.wavelengths]}}
        ids = list(range(self.file_bands)) if self.band_ids is None else [int(i) for i in self.band_ids]
        return {"ids": ids, "wavelengths": None if self.wavelengths is None else [float(w) for w in self.wavelengths]}

    def read(self, index, y0, y1, x0, x1):
        image = self.rasters[index].image
        if self.band_ids is None or len(self.band_ids) == image.shape[0]:
            return image[:, y0:y1, x0:x1]
        return image[np.asarray(self.band_ids), y0:y1, x0:x1]

    def physical(self, raw, out=None, per_value=False):
        """Raw values -> float32 (reflectance where the scale is known), written into `out`, and the (H, W)
        mask of valid pixels, None when all are (the common case: no masking). A pixel is invalid where any
        band read is nodata, NaN/inf or fill. per_value=True: the (C, H, W) mask of invalid values instead."""
        if self.signed_view and raw.dtype == np.uint16:
            raw = raw.view(np.int16)
        out = np.empty(raw.shape, np.float32) if out is None else out
        np.copyto(out, raw, casting="unsafe")
        bad = [raw == self.nodata] if self.nodata is not None else []
        if raw.dtype.kind == "f":
            bad.append(~np.isfinite(raw))
        if self.value_scale is not None:
            out *= self.value_scale
            bad.append(out < FILL_BELOW_REFLECTANCE)
        invalid = functools.reduce(np.logical_or, bad) if bad else None
        if invalid is None or not invalid.any():
            return out, None
        return out, (invalid if per_value else ~invalid.any(0))

    def crop(self, index, y, x, h, w):
        """A (C, h, w) float32 window in physical units and its (h, w) int64 labels (IGNORE_INDEX where
        unlabelled or invalid). Invalid pixels, and windows reaching past the border, get the band means."""
        r = self.rasters[index]
        _, H, W = r.image.shape
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + h, H), min(x + w, W)
        img = np.empty((self.raw_bands, h, w), np.float32)
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

    def raw_window(self, index, y, x, size, dtype):
        """The raw (C, size, size) window at (y, x) as `dtype` (uint16 into int16 as its bit pattern), zero
        past the border, and its part inside the raster (y0, x0, y1, x1) in window coordinates: what
        RandomTiles(raw=True) ships, for DeviceNormalise to finish as crop() would."""
        _, H, W = self.rasters[index].image.shape
        y0, x0, y1, x1 = max(y, 0), max(x, 0), min(y + size, H), min(x + size, W)
        out = np.zeros((self.raw_bands, size, size), dtype)
        if y1 > y0 and x1 > x0:
            src = self.read(index, y0, y1, x0, x1)
            wrap = src.dtype == np.uint16 and dtype == np.int16
            out[:, y0 - y:y1 - y, x0 - x:x1 - x] = src.view(np.int16) if wrap else src
        return out, (y0 - y, x0 - x, y1 - y, x1 - x)

    def normalise(self, img):
        """(x - mean) / std per band, in place; then projected by PCA to (k, h, w), or resampled onto the
        wavelength grid's (G, h, w) points (0, the mean, where the sensor has no band)."""
        img -= self.mean[:, None, None]
        img *= (1 / self.std)[:, None, None]
        projection = self.pca if self.pca is not None else self.grid_matrix
        if projection is not None:
            img = np.einsum("kc,chw->khw", projection, img, optimize=True).astype(np.float32)
        return img


def load_datasets(spec, split="tr", cache_dir=None, band_info=None):
    """`spec`: folders, comma-separated, each a WHU-OHS root or a scene folder. `band_info`: a
    checkpoint's, to read exactly the bands it was trained on. Without it, products of one sensor (same band
    count in the file) whose dead bands differ are all read with the bands valid in all, for one model."""
    paths = [p.strip() for p in spec.split(",") if p.strip()]
    if not paths:
        raise DataError("--data is empty")
    datasets = [load_dataset(p, split, cache_dir, band_info) for p in paths]
    if band_info is not None:  # a checkpoint's bands, or a wavelength grid (where every scene reads its own)
        return datasets
    same_sensor = {}
    for i, ds in enumerate(datasets):
        same_sensor.setdefault(ds.file_bands, []).append(i)
    for group in (g for g in same_sensor.values() if len(g) > 1):
        shared = sorted(set.intersection(*(set(datasets[i].band_info["ids"]) for i in group)))
        if all(datasets[i].band_info["ids"] == shared for i in group):
            continue
        names = ", ".join(datasets[i].name for i in group)
        if not shared:
            raise DataError(f"{spec}: {names} have no band that is valid in all of them")
        for i in group:
            datasets[i] = load_dataset(paths[i], split, cache_dir, {"ids": shared, "wavelengths": None},
                                       f"the bands valid in all of {names}")
    return datasets


def load_dataset(path, split="tr", cache_dir=None, band_info=None, why="the checkpoint's band list"):
    """A WHU-OHS split or a scene folder. `band_info` (a checkpoint's) fixes the bands read, `why`
    names it in the printed line; with a "grid" (ANY_SENSOR, or a checkpoint trained on the grid): all the
    data's own bands, resampled onto the grid."""
    if band_info is not None and "grid" in band_info:
        ds = attach_grid(load_dataset(path, split, cache_dir), band_info["grid"])
        report_new_bands([ds], band_info.get("sensors"))
        return ds
    if os.path.isfile(path) and path.lower().endswith(FILE_EXTENSIONS):
        raise DataError(f"{path}: a file, not a scene folder; convert it first: "
                        f"python formats.py {path} --out <scene folder> (README: Bring your own scene)")
    if not os.path.isdir(path):
        raise DataError(f"{path}: no such folder")
    if os.path.isfile(os.path.join(path, "image.tif")):
        return load_scene(path, cache_dir, band_info, why)
    if any(os.path.isdir(os.path.join(path, s)) for s in WHU_SPLITS):
        return load_whu(path, split, cache_dir, band_info, why)
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
    listed = lambda v, kind: isinstance(v, list) and all(isinstance(x, kind) for x in v)  # noqa: E731
    for key, ok, what in [("nodata", lambda v: isinstance(v, number), "a number"),
                          ("value_scale", lambda v: isinstance(v, number) and v > 0, "a positive number"),
                          ("wavelengths_nm", lambda v: listed(v, number), "a list of numbers"),
                          ("fwhm_nm", lambda v: listed(v, number), "a list of numbers"),
                          ("bad_bands", lambda v: listed(v, int), "a list of 0-based band indices"),
                          ("class_names", lambda v: listed(v, str), "a list of strings")]:
        v = meta.get(key)
        if v is not None and (isinstance(v, bool) or not ok(v)):
            raise DataError(f"{path}: {key} must be {what} or null, got {json.dumps(v)[:80]}")
    return meta


def _per_band(meta, key, meta_path, bands, bad):
    """meta[key] (wavelengths_nm, fwhm_nm) for every band of the file: it may list them all, or only those
    left after bad_bands (then the bad ones get None)."""
    v = meta.get(key)
    if v is None or len(v) == bands:
        return v
    if bad and len(v) == bands - len(bad):
        it = iter(v)
        return [None if b in bad else next(it) for b in range(bands)]
    after = f" ({bands - len(bad)} after dropping the {len(bad)} bad_bands)" if bad else ""
    raise DataError(f"{meta_path}: {len(v)} {key} for an image with {bands} bands{after}")


def load_scene(path, cache_dir=None, band_info=None, why="the checkpoint's band list"):
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
    C, bad = image.shape[0], sorted(set(meta.get("bad_bands") or []))
    if bad and (bad[0] < 0 or bad[-1] >= C):
        raise DataError(f"{meta_path}: bad_bands must be 0-based band indices 0 .. {C - 1}, "
                        f"got {bad[0] if bad[0] < 0 else bad[-1]}")
    wl = _per_band(meta, "wavelengths_nm", meta_path, C, bad)
    if wl is None and (meta.get("sensor"), C) in KNOWN_WAVELENGTHS:
        wl = list(KNOWN_WAVELENGTHS[meta["sensor"], C])
    ds = HSIDataset(meta.get("name") or os.path.basename(os.path.abspath(path)), [Raster(image_path, image, label)],
                    num_classes, names, wl, meta.get("value_scale"), meta.get("nodata"),
                    fwhm=_per_band(meta, "fwhm_nm", meta_path, C, bad))
    choose_bands(ds, cache, bad, band_info, why)
    return ds


def load_whu(root, split="tr", cache_dir=None, band_info=None, why="the checkpoint's band list"):
    if split not in WHU_SPLITS:
        raise DataError(f"{root}: WHU-OHS split must be one of {WHU_SPLITS}, got {split!r}")
    cache = RasterCache(root, cache_dir)
    ds = _whu_split(root, split, cache)
    # Every split is normalised with the training split's statistics (and reads the training split's bands).
    stats_from = ds if split == "tr" else _whu_split(root, "tr", cache)
    choose_bands(stats_from, cache, (), band_info, why)
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


def choose_bands(ds, cache, bad_bands=(), band_info=None, why="the checkpoint's band list"):
    """Sets the file's bands ds reads and their mean/std over valid pixels, cached beside the rasters.
    Without `band_info`: all but those in `bad_bands` and the dead ones (no valid value at all: normal in a
    product, not an error), named in one printed line, so that a pixel is invalid only where a band that is
    read is. With `band_info` (a checkpoint's): exactly those; a dead one is an error, a wavelength
    more than WAVELENGTH_TOLERANCE_NM from the checkpoint's a warning."""
    C, bad = ds.file_bands, sorted(set(bad_bands))
    if band_info is not None and not all(0 <= i < C for i in band_info["ids"]):
        # Another sensor: read the data's own bands; the caller's band count check says what does not fit.
        print0(f"warning: {ds.name}: {why} reads bands up to {max(band_info['ids'])}, but this data has {C}; "
               "reading its own bands")
        band_info = None
    own = [b for b in range(C) if b not in set(bad)]  # before dropping dead bands
    if band_info is None and not own:
        raise DataError(f"{ds.name}: bad_bands flags all {C} bands")
    ids = own if band_info is None else [int(i) for i in band_info["ids"]]
    rasters = list(range(len(ds.rasters)))
    if len(rasters) > STATS_MAX_RASTERS:
        rasters = sorted(np.random.default_rng(0).choice(len(rasters), STATS_MAX_RASTERS, replace=False).tolist())
    paths = [ds.rasters[i].path for i in rasters]

    def cache_path(ids, auto):
        key = [cache.manifest[os.path.abspath(p)]["sig"] for p in paths] + paths
        key += [ds.value_scale, ds.nodata, ids, auto]
        return os.path.join(cache.dir, f"bands-{hashlib.sha1(json.dumps(key).encode()).hexdigest()[:16]}.json")
    path = cache_path(own, True)
    cached = _read_json(path) if own else None
    if band_info is not None and (cached is None or cached["band_ids"] != ids):  # not the data's own band list
        path = cache_path(ids, False)
        cached = _read_json(path)
    if cached is None:
        cached = _band_stats(ds, rasters, ids, band_info is None, why)
        _write_json(path, cached)
    wl_all = ds.wavelengths
    ds.band_ids = cached["band_ids"]
    ds.wavelengths = None if wl_all is None else [wl_all[i] for i in ds.band_ids]
    ds.fwhm = None if ds.fwhm is None else [ds.fwhm[i] for i in ds.band_ids]
    if ds.wavelengths is not None and None in ds.wavelengths:  # a bad band the checkpoint reads has none
        ds.wavelengths = None
    std = np.asarray(cached["std"], np.float32)
    ds.mean, ds.std = np.asarray(cached["mean"], np.float32), np.where(std > 0, std, 1).astype(np.float32)
    _report_bands(ds, C, bad, cached, wl_all, band_info, why)


def _band_stats(ds, rasters, ids, auto, why):
    """Mean/std of the bands `ids` over valid pixels; with `auto`, dead bands are dropped first (a second
    scan: they would make every pixel invalid)."""
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
    """Sums and sums of squares over the pixels valid in all bands `ids`, their count, each band's count of
    valid values, and the pixels scanned; in row blocks that bound the memory used."""
    view = replace(ds, band_ids=ids, pca=None)
    s1, s2, good = np.zeros(len(ids)), np.zeros(len(ids)), np.zeros(len(ids), np.int64)
    n = total = 0
    for i in rasters:
        _, H, W = ds.rasters[i].image.shape
        rows = max(1, STATS_BLOCK_VALUES // (len(ids) * W))
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
            release(ds.rasters[i].image)
    return s1, s2, n, good, total


def _report_bands(ds, C, bad, cached, wl_all, band_info, why):
    kept = set(cached["band_ids"])
    if band_info is None:
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
    theirs = None if band_info is None else band_info.get("wavelengths")
    if theirs is not None and ds.wavelengths is not None:
        shift = np.abs(np.asarray(theirs, float) - np.asarray(ds.wavelengths, float))
        if shift.max() > WAVELENGTH_TOLERANCE_NM:
            i = int(shift.argmax())
            print0(f"warning: {ds.name}: band {ds.band_ids[i]} is at {ds.wavelengths[i]:.1f} nm but the checkpoint's "
                   f"is at {theirs[i]:.1f} nm: is this the same sensor?")


def _runs(ids):
    """[3, 4, 5, 9] -> [(3, 5), (9, 9)]."""
    ids = sorted(ids)
    starts = [i for i, b in enumerate(ids) if i == 0 or b != ids[i - 1] + 1]
    return [(ids[s], ids[e - 1]) for s, e in zip(starts, starts[1:] + [len(ids)])]


def _describe(ids, wavelengths=None):
    """[3, 4, 5, 9] -> '3-5 (1350-1370 nm), 9 (1400 nm)'."""
    out = []
    for a, b in _runs(ids):
        text = f"{a}" if a == b else f"{a}-{b}"
        if wavelengths is not None and wavelengths[a] is not None and wavelengths[b] is not None:
            text += f" ({wavelengths[a]:.0f} nm)" if a == b else f" ({wavelengths[a]:.0f}-{wavelengths[b]:.0f} nm)"
        out.append(text)
    return ", ".join(out)


def check_same_bands(datasets, backbone):
    counts = {d.name: d.bands for d in datasets}
    if len(set(counts.values())) > 1:
        raise DataError(f"backbone '{backbone}' needs one band count, but the datasets differ: {counts}; "
                        "--any-sensor resamples every scene onto one wavelength grid")
    return datasets[0].bands


# ----------------------------------------------------------------------------- wavelength grid (any sensor, #17)

# Band centres of the two unmixing benchmarks, whose distributed files carry none (../shared/docs/DATA.md):
# Jasper Ridge = AVIRIS' 224 channels evenly over 380-2500 nm without channels 1-3, 108-112, 154-166 and
# 220-224 (1-based; water vapour) -> 198; Samson = 156 channels evenly over 401-889 nm (3.13 nm). Used when a
# scene's meta.json names that sensor, has that band count and no wavelengths_nm.
_JASPER = [380 + i * (2500 - 380) / 223 for i in range(224)
           if not (i < 3 or 107 <= i < 112 or 153 <= i < 166 or i >= 219)]
KNOWN_WAVELENGTHS = {("AVIRIS", 198): _JASPER, ("SAMSON", 156): [401 + i * (889 - 401) / 155 for i in range(156)]}

# The common wavelength grid of the sensor-agnostic backbones: 10 nm steps from 360 to 2510 nm hold every
# bundled sensor (and WHU-OHS, EnMAP); 216 = 2^3 x 3^3 points split into band groups of 2, 3, 4, 6, 8, 9, 12...
GRID = {"start": 360.0, "step": 10.0, "count": 216}
ANY_SENSOR = {"grid": GRID}  # load_datasets(band_info=ANY_SENSOR): every scene resampled onto GRID


def grid_wavelengths(grid):
    return grid["start"] + grid["step"] * np.arange(grid["count"])


def resampling_matrix(wavelengths, grid, fwhm=None):
    """(G, C) weights that resample C bands at `wavelengths` (any order) onto the grid, and valid (G,).
    Band c spreads over a triangle of half-width max(grid step, distance to the nearest other band, FWHM
    where known); grid point g is the weighted mean of the bands whose triangles reach it, else 0 (the band
    mean of normalised data: no band there, e.g. in the water-absorption gaps). So finer sensors are
    averaged (no aliasing), coarser ones interpolated, and permuting bands with their wavelengths permutes
    the columns only."""
    wl = np.asarray(wavelengths, np.float64)
    if wl.ndim != 1 or not np.isfinite(wl).all():
        raise ValueError(f"wavelengths must be finite numbers, got {wavelengths!r}")
    gaps = np.abs(wl[:, None] - wl[None, :]) + np.diag(np.full(len(wl), np.inf))
    h = np.maximum(grid["step"], gaps.min(1) if len(wl) > 1 else grid["step"])
    if fwhm is not None and None not in fwhm:
        h = np.maximum(h, np.asarray(fwhm, np.float64))
    w = np.clip(1 - np.abs(grid_wavelengths(grid)[:, None] - wl[None, :]) / h[None, :], 0, None)
    total = w.sum(1, keepdims=True)
    valid = total[:, 0] > 0
    return (w / np.where(valid[:, None], total, 1)).astype(np.float32), valid


def attach_grid(ds, grid):
    if ds.wavelengths is None:
        raise DataError(f"{ds.name}: a wavelength-aware model (--any-sensor, or a checkpoint trained with it) "
                        "needs the band wavelengths; add wavelengths_nm to its meta.json")
    ds.grid = dict(grid)
    ds.grid_matrix, _ = resampling_matrix(ds.wavelengths, grid, ds.fwhm)
    return ds


def report_new_bands(datasets, seen):
    """Print each scene's grid points that no pre-training sensor reached (`seen`: a checkpoint's {sensor:
    wavelengths}): the model's weights there never saw data."""
    if not seen:
        return
    grid = datasets[0].grid
    covered, points = np.zeros(grid["count"], bool), grid_wavelengths(grid)
    for wl in seen.values():
        covered |= resampling_matrix(wl, grid)[1]
    for ds in datasets:
        mine = ds.grid_matrix.sum(1) > 0
        new = mine & ~covered
        nm = ", ".join(f"{points[a]:.0f}" + ("" if a == b else f"-{points[b]:.0f}")
                       for a, b in _runs(np.flatnonzero(new)))
        print0(f"{ds.name}: {len(ds.wavelengths)} bands on {int(mine.sum())} grid points; {int(new.sum())} new "
               f"(not in pre-training on {', '.join(seen)}){f' ({nm} nm)' if nm else ''}")


def bands_record(datasets):
    """What a checkpoint records about its training data's bands (build_backbone(bands=...)): one sensor's
    band_info, or on the grid the grid and every sensor's wavelengths."""
    if datasets[0].grid is None:
        return datasets[0].band_info
    return {"grid": dict(datasets[0].grid), "sensors": {ds.name: ds.band_info["sensors"][ds.name] for ds in datasets}}


# ----------------------------------------------------------------------------- band projections (PCA), display bands

def fit_pca(ds, components, mask=None, max_pixels=200_000, seed=0):
    """The study's band reduction: a (components, C) projection of the normalised bands onto their leading
    principal components, each scaled to unit variance, fitted on training pixels only (where mask (H, W)
    is True; else a sample of all pixels of a training set). Returns (projection, explained variance share
    of each component)."""
    if ds.grid is not None:
        raise DataError(f"{ds.name}: --pca and --any-sensor exclude each other")
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


def display_bands(ds, false_colour=False):
    """Three band indices: true colour (670/566/480 nm) or false colour (840/670/566 nm, vegetation red);
    spread over the bands when wavelengths are unknown."""
    if ds.wavelengths:
        wl = np.asarray(ds.wavelengths)
        return [int(np.abs(wl - t).argmin()) for t in ((840, 670, 566) if false_colour else (670, 566, 480))]
    c = ds.raw_bands
    return [c - 1, c // 2, c // 4] if false_colour else [3 * c // 4, c // 2, c // 4]


def render_bands(img, bands, ref=None):
    """(C, H, W) -> (3, H, W) in [0, 1], each band stretched between its 2nd and 98th percentile (of `ref`
    when given, so that a prediction is shown on the same scale as its input)."""
    rgb = img[list(bands)].float()
    ref = rgb if ref is None else ref[list(bands)].float()
    lo = ref.flatten(1).quantile(0.02, dim=1)[:, None, None]
    hi = ref.flatten(1).quantile(0.98, dim=1)[:, None, None]
    return ((rgb - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)


# ----------------------------------------------------------------------------- sparse-label splits

def sparse_split(labels, seed, per_class=None, fraction=None):
    """Train/test masks over the labelled pixels of labels (H, W): `per_class` pixels (at most half of a
    small class) or a `fraction` (at least one) of each class go to train, the rest to test."""
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
    """The scene's (H, W) int64 labels, IGNORE_INDEX where unlabelled or invalid."""
    r = ds.rasters[0]
    if r.label is None:
        raise DataError(f"{ds.name}: scene has no gt.tif, so it has no labels to split")
    return ds.crop(0, 0, 0, *r.image.shape[1:])[1]


def select_classes(ds, classes):
    """A copy of a one-raster scene with only `classes` (0-based ids, in this order) labelled, renumbered
    0..len(classes)-1."""
    r = ds.rasters[0]
    lut = np.zeros(max(ds.num_classes, int(np.max(r.label))) + 1, np.uint8)
    lut[np.asarray(classes, np.int64) + 1] = np.arange(1, len(classes) + 1)
    return replace(ds, rasters=[Raster(r.path, r.image, lut[np.asarray(r.label)])], num_classes=len(classes),
                   class_names=[ds.class_names[c] for c in classes])


def scene_split(ds, seed, per_class=None, fraction=None, min_class_pixels=0):
    """The sparse-label protocol of a scene: the classes with at least `min_class_pixels` labelled (valid)
    pixels (e.g. 400: Lee & Kwon's 9 Indian Pines classes), then `sparse_split`. Returns (the dataset with
    the kept classes renumbered, train mask, test mask, kept class ids or None)."""
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
    """A copy of a one-raster scene unlabelled outside `mask` (e.g. the train split)."""
    r = ds.rasters[0]
    return replace(ds, rasters=[Raster(r.path, r.image, np.where(mask, np.asarray(r.label), 0).astype(np.uint8))])


# ----------------------------------------------------------------------------- per-tile augmentations

def dihedral(arrays, rng):
    """The same random rot90 / flip on the last two axes of every array."""
    k, flip = int(rng.integers(4)), rng.random() < 0.5
    out = []
    for a in arrays:
        a = np.rot90(a, k, axes=(-2, -1))
        out.append(np.ascontiguousarray(a[..., ::-1] if flip else a))
    return out


def random_resized_crop(img, lab, rng, out_size, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """A random region (area share in `scale`) resized to out_size: bilinear for the image, nearest for
    labels. An augmentation only: tiles themselves are cut, never resized."""
    _, H, W = img.shape
    for _ in range(CROP_TRIES):
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


def spectral_jitter(img, rng, brightness=0.0, contrast=0.0, band_gain=0.0, spread=None):
    """Photometric jitter that makes sense for reflectance: a global illumination gain, a small per-band
    gain (calibration / atmosphere) and contrast around each band's spatial mean; no hue or grey-scale
    tricks, bands are not colours. spread: each band's gain is clipped so that its tile mean moves by at
    most this share of its within-tile std, keeping the jitter below the spectral differences between land
    covers (None = unbounded). The contrast stops where the darkest pixel would reach zero."""
    C = img.shape[0]
    gain = rng.uniform(1 - brightness, 1 + brightness) * rng.uniform(1 - band_gain, 1 + band_gain, C)
    c = rng.uniform(1 - contrast, 1 + contrast)
    mean = img.mean(axis=(1, 2), keepdims=True)
    if img.min() >= 0:
        c = min(c, float((mean[:, 0, 0] / np.maximum(mean[:, 0, 0] - img.min(axis=(1, 2)), 1e-12)).min()))
    if spread is not None:
        bound = spread * img.std(axis=(1, 2)) / np.maximum(np.abs(mean[:, 0, 0]), 1e-12)
        gain = np.clip(gain, 1 - bound, 1 + bound)
    return ((mean + c * (img - mean)) * gain[:, None, None]).astype(np.float32)


def jitter_notice(datasets, augment, say=print):
    """Say which scenes get no spectral jitter from the MultiCrop `augment`: those without a value scale."""
    raw = [ds.name for ds in datasets if ds.value_scale is None]
    if raw and augment.jitters:
        say(f"notice: no spectral jitter on {', '.join(raw)}: no value_scale in meta.json, so the values are not "
            "reflectance and a gain would be no physical change")


def gaussian_blur(img, sigma):
    """Spatial Gaussian blur of every band of (C, H, W) float32; reflect padding."""
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
    """Solarisation for normalised HSI: values above the threshold (the band mean at 0) are mirrored below it,
    as RGB solarisation inverts bright pixels."""
    return np.where(x > threshold, 2 * threshold - x, x).astype(np.float32)


@dataclass
class Augment:
    """Flips and a random resized crop, both off by default: a tile in physical units -> its normalised
    tensor and labels. No spectral jitter: MAE's recipe has none."""
    flips: bool = False
    crop_scale: tuple = None      # random resized crop area range, None = off

    def __call__(self, img, lab, rng, normalise, reflectance=True):
        if self.flips:
            img, lab = dihedral([img, lab], rng)
        if self.crop_scale is not None:
            img, lab = random_resized_crop(img, lab, rng, img.shape[-1], self.crop_scale)
        return torch.from_numpy(normalise(img)), torch.from_numpy(lab)


@dataclass
class MultiCrop:
    """DINO's multi-crop for HSI: 2 global and n_local local views of one tile -> ((2, C, G, G), (n_local,
    C, L, L)) normalised. Each is a random resized crop with flips, spectral jitter (with probability
    jitter_p, on reflectance only: on sensor counts with an offset a gain is no physical change) and blur;
    the second global view may be solarised (off by default: solarisation mirrors every band about its mean,
    erasing whether a band is above or below it - the very thing land covers differ by). Blur sigmas are in
    pixels: DINOv2's (0.1, 2.0) suit 224 px crops of 14 px patches; a trainer scales them to its patch."""
    global_size: int = 64
    local_size: int = 32
    n_local: int = 4
    global_scale: tuple = (0.32, 1.0)
    local_scale: tuple = (0.05, 0.32)
    brightness: float = 0.2
    contrast: float = 0.2
    band_gain: float = 0.05
    spread: float = None
    jitter_p: float = 0.8
    blur_sigma: tuple = (0.1, 2.0)
    global_blur_p: tuple = (1.0, 0.1)
    local_blur_p: float = 0.5
    global_solarize_p: tuple = (0.0, 0.0)

    @property
    def jitters(self):
        return self.jitter_p > 0 and bool(self.brightness or self.contrast or self.band_gain)

    def view(self, img, lab, rng, normalise, size, scale, blur_p, solarize_p, reflectance):
        v, _ = random_resized_crop(img, lab, rng, size, scale)
        v = dihedral([v], rng)[0]
        if rng.random() < self.jitter_p and reflectance:
            v = spectral_jitter(v, rng, self.brightness, self.contrast, self.band_gain, self.spread)
        if rng.random() < blur_p:
            v = gaussian_blur(v, rng.uniform(*self.blur_sigma))
        v = normalise(np.ascontiguousarray(v, dtype=np.float32))
        if rng.random() < solarize_p:
            v = spectral_solarize(v)
        return torch.from_numpy(v)

    def __call__(self, img, lab, rng, normalise, reflectance=True):
        g = [self.view(img, lab, rng, normalise, self.global_size, self.global_scale, blur, solarize, reflectance)
             for blur, solarize in zip(self.global_blur_p, self.global_solarize_p)]
        local = [self.view(img, lab, rng, normalise, self.local_size, self.local_scale, self.local_blur_p, 0.0,
                           reflectance) for _ in range(self.n_local)]
        local = torch.stack(local) if local else torch.zeros(0, img.shape[0], self.local_size, self.local_size)
        return (torch.stack(g), local), torch.from_numpy(lab)


# ----------------------------------------------------------------------------- loaders

class RandomTiles(torch.utils.data.Dataset):
    """Random size x size windows of all datasets' rasters, every pixel equally likely, through `augment`
    (anything mapping (img, lab, rng, normalise, reflectance) to (x, y)): items (x, y, dataset index), or
    (x, dataset index) with labels=False (pre-training: less to ship between processes). raw=True: the raw
    window (C, size, size) in transport_dtype and (dataset, valid extent) (5,), for the device to finish.
    Item i is a function of (seed, i) only, the same window in both modes, so any number of workers and any
    resume point give the same samples."""

    def __init__(self, datasets, size, seed=0, augment=None, min_labelled=0, labels=True, raw=False):
        self.datasets, self.size, self.seed, self.augment = datasets, size, seed, augment or Augment()
        self.min_labelled, self.labels, self.raw = min_labelled, labels, raw
        if raw and (min_labelled or labels):
            raise ValueError("RandomTiles(raw=True) cuts unlabelled windows: pass labels=False, min_labelled=0")
        self.transport = transport_dtype(datasets) if raw else None
        self.bands = max(ds.raw_bands for ds in datasets)  # raw windows: every sensor's padded to the most
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
            if self.raw:
                window, extent = ds.raw_window(r, y, x, self.size, self.transport)
                if len(window) < self.bands:  # with copies of the last band: see DeviceNormalise
                    window = np.concatenate([window, np.repeat(window[-1:], self.bands - len(window), 0)])
                return torch.from_numpy(window), torch.tensor([d, *extent], dtype=torch.int32)
            img, lab = ds.crop(r, y, x, self.size, self.size)
            if (lab != IGNORE_INDEX).sum() >= self.min_labelled:
                break
        x, y = self.augment(img, lab, rng, ds.normalise, ds.value_scale is not None)
        return (x, y, d) if self.labels else (x, d)


class GridTiles(torch.utils.data.Dataset):
    """Overlapping windows over every raster (or the listed ones), for evaluation: the normalised window,
    its labels and where it came from (raster index, y, x)."""

    def __init__(self, ds, size, overlap, rasters=None):
        self.ds, self.size = ds, size
        rasters = range(len(ds.rasters)) if rasters is None else rasters
        self.items = [(r, y, x) for r in rasters
                      for y, x in grid_windows(*ds.rasters[r].image.shape[1:], size, overlap)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        r, y, x = self.items[i]
        img, lab = self.ds.crop(r, y, x, self.size, self.size)
        return torch.from_numpy(self.ds.normalise(img)), torch.from_numpy(lab), torch.tensor([r, y, x])


def grid_windows(H, W, size, overlap):
    """Top-left corners of size x size windows covering H x W with at least `overlap` px overlap, the last
    row/column aligned with the border; one (padded) window when the image is smaller."""
    stride = size - overlap
    if stride <= 0:
        raise ValueError(f"overlap {overlap} must be smaller than the window {size}")

    def starts(n):
        return [0] if n <= size else sorted(set(list(range(0, n - size, stride)) + [n - size]))
    return [(y, x) for y in starts(H) for x in starts(W)]


class StepBatches(torch.utils.data.Sampler):
    """Batch indices by step: step s, rank r reads items [(s*world + r)*B, ... + B), in pieces of at most
    `chunk` items, so that a run resumed at step s reads exactly what the uninterrupted run would have."""

    def __init__(self, batch_size, start_step=0, rank=0, world=1, chunk=None):
        self.B, self.start, self.rank, self.world, self.chunk = batch_size, start_step, rank, world, chunk or batch_size

    def __iter__(self):
        step = self.start
        while True:
            base = (step * self.world + self.rank) * self.B
            for lo in range(base, base + self.B, self.chunk):
                yield list(range(lo, min(lo + self.chunk, base + self.B)))
            step += 1


SHM_ADVICE = ("give the container more shared memory (docker run --shm-size=8g, or --ipc=host; Kubernetes: an "
              "emptyDir volume with medium: Memory mounted at /dev/shm), or pass --workers 0")


class StepLoader:
    """The step-indexed DataLoader every trainer reads: each step's batch, collated like the items, on
    `device` (through pinned memory on a GPU). workers=None: 4 per process on GPU, none on CPU (where
    workers only steal the model's cores). Workers hand batches over in /dev/shm (64 MB in a default
    container), PREFETCH each: where that does not fit, a batch travels in chunks (shm_chunk)."""

    def __init__(self, dataset, batch_size, start_step, rank, world, workers, device):
        workers = (4 if device.type == "cuda" else 0) if workers is None else workers
        chunk = shm_chunk(dataset, batch_size, workers) if workers else batch_size
        self.parts, self.device = math.ceil(batch_size / chunk), device
        # Own generator: otherwise creating the iterator draws from the global torch RNG, which would make a
        # resumed run's masks differ from the uninterrupted run's.
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=StepBatches(batch_size, start_step, rank, world, chunk),
            generator=torch.Generator(), num_workers=workers, pin_memory=device.type == "cuda",
            persistent_workers=workers > 0, prefetch_factor=PREFETCH if workers else None,
            worker_init_fn=ignore_stop_signals if workers else None)

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            try:
                parts = [to_device(next(batches), self.device) for _ in range(self.parts)]
            except RuntimeError as e:
                if not any(s in str(e) for s in ("shared memory", "No space left on device", "Bus error")):
                    raise
                raise DataError(f"the DataLoader workers ran out of shared memory (/dev/shm): {SHM_ADVICE} "
                                f"({type(e).__name__}: {str(e).splitlines()[0]})") from e
            yield parts[0] if self.parts == 1 else concat(parts)


step_loader = StepLoader  # the name the trainers call


def shm_free_bytes():
    """Free bytes in /dev/shm, None where there is none (not Linux)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def shm_chunk(dataset, batch_size, workers):
    """Items per DataLoader batch such that what the workers hold in /dev/shm (workers x PREFETCH batches)
    stays within half of this process's share of its free space (the node's processes share it)."""
    free = shm_free_bytes()
    if free is None:
        return batch_size
    item = nbytes(dataset[0])
    share = free / 2 / int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    chunk = min(batch_size, int(share // (workers * PREFETCH * item)))
    mb = lambda n: f"{n / 2 ** 20:.1f} MB"  # noqa: E731
    if chunk < 1:
        raise DataError(f"/dev/shm has {mb(free)} free: too little for {workers} loader workers x {PREFETCH} batches "
                        f"of even one item ({mb(item)}) per process; {SHM_ADVICE}")
    if chunk < batch_size:
        print0(f"note: /dev/shm has {mb(free)} free, so the loader ships each batch of {batch_size} in chunks of "
               f"{chunk} (more overhead per item); {SHM_ADVICE}")
    return chunk


# Items and batches are tensors in (nested) tuples/lists.

def nbytes(item):
    if torch.is_tensor(item):
        return item.nbytes
    return sum(nbytes(i) for i in item) if isinstance(item, (tuple, list)) else 0


def to_device(batch, device):  # from pinned memory the copy does not wait for the device
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    return type(batch)(to_device(b, device) for b in batch)


def concat(parts):
    """Chunks of one batch -> the batch."""
    return torch.cat(parts) if torch.is_tensor(parts[0]) else type(parts[0])(concat(list(p)) for p in zip(*parts))


def ignore_stop_signals(worker_id):
    """DataLoader workers leave SIGTERM/SIGUSR1 to the training process, which saves and stops."""
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)


# ----------------------------------------------------------------------------- batched on the device
# The per-tile augmentations for a whole batch at once (B tiles, or V views of each, view-major: V * B
# images), with the same distributions and other draws, every draw from a StepRandom. The loader's workers
# only cut raw windows (RandomTiles(raw=True)).

def transport_dtype(datasets):
    """int16 (half of float32) when every raster holds integers of at most 16 bits (uint16 as its bit
    pattern, undone on the device), else float32."""
    small = all(r.image.dtype in (np.int8, np.uint8, np.int16, np.uint16) for ds in datasets for r in ds.rasters)
    return np.int16 if small else np.float32


class DeviceNormalise:
    """HSIDataset.crop's and normalise's arithmetic, bit for bit, on the device. physical: raw windows
    (B, C, S, S) and their info (B, 5) (dataset, valid extent) -> float32 in physical units, invalid pixels
    (nodata, NaN, fill, past the border) at the band means; calling it: (x - mean) / std per band with each
    sample's dataset's statistics, then its projection (the wavelength grid's resampling, or PCA) as one
    batched matmul (equal up to float rounding). Sensors with fewer bands than the most arrive padded with
    copies of their last band (RandomTiles): those get zero weight, and copies change none of the cross-band
    reductions on the way (the validity mask's any, the contrast bound's min)."""

    def __init__(self, datasets, device):
        on = lambda values, dtype=torch.float32: torch.tensor(np.asarray(values), dtype=dtype, device=device)  # noqa
        C = max(ds.raw_bands for ds in datasets)
        pad = lambda a: np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, C - a.shape[-1])])  # noqa: E731 - zero weight
        self.mean = on(np.stack([pad(ds.mean) for ds in datasets]))  # (D, C)
        self.inv_std = on(np.stack([pad(1 / ds.std) for ds in datasets]))
        projections = [ds.pca if ds.pca is not None else ds.grid_matrix for ds in datasets]
        self.projection = None if projections[0] is None else on(np.stack([pad(p) for p in projections]))
        self.scale = on([ds.value_scale or 1.0 for ds in datasets])
        self.reflectance = on([ds.value_scale is not None for ds in datasets], torch.bool)  # else raw counts
        self.nodata = on([np.nan if ds.nodata is None else ds.nodata for ds in datasets])  # NaN: never equal
        unsigned = [any(r.image.dtype == np.uint16 for r in ds.rasters) and not ds.signed_view for ds in datasets]
        self.unsigned = on(unsigned, torch.bool)
        # What can happen at all, known here, so that the common case runs few kernels.
        self.checks = {"unsigned": any(unsigned), "nodata": any(ds.nodata is not None for ds in datasets),
                       "scale": any(ds.value_scale is not None for ds in datasets),
                       "smallest side": min(min(r.image.shape[1:]) for ds in datasets for r in ds.rasters)}

    def physical(self, raw, info):
        d, extent = info[:, 0].long(), info[:, 1:].long()
        each = lambda t: t[d].view(-1, 1, 1, 1)  # noqa: E731 - one value per sample, over (C, H, W)
        x, bad, checks = raw.float(), [], self.checks
        if raw.dtype == torch.int16 and checks["unsigned"]:
            x = torch.where(each(self.unsigned) & (x < 0), x + 65536, x)  # uint16 data sent as its bit pattern
        if checks["nodata"]:
            bad.append(x == each(self.nodata))
        if checks["scale"]:
            x = x * each(self.scale)
            bad.append(each(self.reflectance) & (x < FILL_BELOW_REFLECTANCE))
        if raw.is_floating_point():
            bad.append(~torch.isfinite(x))
        invalid = [b.any(1) for b in bad]
        if max(x.shape[-2:]) > checks["smallest side"]:  # some window may reach past its raster's border
            ys, xs = (torch.arange(n, device=x.device) for n in x.shape[-2:])
            invalid.append(~(((ys >= extent[:, 0, None]) & (ys < extent[:, 2, None]))[:, :, None]
                             & ((xs >= extent[:, 1, None]) & (xs < extent[:, 3, None]))[:, None, :]))
        if not invalid:
            return x
        return torch.where(torch.stack(invalid).any(0)[:, None], self.mean[d][:, :, None, None], x)

    def __call__(self, x, d):
        d = d.long()
        x = (x - self.mean[d][:, :, None, None]) * self.inv_std[d][:, :, None, None]
        if self.projection is None:
            return x
        P = self.projection[d] if len(self.projection) > 1 else self.projection[0]  # (N, G, C), or one for all
        return (P @ x.flatten(2)).unflatten(2, x.shape[-2:])


class StepRandom:
    """Uniform random numbers for one step of the global batch, of which this process takes its rows: every
    draw is made for all world x batch samples from a generator seeded by (seed, stream, step), and row
    r * batch + j goes to sample j of rank r (the global sample StepBatches gives it). So an augmentation
    depends on (seed, step, place in the global batch) only: one process and several draw the same, and a
    resumed run redraws exactly, for a few numbers per sample."""

    def __init__(self, seed, step, rank, world, batch, device, stream=0):
        state = np.random.SeedSequence([seed, stream, step]).generate_state(1, np.uint64)[0]
        self.gen = torch.Generator(device).manual_seed(int(state))
        self.rows, self.total, self.device = slice(rank * batch, (rank + 1) * batch), world * batch, device

    def uniform(self, *shape):
        """(batch, *shape) uniforms in [0, 1) for this rank's samples."""
        return torch.rand(self.total, *shape, generator=self.gen, device=self.device)[self.rows]

    def views(self, views, *shape):
        """(views * batch, *shape) uniforms for `views` views of each sample, view-major."""
        return self.uniform(views, *shape).transpose(0, 1).flatten(0, 1)


def crop_boxes(u, scale, ratio=(3 / 4, 4 / 3)):
    """random_resized_crop's boxes from u (N, 2 * CROP_TRIES + 2) uniforms, in fractions of the tile's side
    -> (w, h, x, y), each (N,), (x, y) the centre in affine_grid units ([-1, 1])."""
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0:2 * CROP_TRIES:2]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1:2 * CROP_TRIES:2]
    w, h = (area * log_r.exp()).sqrt(), (area / log_r.exp()).sqrt()  # (N, tries)
    fits = (w <= 1) & (h <= 1)
    first = fits.float().argmax(1, keepdim=True)
    w = torch.where(fits.any(1), w.gather(1, first)[:, 0], 1.0)  # none fits: the whole tile
    h = torch.where(fits.any(1), h.gather(1, first)[:, 0], 1.0)
    return w, h, (2 * u[:, -2] - 1) * (1 - w), (2 * u[:, -1] - 1) * (1 - h)


def full_boxes(n, device):
    one, zero = torch.ones(n, device=device), torch.zeros(n, device=device)
    return one, one, zero, zero


def dihedral_index(u):
    """One of the 8 rot90/flip transforms per image, from uniforms u (N,)."""
    return (u * 8).long().clamp(max=7)


def dihedral_matrices(k):
    """(N, 2, 2) matrices of the rot90/flip transforms k (N,), built where k is (no table to copy to the
    device): k < 4 diagonal, k >= 4 anti-diagonal, the signs from k's two low bits."""
    a, b, swap = 1 - 2 * ((k >> 1) & 1).float(), 1 - 2 * (k & 1).float(), (k >= 4).float()
    return torch.stack([a * (1 - swap), a * swap, b * swap, b * (1 - swap)], -1).view(-1, 2, 2)


def resample(x, boxes, k, size):
    """Crop (boxes (w, h, x, y)), turn (rot90/flip k, None: not turned) and resize to size x size in one
    bilinear affine resampling. x (B, C, S, S); boxes and k hold V views per tile, view-major -> (V * B, C,
    size, size). The views share one sampling grid per tile, so x is never copied V times."""
    w, h, cx, cy = boxes
    (B, C), N = x.shape[:2], w.shape[0]
    theta = torch.zeros(N, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2] = w, h, cx, cy
    if k is not None:
        theta[:, :, :2] = theta[:, :, :2] @ dihedral_matrices(k)
    grid = F.affine_grid(theta, [N, 1, size, size], align_corners=False)  # (V * B, size, size, 2)
    grid = grid.view(N // B, B, size, size, 2).transpose(0, 1).reshape(B, N // B * size, size, 2)
    out = F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(B, C, N // B, size, size).transpose(0, 2).transpose(1, 2).reshape(N, C, size, size)


def batch_jitter(x, u, brightness, contrast, band_gain, apply, spread=None):
    """spectral_jitter of the images of x (N, C, H, W) where apply (N,), from u (N, 2 + C) uniforms, as one
    multiply-add per value: (mean + c (x - mean)) gain = mean (1 - c) gain + c gain x."""
    C = x.shape[1]
    gain = (1 - brightness + 2 * brightness * u[:, :1]) * (1 - band_gain + 2 * band_gain * u[:, 2:2 + C])  # (N, C)
    c = 1 - contrast + 2 * contrast * u[:, 1:2]
    mean, low = x.mean((2, 3)), x.amin((2, 3))
    c_max = (mean / (mean - low).clamp_min(1e-12)).amin(1, keepdim=True)  # the darkest pixel reaches zero
    c = torch.where(low.amin(1, keepdim=True) >= 0, torch.minimum(c, c_max), c)
    if spread is not None:
        bound = spread * x.std((2, 3), correction=0) / mean.abs().clamp_min(1e-12)
        gain = torch.minimum(torch.maximum(gain, 1 - bound), 1 + bound)
    scale = torch.where(apply[:, None], c * gain, 1.0)
    shift = torch.where(apply[:, None], mean * (1 - c) * gain, 0.0)
    return torch.addcmul(shift[:, :, None, None], scale[:, :, None, None], x)


def batch_blur(x, sigma, max_sigma):
    """gaussian_blur of every image of x (N, C, H, W) with its own sigma (N,), 0 = none, as one separable
    depthwise convolution of the batch: each kernel cut at ceil(3 sigma), as gaussian_blur's."""
    N, C, H, W = x.shape
    R = min(math.ceil(3 * max_sigma), (min(H, W) - 1) // 2)
    if R < 1:
        return x
    t = torch.arange(-R, R + 1, device=x.device, dtype=x.dtype)
    on = sigma > 0
    s = torch.where(on, sigma, 1.0)[:, None]
    k = torch.exp(-0.5 * (t / s) ** 2) * (t.abs() <= (3 * s).ceil())
    k = torch.where(on[:, None], k / k.sum(1, keepdim=True), (t == 0).to(x.dtype))  # (N, 2R + 1)
    k = k[:, None].expand(N, C, 2 * R + 1).reshape(N * C, 1, 1, 2 * R + 1)
    y = x.reshape(1, N * C, H, W)  # every band of every image is its own channel
    y = F.conv2d(F.pad(y, (R, R, 0, 0), mode="reflect"), k, groups=N * C)
    y = F.conv2d(F.pad(y, (0, 0, R, R), mode="reflect"), k.view(N * C, 1, -1, 1), groups=N * C)
    return y.view(N, C, H, W)


def batch_solarize(x, apply):
    return torch.where(apply.view(-1, 1, 1, 1) & (x > 0), -x, x)


def per_view(u, p):
    """u (V * B,) view-major uniforms < p[v] for view v: a draw with a probability per view."""
    return torch.cat([c < pv for c, pv in zip(u.chunk(len(p)), p)])


def augment_on_device(augment, x, d, rnd, normalise):
    """An Augment or a MultiCrop for tiles x (B, C, S, S) in physical units from datasets d (B,), drawn from
    rnd (a StepRandom), normalised by a DeviceNormalise: an Augment -> (B, C, S, S); a MultiCrop -> global
    views (2B, C, G, G) and local views (n_local * B, C, L, L), view-major."""
    a = augment
    if isinstance(a, MultiCrop):
        return (multi_crop_views(a, x, d, rnd, normalise, a.global_size, a.global_scale, a.global_blur_p,
                                 a.global_solarize_p),
                multi_crop_views(a, x, d, rnd, normalise, a.local_size, a.local_scale, (a.local_blur_p,) * a.n_local,
                                 (0.0,) * a.n_local))
    if a.flips or a.crop_scale is not None:
        boxes = full_boxes(len(x), x.device) if a.crop_scale is None else crop_boxes(rnd.uniform(2 * CROP_TRIES + 2),
                                                                                      a.crop_scale)
        x = resample(x, boxes, dihedral_index(rnd.uniform()) if a.flips else None, x.shape[-1])
    return normalise(x, d)


def multi_crop_views(crops, x, d, rnd, normalise, size, scale, blur_p, solarize_p):
    """len(blur_p) views of every tile, view v blurred with probability blur_p[v] and solarised with
    solarize_p[v] -> (V * B, C, size, size), view-major."""
    V, C = len(blur_p), x.shape[1]
    if V == 0:
        return x.new_zeros(0, C, size, size)
    v = resample(x, crop_boxes(rnd.views(V, 2 * CROP_TRIES + 2), scale), dihedral_index(rnd.views(V)), size)
    jitter = (rnd.views(V) < crops.jitter_p) & normalise.reflectance[d].repeat(V)
    v = batch_jitter(v, rnd.views(V, 2 + C), crops.brightness, crops.contrast, crops.band_gain, jitter, crops.spread)
    blur = per_view(rnd.views(V), blur_p)
    lo, hi = crops.blur_sigma
    v = batch_blur(v, torch.where(blur, lo + (hi - lo) * rnd.views(V), 0.0), hi)
    return batch_solarize(normalise(v, d.repeat(V)), per_view(rnd.views(V), solarize_p))


def view_major(views):
    """The loader's collated per-tile views ((B, 2, C, G, G), (B, n, C, L, L)) -> augment_on_device's layout."""
    return tuple(v.transpose(0, 1).flatten(0, 1) for v in views)


# iBOT masks: how many tokens each crop masks is drawn on the host (then the step needs no host sync to know
# the number of masked tokens); which tokens, on the device.

def ibot_mask_counts(batch, tokens, rng, ratio=(0.1, 0.5), probability=0.5):
    """(batch,) masked-token counts: a `probability` share of the images masked, their ratios stratified
    over `ratio` (one draw per equal-width bin, as DINOv2 does), the others not; order shuffled."""
    n_masked = int(batch * probability)
    edges = np.linspace(*ratio, n_masked + 1)
    counts = np.zeros(batch, np.int64)
    counts[:n_masked] = np.round(tokens * rng.uniform(edges[:-1], edges[1:]))
    return counts[rng.permutation(batch)]


def spectral_mask_counts(n, groups, rng, ratio=(0.1, 0.5), probability=0.5):
    """(n,) masked band-group counts: a `probability` share of the rows hides round(U(ratio) * groups)
    groups (at least one), the others none."""
    masked = rng.random(n) < probability
    return np.where(masked, np.maximum(1, np.round(rng.uniform(*ratio, n) * groups)), 0).astype(np.int64)


def block_masks(counts, h, w, u_blocks, u_fill, min_block=4, aspect=(0.3, 1 / 0.3)):
    """BEiT-style block masks, batched: row i of the (n, h * w) result masks exactly counts[i] of the h x w
    patches. Per row, T rectangles (u_blocks (n, T, 4) uniforms: area U(min_block, patches still missing),
    log-uniform aspect ratio, uniform position) are laid one after the other, each kept when it adds at
    least one and at most the missing patches; then single random patches (u_fill (n, h * w)) make the
    count exact."""
    ys = torch.arange(h, device=counts.device).view(1, h, 1)
    xs = torch.arange(w, device=counts.device).view(1, 1, w)
    mask = torch.zeros(len(counts), h, w, dtype=torch.bool, device=counts.device)
    lo, hi = math.log(aspect[0]), math.log(aspect[1])
    for u in u_blocks.unbind(1):
        left = counts - mask.sum((1, 2))
        area = min_block + u[:, 0] * (left - min_block)
        ar = torch.exp(lo + (hi - lo) * u[:, 1])
        bh, bw = (area * ar).sqrt().round(), (area / ar).sqrt().round()
        top, lft = (u[:, 2] * (h - bh + 1)).floor(), (u[:, 3] * (w - bw + 1)).floor()
        rect = ((ys >= top.view(-1, 1, 1)) & (ys < (top + bh).view(-1, 1, 1))
                & (xs >= lft.view(-1, 1, 1)) & (xs < (lft + bw).view(-1, 1, 1)))
        new = (rect & ~mask).sum((1, 2))
        ok = (left >= min_block) & (bh >= 1) & (bh <= h) & (bw >= 1) & (bw <= w) & (new >= 1) & (new <= left)
        mask |= rect & ok.view(-1, 1, 1)
    mask = mask.flatten(1)
    left = counts - mask.sum(1)
    order = torch.where(mask, 2.0, u_fill).argsort(1).argsort(1)  # unmasked patches first, in random order
    return mask | (order < left[:, None])


def random_subsets(counts, u):
    """(n, G) bool: row i marks counts[i] of its G entries, chosen uniformly by the uniforms u (n, G)."""
    return u.argsort(1).argsort(1) < counts[:, None]


def augmented_batches(datasets, size, augment, seed, batch_size, start_step, rank, world, workers, device,
                      on_device):
    """Each step's augmented, normalised batch on the device for the pre-training trainers, laid out as
    augment_on_device returns it. on_device: the workers only cut raw windows and the augmentations run
    batched on the device, drawn from StepRandom(seed, step); else the workers augment every tile (CPU
    runs). Same windows and distributions, other draws."""
    tiles = RandomTiles(datasets, size, seed, None if on_device else augment, labels=False, raw=on_device)
    normalise = DeviceNormalise(datasets, device) if on_device else None
    loader = StepLoader(tiles, batch_size, start_step, rank, world, workers, device)
    multi = isinstance(augment, MultiCrop)

    def batches():  # the loader and constants above are ready before the first step
        for step, batch in enumerate(loader, start_step):
            if not on_device:
                yield view_major(batch[0]) if multi else batch[0]
                continue
            raw, info = batch
            rnd = StepRandom(seed, step, rank, world, batch_size, device)
            yield augment_on_device(augment, normalise.physical(raw, info), info[:, 0], rnd, normalise)
    return batches()
