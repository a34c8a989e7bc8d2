import pytest
import torch
import torch.nn.functional as F

from models import MAE, VIT_SIZES, build_backbone, patchify, unpatchify


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
    for size, (dim, depth, heads) in VIT_SIZES.items():
        m = build_backbone("vit", size, 32)
        assert (m.embed_dim, len(m.blocks), m.blocks[0].attn.num_heads) == (dim, depth, heads)
    base = build_backbone("vit", "base", 32)
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
    target = mae.normalize_targets(torch.gather(patchify(x, 8), 1, masked[..., None].expand(-1, -1, 6 * 64)))
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
