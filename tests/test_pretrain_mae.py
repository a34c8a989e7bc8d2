"""pretrain_mae.py: MAE (vit, ssvit) and SimMIM (sst) runs: exact resume with either augmentation pipeline, the
loss goes down, a diverged or mismatched run stops cleanly, torchrun, the MaskedSST preset end to end, and
pre-training on three sensors at once (--any-sensor)."""
import os

import pytest
import torch

import data
import finetune_seg
import pretrain_mae
from conftest import (ROOT, SENSORS, Interrupt, fail_at_call, losses, mae_args, sensor_scene, three_sensors, torchrun,
                      write_scene)
from models import MAE, SimMIM


@pytest.mark.parametrize("pipeline", ["--no-device-augment", "--device-augment"])
def test_resume_continues_exactly(scene, tmp_path, monkeypatch, pipeline):
    """Bit for bit, with the augmentations in the loader or batched on the device (here the CPU)."""
    monkeypatch.setattr(pretrain_mae, "IMAGE_EVERY", 2)  # reconstructions to TensorBoard on the way
    pretrain_mae.main(mae_args(scene, tmp_path / "a", 6, pipeline))
    full = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=False)

    def interrupt(result):
        raise Interrupt()
    with monkeypatch.context() as m:
        fail_at_call(m, 5, interrupt)  # dies during step 5, after the step-3 checkpoint
        with pytest.raises(Interrupt):
            pretrain_mae.main(mae_args(scene, tmp_path / "b", 6, pipeline))
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["step"] == 3
    pretrain_mae.main(mae_args(scene, tmp_path / "b", 6, pipeline, "--resume"))
    resumed = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert any(f.startswith("events") for f in os.listdir(tmp_path / "a" / "tb"))


def test_loss_goes_down(scene, tmp_path):
    pretrain_mae.main(mae_args(scene, tmp_path / "r", 60, "--ckpt-every", "60", "--blr", "0.05",
                               "--batch-size", "8", "--warmup-steps", "5", "--crop-scale", "1", "1"))
    curve = list(losses(tmp_path / "r").values())
    assert sum(curve[-10:]) / 10 < 0.93 * sum(curve[:10]) / 10, curve


