"""finetune_seg.py: the model it builds (cross-domain CNN transfer, layer-wise lr decay), the loss and FLOPs,
runs on scenes and WHU-OHS (best checkpoint on val, the same decision on every rank), resume, torchrun, the
full-resolution head recorded, an unseen sensor; --semi: the EMA teacher, the confidence mask, CutMix targets,
exact resume, ranks, and that the unlabelled pixels teach something."""
import json
import os

import numpy as np
import pytest
import tifffile
import torch
import torch.nn as nn

import common
import data
import eval as evaluation
import finetune_seg
import pretrain_contrast
import pretrain_mae
import segmentation
from conftest import (ROOT, contrast_args, contrast_sources, mae_args, seg_args, sensor_scene, torchrun, write_scene,
                      write_whu)
from models import SegmentationModel, build_backbone, layer_ids


# ----------------------------------------------------------------------------- model, loss, optimizer groups

def test_segmentation_loss_adds_deeplabs_auxiliary_head():
    logits, aux = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    target = torch.randint(-1, 5, (2, 8, 8))
    loss = finetune_seg.segmentation_loss((logits, aux), target)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(loss, ce(logits, target, ignore_index=-1) + 0.4 * ce(aux, target, ignore_index=-1))
    torch.testing.assert_close(finetune_seg.segmentation_loss(logits, target), ce(logits, target, ignore_index=-1))


def test_train_flops_and_the_semi_supervised_ratio():
    torch.manual_seed(0)
    model = SegmentationModel(build_backbone("vit", "tiny", 8, img_size=16), "linear", 3, frozen_backbone=False)
    flops, ratio = finetune_seg.train_flops(model, 8, finetune_seg.parse_args(["--img-size", "16"]),
                                            torch.device("cpu"))
    forward = common.counted_flops(lambda: model.eval()(torch.zeros(1, 8, 16, 16)))
    assert ratio == 1.0 and 2.5 * forward < flops < 3.5 * forward  # forward + backward
    semi, semi_ratio = finetune_seg.train_flops(model, 8, finetune_seg.parse_args(["--img-size", "16", "--semi", "1"]),
                                                torch.device("cpu"))
    assert semi == pytest.approx(2 * flops + forward, rel=0.02) and semi_ratio == pytest.approx(semi / flops)


def test_layer_wise_lr_decay_groups():
    args = finetune_seg.parse_args(["--finetune", "--layer-decay", "0.5", "--backbone-lr-scale", "1"])
    torch.manual_seed(0)
    m = SegmentationModel(build_backbone("ssvit", "tiny", 8, spectral_patch=4), "linear", 5, frozen_backbone=False)
    ids, top = layer_ids(m.backbone)
    assert top == 13 and ids["spatial.patch_embed.weight"] == 0 and ids["spectral.blocks.11.attn.qkv.weight"] == 12
    assert ids["fusions.0.to_spatial.weight"] == m.backbone.fuse_after[0] + 1 and ids["spatial.norm.weight"] == 13
    groups = finetune_seg.param_groups(args, m)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(m.backbone.named_parameters())
    assert scale[id(named["spatial.blocks.11.mlp.fc1.weight"])] == 0.5 ** 1
    assert scale[id(named["spatial.patch_embed.weight"])] == 0.5 ** 13
    assert all(scale[id(p)] == 1.0 for p in m.decoder.parameters())
    assert len(scale) == sum(p.requires_grad for p in m.parameters())  # every trainable parameter, once




