"""The evaluation instrument: the protocol runner (paired differences, resumable cells), same-architecture
random twins, frozen-representation probes (k-NN, linear, per block), class filters and whole-scene
inference for fully convolutional models."""
import json
import math
import os
import shutil

import numpy as np
import pytest
import tifffile
import torch

import common
import compare
import data
import eval as evaluation
import finetune_seg
import pretrain_contrast
import pretrain_mae
from conftest import write_scene
from models import SegmentationModel, build_backbone

CPU = torch.device("cpu")


def seg_args(data_path, out, cache_dir, *extra):
    return ["--data", data_path, "--out", str(out), "--cache-dir", cache_dir, "--img-size", "16",
            "--batch-size", "4", "--steps", "2", "--log-every", "2", "--eval-every", "2", "--ckpt-every", "2",
            "--eval-batch-size", "8", "--workers", "0", *extra]


# ----------------------------------------------------------------------------- runner arithmetic

def test_paired_difference_on_a_hand_made_table():
    a = {0: 70.0, 1: 72.0, 2: 71.0, 3: 99.0}   # seed 3 has no partner: left out of the pairing
    b = {0: 68.0, 1: 73.0, 2: 69.0}
    mean, std, wins, n = compare.paired(a, b)  # differences 2, -1, 2
    assert (mean, wins, n) == (1.0, 2, 3)
    assert std == pytest.approx(math.sqrt(3))  # sample std: ((1)^2 + (-2)^2 + (1)^2) / (3 - 1) = 3
    rows = [{"name": "pre", "mode": "knn", "labels": "5/class", "reference": "pre-twin", "split_seeds": [0, 1, 2, 3],
             "oa": [70, 72, 71, 99], "aa": [1, 1, 1, 1], "miou": [50, 50, 50, 50], "kappa": [0, 0, 0, 0]},
            {"name": "pre-twin", "mode": "knn", "labels": "5/class", "reference": None, "split_seeds": [0, 1, 2],
             "oa": [68, 73, 69], "aa": [1, 1, 1], "miou": [40, 52, 50], "kappa": [0, 0, 0]}]
    md = compare.table(rows)
    pre = next(line for line in md.splitlines() if line.startswith("| pre |"))
    assert "| +1.00 ± 1.73 |" in pre and "| 2/3 |" in pre
    assert "| +2.67 ± 6.43 |" in pre  # mIoU differences 10, -2, 0: sqrt((7.33^2 + 4.67^2 + 2.67^2) / 2)
    assert "78.00 ± 14.02" in pre     # OA over the row's own 4 seeds: sqrt((64 + 36 + 49 + 441) / 3)


def test_budget_labels_and_twins_are_parsed():
    assert compare.parse_budget("10/class") == (["--labels-per-class", "10"], "10-per-class")
    assert compare.parse_budget("10%") == (["--train-fraction", "0.1"], "10pct")
    assert compare.parse_budget("200/class, classes >= 400 px") == (
        ["--labels-per-class", "200", "--min-class-pixels", "400"], "200-per-class-min400px")
    with pytest.raises(ValueError, match="'lots'"):
        compare.parse_budget("lots")
    configs, pairs = compare.parse_configs(["mae: --init a.pt", "pixel: --backbone pixel"], twins=True)
    assert configs["mae-twin"] == ["--init", "a.pt", "--twin"] and pairs == {"mae": "mae-twin"}
    configs, pairs = compare.parse_configs(["p2 vs mae-twin: --init b.pt"], twins=True)
    assert configs == {"p2": ["--init", "b.pt"]} and pairs == {"p2": "mae-twin"}  # an explicit partner, no twin


