"""Decoders (linear, conv, segmenter), the DeepLabV3+ ResNet-50-V1c baseline, resolution change,
layer-wise lr decay and PCA band reduction."""
import numpy as np
import pytest
import torch

import data
import eval as evaluation
import finetune_seg
from models import SegmentationModel, build_backbone, layer_ids
from test_segmentation import seg_args

CASES = [("vit", "linear"), ("vit", "conv"), ("vit", "segmenter"), ("ssvit", "conv"), ("sst", "segmenter"),
         ("resnet50v1c", "deeplabv3plus")]


def model(backbone, decoder, classes=5, C=8):
    torch.manual_seed(0)
    kw = {"spectral_patch": 4} if backbone in ("ssvit", "sst") else {}
    return SegmentationModel(build_backbone(backbone, "tiny", C, **kw), decoder, classes, frozen_backbone=False)


@pytest.mark.parametrize("backbone,decoder", CASES)
@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_decoder_output_shapes(backbone, decoder, hw):
    m = model(backbone, decoder).eval()
    assert m(torch.randn(2, 8, *hw)).shape == (2, 5, *hw)


def test_deeplab_output_stride_and_aux_head():
    m = model("resnet50v1c", "deeplabv3plus")
    stem = [mod for mod in m.backbone.stem.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.kernel_size for c in stem] == [(3, 3)] * 3 and stem[0].in_channels == 8  # deep stem, C bands
    (_, low), (_, mid), (_, high) = m.backbone.intermediate_layers(torch.randn(2, 8, 64, 64))
    assert low.shape == (2, 256, 16, 16) and mid.shape == (2, 1024, 8, 8) and high.shape == (2, 2048, 8, 8)
    assert [(b[0].kernel_size, b[0].dilation) for b in m.decoder.aspp[1:]] == [((3, 3), (r, r)) for r in (12, 24, 36)]
    m.train()
    logits, aux = m(torch.randn(2, 8, 64, 64))
    assert logits.shape == aux.shape == (2, 5, 64, 64)
    target = torch.randint(-1, 5, (2, 64, 64))
    loss = finetune_seg.segmentation_loss((logits, aux), target, aux_weight=0.4)
    ce = torch.nn.functional.cross_entropy
    torch.testing.assert_close(loss, ce(logits, target, ignore_index=-1) + 0.4 * ce(aux, target, ignore_index=-1))


@pytest.mark.parametrize("backbone,decoder", CASES)
def test_a_few_steps_reduce_the_loss(backbone, decoder):
    m = model(backbone, decoder, classes=3).train()
    x = torch.randn(4, 8, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)  # constant 8x8 patches
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()  # a per-pixel rule any decoder can learn
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(12):
        loss = finetune_seg.segmentation_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses


def test_layer_wise_lr_decay_groups():
    args = finetune_seg.parse_args(["--finetune", "--layer-decay", "0.5", "--backbone-lr-scale", "1"])
    m = model("ssvit", "linear")
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


def test_pca_is_fitted_on_training_pixels_only(scene, cache_dir):
    ds = data.load_scene(scene, cache_dir)
    labels = data.scene_labels(ds)
    train, _ = data.sparse_split(labels, 0, per_class=5)
    proj, explained = data.fit_pca(ds, 3, train)
    assert proj.shape == (3, 16) and np.all(np.diff(explained) <= 0)
    # Components have unit variance on the training pixels and are uncorrelated.
    img = ds.normalize(ds.crop(0, 0, 0, 40, 40)[0])
    comps = np.einsum("kc,chw->khw", proj, img)[:, train]
    np.testing.assert_allclose(np.cov(comps, bias=True), np.eye(3), atol=1e-3)
    # Test pixels do not influence the fit.
    r = ds.rasters[0]
    changed = np.where(train, np.asarray(r.image), 0).astype(r.image.dtype)
    ds.rasters[0] = data.Raster(r.path, changed, r.label)
    np.testing.assert_allclose(data.fit_pca(ds, 3, train)[0], proj, rtol=1e-4, atol=1e-5)
    ds.pca = proj
    assert ds.bands == 3 and ds.normalize(ds.crop(0, 0, 0, 8, 8)[0]).shape == (3, 8, 8)


def test_pca_training_and_evaluation_at_a_larger_window(scene, cache_dir, tmp_path):
    out = tmp_path / "pca"
    finetune_seg.main(seg_args(scene, out, cache_dir, "--pca", "3", "--decoder", "conv", "--finetune",
                               "--layer-decay", "0.75", "--drop-path", "0.1"))
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["backbone"]["in_chans"] == 3 and len(ckpt["segmentation"]["pca"]) == 3
    assert ckpt["backbone"]["drop_path_rate"] == 0.1
    # Trained on 16 px tiles; evaluated on 32 px windows through position-embedding interpolation.
    small = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--out", str(tmp_path / "e16")])
    large = evaluation.main(["--ckpt", str(out / "ckpt.pt"), "--window", "32", "--out", str(tmp_path / "e32")])
    assert small["window"] == 16 and large["window"] == 32 and large["pixels"] == small["pixels"]