@pytest.mark.parametrize("backbone", ["ssvit", "sst"])
def test_masked_modelling_loss_goes_down(backbone, scene, tmp_path, monkeypatch):
    # SST SimMIM's curve on this fixture falls ~9% in 50 steps with 2 threads (10% with 1): at the bar. 80 steps
    # clear it with either thread count.
    monkeypatch.setattr(pretrain_mae, "IMAGE_EVERY", 20)  # each model's reconstructions drawn
    steps = "80" if backbone == "sst" else "50"
    pretrain_mae.main(mae_args(scene, tmp_path / backbone, steps, "--batch-size", "8", "--warmup-steps", "5", "--blr",
                               "0.05", "--ckpt-every", steps, "--crop-scale", "1", "1", "--backbone", backbone,
                               "--spectral-patch", "4"))
    curve = list(losses(tmp_path / backbone).values())
    assert sum(curve[-10:]) / 10 < 0.9 * sum(curve[:10]) / 10, curve


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(scene, tmp_path, monkeypatch):
    fail_at_call(monkeypatch, 5, lambda r: (r[0] * float("nan"), *r[1:]))
    with pytest.raises(FloatingPointError, match="non-finite loss.*ckpt.pt"):
        pretrain_mae.main(mae_args(scene, tmp_path / "n", 6, "--log-every", "3"))
    ckpt = torch.load(tmp_path / "n" / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 3 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_refuses_mismatched_checkpoint_and_overwrite(scene, tmp_path):
    out = tmp_path / "m"
    pretrain_mae.main(mae_args(scene, out, 3))
    with pytest.raises(FileExistsError, match="--resume"):
        pretrain_mae.main(mae_args(scene, out, 3))
    other = write_scene(tmp_path / "other", bands=12)
    with pytest.raises(ValueError, match=r"ckpt.pt: checkpoint was trained on 16 bands but the data has 12"):
        pretrain_mae.main(mae_args(other, out, 6, "--resume"))
    with open(out / "ckpt.pt", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="ckpt.pt: cannot read checkpoint"):
        pretrain_mae.main(mae_args(scene, out, 6, "--resume"))


def test_torchrun_two_processes_gloo(scene, tmp_path):
    out = tmp_path / "ddp"
    torchrun(os.path.join(ROOT, "pretrain_mae.py"), mae_args(scene, out, 4))
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    assert len(losses(out)) == 4


def test_crop_off_under_device_augment_only_flips(scene, tmp_path, monkeypatch):
    import data
    real, seen = data.resample, []

    def spy(x, *a, **k):
        out = real(x, *a, **k)
        seen.append((x, out))
        return out
    monkeypatch.setattr(data, "resample", spy)
    pretrain_mae.main(mae_args(scene, tmp_path / "g", 1, "--img-size", "16", "--device-augment", "--crop-scale", "1",
                               "1"))
    x, out = seen[0]
    for a, b in zip(x, out):  # each image is one of its 8 flips/rotations, values not resampled
        views = [a.rot90(k, (-2, -1)) for k in range(4)]
        views += [v.flip(-1) for v in views]
        assert any(torch.allclose(b, v, atol=1e-5 * a.abs().max()) for v in views)


def test_maskedsst_pretrain_then_finetune(tmp_path, monkeypatch):
    scene = write_scene(tmp_path / "s20", bands=20, size=24)
    pre = tmp_path / "mst"
    monkeypatch.setattr(pretrain_mae, "IMAGE_EVERY", 1)  # SimMIM's reconstructions of 1 px tokens drawn
    pretrain_mae.main(["--preset", "maskedsst", "--data", scene, "--out", str(pre), "--steps", "2", "--batch-size",
                       "2", "--workers", "0"])
    ckpt = torch.load(pre / "ckpt.pt", weights_only=False)
    assert ckpt["backbone"]["block_order"] == "spatial-first" and ckpt["backbone"]["patch_size"] == 1
    out = tmp_path / "seg"
    finetune_seg.main(["--preset", "maskedsst", "--data", scene, "--out", str(out),
                       "--init", str(pre / "ckpt.pt"), "--steps", "2", "--batch-size", "2", "--eval-every", "2",
                       "--workers", "0"])
    assert torch.load(out / "ckpt.pt", weights_only=False)["segmentation"]["decoder"] == "linear"



# ----------------------------------------------------------------------------- any sensor

@pytest.mark.parametrize("backbone", [["--backbone", "sst", "--spectral-patch", "24"],
                                      ["--backbone", "ssvit", "--spectral-patch", "24"],
                                      ["--backbone", "ssvit", "--spectral-patch", "24", "--device-augment"]])
def test_one_model_three_sensors_resumes_exactly(tmp_path, monkeypatch, backbone):
    """Three sensors in one run, mixed within every batch: bit-for-bit resume, and the checkpoint
    records each sensor's wavelengths."""
    scenes = three_sensors(tmp_path)
    flags = ["--any-sensor", *backbone]
    pretrain_mae.main(mae_args(scenes, tmp_path / "full", 6, *flags))
    def interrupt(result):
        raise Interrupt()
    with monkeypatch.context() as m:
        fail_at_call(m, 5, interrupt, SimMIM if backbone[1] == "sst" else MAE)  # in step 5, after step 3's checkpoint
        with pytest.raises(Interrupt):
            pretrain_mae.main(mae_args(scenes, tmp_path / "cut", 6, *flags))
    pretrain_mae.main(mae_args(scenes, tmp_path / "cut", 6, *flags, "--resume"))
    full, cut = (torch.load(tmp_path / d / "ckpt.pt", weights_only=False) for d in ("full", "cut"))
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")
    assert all(torch.equal(v, cut["model"][k]) for k, v in full["model"].items())
    bands = full["backbone"]["bands"]
    assert bands["grid"] == data.GRID and list(bands["sensors"]) == ["a", "b", "c"]
    assert bands["sensors"]["b"] == pytest.approx(SENSORS["b"].tolist())


def test_three_sensors_loss_goes_down(tmp_path):
    pretrain_mae.main(mae_args(three_sensors(tmp_path), tmp_path / "r", 60, "--any-sensor", "--backbone",
                               "sst", "--spectral-patch", "24", "--ckpt-every", "60", "--blr", "0.05",
                               "--batch-size", "8", "--warmup-steps", "5", "--crop-scale", "1", "1",
                               "--img-size", "16"))  # 4 x 9 tokens: falls 20-30% (seeds 0-2), 3x faster than 32 px
    curve = list(losses(tmp_path / "r").values())
    assert sum(curve[-10:]) / 10 < 0.9 * sum(curve[:10]) / 10, curve


def test_two_processes_gloo_with_different_sensors_on_the_ranks(tmp_path, cache_dir):
    scenes = three_sensors(tmp_path)
    datasets = data.load_datasets(scenes, cache_dir=cache_dir, band_info=data.ANY_SENSOR)
    tiles = data.RandomTiles(datasets, 32, 0, labels=False)  # three scenes of one size: each a third of the tiles
    B, world = 2, 2  # the items rank r reads at step s: [(s * world + r) * B, ... + B)
    per_rank = [[{tiles[(s * world + r) * B + j][1] for j in range(B)} for r in range(world)] for s in range(4)]
    assert any(ranks[0] != ranks[1] for ranks in per_rank), per_rank  # the ranks hold different sensors
    torchrun(os.path.join(ROOT, "pretrain_mae.py"), mae_args(scenes, tmp_path / "ddp", 4, "--any-sensor",
                                                             "--batch-size", str(B)))
    assert len(losses(tmp_path / "ddp")) == 4


def test_a_scene_without_wavelengths_gets_one_clear_error(tmp_path):
    bare = write_scene(tmp_path / "bare", bands=8)
    with pytest.raises(data.DataError, match=r"^bare: a wavelength-aware model .* wavelengths_nm"):
        pretrain_mae.main(mae_args(f"{sensor_scene(tmp_path, 'a')},{bare}", tmp_path / "o", 2,
                                   "--any-sensor"))
