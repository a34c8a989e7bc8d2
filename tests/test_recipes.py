"""Recipe options of issue #13: init schemes, fixed positions, SS-ViT band hiding, the MaskedSST preset,
DINO's momentum, lr scaling, fp32 head and KoLeo, probing the student. Defaults stay as before."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import finetune_seg
import pretrain_dino
import pretrain_mae
from conftest import write_scene
from models import MAE, PRESETS, DINOHead, SegmentationModel, SimMIM, block_axes, build_backbone, init_weights
from test_pretrain_dino import dino_args


# ----------------------------------------------------------------------------- init schemes

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


# ----------------------------------------------------------------------------- fixed position embeddings

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


# ----------------------------------------------------------------------------- SS-ViT MAE: hiding bands

def ssvit_mae(hide):
    torch.manual_seed(0)
    enc = build_backbone("ssvit", "tiny", 8, img_size=32, patch_size=8, spectral_patch=2, spectral_pool=4,
                         fuse_every=2).eval()
    for p in enc.fusions.parameters():  # zero at init (identity); randomised so the streams interact
        nn.init.normal_(p, std=0.05)
    return MAE(enc, 32, 1, 2, mask_ratio=0.75, spectral_mask_ratio=0.5, hide_bands_from_spatial=hide)


@pytest.mark.parametrize("hide", [True, False])
def test_spatial_stream_sees_all_bands_when_told_to(hide):
    mae = ssvit_mae(hide)
    enc, x = mae.encoder, torch.randn(2, 8, 32, 32)
    entering = []
    enc.spatial.blocks[0].register_forward_hook(lambda mod, inp, out: entering.append(inp[0]))
    torch.manual_seed(1)
    _, _, (patches_masked, groups_masked) = mae(x)
    torch.manual_seed(1)
    keep_patches = mae.random_masking(2, 16, "cpu")[0]  # the same draw as inside forward
    assert groups_masked.shape == (2, 2)
    enc.encode(x, keep=(keep_patches, None))  # same patches dropped, every band group visible
    if hide:
        assert not torch.allclose(entering[0], entering[1])
    else:
        torch.testing.assert_close(entering[0], entering[1])  # the spatial stream's tokens: all bands
    # The spectral targets are the dropped groups either way.
    torch.manual_seed(1)
    _, preds, (_, groups) = mae(x)
    assert preds[1].shape == (2, 2, 2 * 4 * 4) and torch.equal(groups, groups_masked)


def test_hide_bands_option_needs_two_streams():
    with pytest.raises(ValueError, match="ssvit"):
        MAE(build_backbone("vit", "tiny", 8, img_size=32), 32, 1, 2, hide_bands_from_spatial=False)


# ----------------------------------------------------------------------------- MaskedSST

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
    assert tuple(args.crop_scale) == (1, 1) and args.flips  # flips only: no resampling that blends spectra
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


def test_maskedsst_pretrain_then_finetune(tmp_path, cache_dir):
    scene = write_scene(tmp_path / "s20", bands=20, size=24)
    pre = tmp_path / "mst"
    pretrain_mae.main(["--preset", "maskedsst", "--data", scene, "--out", str(pre), "--cache-dir", cache_dir,
                       "--steps", "2", "--batch-size", "2", "--image-every", "1", "--workers", "0"])
    ckpt = torch.load(pre / "ckpt.pt", weights_only=False)
    assert ckpt["backbone"]["block_order"] == "spatial-first" and ckpt["backbone"]["patch_size"] == 1
    out = tmp_path / "seg"
    finetune_seg.main(["--preset", "maskedsst", "--data", scene, "--out", str(out), "--cache-dir", cache_dir,
                       "--init", str(pre / "ckpt.pt"), "--steps", "2", "--batch-size", "2", "--eval-every", "2",
                       "--workers", "0"])
    assert torch.load(out / "ckpt.pt", weights_only=False)["segmentation"]["decoder"] == "linear"


def test_crop_off_under_device_augment_only_flips(scene, cache_dir, tmp_path, monkeypatch):
    import data
    real, seen = data.resample, []

    def spy(x, *a, **k):
        out = real(x, *a, **k)
        seen.append((x, out))
        return out
    monkeypatch.setattr(data, "resample", spy)
    pretrain_mae.main(["--data", scene, "--out", str(tmp_path / "g"), "--cache-dir", cache_dir, "--steps", "1",
                       "--img-size", "16", "--batch-size", "4", "--decoder-dim", "32", "--decoder-depth", "1",
                       "--decoder-heads", "2", "--workers", "0", "--device-augment", "--crop-scale", "1", "1"])
    x, out = seen[0]
    for a, b in zip(x, out):  # each image is one of its 8 flips/rotations, values not resampled
        views = [a.rot90(k, (-2, -1)) for k in range(4)]
        views += [v.flip(-1) for v in views]
        assert any(torch.allclose(b, v, atol=1e-5 * a.abs().max()) for v in views)


# ----------------------------------------------------------------------------- DINO

def test_dino_head_and_koleo_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    head, x = DINOHead(16, 4096, 32, 8), torch.randn(6, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = head.mlp(x)
        logits = head(x)
    assert hidden.dtype == torch.bfloat16 and logits.dtype == torch.float32
    ref = F.linear(F.normalize(hidden.float(), dim=-1), F.normalize(head.prototypes, dim=-1))
    torch.testing.assert_close(logits, ref)
    torch.testing.assert_close(head(x), F.linear(F.normalize(head.mlp(x), dim=-1), F.normalize(head.prototypes, dim=-1)))
    feats = torch.randn(32, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = pretrain_dino.koleo(feats)
    assert under.dtype == torch.float32 and torch.equal(under, pretrain_dino.koleo(feats))


def test_momentum_schedule_and_initial_teacher_share():
    args = pretrain_dino.parse_args([])  # 300 steps: the short-run default leaves ~1% of the random teacher
    default = common.cosine_schedule(*args.momentum, 300)
    assert default[0] == pytest.approx(1 - 2 * math.log(100) / 300, abs=1e-4) and default[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(default, default[1:]))
    assert 0.005 < pretrain_dino.initial_teacher_share(default) < 0.02
    assert pretrain_dino.parse_args(["--steps", "125000"]).momentum == (0.992, 1.0)  # DINOv2's, for its length
    assert pretrain_dino.parse_args(["--steps", "4"]).momentum == (0.9, 1.0)  # never below 0.9
    dinov2 = pretrain_dino.parse_args(["--momentum", "0.992", "1"])
    assert pretrain_dino.initial_teacher_share(common.cosine_schedule(*dinov2.momentum, 300)) == pytest.approx(
        0.30, abs=0.01)  # issue #13's ~30%
    # The EMA really leaves that share: a teacher of ones, a student of zeros.
    teacher, student = nn.Linear(2, 2), nn.Linear(2, 2)
    nn.init.ones_(teacher.weight), nn.init.zeros_(student.weight)
    for m in default:
        pretrain_dino.ema_update(teacher, student, float(m))
    assert teacher.weight.mean().item() == pytest.approx(pretrain_dino.initial_teacher_share(default), rel=1e-4)


def test_lr_scaling_rules():
    assert common.scaled_lr(2e-3, 16, 1) == 2e-3 * 16 / 256  # linear: as before
    assert common.scaled_lr(0.004, 1024, 1, rule="sqrt") == pytest.approx(0.004)
    assert common.scaled_lr(0.004, 8, 2, rule="sqrt") == pytest.approx(0.004 * math.sqrt(16 / 1024))
    assert pretrain_dino.parse_args([]).blr == 2e-3
    assert pretrain_dino.parse_args(["--lr-scaling", "sqrt"]).blr == 0.004
    assert pretrain_dino.parse_args(["--lr-scaling", "sqrt", "--blr", "1e-3"]).blr == 1e-3


def test_backbone_weights_teacher_or_student():
    ckpt = {"backbone_key": ("teacher", "backbone."),
            "teacher": {"backbone.w": torch.zeros(2), "dino_heads.0.p": torch.zeros(1)},
            "student": {"backbone.w": torch.ones(2), "dino_heads.0.p": torch.ones(1)}}
    assert torch.equal(common.backbone_weights(ckpt)["w"], torch.zeros(2))
    assert torch.equal(common.backbone_weights(ckpt, "student")["w"], torch.ones(2))
    assert set(common.backbone_weights(ckpt, "student")) == {"w"}
    mae = {"backbone_key": ("model", "encoder."), "model": {"encoder.w": torch.zeros(2)}}
    assert set(common.backbone_weights(mae)) == {"w"}
    with pytest.raises(ValueError, match="no student"):
        common.backbone_weights(mae, "student")


def test_probe_the_dino_student(scene, cache_dir, tmp_path, capsys):
    pre = tmp_path / "d"
    pretrain_dino.main(dino_args(scene, pre, cache_dir, 2, 4, "--init-scheme", "xavier", "--pos-embed", "fixed",
                                 "--lr-scaling", "sqrt"))
    printed = capsys.readouterr().out
    assert "final teacher keeps" in printed and "sqrt scaling of blr 0.004" in printed
    dino = torch.load(pre / "ckpt.pt", weights_only=False)
    assert dino["backbone"]["init"] == "xavier" and dino["backbone"]["pos_embed"] == "fixed"
    seg = ["--data", scene, "--cache-dir", cache_dir, "--img-size", "16", "--batch-size", "2", "--steps", "1",
           "--eval-every", "1", "--workers", "0", "--init", str(pre / "ckpt.pt")]
    for which in ("student", "teacher"):
        finetune_seg.main(seg + ["--out", str(tmp_path / which), "--init-weights", which])
    student, teacher = (torch.load(tmp_path / w / "ckpt.pt", weights_only=False)["model"] for w in ("student", "teacher"))
    names = [k for k in common.backbone_weights(dino) if not k.endswith("pos_embed")]
    assert any(not torch.equal(dino["student"][f"backbone.{k}"], dino["teacher"][f"backbone.{k}"]) for k in names)
    for k in names:  # frozen probes keep the backbone they read bit for bit
        assert torch.equal(student[f"backbone.{k}"], dino["student"][f"backbone.{k}"]), k
        assert torch.equal(teacher[f"backbone.{k}"], dino["teacher"][f"backbone.{k}"]), k
