"""The spatial-spectral ViT (`ssvit`) and the MaskedSST-style factorised transformer (`sst`)."""
import json
import os

import pytest
import torch

import pretrain_dino
import pretrain_mae
from models import MAE, SimMIM, build_backbone, masked_l1, patchify
from test_pretrain_dino import dino_args


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


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


def mae_args(scene, out, cache_dir, *extra):
    return ["--data", scene, "--out", str(out), "--cache-dir", cache_dir, "--img-size", "32", "--steps", "50",
            "--batch-size", "8", "--warmup-steps", "5", "--blr", "0.05", "--log-every", "1", "--ckpt-every", "50",
            "--image-every", "20", "--crop-scale", "1", "1", "--workers", "0", *extra]


@pytest.mark.parametrize("backbone", ["ssvit", "sst"])
def test_masked_modelling_loss_goes_down(backbone, scene, cache_dir, tmp_path):
    # SST SimMIM's curve on this fixture falls ~9% in 50 steps with 2 threads (10% with 1): at the bar. 80 steps
    # clear it with either thread count.
    steps = ["--steps", "80", "--ckpt-every", "80"] if backbone == "sst" else []
    pretrain_mae.main(mae_args(scene, tmp_path / backbone, cache_dir, "--backbone", backbone, "--spectral-patch", "4",
                               *steps))
    curve = losses(tmp_path / backbone)
    assert sum(curve[-10:]) / 10 < 0.9 * sum(curve[:10]) / 10, curve


def test_ssvit_dino_loss_goes_down(scene, cache_dir, tmp_path):
    pretrain_dino.main(dino_args(scene, tmp_path / "d", cache_dir, 30, 8, "--backbone", "ssvit", "--blr", "0.02",
                                 "--ckpt-every", "30"))
    curve = losses(tmp_path / "d")
    rows = [json.loads(line) for line in open(tmp_path / "d" / "metrics.jsonl")]
    assert {"spatial/ibot", "spectral/ibot", "spectral/dino_local", "spectral/koleo"} <= set(rows[-1])
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5, curve
