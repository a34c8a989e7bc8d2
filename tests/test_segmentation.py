import json
import os

import numpy as np
import pytest
import torch

import common
import data
import eval as evaluation
import finetune_seg
import pretrain_mae
from conftest import write_scene, write_whu
from data import IGNORE_INDEX
from models import MultiscaleLinearDecoder, SegmentationModel, build_backbone


# ----------------------------------------------------------------------------- metrics

def test_metrics_against_hand_computed_confusion():
    # 4 classes; class 3 is absent from the ground truth but predicted once; one pixel ignored.
    target = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, IGNORE_INDEX])
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 3, 0, 2])
    cm = evaluation.confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 1], [0, 0, 0, 0]]
    m = evaluation.metrics_from_confusion(cm, ["a", "b", "c", "d"])
    assert m["pixels"] == 9
    assert m["oa"] == pytest.approx(6 / 9)
    assert m["aa"] == pytest.approx((2 / 3 + 2 / 2 + 2 / 4) / 3)       # over classes in the ground truth
    ious = [2 / (3 + 3 - 2), 2 / (2 + 3 - 2), 2 / (4 + 2 - 2), 0.0]
    assert m["miou"] == pytest.approx(sum(ious) / 4)                     # class 3 predicted: counts as 0
    assert m["miou_present"] == pytest.approx(sum(ious[:3]) / 3)
    pe = (3 * 3 + 2 * 3 + 4 * 2 + 0 * 1) / 81
    assert m["kappa"] == pytest.approx((6 / 9 - pe) / (1 - pe))
    assert m["per_class"][3] == {"name": "d", "iou": 0.0, "acc": None, "support": 0}


def test_class_absent_everywhere_is_skipped_not_zero():
    m = evaluation.metrics_from_confusion(evaluation.confusion_matrix([0, 1], [0, 1], 3), ["a", "b", "c"])
    assert m["miou"] == 1.0 and m["miou_present"] == 1.0 and m["per_class"][2]["iou"] is None


# ----------------------------------------------------------------------------- models and inference

def test_multiscale_linear_decoder_shapes():
    dec = MultiscaleLinearDecoder([8, 8, 8, 8], 5)
    feats = [(torch.randn(2, 8), torch.randn(2, 8, 4, 6)) for _ in range(4)]
    assert dec(feats, (32, 48)).shape == (2, 5, 32, 48)