def test_runner_writes_results_and_skips_finished_cells(tmp_path, cache_dir, monkeypatch):
    scene = write_scene(tmp_path / "scene", bands=8, size=32)
    calls = []
    real_eval, real_ft = evaluation.main, finetune_seg.main
    monkeypatch.setattr(evaluation, "main", lambda argv: calls.append(argv) or real_eval(argv))
    monkeypatch.setattr(finetune_seg, "main", lambda argv: calls.append(argv) or real_ft(argv))
    argv = ["--study", "s", "--data", scene, "--config", "pixel: --backbone pixel --cache-dir " + cache_dir,
            "--config", "vit: --backbone vit --img-size 16", "--reference", "pixel", "--modes", "knn,finetune",
            "--budget", "3/class", "--seeds", "0,1", "--in-process", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"),
            "--finetune-args", f"--steps 2 --eval-every 2 --batch-size 2 --img-size 16 --workers 0 --cache-dir {cache_dir}"]
    summary = compare.main(argv)
    assert len(calls) == 8  # 2 configs x 2 modes x 2 seeds
    rows = {(r["name"], r["mode"]): r for r in summary["rows"]}
    vit = rows[("vit", "finetune")]
    assert vit["reference"] == "pixel" and rows[("pixel", "knn")]["reference"] is None
    assert vit["split_seeds"] == [0, 1] and len(vit["oa"]) == 2 and vit["labels"] == "3/class"
    assert rows[("pixel", "knn")]["oa"] == [100.0, 100.0]  # the fixture's class spectra are far apart
    assert "finetune_seg.py" in vit["command"] and "--split-seed 0" in vit["command"]
    with open(tmp_path / "results" / "s.json") as f:
        assert json.load(f)["rows"] == summary["rows"]
    assert "| vit | finetune | 3/class | 2 |" in (tmp_path / "results" / "s.md").read_text()
    # Re-run after one cell was interrupted (no result.json): only that cell runs again.
    os.remove(tmp_path / "runs" / "s" / "vit" / "knn" / "3-per-class" / "seed1" / "result.json")
    calls.clear()
    again = compare.main(argv)
    assert len(calls) == 1 and "--probe" in calls[0] and calls[0][calls[0].index("--seed") + 1] == "1"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(again["rows"]) == strip(summary["rows"])  # the re-run cell reproduces its result
    # Another session: no runs/ folder, only the committed results file. Nothing runs; the rows stay.
    shutil.rmtree(tmp_path / "runs")
    calls.clear()
    assert compare.main(argv)["rows"] == again["rows"] and not calls
    # ... unless the flags changed: then the recorded cells are not these cells. --collect runs none of them
    # and writes the finished ones (the knn cells here); without it they run.
    changed = [a.replace("--steps 2", "--steps 1") for a in argv]
    calls.clear()
    partial = compare.main(changed + ["--collect"])
    assert not calls and "--collect" not in partial["command"]
    assert [len(r["split_seeds"]) for r in partial["rows"]] == [2, 0, 2, 0]  # (pixel, vit) x (knn, finetune)
    compare.main(changed)
    assert len(calls) == 4 and all("--probe" not in c for c in calls)  # the finetune cells, both configs and seeds


# ----------------------------------------------------------------------------- twins

def test_twin_has_the_checkpoint_config_and_none_of_its_weights(tmp_path, cache_dir):
    scene = write_scene(tmp_path / "scene", bands=8, size=32)
    pre = tmp_path / "pre"
    pretrain_mae.main(["--data", scene, "--out", str(pre), "--cache-dir", cache_dir, "--steps", "3", "--img-size", "16",
                       "--batch-size", "4", "--registers", "2", "--ffn", "swiglu", "--log-every", "1", "--workers", "0"])
    ckpt = common.load_checkpoint(pre / "ckpt.pt")
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    args = evaluation.parse_args(["--probe", "knn", "--init", str(pre / "ckpt.pt"), "--twin"])
    torch.manual_seed(0)
    twin, _ = evaluation.load_backbone(args, ds)
    torch.manual_seed(1)
    other, _ = evaluation.load_backbone(args, ds)
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
    finetune_seg.main(seg_args(scene, tmp_path / "ft_twin", cache_dir, "--init", str(pre / "ckpt.pt"), "--twin"))
    finetune_seg.main(seg_args(scene, tmp_path / "ft_pre", cache_dir, "--init", str(pre / "ckpt.pt"), "--steps", "0"))
    assert common.load_checkpoint(tmp_path / "ft_twin" / "ckpt.pt")["backbone"] == ckpt["backbone"]
    with pytest.raises(ValueError, match="--twin needs --init"):
        evaluation.load_backbone(evaluation.parse_args(["--probe", "knn", "--twin"]), ds)


