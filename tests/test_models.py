"""models.py: the backbones (ViT, spatial-spectral ViT, MaskedSST-style transformer, pixel, ResNet, cross-domain
CNN), their init and position options and presets, MAE and SimMIM, the DINO head, the decoders and the
full-resolution path of SegmentationModel."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import finetune_seg
import pretrain_mae
from models import (MAE, PRESETS, VIT_SIZES, CrossDomainCNN, DINOHead, MultiscaleLinearDecoder, SegmentationModel,
                    SimMIM, block_axes, build_backbone, init_weights, masked_l1, patchify, unpatchify)

CASES = [("vit", "linear"), ("vit", "conv"), ("vit", "segmenter"), ("ssvit", "conv"), ("sst", "segmenter"),
         ("resnet50v1c", "deeplabv3plus")]


def seg_model(backbone, decoder, classes=5, C=8, frozen=False, full_res=False):
    torch.manual_seed(0)
    kw = {"spectral_patch": 4} if backbone in ("ssvit", "sst") else {}
    return SegmentationModel(build_backbone(backbone, "tiny", C, **kw), decoder, classes, frozen_backbone=frozen,
                             full_res=full_res)


# ----------------------------------------------------------------------------- ViT and MAE

def tiny_mae(C=6, mask_ratio=0.75, registers=0, img_size=32):
    torch.manual_seed(0)
    enc = build_backbone("vit", "tiny", C, img_size=img_size, patch_size=8, num_registers=registers)
    return MAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2, mask_ratio=mask_ratio)


def test_patchify_matches_conv_layout_and_roundtrips():
    x = torch.randn(2, 5, 16, 24)
    p = patchify(x, 8)
    assert p.shape == (2, 6, 5 * 64)
    assert torch.equal(unpatchify(p, 8, 5, 2, 3), x)
    w = torch.randn(7, 5, 8, 8)
    conv = F.conv2d(x, w, stride=8).flatten(2).transpose(1, 2)  # (B, N, 7)
    torch.testing.assert_close(p @ w.reshape(7, -1).T, conv, rtol=1e-4, atol=1e-4)


def test_presets_and_paper_base():
    built = {size: build_backbone("vit", size, 32) for size in VIT_SIZES}
    for size, (dim, depth, heads) in VIT_SIZES.items():
        m = built[size]
        assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (dim, depth, heads)
    base = built["base"]
    assert base.patch_size == 8 and base.grid == (8, 8) and base.patch_embed.in_features == 32 * 64
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet", "tiny", 32)


@pytest.mark.parametrize("registers,ffn", [(0, "mlp"), (4, "swiglu")])
def test_vit_outputs_and_intermediate_layers(registers, ffn):
    m = build_backbone("vit", "tiny", 6, img_size=32, num_registers=registers, ffn=ffn, layerscale=1e-5).eval()
    x = torch.randn(2, 6, 32, 32)
    assert m.forward_features(x).shape == (2, 1 + registers + 16, 192)
    assert m(x).shape == (2, 192)
    layers = m.intermediate_layers(x, 4)
    assert len(layers) == 4 and layers[0][0].shape == (2, 192) and layers[0][1].shape == (2, 192, 4, 4)
    # The last requested layer is the final normalised output.
    torch.testing.assert_close(layers[-1][0], m(x))
    assert [c.shape for c, _ in m.intermediate_layers(x, [0, 5])] == [(2, 192)] * 2


def test_position_embedding_interpolates_to_other_sizes():
    m = build_backbone("vit", "tiny", 6, img_size=32).eval()
    assert torch.equal(m.interpolate_pos_embed(4, 4), m.pos_embed)
    x = torch.randn(1, 6, 48, 64)  # non-square, larger than training
    assert m.intermediate_layers(x, 1)[0][1].shape == (1, 192, 6, 8)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        m(torch.randn(1, 6, 30, 32))


def test_masking_ratio_and_partition():
    mae = tiny_mae(mask_ratio=0.75)
    keep, masked, restore = mae.random_masking(3, 16, "cpu")
    assert keep.shape == (3, 4) and masked.shape == (3, 12)
    for b in range(3):
        assert sorted(torch.cat([keep[b], masked[b]]).tolist()) == list(range(16))
    shuffled = torch.cat([keep, masked], 1)
    assert torch.equal(torch.gather(shuffled, 1, restore), torch.arange(16).expand(3, -1))


@pytest.mark.parametrize("registers", [0, 4])
def test_masked_tokens_never_reach_the_encoder(registers):
    mae = tiny_mae(registers=registers).eval()
    seen = []
    mae.encoder.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    x = torch.randn(2, 6, 32, 32)
    torch.manual_seed(1)
    _, _, (masked,) = mae(x)
    assert seen[0] == (2, 1 + registers + 4, 192)  # 25% of 16 patches + prefix tokens
    # Changing the masked pixels changes nothing the encoder sees.
    latents = []
    mae.encoder.norm.register_forward_hook(lambda mod, inp, out: latents.append(out))
    p = patchify(x, 8)
    p2 = p.scatter(1, masked[..., None].expand(-1, -1, p.shape[-1]), 100.0)
    x2 = unpatchify(p2, 8, 6, 4, 4)
    for inp in (x, x2):
        torch.manual_seed(1)
        mae(inp)
    torch.testing.assert_close(latents[0], latents[1])


def test_loss_is_on_masked_patches_only():
    mae = tiny_mae().eval()
    x = torch.randn(2, 6, 32, 32)
    torch.manual_seed(1)
    loss, (pred,), (masked,) = mae(x)
    target = mae.normalise_targets(torch.gather(patchify(x, 8), 1, masked[..., None].expand(-1, -1, 6 * 64)))
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())
    var, mean = torch.var_mean(target, dim=-1)
    torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-5, rtol=0)


def test_reconstruction_keeps_visible_patches():
    mae = tiny_mae().eval()
    x = torch.randn(2, 6, 32, 32)
    recon, mask = mae.reconstruct(x, *mae(x)[1:])
    assert recon.shape == x.shape and mask.sum() == 2 * 12
    visible = ~mask.bool()
    torch.testing.assert_close(patchify(recon, 8)[visible], patchify(x, 8)[visible])


def test_attention_maps_shape():
    vit = build_backbone("vit", "tiny", 6, img_size=32, num_registers=4)
    attn = vit.attention_maps(torch.randn(2, 6, 32, 32))["spatial"]
    assert attn.shape == (2, 3, 4, 4)
    assert (attn.sum((-2, -1)) <= 1 + 1e-5).all()  # CLS also attends to itself and the registers


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



# ----------------------------------------------------------------------------- init schemes and position embeddings

def linears(module):
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def xavier_std(layer):
    """std of xavier_uniform: bound sqrt(6 / (fan_in + fan_out)) / sqrt(3)."""
    return math.sqrt(6 / (layer.in_features + layer.out_features)) / math.sqrt(3)


@pytest.mark.parametrize("name,kw", [("vit", {}), ("ssvit", {"spectral_patch": 2}), ("sst", {"spectral_patch": 4})])
def test_xavier_init_matches_the_xavier_bound(name, kw):
    torch.manual_seed(0)
    model = build_backbone(name, "tiny", 8, img_size=32, init="xavier", **kw)
    blocks = model.blocks if name != "ssvit" else model.spatial.blocks
    for layer in linears(blocks):
        assert layer.weight.std().item() == pytest.approx(xavier_std(layer), rel=0.05)
        assert layer.bias is None or not layer.bias.any()
    assert model.config["init"] == "xavier"
    twin = build_backbone(**model.config)  # a twin rebuilt from the checkpoint config gets the same scheme
    assert twin.init_scheme == "xavier"
    if name == "ssvit":
        for f in model.fusions:  # fusion still starts as the identity
            assert not f.to_spatial.weight.any() and not f.to_spectral.weight.any()
    default = build_backbone(name, "tiny", 8, img_size=32, **kw)
    assert "init" not in default.config and default.init_scheme == "trunc_normal"  # old configs mean this
    for layer in linears(default.blocks if name != "ssvit" else default.spatial.blocks):
        assert layer.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_random_xavier_vit_transforms_its_input_more():
    x = torch.randn(4, 8, 32, 32)

    def cosine(init):
        torch.manual_seed(0)
        vit = build_backbone("vit", "tiny", 8, img_size=32, init=init).eval()
        t0 = t = vit.embed(x)
        for blk in vit.blocks:
            t = blk(t)
        return F.cosine_similarity(t[:, 1:], t0[:, 1:], dim=-1).mean().item()  # block-12 output vs embedding
    trunc, xavier = cosine("trunc_normal"), cosine("xavier")
    assert trunc > 0.9 and xavier < 0.8, (trunc, xavier)


def test_mae_decoder_follows_the_encoder_init_and_defaults_are_unchanged():
    torch.manual_seed(0)
    mae = MAE(build_backbone("vit", "tiny", 8, img_size=32, init="xavier"), 64, 2, 4)
    for layer in linears(mae.decoders[0].decoder_blocks):
        assert layer.weight.std().item() == pytest.approx(xavier_std(layer), rel=0.05)
    # The default build draws the same numbers as before the option existed.
    torch.manual_seed(0)
    new = build_backbone("vit", "tiny", 8, img_size=32, init="trunc_normal")
    torch.manual_seed(0)
    old = build_backbone("vit", "tiny", 8, img_size=32)
    for (k, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), k
    layer = nn.Linear(64, 32)
    init_weights(layer)
    assert layer.weight.std().item() == pytest.approx(0.02, rel=0.1)
    with pytest.raises(ValueError, match="unknown init 'kaiming'"):
        build_backbone("vit", "tiny", 8, img_size=32, init="kaiming")


@pytest.mark.parametrize("name,kw", [("vit", {}), ("ssvit", {"spectral_patch": 2}), ("sst", {"spectral_patch": 4})])
def test_fixed_pos_embed_is_a_buffer_that_never_changes(name, kw):
    torch.manual_seed(0)
    model = build_backbone(name, "tiny", 8, img_size=32, pos_embed="fixed", **kw)
    owner = model.spatial if name == "ssvit" else model
    key = "spatial.pos_embed" if name == "ssvit" else "pos_embed"
    assert key not in dict(model.named_parameters()) and key in model.state_dict()
    assert model.config["pos_embed"] == "fixed"
    before = owner.pos_embed.clone()
    opt = common.adamw(common.decay_groups(model, 0.05), 1e-2)
    x = torch.randn(2, 8, 32, 32)
    out = model.forward_tokens(x) if name == "sst" else model.encode(x)[0]
    out.square().mean().backward()
    opt.step()
    assert torch.equal(owner.pos_embed, before)
    assert all(p is not owner.pos_embed for g in opt.param_groups for p in g["params"])  # never weight-decayed
    # Checkpoints load either way: same key, same shape.
    learned = build_backbone(name, "tiny", 8, img_size=32, **kw)
    assert isinstance(learned.spatial.pos_embed if name == "ssvit" else learned.pos_embed, nn.Parameter)
    learned.load_state_dict(model.state_dict())
    model.load_state_dict(learned.state_dict())



# ----------------------------------------------------------------------------- spatial-spectral ViT

def ssvit(C=8, img=32, **kw):
    torch.manual_seed(0)
    m = build_backbone("ssvit", "tiny", C, img_size=img, patch_size=8, spectral_pool=4, fuse_every=2, **kw).eval()
    for fusion in m.fusions:  # zero at init (identity); randomise so the streams really talk to each other
        for p in fusion.parameters():
            torch.nn.init.normal_(p, std=0.05)
    return m


@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_token_counts_and_shapes(hw):
    x = torch.randn(2, 32, *hw)
    h, w = hw[0] // 8, hw[1] // 8
    vit = build_backbone("vit", "tiny", 32, num_registers=4).eval()
    assert vit.encode(x)[0].shape == (2, 5 + h * w, 192)
    ss = build_backbone("ssvit", "tiny", 32, wavelengths=[400 + 10 * i for i in range(32)]).eval()
    spatial, spectral = ss.encode(x)
    assert spatial.shape == (2, 5 + h * w, 192) and spectral.shape == (2, 5 + 16, 192)  # groups of 2 bands
    if hw == (64, 64):
        assert spatial.shape[1] + spectral.shape[1] == 90  # the study's token count
    sst = build_backbone("sst", "tiny", 32).eval()
    assert sst.forward_tokens(x).shape == (2, 4, h * w, 192)  # 4 spectral blocks of 8 bands x patches
    for m in (vit, ss, sst):
        layers = m.intermediate_layers(x, 4)
        assert len(layers) == 4 and all(f.shape == (2, 192, h, w) for _, f in layers)
        maps = m.attention_maps(x)
        assert maps["spatial"].shape == (2, 3, h, w)
    assert ss.attention_maps(x)["spectral"].shape == (2, 3, 16)
    assert sst.attention_maps(x)["spectral"].shape == (2, 3, 4)


def test_paper_size_ssvit_layout():
    m = build_backbone("ssvit", "base", 32)
    assert (m.embed_dim, len(m.spatial.blocks), len(m.spectral.blocks)) == (768, 12, 12)
    assert m.spatial.blocks[0].attn.num_heads == 12 and m.spectral.num_groups == 16 and m.num_prefix == 5
    assert m.fuse_after == [2, 5, 8] and len(m.fusions) == 3
    # The spectral embedding's weights do not depend on the crop size: global and local crops share them.
    small, large = m.spectral.pieces(torch.randn(1, 32, 32, 32)), m.spectral.pieces(torch.randn(1, 32, 64, 64))
    assert small.shape == large.shape == (1, 16, 2 * 8 * 8)


def test_spectral_mask_hides_exactly_the_chosen_band_groups():
    m = ssvit(mask_token=True)
    x = torch.randn(2, 8, 32, 32)
    groups = torch.tensor([[True, False, False, True], [False, True, False, False]])  # (B, 4 groups of 2)
    out = m.encode(x, mask=(None, groups))
    bands = groups.repeat_interleave(2, dim=1)  # (B, 8)
    hidden = torch.where(bands[:, :, None, None], torch.randn_like(x) * 10, x)
    for a, b in zip(out, m.encode(hidden, mask=(None, groups))):
        torch.testing.assert_close(a, b)  # neither stream sees the masked bands
    visible = x.clone()
    visible[0, 2] += 5  # band 2 = group 1, visible in sample 0
    changed = m.encode(visible, mask=(None, groups))
    assert not torch.allclose(changed[0][0], out[0][0]) and not torch.allclose(changed[1][0], out[1][0])
    torch.testing.assert_close(changed[0][1], out[0][1])  # the other sample is untouched
    # Dropping groups (MAE) hides them the same way.
    keep = torch.tensor([[1, 2], [0, 2]])
    dropped = torch.ones(2, 4, dtype=torch.bool).scatter(1, keep, False).repeat_interleave(2, dim=1)
    noisy = torch.where(dropped[:, :, None, None], torch.randn_like(x) * 10, x)
    for a, b in zip(m.encode(x, keep=(None, keep)), m.encode(noisy, keep=(None, keep))):
        torch.testing.assert_close(a, b)


def test_spatial_mask_hides_patches_from_the_spectral_stream():
    m = ssvit(mask_token=True)
    x = torch.randn(2, 8, 32, 32)
    patches = torch.zeros(2, 16, dtype=torch.bool)
    patches[0, [0, 5, 6]] = patches[1, [15]] = True
    out = m.encode(x, mask=(patches, None))
    p = patchify(x, 8)
    noisy = torch.where(patches[..., None], torch.randn_like(p) * 10, p)
    x2 = noisy.reshape(2, 4, 4, 8, 8, 8).permute(0, 3, 1, 4, 2, 5).reshape(2, 8, 32, 32)
    for a, b in zip(out, m.encode(x2, mask=(patches, None))):
        torch.testing.assert_close(a, b)


def test_ssvit_mae_masks_and_reconstructs_both_streams():
    enc = ssvit()
    mae = MAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2, mask_ratio=0.75, spectral_mask_ratio=0.5)
    seen = []
    enc.spectral.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    loss, preds, masked = mae(torch.randn(3, 8, 32, 32))
    assert seen[0] == (3, 5 + 2, 192)  # 2 of 4 groups visible, + CLS and 4 registers
    assert preds[0].shape == (3, 12, 8 * 64) and preds[1].shape == (3, 2, 2 * 4 * 4)
    assert [m.shape for m in masked] == [(3, 12), (3, 2)] and torch.isfinite(loss)


def test_mae_hides_the_dropped_band_groups_from_the_spatial_stream():
    """What the spectral stream drops, the spatial stream cannot see either (exact hiding): its tokens differ
    from those of the same patches with every band group visible."""
    torch.manual_seed(0)
    enc = build_backbone("ssvit", "tiny", 8, img_size=32, patch_size=8, spectral_patch=2, spectral_pool=4,
                         fuse_every=2).eval()
    for p in enc.fusions.parameters():  # zero at init (identity); randomised so the streams interact
        nn.init.normal_(p, std=0.05)
    mae = MAE(enc, 32, 1, 2, mask_ratio=0.75, spectral_mask_ratio=0.5)
    x = torch.randn(2, 8, 32, 32)
    entering = []
    enc.spatial.blocks[0].register_forward_hook(lambda mod, inp, out: entering.append(inp[0]))
    torch.manual_seed(1)
    _, _, (patches_masked, groups_masked) = mae(x)
    torch.manual_seed(1)
    keep_patches = mae.random_masking(2, 16, "cpu")[0]  # the same draw as inside forward
    assert groups_masked.shape == (2, 2)
    enc.encode(x, keep=(keep_patches, None))  # same patches dropped, every band group visible
    assert entering[0].shape == entering[1].shape and not torch.allclose(entering[0], entering[1])
    keep_groups = torch.ones(2, 4, dtype=torch.bool).scatter(1, groups_masked, False).nonzero()[:, 1].view(2, 2)
    enc.encode(x, keep=(keep_patches, keep_groups))  # the draw's patches and groups: what MAE's encoder saw
    torch.testing.assert_close(entering[0], entering[2])
    # The spectral targets are the dropped groups.
    torch.manual_seed(1)
    _, preds, (_, groups) = mae(x)
    assert preds[1].shape == (2, 2, 2 * 4 * 4) and torch.equal(groups, groups_masked)



# ----------------------------------------------------------------------------- MaskedSST-style transformer and SimMIM

def test_sst_tube_mask_and_loss_only_on_masked_tokens_per_sample():
    torch.manual_seed(0)
    mim = SimMIM(build_backbone("sst", "tiny", 8, img_size=32, spectral_patch=4), mask_ratio=0.7)
    mask = mim.tube_mask(5, 16, "cpu")
    assert (mask.sum(1) == 11).all()  # exactly round(0.7 * 16) per sample
    assert len({tuple(r.tolist()) for r in mask}) > 1  # different patches per sample
    x = torch.randn(5, 8, 32, 32)
    loss, pred, used = mim(x, mask)
    target = mim.encoder.pieces(x)  # (B, S, N, K)
    # Reference: per sample, the mean L1 error over its own masked tokens, in every spectral block.
    ref = torch.stack([(pred[b][:, mask[b]] - target[b][:, mask[b]]).abs().mean() for b in range(5)]).mean()
    torch.testing.assert_close(loss, ref)
    # Visible tokens do not reach the loss at all: their predictions get no gradient.
    p = pred.detach().requires_grad_()
    masked_l1(p, target, mask).backward()
    assert (p.grad[~mask[:, None].expand(-1, 2, -1)] == 0).all()
    assert (p.grad[mask[:, None].expand(-1, 2, -1)] != 0).all()
    # The encoder sees mask tokens, not the pixels, at masked positions in every spectral block.
    hidden = torch.where(mask.repeat_interleave(64, 1).reshape(5, 4, 4, 8, 8).permute(0, 1, 3, 2, 4)
                         .reshape(5, 1, 32, 32), torch.randn_like(x) * 10, x)
    torch.testing.assert_close(mim.encoder.forward_tokens(hidden, mask[:, None].expand(-1, 2, -1)),
                               mim.encoder.forward_tokens(x, mask[:, None].expand(-1, 2, -1)))


def test_block_orders():
    assert block_axes("alternating", 4) == ["spatial", "spectral", "spatial", "spectral"]
    assert block_axes("spatial-first", 12) == ["spatial"] * 6 + ["spectral"] * 6
    a = build_backbone("sst", "tiny", 8, img_size=16, spectral_patch=4)
    b = build_backbone("sst", "tiny", 8, img_size=16, spectral_patch=4, block_order="spatial-first")
    assert [blk.axis for blk in a.blocks] == block_axes("alternating", 12) and "block_order" not in a.config
    assert [blk.axis for blk in b.blocks] == block_axes("spatial-first", 12)
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    with pytest.raises(ValueError, match="unknown block_order"):
        build_backbone("sst", "tiny", 8, img_size=16, spectral_patch=4, block_order="spectral-first")
    with pytest.raises(ValueError, match="backbone 'vit'"):
        build_backbone("vit", "tiny", 8, img_size=16, block_order="spatial-first")


def test_maskedsst_preset_tokens_order_and_norms():
    args = pretrain_mae.parse_args(["--preset", "maskedsst"])
    assert (args.backbone, args.patch_size, args.spectral_patch, args.img_size) == ("sst", 1, 10, 8)
    assert args.block_order == "spatial-first" and args.embed_norm and args.mask_block == 4
    assert tuple(args.crop_scale) == (1, 1)  # no random resized crop: it blends neighbouring spectra
    assert pretrain_mae.parse_args(["--preset", "maskedsst", "--img-size", "16"]).img_size == 16  # flags win
    seg = finetune_seg.parse_args(["--preset", "maskedsst"])
    assert {k: getattr(seg, k) for k in PRESETS["maskedsst"]} == PRESETS["maskedsst"]
    sst = build_backbone(args.backbone, args.size, 200, args.img_size, args.patch_size, spectral_patch=args.spectral_patch,
                         block_order=args.block_order, embed_norm=args.embed_norm).eval()
    x = torch.randn(2, 200, 8, 8)
    assert sst.forward_tokens(x).shape == (2, 20, 64, 96)  # 20 spectral blocks x 64 pixels, the reference's 96-d
    assert [b.axis for b in sst.blocks] == ["spatial"] * 4 + ["spectral"] * 4  # the reference's 4 + 4 blocks
    assert sst.embed_pre_norm.normalized_shape == (10,) and sst.embed_post_norm.normalized_shape == (96,)
    assert sst.config["block_order"] == "spatial-first" and sst.config["embed_norm"] is True
    assert build_backbone(**sst.config).embed_pre_norm is not None
    # The pre-norm sees each token's raw values: a token's offset and scale do not reach the encoder.
    pieces = sst.pieces(x)
    scaled = (pieces * 3 + 1).reshape(2, 20, 8, 8, 10).permute(0, 1, 4, 2, 3).reshape(2, 200, 8, 8)
    torch.testing.assert_close(sst.embed(scaled), sst.embed(x), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="198 bands do not split into blocks of 10"):
        build_backbone("sst", "tiny", 198, 8, 1, spectral_patch=10)


def test_patch_one_linear_decoder_is_a_per_pixel_head():
    sst = build_backbone("sst", "tiny", 20, img_size=8, patch_size=1, spectral_patch=10, block_order="spatial-first",
                         embed_norm=True)
    model = SegmentationModel(sst, "linear", 5).eval()
    x = torch.randn(2, 20, 8, 8)
    assert model(x).shape == (2, 5, 8, 8)  # (B, K, H, W)
    features = sst.intermediate_layers(x, model.blocks)
    assert all(f.shape == (2, 192, 8, 8) for _, f in features)  # one feature per pixel: stride 1, no upsampling
    assert model.decoder.classifier.kernel_size == (1, 1)


def test_simmim_mask_blocks():
    torch.manual_seed(0)
    mim = SimMIM(build_backbone("sst", "tiny", 20, img_size=8, patch_size=1, spectral_patch=10), 0.7, mask_block=4)
    mask = mim.tube_mask(6, 64, "cpu").reshape(6, 2, 4, 2, 4)
    squares = mask.permute(0, 1, 3, 2, 4).reshape(6, 4, 16)
    assert ((squares.all(-1)) | (~squares.any(-1))).all()  # whole 4 x 4 squares
    assert (squares.all(-1).sum(1) == 3).all()  # round(0.7 * 4)
    with pytest.raises(ValueError, match="4x4 mask blocks"):
        SimMIM(build_backbone("sst", "tiny", 20, img_size=6, patch_size=1, spectral_patch=10), 0.7, mask_block=4)



# ----------------------------------------------------------------------------- DINO head, cross-domain CNN

def test_dino_head_prototypes_are_unit_norm():
    head = DINOHead(12, 10, 32, 8)
    with torch.no_grad():
        head.prototypes.mul_(7)
    out = head(torch.randn(3, 12))
    assert out.shape == (3, 10) and out.abs().max() <= 1 + 1e-5  # cosine similarities


def test_cross_domain_cnn_is_per_domain_then_shared_at_full_resolution():
    torch.manual_seed(0)
    m = CrossDomainCNN({"a": 6, "b": 9}, width=8, depth=2).eval()
    xa, xb = torch.randn(2, 6, 11, 11), torch.randn(1, 9, 11, 11)
    both = m([xa, xb], ["a", "b"])
    assert both.shape == (3, 8, 11, 11)
    torch.testing.assert_close(both[:2], m(xa, "a"))
    x2 = xa.clone()
    x2[0, :, 5, 5] += 3  # a pixel reaches exactly its 5x5 neighbourhood
    changed = (m(x2, "a") - m(xa, "a")).abs().sum(1)[0] > 0
    assert changed[3:8, 3:8].all() and changed.sum() == 25
    with pytest.raises(ValueError, match="domains a, b: say which one"):
        m(xa)
    with pytest.raises(ValueError, match="no domain 'c'"):
        m(xa, "c")
    with pytest.raises(ValueError, match="domain 'b' has 9 bands, got an input with 6"):
        m(xa, "b")
    with pytest.raises(ValueError, match="in_chans = {domain name: band count}"):
        build_backbone("cdcnn", in_chans=6)



# ----------------------------------------------------------------------------- decoders

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


@pytest.mark.parametrize("backbone,decoder", CASES)
@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_decoder_output_shapes(backbone, decoder, hw):
    m = seg_model(backbone, decoder).eval()
    assert m(torch.randn(2, 8, *hw)).shape == (2, 5, *hw)


def test_deeplab_output_stride_and_aux_head():
    m = seg_model("resnet50v1c", "deeplabv3plus")
    stem = [mod for mod in m.backbone.stem.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert [c.kernel_size for c in stem] == [(3, 3)] * 3 and stem[0].in_channels == 8  # deep stem, C bands
    (_, low), (_, mid), (_, high) = m.backbone.intermediate_layers(torch.randn(2, 8, 64, 64))
    assert low.shape == (2, 256, 16, 16) and mid.shape == (2, 1024, 8, 8) and high.shape == (2, 2048, 8, 8)
    assert [(b[0].kernel_size, b[0].dilation) for b in m.decoder.aspp[1:]] == [((3, 3), (r, r)) for r in (12, 24, 36)]
    m.train()
    logits, aux = m(torch.randn(2, 8, 64, 64))
    assert logits.shape == aux.shape == (2, 5, 64, 64)


@pytest.mark.parametrize("backbone,decoder", CASES)
def test_a_few_steps_reduce_the_loss(backbone, decoder):
    m = seg_model(backbone, decoder, classes=3).train()
    x = torch.randn(4, 8, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)  # constant 8x8 patches
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()  # a per-pixel rule any decoder can learn
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = finetune_seg.segmentation_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses



# ----------------------------------------------------------------------------- the full-resolution path

@pytest.mark.parametrize("backbone,decoder", CASES)
@pytest.mark.parametrize("hw", [(64, 64), (48, 80)])
def test_the_full_resolution_path_keeps_the_shape(backbone, decoder, hw):
    m = seg_model(backbone, decoder, full_res=True)
    assert m.full_res is not None
    assert m.eval()(torch.randn(2, 8, *hw)).shape == (2, 5, *hw)
    m.train()
    out = m(torch.randn(2, 8, *hw))
    for logits in out if isinstance(out, tuple) else (out,):  # DeepLabV3+ trains with auxiliary logits
        assert logits.shape == (2, 5, *hw)


@pytest.mark.parametrize("backbone,decoder", CASES)
def test_with_zeroed_features_the_head_is_a_per_pixel_linear_classifier(backbone, decoder):
    m = seg_model(backbone, decoder, full_res=True)
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

    def train_accuracy(full_res):
        torch.manual_seed(0)
        m = seg_model("vit", "linear", classes=2, C=4, frozen=True, full_res=full_res) if full_res is not None else \
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
    assert train_accuracy(True) > baseline - 0.05  # the random context adds some noise to fit around
    assert train_accuracy(False) < 0.75  # the study's head cannot see below the patch


def test_stride_one_backbones_get_no_second_pixel_path():
    m = SegmentationModel(build_backbone("pixel", in_chans=6), "linear", 3, full_res=True)
    assert m.full_res is None and len(m.head_modules()) == 1  # the decoder alone
    vit = SegmentationModel(build_backbone("vit", "tiny", 6, img_size=32), "linear", 3, full_res=True)
    assert vit.full_res is not None and vit.full_res.pixel.in_channels == 6
