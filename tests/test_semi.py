"""finetune_seg.py --semi: the EMA teacher, the confidence mask, CutMix targets, exact resume, ranks, and
that the unlabelled pixels teach something."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
import torch.nn as nn

import common
import data
import finetune_seg
from models import SegmentationModel, build_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_toy(folder, size=32, seed=0):
    """Two classes told apart by band 0 (clusters at -1 and +1 with a gap between) beside a nuisance band 1
    of larger spread: one labelled pixel per class leaves the boundary tilted towards band 1; the
    unlabelled pixels' clusters tell where it belongs."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    gt = np.where(np.arange(size)[None, :] < size // 2, 1, 2).repeat(size, 0).astype(np.uint8)
    b0 = np.where(gt == 1, -1.0, 1.0) + 0.15 * rng.standard_normal(gt.shape)
    img = np.stack([b0, 1.5 * rng.standard_normal(gt.shape), 0.1 * rng.standard_normal(gt.shape)])
    tifffile.imwrite(os.path.join(folder, "image.tif"), (1000 + 300 * img).astype(np.uint16))
    tifffile.imwrite(os.path.join(folder, "gt.tif"), gt)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"name": "toy", "class_names": ["a", "b"]}, f)
    return str(folder)


def toy_args(scene, out, *extra):
    return ["--data", scene, "--out", str(out), "--backbone", "pixel", "--img-size", "16", "--batch-size", "4",
            "--labels-per-class", "1", "--lr", "0.05", "--semi-threshold", "0.7", "--dtype", "fp32",
            "--workers", "0", *extra]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HSI_SSL_CACHE", str(tmp_path / "cache"))


def test_teacher_is_an_ema_of_the_student():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    student(torch.randn(5, 3))  # running statistics and the batch counter move
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    finetune_seg.ema_update(teacher, student, 0.9)
    for k, v in teacher.state_dict().items():
        s, t = student.state_dict()[k], before[k]
        expected = s if k.endswith("num_batches_tracked") else 0.9 * t + 0.1 * s
        torch.testing.assert_close(v, expected)


def test_pixels_under_the_threshold_teach_nothing():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    probs = torch.full((2, 3, 4, 4), 1 / 3)
    probs[:, :, :2] = torch.tensor([0.95, 0.03, 0.02])[None, :, None, None]  # confident in the top half only
    loss, share = finetune_seg.semi_loss(logits, probs, 0.9)
    loss.backward()
    assert share.item() == 0.5
    assert logits.grad[:, :, 2:].abs().sum() == 0 and logits.grad[:, :, :2].abs().sum() > 0
    assert finetune_seg.semi_loss(logits, probs, 0.99)[0].item() == 0.0


def test_cutmix_targets_match_the_mixed_inputs():
    # A per-pixel model: its prediction on the mixed tiles is the mix of its predictions.
    torch.manual_seed(0)
    model = SegmentationModel(build_backbone("pixel", in_chans=5), "linear", 4).eval()
    x = torch.randn(3, 5, 8, 8)
    rnd = data.StepRandom(0, 0, 0, 1, 3, torch.device("cpu"))
    strong, targets = finetune_seg.semi_views(model, x, rnd)
    mask = finetune_seg.cutmix_masks(data.StepRandom(0, 0, 0, 1, 3, torch.device("cpu")).uniform(2), 8)
    assert mask.sum((1, 2, 3)).tolist() == [16] * 3  # a 4 x 4 box per tile
    torch.testing.assert_close(strong, torch.where(mask, x.roll(-1, 0), x))
    torch.testing.assert_close(targets, model(strong).softmax(1))


def test_resume_with_semi_is_exact(tmp_path, monkeypatch):
    scene = write_toy(tmp_path / "toy")
    args = toy_args(scene, tmp_path / "full", "--steps", "6", "--eval-every", "6", "--semi", "1", "--ckpt-every", "3")
    finetune_seg.main(args)
    real, calls = finetune_seg.semi_views, [0]

    def dies_in_step_5(*a):
        calls[0] += 1
        if calls[0] == 5:  # after the step-3 checkpoint
            raise KeyboardInterrupt
        return real(*a)
    cut = [a if a != str(tmp_path / "full") else str(tmp_path / "cut") for a in args]
    with monkeypatch.context() as m:
        m.setattr(finetune_seg, "semi_views", dies_in_step_5)
        with pytest.raises(KeyboardInterrupt):
            finetune_seg.main(cut)
    assert common.load_checkpoint(str(tmp_path / "cut" / "ckpt.pt"))["step"] == 3
    finetune_seg.main(cut + ["--resume"])
    full, resumed = (common.load_checkpoint(str(tmp_path / r / "ckpt.pt")) for r in ("full", "cut"))
    for key in ("model", "teacher"):
        for k, v in full[key].items():
            assert torch.equal(v, resumed[key][k]), (key, k)
    assert full["segmentation"]["weights"] == "teacher"


def test_two_ranks_hold_the_same_teacher(tmp_path):
    scene = write_toy(tmp_path / "toy")
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(ROOT, "finetune_seg.py"), *toy_args(scene, out, "--steps", "3", "--eval-every", "3",
                                                            "--semi", "1", "--batch-size", "2")]
    script = tmp_path / "dump.py"  # each rank saves the network it evaluates (the teacher) after training
    script.write_text(
        "import sys, torch, torch.distributed as dist, finetune_seg\n"
        "real = finetune_seg.log_evaluation\n"
        "def log_evaluation(logger, model, *a):\n"
        f"    torch.save(model.state_dict(), {str(tmp_path)!r} + f'/teacher{{dist.get_rank()}}.pt')\n"
        "    return real(logger, model, *a)\n"
        "finetune_seg.log_evaluation = log_evaluation\n"
        "finetune_seg.main(sys.argv[1:])\n")
    cmd[cmd.index(os.path.join(ROOT, "finetune_seg.py"))] = str(script)
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, timeout=300)
    a, b = (torch.load(tmp_path / f"teacher{r}.pt") for r in (0, 1))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    saved = common.load_checkpoint(str(out / "ckpt.pt"))["teacher"]
    for k in a:
        assert torch.equal(a[k], saved[k]), k


def test_unlabelled_pixels_teach_the_boundary(tmp_path):
    scene = write_toy(tmp_path / "toy")
    oa = {}
    for weight in ("0", "1"):  # "0": the same run without the unsupervised loss
        out = tmp_path / f"semi{weight}"
        finetune_seg.main(toy_args(scene, out, "--steps", "300", "--eval-every", "300", "--semi", weight))
        with open(out / "eval.json") as f:
            oa[weight] = json.load(f)["oa"]
    assert oa["1"] > oa["0"] + 0.08, oa
