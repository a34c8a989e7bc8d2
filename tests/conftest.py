"""What many test files share: data writers (fixtures write their own small data: a fresh clone's tests never
need ../shared), the raster cache per test, each script's small-run flags, and the helpers that interrupt,
break or read back a run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile

import common
from models import MAE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WHU_TILE = 48  # real tiles are 512; the readers take any size


# ----------------------------------------------------------------------------- data writers

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
    tifffile.imwrite(os.path.join(folder, "image.tif"), img.astype(np.uint16), compression="zlib",
                     photometric="minisblack")
    if with_gt:
        tifffile.imwrite(os.path.join(folder, "gt.tif"), gt)
    info = {"name": os.path.basename(folder), "nodata": nodata, "value_scale": None,
            "class_names": [f"c{i}" for i in range(classes)] if with_gt else [], **meta}
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump(info, f)
    return str(folder)


def rewrite_image(folder, fn):
    """Replace a scene's image.tif by fn(image); returns the new image."""
    path = os.path.join(folder, "image.tif")
    img = fn(tifffile.imread(path))
    tifffile.imwrite(path, img, photometric="minisblack")
    return img


# Three fake sensors: different band counts, ranges and spacings (one finer than the grid, one coarser).
SENSORS = {"a": np.linspace(400, 1000, 12), "b": np.linspace(450, 2400, 20), "c": np.linspace(380, 900, 90)}


def sensor_scene(tmp_path, name, wavelengths=None, size=40, seed=0):
    wl = SENSORS[name] if wavelengths is None else wavelengths
    return write_scene(tmp_path / name, bands=len(wl), size=size, seed=seed, wavelengths_nm=[float(w) for w in wl])


def three_sensors(tmp_path):
    """--data for the three SENSORS, one scene each."""
    return ",".join(sensor_scene(tmp_path, n, seed=i) for i, n in enumerate(SENSORS))


def contrast_sources(tmp_path):
    """Two unlabelled scenes from 'different sensors' (6 and 9 bands) and a labelled target (16 bands)."""
    a = write_scene(tmp_path / "src" / "sensor_a", bands=6, size=24, seed=1, with_gt=False)
    b = write_scene(tmp_path / "src" / "sensor_b", bands=9, size=20, seed=2, with_gt=False)
    target = write_scene(tmp_path / "target", bands=16, size=32)
    return f"{a},{b}", target


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test's decoded rasters and band statistics in its own cache ($HSI_SSL_CACHE, which the scripts
    and subprocesses read); the path, for the data functions that take it."""
    path = str(tmp_path / "cache")
    monkeypatch.setenv("HSI_SSL_CACHE", path)
    return path


@pytest.fixture(autouse=True)
def quick_peak_probe(monkeypatch):
    """Every trainer measures the CPU's matmul peak for its MFU: 2048 x 2048 matmuls for a second or more per
    run, the same measurement on smaller matrices here (arguments given explicitly still count)."""
    real = common.matmul_tflops

    def quick(dtype, n=256, seconds=0.02, probes=1):
        return real(dtype, n, seconds, probes)
    monkeypatch.setattr(common, "matmul_tflops", quick)


@pytest.fixture
def whu_root(tmp_path):
    return write_whu(tmp_path / "whu")


@pytest.fixture
def scene(tmp_path):
    return write_scene(tmp_path / "scene")


# ----------------------------------------------------------------------------- small runs of each script

def mae_args(data, out, steps=6, *extra):
    return ["--data", data, "--out", str(out), "--steps", str(steps), "--img-size", "32", "--batch-size", "4",
            "--warmup-steps", "2", "--blr", "1e-2", "--decoder-dim", "32", "--decoder-depth", "1",
            "--log-every", "1", "--ckpt-every", "3", "--workers", "0", *extra]


def dino_args(data, out, steps=4, batch=4, *extra):
    return ["--data", data, "--out", str(out), "--steps", str(steps), "--img-size", "16", "--local-crops", "2",
            "--batch-size", str(batch), "--prototypes", "64", "--warmup-steps", "1", "--teacher-temp-warmup-steps",
            "2", "--log-every", "1", "--ckpt-every", "2", "--workers", "0", *extra]


def seg_args(data, out, *extra):
    return ["--data", data, "--out", str(out), "--img-size", "16", "--batch-size", "4", "--steps", "4",
            "--log-every", "2", "--eval-every", "2", "--ckpt-every", "2", "--workers", "0", *extra]


def contrast_args(data, out, steps=6, *extra):
    return ["--data", data, "--out", str(out), "--steps", str(steps), "--width", "16", "--depth", "2",
            "--region-size", "3", "--log-every", "1", "--ckpt-every", "3", "--workers", "0", *extra]


def torchrun(script, args, timeout=300):
    """`script args` as two gloo processes under torchrun; fails the test with their stderr unless both succeed."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


# ----------------------------------------------------------------------------- reading a run back

def rows(out):
    """{step: everything logged at that step} from <out>/metrics.jsonl; a resumed run's rows for the steps
    after its checkpoint replace the interrupted run's."""
    merged = {}
    with open(os.path.join(out, "metrics.jsonl")) as f:
        for r in map(json.loads, f):
            merged[r["step"]] = {**merged.get(r["step"], {}), **r}
    return merged


def losses(out):
    """{step: training loss}."""
    return {s: r["loss"] for s, r in rows(out).items() if "loss" in r}


# ----------------------------------------------------------------------------- breaking a run

class Interrupt(Exception):
    pass


def fail_at_call(monkeypatch, n, make_result, model=MAE):
    """Make the n-th forward call of `model` (MAE, or SimMIM for sst) return make_result(real result), which
    may raise or send a signal instead."""
    real, calls = model.forward, [0]

    def forward(self, *a, **kw):
        calls[0] += 1
        result = real(self, *a, **kw)
        return make_result(result) if calls[0] == n else result
    monkeypatch.setattr(model, "forward", forward)


def interrupt_at_call(monkeypatch, n):
    """The n-th DINO student forward raises KeyboardInterrupt (with --ckpt-every 2, call 3 dies after the
    step-2 checkpoint)."""
    import pretrain_dino
    real, calls = pretrain_dino.Student.forward, [0]

    def forward(self, *a, **k):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(self, *a, **k)
    monkeypatch.setattr(pretrain_dino.Student, "forward", forward)