def test_transfer_lr_groups_init_and_eval(tmp_path, cache_dir):
    spec, target = contrast_sources(tmp_path)
    pre = tmp_path / "pre"
    pretrain_contrast.main(contrast_args(spec, pre, 2))
    args = finetune_seg.parse_args(["--init", str(pre / "ckpt.pt"), "--data", target, "--preset", "leekwon"])
    ds = data.load_dataset(target, cache_dir=cache_dir)
    model = finetune_seg.build_model(args, ds, segmentation.read_init(args)[0])
    backbone = model.backbone
    # A new first layer for the target scene and a new classifier, N(0, 0.001); the trunk transferred.
    assert list(backbone.first) == ["target"] and backbone.first["target"].in_channels == 16
    for new in (backbone.first["target"], model.decoder.classifier):
        assert new.weight.std().item() == pytest.approx(0.001, rel=0.2) and not new.bias.any()
    trunk = common.backbone_weights(torch.load(pre / "ckpt.pt", weights_only=False))
    for k, v in backbone.trunk.state_dict().items():
        assert torch.equal(v, trunk[f"trunk.{k}"]), k
    # What the optimizer holds: new layers at lr, the trunk at lr / 10, every parameter exactly once.
    optimizer = common.sgd(finetune_seg.param_groups(args, model), 0.01)
    common.set_lr(optimizer, 0.01)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert len(lr_of) == sum(len(g["params"]) for g in optimizer.param_groups)
    for name, p in model.named_parameters():
        expected = 0.001 if name.startswith("backbone.trunk.") else 0.01
        assert lr_of[id(p)] == pytest.approx(expected), name
    # End to end: fine-tune, resume, evaluate the checkpoint.
    out = tmp_path / "ft"
    seg = ["--data", target, "--out", str(out), "--img-size", "16", "--batch-size", "4",
           "--log-every", "1", "--eval-every", "2", "--ckpt-every", "1", "--workers", "0",
           "--init", str(pre / "ckpt.pt"), "--preset", "leekwon", "--lr", "0.01", "--labels-per-class", "5"]
    finetune_seg.main([*seg, "--steps", "1"])
    finetune_seg.main([*seg, "--steps", "2", "--resume"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["step"] == 2 and ckpt["backbone"]["in_chans"] == {"target": 16}
    assert sorted(g["lr"] for g in ckpt["optimizer"]["param_groups"])[-1] == pytest.approx(
        10 * sorted(g["lr"] for g in ckpt["optimizer"]["param_groups"])[0])
    groups = ckpt["optimizer"]["param_groups"]  # --preset leekwon: SGD with momentum 0.9, weight decay 0.005
    assert all(g["momentum"] == 0.9 for g in groups) and {g["weight_decay"] for g in groups} == {0.005, 0.0}
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--pictures", "1"])
    assert m["pixels"] == int(data.load_split(out / "split.npz", (32, 32))[1].sum())
    other = write_scene(tmp_path / "twelve", bands=12, size=32)
    with pytest.raises(ValueError, match="ckpt.pt: checkpoint was trained on 16 bands but twelve has 12"):
        evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", other])


def test_cdcnn_from_scratch_trains_the_whole_network(tmp_path):
    target = write_scene(tmp_path / "target", bands=16, size=32)
    common_args = ["--data", target, "--img-size", "16", "--batch-size", "2", "--steps", "1",
                   "--eval-every", "5", "--workers", "0"]
    finetune_seg.main([*common_args, "--backbone", "cdcnn", "--out", str(tmp_path / "scratch")])
    scratch = torch.load(tmp_path / "scratch" / "ckpt.pt", weights_only=False)
    assert scratch["backbone"] == {"name": "cdcnn", "in_chans": {"target": 16}, "width": 128, "depth": 5}
    assert scratch["segmentation"]["frozen_backbone"] is False



# ----------------------------------------------------------------------------- runs

def test_finetune_from_pretraining_checkpoint_and_resume(scene, tmp_path):
    pre = tmp_path / "mae"
    pretrain_mae.main(mae_args(scene, pre, 2, "--img-size", "16", "--batch-size", "2"))
    out = tmp_path / "probe"
    finetune_seg.main(seg_args(scene, out, "--init", str(pre / "ckpt.pt"), "--steps", "2"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    mae = torch.load(pre / "ckpt.pt", weights_only=False)
    # A linear probe keeps the pre-trained backbone bit for bit.
    for k, v in common.backbone_weights(mae).items():
        assert torch.equal(ckpt["model"][f"backbone.{k}"], v), k
    finetune_seg.main(seg_args(scene, out, "--init", str(pre / "ckpt.pt"), "--resume"))
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 4
    # Attention maps from the pre-training checkpoint itself.
    evaluation.main(["--ckpt", str(pre / "ckpt.pt"), "--attention", "--pictures", "1", "--out", str(tmp_path / "att")])
    assert os.path.isfile(tmp_path / "att" / "attention_0.png")


def test_whu_finetune_selects_on_val(tmp_path):
    root = write_whu(tmp_path / "whu", tiles=1, size=32)
    out = tmp_path / "whu_run"
    finetune_seg.main(seg_args(root, out, "--backbone", "pixel"))
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["val"]["pixels"] > 0 and best["segmentation"]["num_classes"] == 24
    m = evaluation.main(["--ckpt", str(out / "best.pt"), "--split", "ts"])
    assert m["split"] == "ts" and len(m["per_class"]) == 24


def test_finetune_under_torchrun(scene, tmp_path):
    out = tmp_path / "ddp"
    torchrun(os.path.join(ROOT, "finetune_seg.py"), seg_args(scene, out, "--finetune", "--steps", "2"))
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2 and (out / "split.npz").exists()


def test_finetune_records_the_head_and_reports_the_boundary_metric(scene, tmp_path):
    out = tmp_path / "ft"
    finetune_seg.main(seg_args(scene, out, "--labels-per-class", "5"))
    ckpt = common.load_checkpoint(out / "ckpt.pt")
    assert ckpt["segmentation"]["full_res"] is True
    assert any(k.startswith("full_res.") for k in ckpt["model"])
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--pictures", "0"])
    assert json.load(open(out / "eval.json"))["boundary"]["oa"] == pytest.approx(m["boundary"]["oa"])
    assert m["boundary"]["pixels"] + m["interior"]["pixels"] == m["pixels"]
    with pytest.raises(ValueError, match="ckpt.pt: its model does not fit this run's"):  # resuming needs the same head
        finetune_seg.main(seg_args(scene, out, "--labels-per-class", "5", "--steps", "6", "--no-full-res", "--resume"))
    study = tmp_path / "study"  # the study's head
    finetune_seg.main(seg_args(scene, study, "--labels-per-class", "5", "--no-full-res", "--steps", "2"))
    assert common.load_checkpoint(study / "ckpt.pt")["segmentation"]["full_res"] is False
    model, _ = evaluation.load_model(str(study / "ckpt.pt"), torch.device("cpu"))
    assert model.full_res is None


FAKE_PREDICTIONS = '''
import sys

import numpy as np
import torch
import torch.distributed as dist

import finetune_seg
import segmentation

STEP = [0]
real_log_evaluation = finetune_seg.log_evaluation


def log_evaluation(*args):
    STEP[0] = args[-1]
    return real_log_evaluation(*args)


def sliding(model, ds, index, *args):
    """Rank 0's predictions get better from one evaluation to the next and rank 1's worse: on its own,
    each rank would decide differently whether the model improved."""
    labels = ds.crop(index, 0, 0, *ds.rasters[index].image.shape[1:])[1]
    share = 0.15 * STEP[0] if dist.get_rank() == 0 else 1 - 0.15 * STEP[0]
    right = np.arange(labels.size).reshape(labels.shape) < share * labels.size
    pred = np.where(right, labels.clip(0), (labels.clip(0) + 1) % ds.num_classes)
    return torch.nn.functional.one_hot(torch.from_numpy(pred), ds.num_classes).permute(2, 0, 1).float(), labels


finetune_seg.log_evaluation = log_evaluation
segmentation.sliding = sliding
finetune_seg.main(sys.argv[1:])
'''


def test_best_checkpoint_decision_is_the_same_on_every_rank(tmp_path):
    """Ranks whose own evaluations disagree about an improvement: the evaluation is sharded and its
    confusion matrices summed, so all ranks take the same decision and enter the collective save of
    best.pt together (before: a deadlock)."""
    root = write_whu(tmp_path / "whu", tiles=2, size=32)
    script = tmp_path / "fake_predictions.py"
    script.write_text(FAKE_PREDICTIONS)
    out = tmp_path / "seg"
    torchrun(script, ["--data", root, "--out", str(out), "--backbone", "pixel", "--img-size", "16", "--batch-size", "2",
                      "--steps", "4", "--eval-every", "2", "--log-every", "2", "--workers", "0"], timeout=240)
    assert torch.load(out / "best.pt", weights_only=False)["step"] in (2, 4)


def test_transfer_to_an_unseen_sensor(tmp_path, capsys):
    """Pre-trained on sensors a and c (380-1000 nm), fine-tuned on d (600-2500 nm, mostly new):
    the checkpoint's weights load as they are (no new parameters) and the run says which bands are new."""
    pre = tmp_path / "pre"
    pretrain_mae.main(mae_args(",".join(sensor_scene(tmp_path, n) for n in "ac"), pre, 2, "--any-sensor",
                               "--backbone", "sst", "--spectral-patch", "24"))
    d = sensor_scene(tmp_path, "d", wavelengths=np.linspace(600, 2500, 40))
    capsys.readouterr()
    finetune_seg.main(["--data", d, "--init", str(pre / "ckpt.pt"), "--out", str(tmp_path / "ft"), "--steps", "2",
                       "--eval-every", "2", "--img-size", "32", "--batch-size", "2", "--workers", "0",
                       "--labels-per-class", "3"])
    out = capsys.readouterr().out
    assert "d: 40 bands on 196 grid points; 146 new (not in pre-training on a, c) (1060-2510 nm)" in out
    ckpt = torch.load(tmp_path / "ft" / "ckpt.pt", weights_only=False)
    pre_ckpt = torch.load(pre / "ckpt.pt", weights_only=False)
    assert ckpt["backbone"]["in_chans"] == pre_ckpt["backbone"]["in_chans"] == 216



# ----------------------------------------------------------------------------- semi-supervised (--semi)

def write_toy(folder, size=32, seed=0):
    """Two classes told apart by band 0 (clusters at -1 and +1 with a gap between) beside a nuisance band 1
    of larger spread: one labelled pixel per class leaves the boundary tilted towards band 1; the
    unlabelled pixels' clusters tell where it belongs."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    gt = np.where(np.arange(size)[None, :] < size // 2, 1, 2).repeat(size, 0).astype(np.uint8)
    b0 = np.where(gt == 1, -1.0, 1.0) + 0.15 * rng.standard_normal(gt.shape)
    img = np.stack([b0, 1.5 * rng.standard_normal(gt.shape), 0.1 * rng.standard_normal(gt.shape)])
    tifffile.imwrite(os.path.join(folder, "image.tif"), (1000 + 300 * img).astype(np.uint16),
                     photometric="minisblack")
    tifffile.imwrite(os.path.join(folder, "gt.tif"), gt)
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"name": "toy", "class_names": ["a", "b"]}, f)
    return str(folder)


def toy_args(scene, out, *extra):
    return ["--data", scene, "--out", str(out), "--backbone", "pixel", "--img-size", "16", "--batch-size", "4",
            "--labels-per-class", "1", "--lr", "0.05", "--semi-threshold", "0.7", "--dtype", "fp32",
            "--workers", "0", *extra]


def test_teacher_is_an_ema_of_the_student():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    teacher = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    student(torch.randn(5, 3))  # running statistics and the batch counter move
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    common.ema_update(teacher, student, 0.9)
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


@pytest.mark.parametrize("mix", ["cutmix", "classmix"])
def test_mixed_targets_match_the_mixed_inputs(mix):
    # A per-pixel model: its prediction on the mixed tiles is the mix of its predictions.
    torch.manual_seed(0)
    model = SegmentationModel(build_backbone("pixel", in_chans=5), "linear", 4).eval()
    x = torch.randn(3, 5, 8, 8)
    rnd = data.StepRandom(0, 0, 0, 1, 3, torch.device("cpu"))
    strong, targets = finetune_seg.semi_views(model, x, rnd, mix)
    u = data.StepRandom(0, 0, 0, 1, 3, torch.device("cpu"))
    if mix == "cutmix":
        mask = finetune_seg.cutmix_masks(u.uniform(2), 8)
        assert mask.sum((1, 2, 3)).tolist() == [16] * 3  # a 4 x 4 box per tile
    else:
        mask = finetune_seg.classmix_masks(model(x).argmax(1), u.uniform(4))
    assert mask.any() and not mask.all()
    torch.testing.assert_close(strong, torch.where(mask, x.roll(-1, 0), x))
    torch.testing.assert_close(targets, model(strong).softmax(1))


def test_classmix_pastes_whole_classes_of_the_next_tile():
    pred = torch.zeros(3, 4, 4, dtype=torch.long)
    pred[0, :, 2:] = 1  # tile 0: classes 0 and 1
    pred[1] = torch.arange(4)[:, None]  # tile 1: classes 0-3, a row each
    pred[2, 0, 0] = 2  # tile 2: classes 0 and 2
    for seed in range(20):
        mask = finetune_seg.classmix_masks(pred, torch.rand(3, 5, generator=torch.Generator().manual_seed(seed)))
        for i in range(3):
            nxt = pred[(i + 1) % 3]
            pasted = nxt[mask[i, 0]].unique()
            assert torch.equal(mask[i, 0], torch.isin(nxt, pasted))  # whole classes, nothing else
            assert len(pasted) == (len(nxt.unique()) + 1) // 2  # half of its classes, rounded up


@pytest.mark.parametrize("mix", ["cutmix", "classmix"])
def test_resume_with_semi_is_exact(tmp_path, monkeypatch, mix):
    scene = write_toy(tmp_path / "toy")
    args = toy_args(scene, tmp_path / "full", "--steps", "6", "--eval-every", "6", "--semi", "1", "--ckpt-every", "3",
                    "--semi-mix", mix)
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


def test_two_ranks_hold_the_same_teacher(tmp_path):
    scene = write_toy(tmp_path / "toy")
    out = tmp_path / "ddp"
    script = tmp_path / "dump.py"  # each rank saves its teacher after training
    script.write_text(
        "import os, sys, torch, common, finetune_seg\n"
        "real, kept = common.ema_update, []\n"
        "def ema_update(teacher, student, momentum):\n"
        "    real(teacher, student, momentum)\n"
        "    kept[:] = [teacher]\n"
        "common.ema_update = ema_update\n"
        "finetune_seg.main(sys.argv[1:])\n"
        f"torch.save(kept[0].state_dict(), {str(tmp_path)!r} + f'/teacher{{os.environ[\"RANK\"]}}.pt')\n")
    torchrun(script, toy_args(scene, out, "--steps", "3", "--eval-every", "3", "--semi", "1", "--batch-size", "2"))
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
