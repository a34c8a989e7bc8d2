"""One backbone for every sensor (issue #17): scenes resampled by wavelength onto one common grid,
mixed-sensor pre-training, transfer to a sensor never seen in pre-training."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch

import data
import finetune_seg
import pretrain_dino
import pretrain_mae
from conftest import write_scene
from models import MAE, SimMIM, build_backbone
from test_pretrain_dino import dino_args, interrupt_at_call
from test_pretrain_mae import ROOT, Interrupt, args_for, fail_at_call, losses

# Three fake sensors: different band counts, ranges and spacings (one finer than the grid, one coarser).
SENSORS = {"a": np.linspace(400, 1000, 12), "b": np.linspace(450, 2400, 20), "c": np.linspace(380, 900, 90)}


def sensor_scene(tmp_path, name, wavelengths=None, size=40, seed=0):
    wl = SENSORS[name] if wavelengths is None else wavelengths
    return write_scene(tmp_path / name, bands=len(wl), size=size, seed=seed, wavelengths_nm=[float(w) for w in wl])


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
    a, b = (data.load_dataset(p, cache_dir=cache_dir, bands=data.ANY_SENSOR) for p in (src, other))
    x = [torch.from_numpy(ds.normalize(ds.crop(0, 4, 4, 32, 32)[0]))[None] for ds in (a, b)]
    torch.testing.assert_close(x[0], x[1], atol=1e-5, rtol=1e-5)
    for name, kw in (("sst", {"spectral_patch": 8}), ("ssvit", {"spectral_patch": 12}), ("vit", {})):
        torch.manual_seed(0)
        model = build_backbone(name, "tiny", a.bands, 32, 8, wavelengths=a.input_wavelengths, **kw).eval()
        with torch.no_grad():
            out = [model.intermediate_layers(v, 1)[0][1] for v in x]
        torch.testing.assert_close(out[0], out[1], atol=1e-4, rtol=1e-4)


def test_a_scene_without_wavelengths_gets_one_clear_error(tmp_path, cache_dir):
    bare = write_scene(tmp_path / "bare", bands=8)
    with pytest.raises(data.DataError, match=r"^bare: a wavelength-aware model .* wavelengths_nm"):
        pretrain_mae.main(args_for(f"{sensor_scene(tmp_path, 'a')},{bare}", tmp_path / "o", cache_dir, 2,
                                   "--any-sensor"))


def test_published_band_centres_of_the_unmixing_benchmarks(tmp_path, cache_dir):
    ds = data.load_dataset(write_scene(tmp_path / "samson", bands=156, size=12, sensor="SAMSON"), cache_dir=cache_dir)
    assert ds.wavelengths[0] == 401 and ds.wavelengths[-1] == 889 and len(ds.wavelengths) == 156
    assert len(data.KNOWN_WAVELENGTHS["AVIRIS", 198]) == 198


def three_sensors(tmp_path):
    return ",".join(sensor_scene(tmp_path, n, seed=i) for i, n in enumerate(SENSORS))


@pytest.mark.parametrize("backbone", [["--backbone", "sst", "--spectral-patch", "24"],
                                      ["--backbone", "ssvit", "--spectral-patch", "24"],
                                      ["--backbone", "ssvit", "--spectral-patch", "24", "--device-augment"]])
def test_one_model_three_sensors_resumes_exactly(tmp_path, cache_dir, monkeypatch, backbone):
    """Three sensors in one run, mixed within every batch: bit-for-bit resume, and the checkpoint
    records each sensor's wavelengths."""
    scenes = three_sensors(tmp_path)
    flags = ["--any-sensor", *backbone]
    pretrain_mae.main(args_for(scenes, tmp_path / "full", cache_dir, 6, *flags))
    def interrupt(result):
        raise Interrupt()
    with monkeypatch.context() as m:
        fail_at_call(m, 5, interrupt, SimMIM if backbone[1] == "sst" else MAE)  # in step 5, after step 3's checkpoint
        with pytest.raises(Interrupt):
            pretrain_mae.main(args_for(scenes, tmp_path / "cut", cache_dir, 6, *flags))
    pretrain_mae.main(args_for(scenes, tmp_path / "cut", cache_dir, 6, *flags, "--resume"))
    full, cut = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("full", "cut"))
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    assert all(torch.equal(v, cut["model"][k]) for k, v in full["model"].items())
    bands = full["backbone"]["bands"]
    assert bands["grid"] == data.GRID and list(bands["sensors"]) == ["a", "b", "c"]
    assert bands["sensors"]["b"] == pytest.approx(SENSORS["b"].tolist())


