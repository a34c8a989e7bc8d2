"""segmentation.py, what finetune_seg.py and eval.py share: the metrics (boundary and interior included),
sliding-window and whole-scene inference, the backbone that flags and a checkpoint give (random twins
included) and a scene's label split."""
import json
import os

import numpy as np
import pytest
import tifffile
import torch

import common
import data
import eval as evaluation
import finetune_seg
import pretrain_contrast
import pretrain_mae
import segmentation
from conftest import mae_args, seg_args, write_scene
from data import IGNORE_INDEX
from models import SegmentationModel, build_backbone

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- metrics

def test_metrics_against_hand_computed_confusion():
    # 4 classes; class 3 is absent from the ground truth but predicted once; one pixel ignored.
    target = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, IGNORE_INDEX])
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 3, 0, 2])
    cm = segmentation.confusion_matrix(pred, target, 4)
    assert cm.tolist() == [[2, 1, 0, 0], [0, 2, 0, 0], [1, 0, 2, 1], [0, 0, 0, 0]]
    m = segmentation.metrics_from_confusion(cm, ["a", "b", "c", "d"])
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
    m = segmentation.metrics_from_confusion(segmentation.confusion_matrix([0, 1], [0, 1], 3), ["a", "b", "c"])
    assert m["miou"] == 1.0 and m["miou_present"] == 1.0 and m["per_class"][2]["iou"] is None


def test_boundary_mask_on_a_hand_made_map():
    I = IGNORE_INDEX
    labels = np.array([[0, 0, 0, 0, 0, 0, 1, 1],
                       [0, 0, 0, 0, 0, 0, 1, 1],
                       [0, 0, 0, 0, 0, 0, 1, 1],
                       [0, 0, 0, 0, 0, 0, 1, 1],
                       [0, 0, 0, 0, 0, 0, 0, 0],
                       [0, 0, 0, 0, 0, 0, 0, 0],
                       [0, 0, 0, 0, 0, 0, 0, 0],
                       [I, 0, 0, 0, 0, 0, 0, 0]])
    edge = segmentation.boundary_mask(labels, radius=2)
    expected = np.zeros((8, 8), bool)
    expected[:6, 4:] = True   # within 2 px (Chebyshev) of the 1-block, on both sides
    expected[5:, :3] = True   # within 2 px of the unlabelled corner (other land cover)
    expected[7, 0] = False    # unlabelled pixels are never scored
    assert (edge == expected).all(), edge.astype(int)
    pred = labels.copy()
    pred[:4, 5] = 1           # 4 errors, all on the boundary
    cms = segmentation.region_confusions(pred, labels, edge, 2)
    m = segmentation.region_metrics(cms, ["a", "b"])
    assert m["boundary"]["pixels"] == expected.sum() and m["interior"]["pixels"] == 63 - expected.sum()
    assert m["boundary"]["oa"] == pytest.approx(1 - 4 / expected.sum()) and m["interior"]["oa"] == 1.0
    assert "boundary (within 2 px" in segmentation.format_table(m)



# ----------------------------------------------------------------------------- inference

def test_sliding_window_equals_single_pass(scene, cache_dir):
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    torch.manual_seed(0)
    model = SegmentationModel(build_backbone("vit", "tiny", 16, img_size=40), "linear", 3).eval()
    full = model(torch.from_numpy(ds.normalise(ds.crop(0, 0, 0, 40, 40)[0]))[None])[0]
    one, labels = segmentation.sliding(model, ds, 0, 40, 10, 4, torch.device("cpu"), torch.float32)
    torch.testing.assert_close(one, full)
    assert (labels == ds.crop(0, 0, 0, 40, 40)[1]).all()
    # Overlapping smaller windows average logits: every pixel is covered, shapes match.
    many, many_labels = segmentation.sliding(model, ds, 0, 24, 8, 4, torch.device("cpu"), torch.float32)
    assert many.shape == full.shape and torch.isfinite(many).all()
    assert (many_labels == labels).all()


def test_whole_scene_cdcnn_inference_equals_tiles_where_tiles_have_full_context(tmp_path, cache_dir):
    scene = write_scene(tmp_path / "scene", bands=6, size=40)
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    torch.manual_seed(0)
    model = SegmentationModel(build_backbone("cdcnn", in_chans={"scene": 6}, width=16, depth=2), "linear", 3,
                              frozen_backbone=False).eval()
    whole, labels = segmentation.sliding(model, ds, 0, None, 0, 4, CPU, torch.float32)
    assert whole.shape == (3, 40, 40) and (labels == data.scene_labels(ds)).all()
    margin = 2  # the 5x5 first layer's reach
    for y, x in data.grid_windows(40, 40, 16, 8):
        tile = torch.from_numpy(ds.normalise(ds.crop(0, y, x, 16, 16)[0]))[None]
        with torch.no_grad():
            out = model(tile)[0]
        inner = (slice(None), slice(margin, 16 - margin), slice(margin, 16 - margin))
        torch.testing.assert_close(out[inner], whole[:, y:y + 16, x:x + 16][inner])
    # Averaged tiles are wrong near interior tile borders, which is why whole-scene inference is used.
    tiled, _ = segmentation.sliding(model, ds, 0, 16, 8, 4, CPU, torch.float32)
    assert not torch.allclose(tiled, whole)



# ----------------------------------------------------------------------------- backbones from flags and checkpoints