def test_frozen_backbone_gets_no_gradient():
    model = SegmentationModel(build_backbone("vit", "tiny", 6, img_size=32), "linear", 4)
    model.train()
    model(torch.randn(2, 6, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.decoder.classifier.weight.grad is not None and not model.backbone.training


def test_pixel_backbone_is_a_per_pixel_classifier():
    model = SegmentationModel(build_backbone("pixel", in_chans=6), "linear", 4).eval()
    x = torch.randn(1, 6, 8, 8)
    out = model(x)
    x2 = x.clone()
    x2[..., 0, 0] += 5  # changing one pixel changes only that pixel's logits
    diff = (model(x2) - out).abs().sum(1)[0]
    assert diff[0, 0] > 0 and diff.flatten()[1:].max() == 0


def test_sliding_window_equals_single_pass(scene, cache_dir):
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    torch.manual_seed(0)
    model = SegmentationModel(build_backbone("vit", "tiny", 16, img_size=40), "linear", 3).eval()
    full = model(torch.from_numpy(ds.normalize(ds.crop(0, 0, 0, 40, 40)[0]))[None])[0]
    one, labels = evaluation.predict_raster(model, ds, 0, 40, 10, 4, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(one, full)
    assert (labels == ds.crop(0, 0, 0, 40, 40)[1]).all()
    # Overlapping smaller windows average logits: every pixel is covered, shapes match.
    many, many_labels = evaluation.predict_raster(model, ds, 0, 24, 8, 4, torch.device("cpu"), torch.float32)
    assert many.shape == full.shape and torch.isfinite(many).all()
    assert (many_labels == labels).all()


def test_attention_maps_shape():
    vit = build_backbone("vit", "tiny", 6, img_size=32, num_registers=4)
    attn = vit.attention_maps(torch.randn(2, 6, 32, 32))["spatial"]
    assert attn.shape == (2, 3, 4, 4)
    assert (attn.sum((-2, -1)) <= 1 + 1e-5).all()  # CLS also attends to itself and the registers


# ----------------------------------------------------------------------------- scripts end to end

def seg_args(data_path, out, cache_dir, *extra):
    return ["--data", data_path, "--out", str(out), "--cache-dir", cache_dir, "--img-size", "16",
            "--batch-size", "4", "--steps", "4", "--log-every", "2", "--eval-every", "2", "--ckpt-every", "2",
            "--eval-batch-size", "8", "--workers", "0", *extra]


def test_finetune_then_eval_on_scene(scene, cache_dir, tmp_path):
    out = tmp_path / "ft"
    finetune_seg.main(seg_args(scene, out, cache_dir, "--labels-per-class", "5", "--finetune"))
    z = np.load(out / "split.npz")
    assert z["train"].sum() == 15 and not (z["train"] & z["test"]).any()
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--attention", "--pictures", "1"])
    assert m["pixels"] == int(z["test"].sum())
    saved = json.load(open(out / "eval-test" / "metrics.json"))
    assert {"oa", "aa", "miou", "miou_present", "kappa", "per_class"} <= set(saved)
    assert os.path.isfile(out / "eval-test" / "prediction_0.png") and os.path.isfile(out / "eval-test" / "attention_0.png")


def test_finetune_from_pretraining_checkpoint_and_resume(scene, cache_dir, tmp_path):
    pre = tmp_path / "mae"
    pretrain_mae.main(["--data", scene, "--out", str(pre), "--cache-dir", cache_dir, "--steps", "2", "--img-size", "16",
                       "--batch-size", "2", "--decoder-dim", "32", "--decoder-depth", "1", "--decoder-heads", "2",
                       "--workers", "0"])
    out = tmp_path / "probe"
    finetune_seg.main(seg_args(scene, out, cache_dir, "--init", str(pre / "ckpt.pt"), "--steps", "2"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    mae = torch.load(pre / "ckpt.pt", weights_only=False)
    # A linear probe keeps the pre-trained backbone bit for bit.
    for k, v in common.backbone_weights(mae).items():
        assert torch.equal(ckpt["model"][f"backbone.{k}"], v), k
    finetune_seg.main(seg_args(scene, out, cache_dir, "--init", str(pre / "ckpt.pt"), "--resume"))
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 4
    # Attention maps from the pre-training checkpoint itself.
    evaluation.main(["--ckpt", str(pre / "ckpt.pt"), "--attention", "--pictures", "1", "--out", str(tmp_path / "att")])
    assert os.path.isfile(tmp_path / "att" / "attention_0.png")


def test_whu_finetune_selects_on_val(tmp_path, cache_dir):
    root = write_whu(tmp_path / "whu", tiles=1, size=32)
    out = tmp_path / "whu_run"
    finetune_seg.main(seg_args(root, out, cache_dir, "--backbone", "pixel", "--loss", "focal",
                               "--class-weights", "sqrt-inverse"))
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["val"]["pixels"] > 0 and best["segmentation"]["num_classes"] == 24
    m = evaluation.main(["--ckpt", str(out / "best.pt"), "--split", "ts"])
    assert m["split"] == "ts" and len(m["per_class"]) == 24


def test_eval_refuses_mismatched_bands_or_classes(scene, cache_dir, tmp_path):
    out = tmp_path / "ft"
    finetune_seg.main(seg_args(scene, out, cache_dir, "--backbone", "pixel", "--steps", "2"))
    other_bands = write_scene(tmp_path / "b", bands=12)
    with pytest.raises(ValueError, match="ckpt.pt: checkpoint was trained on 16 bands but b has 12"):
        evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", other_bands, "--cache-dir", cache_dir])
    other_classes = write_scene(tmp_path / "c", classes=5)
    with pytest.raises(ValueError, match="ckpt.pt: checkpoint predicts 3 classes but c has 5"):
        evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", other_classes, "--cache-dir", cache_dir])
    with pytest.raises(ValueError, match="trained on 16 bands"):
        finetune_seg.main(seg_args(other_bands, tmp_path / "x", cache_dir, "--init", str(out / "ckpt.pt")))


def test_focal_loss_reduces_to_cross_entropy_at_gamma_zero():
    logits, target = torch.randn(2, 4, 5, 5), torch.randint(-1, 4, (2, 5, 5))
    ce = finetune_seg.segmentation_loss(logits, target)
    torch.testing.assert_close(finetune_seg.segmentation_loss(logits, target, focal_gamma=0.0), ce)
    assert finetune_seg.segmentation_loss(logits, target, focal_gamma=2.0) < ce


def test_finetune_under_torchrun(scene, cache_dir, tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.join(root, "finetune_seg.py"), *seg_args(scene, out, cache_dir, "--finetune", "--steps", "2")]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2 and (out / "split.npz").exists()
