"""Issue #15: the full-resolution path of every segmentation head, guided upsampling, the boundary metric,
the patch 4 / 2 presets."""
import json

import numpy as np
import pytest
import torch

import compare
import common
import eval as evaluation
import finetune_seg
import pretrain_mae
from data import IGNORE_INDEX
from models import MAE, SegmentationModel, build_backbone, guided_upsample
from test_decoders import CASES
from test_segmentation import seg_args

HEADS = {"off": {}, "on": {"full_res": True}, "stem": {"full_res": True, "stem": 8},
         "guided": {"full_res": True, "upsample": "guided"}}


def model(backbone, decoder, head, classes=5, C=8, frozen=False):
    torch.manual_seed(0)
    kw = {"spectral_patch": 4} if backbone in ("ssvit", "sst") else {}
    return SegmentationModel(build_backbone(backbone, "tiny", C, **kw), decoder, classes, frozen_backbone=frozen,
                             **HEADS[head])


@pytest.mark.parametrize("backbone,decoder", CASES)
@pytest.mark.parametrize("head", ["on", "stem", "guided"])
@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_every_head_keeps_the_shape(backbone, decoder, head, hw):
    if head == "guided" and decoder == "conv":
        with pytest.raises(ValueError, match="already decodes to full resolution"):
            model(backbone, decoder, head)
        return
    m = model(backbone, decoder, head)
    assert m.head["full_res"] and m.full_res is not None
    assert m.eval()(torch.randn(2, 8, *hw)).shape == (2, 5, *hw)
    m.train()
    out = m(torch.randn(2, 8, *hw))
    for logits in out if isinstance(out, tuple) else (out,):  # DeepLabV3+ trains with auxiliary logits
        assert logits.shape == (2, 5, *hw)


@pytest.mark.parametrize("backbone,decoder", CASES)
@pytest.mark.parametrize("head", ["on", "guided"])
def test_with_zeroed_features_the_head_is_a_per_pixel_linear_classifier(backbone, decoder, head):
    if head == "guided" and decoder in ("conv", "deeplabv3plus"):
        pytest.skip("a padded conv decoder gives position-dependent logits, which guided upsampling mixes by the input")
    m = model(backbone, decoder, head)
    with torch.no_grad():  # every head parameter and BatchNorm statistic away from its initial value
        for p in m.head_modules().parameters():
            p.normal_(0, 0.5)
        for mod in m.head_modules().modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.normal_(0, 0.5)
                mod.running_var.uniform_(0.5, 2)
    layers = m.backbone.intermediate_layers
    m.backbone.intermediate_layers = lambda x, blocks: [(None if c is None else torch.zeros_like(c), torch.zeros_like(f))
                                                        for c, f in layers(x, blocks)]
    m.eval()
    x1, x2 = torch.randn(2, 8, 32, 48), torch.randn(2, 8, 32, 48)
    with torch.no_grad():
        f1, f2 = m(x1), m(x2)
        pixel1, pixel2 = m.full_res.pixel(x1), m.full_res.pixel(x2)
    # The spectrum enters only through the per-pixel linear map: what is left does not depend on it ...
    rest = f1 - pixel1
    torch.testing.assert_close(rest, f2 - pixel2, atol=1e-4, rtol=1e-4)
    if decoder in ("linear", "segmenter"):  # ... and is one bias per class
        torch.testing.assert_close(rest, rest[:, :, :1, :1].expand_as(rest), atol=1e-4, rtol=1e-4)