def test_cdcnn_twin_and_scratch_depth(tmp_path, cache_dir):
    a, b = write_scene(tmp_path / "a", bands=6, size=24, seed=1), write_scene(tmp_path / "b", bands=9, size=24, seed=2)
    pre = tmp_path / "pre"
    pretrain_contrast.main(["--data", f"{a},{b}", "--out", str(pre), "--cache-dir", cache_dir, "--steps", "2",
                            "--width", "16", "--depth", "2", "--region-size", "3", "--workers", "0"])
    trunk = {k: v for k, v in common.backbone_weights(common.load_checkpoint(pre / "ckpt.pt")).items()
             if k.startswith("trunk.")}
    target = write_scene(tmp_path / "t", bands=5, size=24, seed=3)
    ds = data.load_dataset(target, cache_dir=cache_dir)
    twin = finetune_seg.build_model(finetune_seg.parse_args(["--init", str(pre / "ckpt.pt"), "--twin"]), ds)
    assert twin.backbone.config["depth"] == 2 and twin.backbone.config["width"] == 16
    assert not any(torch.equal(twin.backbone.state_dict()[k], v) for k, v in trunk.items() if v.dim() > 1)
    scratch = finetune_seg.build_model(finetune_seg.parse_args(["--backbone", "cdcnn", "--depth", "4"]), ds)
    assert scratch.backbone.config["depth"] == 4 and len(scratch.backbone.trunk) == 5  # 4 modules + final 1x1


# ----------------------------------------------------------------------------- probes

def test_knn_is_perfect_on_separable_features_and_chance_on_shuffled_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=g) * 5
    y_train, y_test = torch.arange(4).repeat_interleave(20), torch.arange(4).repeat_interleave(500)
    x_train = centres[y_train] + torch.randn(80, 32, generator=g)
    x_test = centres[y_test] + torch.randn(2000, 32, generator=g)
    assert (evaluation.knn_predict(x_train, y_train, x_test, 4) == y_test).all()
    assert (evaluation.linear_probe(x_train, y_train, x_test, 4) == y_test).all()
    shuffled = y_train[torch.randperm(80, generator=g)]
    acc = (evaluation.knn_predict(x_train, shuffled, x_test, 4) == y_test).float().mean()
    assert 0.1 < acc < 0.4  # chance is 0.25