def test_three_sensors_loss_goes_down(tmp_path, cache_dir):
    pretrain_mae.main(args_for(three_sensors(tmp_path), tmp_path / "r", cache_dir, 60, "--any-sensor", "--backbone",
                               "sst", "--spectral-patch", "24", "--ckpt-every", "60", "--blr", "0.05",
                               "--batch-size", "8", "--warmup-steps", "5", "--crop-scale", "1", "1"))
    curve = list(losses(tmp_path / "r").values())
    assert sum(curve[-10:]) / 10 < 0.9 * sum(curve[:10]) / 10, curve


def test_transfer_to_an_unseen_sensor(tmp_path, cache_dir, capsys):
    """Pre-trained on sensors a and c (380-1000 nm), fine-tuned on d (600-2500 nm, mostly new):
    the checkpoint's weights load as they are (no new parameters) and the run says which bands are new."""
    pre = tmp_path / "pre"
    pretrain_mae.main(args_for(",".join(sensor_scene(tmp_path, n) for n in "ac"), pre, cache_dir, 2, "--any-sensor",
                               "--backbone", "sst", "--spectral-patch", "24"))
    d = sensor_scene(tmp_path, "d", wavelengths=np.linspace(600, 2500, 40))
    capsys.readouterr()
    finetune_seg.main(["--data", d, "--init", str(pre / "ckpt.pt"), "--out", str(tmp_path / "ft"), "--cache-dir",
                       cache_dir, "--steps", "2", "--eval-every", "2", "--img-size", "32", "--batch-size", "2",
                       "--workers", "0", "--labels-per-class", "3"])
    out = capsys.readouterr().out
    assert "d: 40 bands on 196 grid points; 146 new (not in pre-training on a, c) (1060-2510 nm)" in out
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)
    pre_ckpt = torch.load(pre / "ckpt.pt", weights_only=False)
    assert ckpt["backbone"]["in_chans"] == pre_ckpt["backbone"]["in_chans"] == 216


def test_tiles_are_drawn_in_proportion_to_each_scenes_pixels(tmp_path, cache_dir):
    big = data.load_dataset(sensor_scene(tmp_path, "a", size=60), cache_dir=cache_dir, bands=data.ANY_SENSOR)
    small = data.load_dataset(sensor_scene(tmp_path, "b", size=20), cache_dir=cache_dir, bands=data.ANY_SENSOR)
    tiles = data.RandomTiles([big, small], 16, 0, labels=False)
    assert np.mean([tiles[i][1] for i in range(400)]) == pytest.approx(400 / 4000, abs=0.06)


def test_two_processes_gloo_with_different_sensors_on_the_ranks(tmp_path, cache_dir):
    scenes = three_sensors(tmp_path)
    datasets = data.load_datasets(scenes, cache_dir=cache_dir, bands=data.ANY_SENSOR)
    tiles = data.RandomTiles(datasets, 32, 0, labels=False)  # three scenes of one size: each a third of the tiles
    B, world = 2, 2  # the items rank r reads at step s: [(s * world + r) * B, ... + B)
    per_rank = [[{tiles[(s * world + r) * B + j][1] for j in range(B)} for r in range(world)] for s in range(4)]
    assert any(ranks[0] != ranks[1] for ranks in per_rank), per_rank  # the ranks hold different sensors
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "pretrain_mae.py"), *args_for(scenes, tmp_path / "ddp", cache_dir, 4, "--any-sensor",
                                                            "--batch-size", str(B))]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(losses(tmp_path / "ddp")) == 4


@pytest.mark.parametrize("backbone", [["vit"], ["ssvit", "--spectral-patch", "24"]])
def test_dino_on_three_sensors(tmp_path, cache_dir, monkeypatch, backbone):
    """DINOv2 with mixed-sensor batches: multi-crop per sensor, every view on the grid; resumes exactly."""
    scenes, flags = three_sensors(tmp_path), ["--any-sensor", "--backbone", *backbone]
    pretrain_dino.main(dino_args(scenes, tmp_path / "full", cache_dir, 4, 4, *flags))
    with monkeypatch.context() as m:
        interrupt_at_call(m, 3)  # dies in step 3, after the step-2 checkpoint
        with pytest.raises(KeyboardInterrupt):
            pretrain_dino.main(dino_args(scenes, tmp_path / "cut", cache_dir, 4, 4, *flags))
    pretrain_dino.main(dino_args(scenes, tmp_path / "cut", cache_dir, 4, 4, *flags, "--resume"))
    full, cut = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("full", "cut"))
    assert all(torch.equal(v, cut["teacher"][k]) for k, v in full["teacher"].items())
    assert list(full["backbone"]["bands"]["sensors"]) == ["a", "b", "c"] and full["backbone"]["in_chans"] == 216