def test_full_res_path_learns_what_the_pixel_baseline_learns_on_a_frozen_random_vit():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 32, 32)
    y = (x[:, 0] > 0).long()  # a per-pixel rule with detail far finer than the 8 px patches

    def train_accuracy(head):
        torch.manual_seed(0)
        m = model("vit", "linear", head, classes=2, C=4, frozen=True) if head else \
            SegmentationModel(build_backbone("pixel", in_chans=4), "linear", 2)  # the per-pixel baseline
        opt = torch.optim.Adam(m.head_modules().parameters(), lr=2e-2)
        for _ in range(60):
            loss = finetune_seg.segmentation_loss(m.train()(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return (m.eval()(x).argmax(1) == y).float().mean().item()
    baseline = train_accuracy(None)
    assert baseline > 0.98
    assert train_accuracy("on") > baseline - 0.05  # the random context adds some noise to fit around
    assert train_accuracy("off") < 0.75  # the study's head cannot see below the patch


def test_guided_upsampling_follows_the_guidance_edge():
    # 8 px wide, 2 cells of 4 px; the guidance (the true edge) switches between columns 2 and 3, one pixel
    # before the cell boundary. Cell 0 says class 0, cell 1 class 1.
    guide = torch.zeros(1, 1, 8, 8)
    guide[..., 3:] = 1
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 0, :, 0], logits[:, 1, :, 1] = 1, 1
    sharp = guided_upsample(logits, guide, torch.tensor(8.0), torch.tensor(np.log(0.5)))
    assert (sharp.argmax(1)[0] == (guide[0, 0] > 0.5)).all()
    blurred = torch.nn.functional.interpolate(logits, (8, 8), mode="bilinear", align_corners=False)
    assert (blurred.argmax(1)[0, :, 3] == 0).all()  # bilinear keeps column 3 on the wrong side
    flat = guided_upsample(torch.full((1, 3, 4, 5), 2.5), torch.randn(1, 4, 16, 20), torch.tensor(1.0),
                           torch.tensor(0.0))
    torch.testing.assert_close(flat, torch.full((1, 3, 16, 20), 2.5))  # a convex mix: constants stay
    with pytest.raises(ValueError, match="full-resolution"):
        SegmentationModel(build_backbone("vit", "tiny", 8), "linear", 3, upsample="guided")


def test_stride_one_backbones_get_no_second_pixel_path():
    m = SegmentationModel(build_backbone("pixel", in_chans=6), "linear", 3, full_res=True)
    assert m.full_res is None and m.head == {"full_res": False, "stem": 0, "upsample": "bilinear"}


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
    edge = evaluation.boundary_mask(labels, radius=2)
    expected = np.zeros((8, 8), bool)
    expected[:6, 4:] = True   # within 2 px (Chebyshev) of the 1-block, on both sides
    expected[5:, :3] = True   # within 2 px of the unlabelled corner (other land cover)
    expected[7, 0] = False    # unlabelled pixels are never scored
    assert (edge == expected).all(), edge.astype(int)
    pred = labels.copy()
    pred[:4, 5] = 1           # 4 errors, all on the boundary
    cms = evaluation.region_confusions(pred, labels, edge, 2)
    m = evaluation.region_metrics(cms, ["a", "b"])
    assert m["boundary"]["pixels"] == expected.sum() and m["interior"]["pixels"] == 63 - expected.sum()
    assert m["boundary"]["oa"] == pytest.approx(1 - 4 / expected.sum()) and m["interior"]["oa"] == 1.0
    assert "boundary (within 2 px" in evaluation.format_table(m)


def test_finetune_records_the_head_and_reports_the_boundary_metric(scene, cache_dir, tmp_path):
    out = tmp_path / "ft"
    finetune_seg.main(seg_args(scene, out, cache_dir, "--labels-per-class", "5", "--upsample", "guided",
                               "--full-res-stem", "4"))
    ckpt = common.load_checkpoint(out / "ckpt.pt")
    assert ckpt["segmentation"]["head"] == {"full_res": True, "stem": 4, "upsample": "guided"}
    m = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--pictures", "0"])
    assert json.load(open(out / "eval.json"))["boundary"]["oa"] == pytest.approx(m["boundary"]["oa"])
    assert m["boundary"]["pixels"] + m["interior"]["pixels"] == m["pixels"]
    with pytest.raises(ValueError, match="trained with the head"):  # resuming needs the same head
        finetune_seg.main(seg_args(scene, out, cache_dir, "--labels-per-class", "5", "--steps", "6", "--resume"))
    old = tmp_path / "study"  # the study's head, for checkpoints written before the path existed
    finetune_seg.main(seg_args(scene, old, cache_dir, "--labels-per-class", "5", "--no-full-res"))
    ckpt = common.load_checkpoint(old / "ckpt.pt")
    del ckpt["segmentation"]["head"]
    torch.save(ckpt, old / "old.pt")
    model, _ = evaluation.load_model(str(old / "old.pt"), torch.device("cpu"))
    assert model.full_res is None


def test_compare_reports_the_boundary_oa_paired():
    rows = [{"name": "a", "mode": "finetune", "labels": "10%", "reference": "b", "split_seeds": [0, 1],
             "oa": [80, 82], "aa": [1, 1], "miou": [1, 1], "kappa": [1, 1], "boundary_oa": [60, 64]},
            {"name": "b", "mode": "finetune", "labels": "10%", "reference": None, "split_seeds": [0, 1],
             "oa": [79, 80], "aa": [1, 1], "miou": [1, 1], "kappa": [1, 1], "boundary_oa": [58, 60]}]
    line = compare.table(rows).splitlines()[2]
    assert line.endswith("| 62.00 ± 2.83 | +3.00 ± 1.41 |"), line


@pytest.mark.parametrize("preset,patch,img", [("patch4", 4, 64), ("patch2", 2, 32)])
def test_patch_presets_have_the_grid_and_the_flops(preset, patch, img):
    args = finetune_seg.parse_args(["--preset", preset])
    assert (args.patch_size, args.img_size) == (patch, img)
    margs = pretrain_mae.parse_args(["--preset", preset, "--patch-size", str(patch)])
    assert margs.img_size == img
    torch.manual_seed(0)
    enc = build_backbone("vit", "tiny", 8, img_size=img, patch_size=patch)
    assert enc.pos_embed.shape[1] == (img // patch) ** 2 and enc.grid == (img // patch,) * 2
    assert enc.interpolate_pos_embed(img // patch * 2, img // patch).shape[1] == (img // patch) ** 2 * 2  # other windows
    mae = MAE(enc, 64, 2, 4)
    x = torch.randn(2, 8, img, img)
    counted = common.counted_flops(lambda: mae(x)[0].backward()) / 2
    assert mae.flops_per_image() == pytest.approx(counted, rel=0.05)
