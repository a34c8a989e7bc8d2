"""eval.py: a fine-tuned checkpoint evaluated on its run's held-out pixels, other data or another window
(bands, classes and PCA as trained), pictures and attention maps; the frozen-representation probes (k-NN,
linear, per block)."""
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
from conftest import rewrite_image, seg_args, write_scene
from models import build_backbone

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- checkpoints

def test_finetune_then_eval_on_scene(scene, tmp_path):
    out = tmp_path / "ft"
    finetune_seg.main(seg_args(scene, out, "--labels-per-class", "5", "--finetune"))
    z = np.load(out / "split.npz")
    assert z["train"].sum() == 15 and not (z["train"] & z["test"]).any()
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--attention", "--pictures", "1"])
    assert m["pixels"] == int(z["test"].sum())
    saved = json.load(open(out / "eval-test" / "metrics.json"))
    assert {"oa", "aa", "miou", "miou_present", "kappa", "per_class"} <= set(saved)
    assert os.path.isfile(out / "eval-test" / "prediction_0.png") and os.path.isfile(out / "eval-test" / "attention_0.png")


def test_a_semi_checkpoint_is_evaluated_with_its_student_or_its_teacher(scene, tmp_path):
    out = tmp_path / "semi"
    finetune_seg.main(seg_args(scene, out, "--backbone", "pixel", "--steps", "3", "--eval-every", "3", "--semi", "1"))
    ckpt = common.load_checkpoint(str(out / "ckpt.pt"))
    for teacher, key in ((False, "model"), (True, "teacher")):
        model, _ = evaluation.load_model(str(out / "ckpt.pt"), CPU, teacher)
        assert all(torch.equal(v, ckpt[key][k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(ckpt["teacher"][k], v) for k, v in ckpt["model"].items())  # two models indeed
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--pictures", "0"])
    assert m["oa"] == json.load(open(out / "eval.json"))["oa"]  # what the run reported: its student
    evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--pictures", "0", "--teacher"])
    assert os.path.isfile(out / "eval-test-teacher" / "metrics.json")
    finetune_seg.main(seg_args(scene, tmp_path / "sup", "--backbone", "pixel", "--steps", "1"))
    with pytest.raises(ValueError, match="sup/ckpt.pt: --teacher needs a checkpoint of finetune_seg.py --semi"):
        evaluation.main(["--ckpt", str(tmp_path / "sup" / "ckpt.pt"), "--teacher"])


def test_eval_refuses_mismatched_bands_or_classes(scene, tmp_path):
    out = tmp_path / "ft"
    finetune_seg.main(seg_args(scene, out, "--backbone", "pixel", "--steps", "2"))
    other_bands = write_scene(tmp_path / "b", bands=12)
    with pytest.raises(ValueError, match="ckpt.pt: checkpoint was trained on 16 bands but b has 12"):
        evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", other_bands])
    other_classes = write_scene(tmp_path / "c", classes=5)
    with pytest.raises(ValueError, match="ckpt.pt: checkpoint predicts 3 classes but c has 5"):
        evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", other_classes])
    with pytest.raises(ValueError, match="trained on 16 bands"):
        finetune_seg.main(seg_args(other_bands, tmp_path / "x", "--init", str(out / "ckpt.pt")))


def test_checkpoints_record_the_bands_and_read_the_next_product_with_them(tmp_path, capsys):
    first = write_scene(tmp_path / "first", bands=6, size=24, nodata=0, wavelengths_nm=[500 + 100 * i for i in range(6)])
    rewrite_image(first, lambda img: np.where(np.arange(6)[:, None, None] == 2, 0, img))  # band 2 dead
    out = tmp_path / "run"
    finetune_seg.main(["--data", first, "--out", str(out), "--backbone", "pixel",
                       "--img-size", "16", "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--workers", "0"])
    ckpt = common.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["backbone"]["bands"] == {"ids": [0, 1, 3, 4, 5], "wavelengths": [500.0, 600.0, 800.0, 900.0, 1000.0]}
    # The next product: band 2 valid, band 5 a little off in wavelength. It is read with the checkpoint's bands.
    nxt = write_scene(tmp_path / "next", bands=6, size=24, nodata=0, seed=1,
                      wavelengths_nm=[500, 600, 700, 800, 900, 1010])
    capsys.readouterr()
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", nxt, "--out", str(tmp_path / "e")])
    printed = capsys.readouterr().out
    assert m["pixels"] > 0 and "next: reading 5 of 6 bands (the checkpoint's band list); not read (0-based): 2 " \
        "(700 nm)" in printed
    assert "warning: next: band 5 is at 1010.0 nm but the checkpoint's is at 1000.0 nm" in printed
    # Data of another sensor (fewer bands than the checkpoint reads) is read with its own bands, and the
    # band count check names the mismatch.
    with pytest.raises(ValueError, match="checkpoint was trained on 5 bands but other has 4 bands"):
        evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--data", write_scene(tmp_path / "other", bands=4, size=24),
                         "--out", str(tmp_path / "o")])


def test_pca_training_and_evaluation_at_a_larger_window(scene, tmp_path):
    out = tmp_path / "pca"
    finetune_seg.main(seg_args(scene, out, "--pca", "3", "--decoder", "conv", "--finetune",
                               "--layer-decay", "0.75", "--drop-path", "0.1"))
    ckpt = common.load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["backbone"]["in_chans"] == 3 and len(ckpt["segmentation"]["pca"]) == 3
    assert ckpt["backbone"]["drop_path_rate"] == 0.1
    # Trained on 16 px tiles; evaluated on 32 px windows through position-embedding interpolation.
    small = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--out", str(tmp_path / "e16")])
    large = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--window", "32", "--out", str(tmp_path / "e32")])
    assert small["window"] == 16 and large["window"] == 32 and large["pixels"] == small["pixels"]



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
def test_knn_probe_on_a_toy_scene_where_the_answer_is_known(tmp_path, shuffle):
    scene = write_spectral_scene(tmp_path / "scene", shuffle)
    m = evaluation.main(["--probe", "knn", "--backbone", "pixel", "--data", scene,
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
    x = torch.from_numpy(ds.normalise(ds.crop(0, 0, 0, 16, 16)[0]))[None]
    block2 = vit.intermediate_layers(x, [1])[0][1]  # (1, D, 2, 2) tokens of block 2
    up = torch.nn.functional.interpolate(block2, size=(16, 16), mode="bilinear", align_corners=False)[0]
    # The corner window is the only one covering pixels (0..11, 0..11) (window 16, overlap 4): features equal.
    torch.testing.assert_close(feats[1][:, :12, :12], up[:, :12, :12])
    assert not torch.allclose(feats[0], feats[1])
    torch.testing.assert_close(feats[2], evaluation.pixel_features(vit, ds, 16, 4, 8, CPU, torch.float32, None))
    with pytest.raises(ValueError, match="blocks 1..12"):
        evaluation.pixel_features(vit, ds, 16, 4, 8, CPU, torch.float32, 13)