def test_twin_has_the_checkpoint_config_and_none_of_its_weights(tmp_path, cache_dir):
    scene = write_scene(tmp_path / "scene", bands=8, size=32)
    pre = tmp_path / "pre"
    pretrain_mae.main(mae_args(scene, pre, 3, "--img-size", "16", "--registers", "2", "--ffn", "swiglu"))
    ckpt = common.load_checkpoint(pre / "ckpt.pt")
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    args = evaluation.parse_args(["--probe", "knn", "--init", str(pre / "ckpt.pt"), "--twin"])
    init, band_info = segmentation.read_init(args)
    assert init["step"] == 3 and band_info == ckpt["backbone"]["bands"]
    torch.manual_seed(0)
    twin = segmentation.load_backbone(args, ds, init)
    torch.manual_seed(1)
    other = segmentation.load_backbone(args, ds, init)
    assert twin.config == ckpt["backbone"] and twin.config["num_registers"] == 2
    trained = common.backbone_weights(ckpt)
    random_tensors = 0
    for name, value in twin.state_dict().items():
        if torch.equal(value, other.state_dict()[name]):
            continue  # fixed by construction (LayerNorm ones, zero biases, sin-cos positions): no information
        random_tensors += 1
        assert not torch.equal(value, trained[name]), name
    assert random_tensors > 10
    # finetune_seg.py --twin trains that same architecture; without --twin it starts from the weights.
    finetune_seg.main(seg_args(scene, tmp_path / "ft_twin", "--steps", "2", "--init", str(pre / "ckpt.pt"), "--twin"))
    finetune_seg.main(seg_args(scene, tmp_path / "ft_pre", "--init", str(pre / "ckpt.pt"), "--steps", "0"))
    assert common.load_checkpoint(tmp_path / "ft_twin" / "ckpt.pt")["backbone"] == ckpt["backbone"]
    with pytest.raises(ValueError, match="--twin needs --init"):
        segmentation.read_init(evaluation.parse_args(["--probe", "knn", "--twin"]))


def test_cdcnn_twin_and_scratch_depth(tmp_path, cache_dir):
    a, b = write_scene(tmp_path / "a", bands=6, size=24, seed=1), write_scene(tmp_path / "b", bands=9, size=24, seed=2)
    pre = tmp_path / "pre"
    pretrain_contrast.main(["--data", f"{a},{b}", "--out", str(pre), "--steps", "2",
                            "--width", "16", "--depth", "2", "--region-size", "3", "--workers", "0"])
    trunk = {k: v for k, v in common.backbone_weights(common.load_checkpoint(pre / "ckpt.pt")).items()
             if k.startswith("trunk.")}
    target = write_scene(tmp_path / "t", bands=5, size=24, seed=3)
    ds = data.load_dataset(target, cache_dir=cache_dir)
    args = finetune_seg.parse_args(["--init", str(pre / "ckpt.pt"), "--twin"])
    twin = finetune_seg.build_model(args, ds, segmentation.read_init(args)[0])
    assert twin.backbone.config["depth"] == 2 and twin.backbone.config["width"] == 16
    assert not any(torch.equal(twin.backbone.state_dict()[k], v) for k, v in trunk.items() if v.dim() > 1)
    scratch = finetune_seg.build_model(finetune_seg.parse_args(["--backbone", "cdcnn", "--depth", "4"]), ds, None)
    assert scratch.backbone.config["depth"] == 4 and len(scratch.backbone.trunk) == 5  # 4 modules + final 1x1



# ----------------------------------------------------------------------------- label splits

def test_min_class_pixels_drops_small_classes_in_training_and_scoring(tmp_path, cache_dir):
    scene = write_scene(tmp_path / "scene", bands=6, size=30, classes=3)
    gt = tifffile.imread(os.path.join(scene, "gt.tif"))
    gt[:, :] = 0
    gt[:10, :] = 1          # 300 px
    gt[10:12, :5] = 2       # 10 px: dropped at >= 50
    gt[15:, :] = 3          # 450 px
    tifffile.imwrite(os.path.join(scene, "gt.tif"), gt)
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    kept, train, test, classes = data.scene_split(ds, 0, per_class=5, min_class_pixels=50)
    assert classes == [0, 2] and kept.num_classes == 2 and kept.class_names == ["c0", "c2"]
    labels = data.scene_labels(kept)
    assert (labels[10:12, :5] == data.IGNORE_INDEX).all() and set(np.unique(labels)) == {-1, 0, 1}
    assert int(train.sum()) == 10 and int(test.sum()) == 300 + 450 - 10
    out = tmp_path / "ft"
    finetune_seg.main(seg_args(scene, out, "--backbone", "pixel", "--steps", "2", "--labels-per-class", "5",
                               "--min-class-pixels", "50"))
    ckpt = common.load_checkpoint(out / "ckpt.pt")
    assert ckpt["segmentation"]["num_classes"] == 2 and ckpt["segmentation"]["classes"] == [0, 2]
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--pictures", "0"])
    assert m["pixels"] == 740 and [c["name"] for c in m["per_class"]] == ["c0", "c2"]
    assert json.loads((out / "eval.json").read_text())["pixels"] == 740
    p = evaluation.main(["--probe", "knn", "--backbone", "pixel", "--data", scene,
                         "--labels-per-class", "5", "--min-class-pixels", "50", "--out", str(tmp_path / "p")])
    assert p["pixels"] == 740 and len(p["per_class"]) == 2