def write_spectral_scene(folder, shuffle=False):
    """Four classes in vertical stripes, each a distinct flat spectrum plus noise; with shuffle the labels
    are a random permutation of the pixels' labels, so features cannot predict them."""
    rng = np.random.default_rng(0)
    size, bands = 40, 8
    gt = (1 + np.arange(size)[None, :].repeat(size, 0) * 4 // size).astype(np.uint8)
    img = (rng.integers(1000, 5000, (5, bands))[gt].transpose(2, 0, 1) + rng.integers(0, 100, (bands, size, size)))
    if shuffle:
        gt = rng.permutation(gt.ravel()).reshape(size, size)
    write_scene(folder, bands=bands, size=size, classes=4)
    tifffile.imwrite(os.path.join(folder, "image.tif"), img.astype(np.uint16))
    tifffile.imwrite(os.path.join(folder, "gt.tif"), gt)
    return str(folder)


@pytest.mark.parametrize("shuffle", [False, True])
def test_knn_probe_on_a_toy_scene_where_the_answer_is_known(tmp_path, cache_dir, shuffle):
    scene = write_spectral_scene(tmp_path / "scene", shuffle)
    m = evaluation.main(["--probe", "knn", "--backbone", "pixel", "--data", scene, "--cache-dir", cache_dir,
                         "--labels-per-class", "10", "--out", str(tmp_path / "p")])
    if shuffle:
        assert 0.12 < m["oa"] < 0.4  # chance: 0.25
    else:
        assert m["oa"] == 1.0 and m["pixels"] == 40 * 40 - 40
    assert json.loads((tmp_path / "p" / "metrics.json").read_text())["oa"] == m["oa"]


def test_probe_block_reads_the_chosen_block(tmp_path, cache_dir):
    scene = write_scene(tmp_path / "scene", bands=8, size=32)
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    torch.manual_seed(0)
    vit = build_backbone("vit", "tiny", 8, img_size=16).eval()
    feats = [evaluation.pixel_features(vit, ds, 16, 4, 8, CPU, torch.float32, b) for b in (1, 2, 12)]
    assert feats[0].shape == (192, 32, 32)
    x = torch.from_numpy(ds.normalize(ds.crop(0, 0, 0, 16, 16)[0]))[None]
    block2 = vit.intermediate_layers(x, [1])[0][1]  # (1, D, 2, 2) tokens of block 2
    up = torch.nn.functional.interpolate(block2, size=(16, 16), mode="bilinear", align_corners=False)[0]
    # The corner window is the only one covering pixels (0..11, 0..11) (window 16, overlap 4): features equal.
    torch.testing.assert_close(feats[1][:, :12, :12], up[:, :12, :12])
    assert not torch.allclose(feats[0], feats[1])
    torch.testing.assert_close(feats[2], evaluation.pixel_features(vit, ds, 16, 4, 8, CPU, torch.float32, None))
    with pytest.raises(ValueError, match="blocks 1..12"):
        evaluation.pixel_features(vit, ds, 16, 4, 8, CPU, torch.float32, 13)


# ----------------------------------------------------------------------------- class filter

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
    finetune_seg.main(seg_args(scene, out, cache_dir, "--backbone", "pixel", "--labels-per-class", "5",
                               "--min-class-pixels", "50"))
    ckpt = common.load_checkpoint(out / "ckpt.pt")
    assert ckpt["segmentation"]["num_classes"] == 2 and ckpt["segmentation"]["classes"] == [0, 2]
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--cache-dir", cache_dir, "--pictures", "0"])
    assert m["pixels"] == 740 and [c["name"] for c in m["per_class"]] == ["c0", "c2"]
    assert json.loads((out / "eval.json").read_text())["pixels"] == 740
    p = evaluation.main(["--probe", "knn", "--backbone", "pixel", "--data", scene, "--cache-dir", cache_dir,
                         "--labels-per-class", "5", "--min-class-pixels", "50", "--out", str(tmp_path / "p")])
    assert p["pixels"] == 740 and len(p["per_class"]) == 2


# ----------------------------------------------------------------------------- whole-scene inference

def test_whole_scene_cdcnn_inference_equals_tiles_where_tiles_have_full_context(tmp_path, cache_dir):
    scene = write_scene(tmp_path / "scene", bands=6, size=40)
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    torch.manual_seed(0)
    model = SegmentationModel(build_backbone("cdcnn", in_chans={"scene": 6}, width=16, depth=2), "linear", 3,
                              frozen_backbone=False).eval()
    whole, labels = evaluation.predict_raster(model, ds, 0, None, 0, 4, CPU, torch.float32)
    assert whole.shape == (3, 40, 40) and (labels == data.scene_labels(ds)).all()
    margin = 2  # the 5x5 first layer's reach
    for y, x in data.grid_windows(40, 40, 16, 8):
        tile = torch.from_numpy(ds.normalize(ds.crop(0, y, x, 16, 16)[0]))[None]
        with torch.no_grad():
            out = model(tile)[0]
        inner = (slice(None), slice(margin, 16 - margin), slice(margin, 16 - margin))
        torch.testing.assert_close(out[inner], whole[:, y:y + 16, x:x + 16][inner])
    # Averaged tiles are wrong near interior tile borders, which is why whole-scene inference is used.
    tiled, _ = evaluation.predict_raster(model, ds, 0, 16, 8, 4, CPU, torch.float32)
    assert not torch.allclose(tiled, whole)
