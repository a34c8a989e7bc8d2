"""Backbones and heads. Every script builds its backbone through `build_backbone`.

Shapes: images are (B, C, H, W) with C spectral bands; tokens are (B, N, D).
"""

import math
import re
from functools import partial

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# embed_dim, depth, heads; micro = MaskedSST's model (configs/config.yaml), base = the study's ViT-B
VIT_SIZES = {"micro": (96, 8, 8), "tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}
# decoder dim, depth, heads; base = the MAE paper's 512-d, 8 blocks
MAE_DECODER_SIZES = {"micro": (96, 4, 4), "tiny": (128, 4, 4), "small": (256, 4, 8), "base": (512, 8, 16)}
INIT_SCHEMES = ("trunc_normal", "xavier")
POS_EMBEDS = ("learned", "fixed")
BLOCK_ORDERS = ("alternating", "spatial-first")


# ----------------------------------------------------------------------------- helpers

def patchify(x, p):
    """(B, C, H, W) -> (B, h*w, C*p*p), row-major patches; matches a Conv2d(kernel=stride=p) weight layout."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(t, p, C, h, w):
    """(B, h*w, C*p*p) -> (B, C, h*p, w*p)."""
    B = t.shape[0]
    return t.reshape(B, h, w, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h * p, w * p)


def sincos_1d(dim, positions):
    """(len(positions), dim) sin-cos embedding of arbitrary (e.g. wavelength) positions."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
    out = np.outer(np.asarray(positions, dtype=float), omega)
    return torch.from_numpy(np.concatenate([np.sin(out), np.cos(out)], axis=1)).float()


def sincos_pos_embed(dim, h, w):
    """Fixed 2-D sin-cos position embedding, (h*w, dim): half the channels encode y, half x."""
    yy, xx = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, yy.ravel()), sincos_1d(dim // 2, xx.ravel())], dim=1)


def wavelength_pos(wavelengths, in_chans, group, dim):
    """Fixed sin-cos positions (G, dim) at the centre wavelength of each group of `group` bands."""
    if len(wavelengths) != in_chans:
        raise ValueError(f"{len(wavelengths)} wavelengths for {in_chans} bands")
    return sincos_1d(dim, np.asarray(wavelengths, dtype=float).reshape(-1, group).mean(1))


def gather_tokens(t, ids):
    """t (B, N, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(t, 1, ids[..., None].expand(-1, -1, t.shape[-1]))


def wanted_blocks(blocks, depth):
    """The last `blocks` block indices (an int), or the listed ones."""
    return set(range(depth - blocks, depth)) if isinstance(blocks, int) else set(blocks)


def drop_path(x, p, training):
    """Stochastic depth: drop the residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


def init_weights(module, scheme="trunc_normal"):
    """Linear weights trunc_normal (std 0.02, timm/DINO) or xavier_uniform (MAE's code); biases 0, LayerNorm 1/0."""
    check_choice("init", scheme, INIT_SCHEMES)
    if isinstance(module, nn.Linear):
        if scheme == "xavier":
            nn.init.xavier_uniform_(module.weight)
        else:
            nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; available: {', '.join(choices)}")


def set_pos_embed(module, table, kind):
    """module.pos_embed = table (1, N, D): a parameter (learned) or a buffer (fixed: never trained nor
    weight-decayed); the state_dict key is the same either way."""
    check_choice("pos_embed", kind, POS_EMBEDS)
    if kind == "fixed":
        module.register_buffer("pos_embed", table)
    else:
        module.pos_embed = nn.Parameter(table)


def linear_flops(layer, n):
    """Forward FLOPs (2 x multiply-adds) of an nn.Linear applied to n vectors."""
    return 2 * n * layer.in_features * layer.out_features


def block_flops(block, n):
    """Forward FLOPs of a transformer block on n tokens: its linear layers and the two attention matmuls."""
    linears = [block.attn.qkv, block.attn.proj, *(m for m in block.mlp.modules() if isinstance(m, nn.Linear))]
    return sum(linear_flops(layer, n) for layer in linears) + 4 * n * n * block.attn.qkv.in_features


# ----------------------------------------------------------------------------- transformer blocks

class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def qkv_heads(self, x):
        B, N, D = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv_heads(x)
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels where available
        return self.proj(x.transpose(1, 2).reshape(B, N, D))

    def weights(self, x):
        """The softmax attention (B, heads, N, N), which SDPA never materialises; for pictures."""
        q, k, _ = self.qkv_heads(x)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU FFN; 2/3 of the MLP's hidden size (a multiple of 8) keeps the parameter count, as in DINOv2."""

    def __init__(self, dim, hidden):
        super().__init__()
        hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class LayerScale(nn.Module):
    def __init__(self, dim, init):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x):
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, ffn="mlp", layerscale=None, drop_path=0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.mlp = {"mlp": Mlp, "swiglu": SwiGLU}[ffn](dim, int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)


# ----------------------------------------------------------------------------- token encoders

class TokenEncoder(nn.Module):
    """A pre-norm transformer over linearly embedded pieces, with CLS, optional register and mask tokens."""

    def __init__(self, piece_dim, embed_dim, depth, num_heads, mlp_ratio=4.0, num_registers=0, ffn="mlp",
                 layerscale=None, drop_path_rate=0.0, mask_token=False, init="trunc_normal"):
        super().__init__()
        self.embed_dim, self.num_prefix, self.init_scheme = embed_dim, 1 + num_registers, init
        self.patch_embed = nn.Linear(piece_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.registers = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        # iBOT replaces masked pieces by a learned token; only trainers that mask this way ask for it.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None
        dpr = np.linspace(0, drop_path_rate, depth)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, ffn, layerscale, float(d)) for d in dpr)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(partial(init_weights, scheme=init))
        nn.init.xavier_uniform_(self.patch_embed.weight)  # as a conv patch embedding, per MAE
        nn.init.normal_(self.cls_token, std=0.02)
        if self.registers is not None:
            nn.init.normal_(self.registers, std=0.02)

    def embed_tokens(self, pieces, pos, ids_keep=None, mask=None):
        """pieces (B, N, piece_dim), pos (1, N, D) -> tokens (B, 1 + R + K, D): CLS, registers, then the
        pieces in ids_keep (B, K) (all when None); where mask (B, N) is True, the mask token."""
        pos = pos.expand(pieces.shape[0], -1, -1)
        if ids_keep is not None:
            pieces, pos = gather_tokens(pieces, ids_keep), gather_tokens(pos, ids_keep)
        t = self.patch_embed(pieces)
        if mask is not None:
            t = torch.where(mask[..., None], self.mask_token.to(t.dtype), t)
        t = t + pos
        prefix = [(self.cls_token + self.cls_pos).expand(t.shape[0], -1, -1)]
        if self.registers is not None:
            prefix.append(self.registers.expand(t.shape[0], -1, -1))
        return torch.cat(prefix + [t], dim=1)

    def run_blocks(self, t, blocks=(), until=None):
        """-> the tokens after the first `until` blocks (all), and the normalised ones after `wanted_blocks`."""
        wanted, outs = wanted_blocks(blocks, len(self.blocks)), []
        for i, blk in enumerate(self.blocks[:until]):
            t = blk(t)
            if i in wanted:
                outs.append(self.norm(t))
        return t, outs

    def flops(self, pieces):
        """Forward FLOPs on `pieces` pieces (and the prefix tokens)."""
        return self.embed_flops(pieces) + sum(block_flops(b, self.num_prefix + pieces) for b in self.blocks)

    def embed_flops(self, pieces):
        return linear_flops(self.patch_embed, pieces)


class VisionTransformer(TokenEncoder):
    """ViT for C-band images; 2-D sin-cos positions, learned from there or fixed (as MAE's encoder)."""

    streams = ("spatial",)

    def __init__(self, in_chans, img_size=64, patch_size=8, embed_dim=768, depth=12, num_heads=12,
                 pos_embed="learned", **kwargs):
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        super().__init__(in_chans * patch_size ** 2, embed_dim, depth, num_heads, **kwargs)
        self.in_chans, self.patch_size = in_chans, patch_size
        self.grid = (img_size // patch_size, img_size // patch_size)
        set_pos_embed(self, sincos_pos_embed(embed_dim, *self.grid)[None], pos_embed)

    def grid_size(self, x):
        (H, W), p = x.shape[-2:], self.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        return H // p, W // p

    def interpolate_pos_embed(self, h, w):
        """(1, h*w, D): the position grid resized bicubically when the input size differs from training."""
        if (h, w) == self.grid:
            return self.pos_embed
        pe = self.pos_embed.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def pieces(self, x):
        """What each stream embeds and MAE reconstructs: [(B, h*w, C*p*p) patches]."""
        return [patchify(x, self.patch_size)]

    def embed(self, x, ids_keep=None, mask=None):
        pos = self.interpolate_pos_embed(*self.grid_size(x))  # checks the size first
        return self.embed_tokens(patchify(x, self.patch_size), pos, ids_keep, mask)

    def encode(self, x, keep=(None,), mask=(None,)):
        """(B, C, H, W) -> [normalised tokens (B, 1 + R + K, D)] per stream; keep/mask as in `embed_tokens`."""
        return [self.norm(self.run_blocks(self.embed(x, keep[0], mask[0]))[0])]

    def forward_features(self, x, mask=None):
        """(B, C, H, W) -> normalised tokens (B, 1 + R + N, D); mask (B, N) as in embed_tokens."""
        return self.encode(x, mask=(mask,))[0]

    def forward(self, x):
        """(B, C, H, W) -> CLS features (B, D)."""
        return self.forward_features(x)[:, 0]

    def intermediate_layers(self, x, blocks=4):
        """[(cls (B, D), patches (B, D, h, w))] after the blocks `blocks` (as in `run_blocks`), for the decoders."""
        h, w = self.grid_size(x)
        _, outs = self.run_blocks(self.embed(x), blocks)
        return [(n[:, 0], n[:, self.num_prefix:].transpose(1, 2).reshape(x.shape[0], -1, h, w)) for n in outs]

    def feature_dims(self, levels):
        return [self.embed_dim] * levels

    @torch.no_grad()
    def attention_maps(self, x):
        """{"spatial": last block's CLS-to-patch attention (B, heads, h, w)}."""
        h, w = self.grid_size(x)
        t, _ = self.run_blocks(self.embed(x), until=-1)
        attn = self.blocks[-1].attn.weights(self.blocks[-1].norm1(t))
        return {"spatial": attn[:, :, 0, self.num_prefix:].reshape(x.shape[0], -1, h, w)}


# ----------------------------------------------------------------------------- spatial-spectral ViT

class SpectralEncoder(TokenEncoder):
    """One token per group of `group` bands, the crop pooled to pool x pool (any crop size shares weights)."""

    def __init__(self, in_chans, group=2, pool=8, embed_dim=768, depth=12, num_heads=12, wavelengths=None,
                 **kwargs):
        if in_chans % group:
            raise ValueError(f"{in_chans} bands do not split into groups of {group} (--spectral-patch)")
        super().__init__(group * pool * pool, embed_dim, depth, num_heads, **kwargs)
        self.group, self.pool, self.num_groups = group, pool, in_chans // group
        if wavelengths is not None:
            self.register_buffer("pos_embed", wavelength_pos(wavelengths, in_chans, group, embed_dim)[None],
                                 persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.empty(1, self.num_groups, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def pieces(self, x, visible=None):
        """(B, C, H, W) -> (B, G, group*pool*pool), averaging only pixels where visible (B, 1, H, W) is 1."""
        if visible is None:
            pooled = F.adaptive_avg_pool2d(x, self.pool)
        else:
            pooled = F.adaptive_avg_pool2d(x * visible, self.pool) / \
                F.adaptive_avg_pool2d(visible, self.pool).clamp_min(1e-6)
        return pooled.reshape(x.shape[0], self.num_groups, -1)


class Fusion(nn.Module):
    """Adds to each token a linear map of it and the other stream's mean token; starts as the identity."""

    def __init__(self, dim):
        super().__init__()
        self.norm_spatial, self.norm_spectral = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.to_spatial, self.to_spectral = nn.Linear(2 * dim, dim), nn.Linear(2 * dim, dim)
        for m in (self.to_spatial, self.to_spectral):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, s, p):
        """s (B, Ns, D) spatial, p (B, Np, D) spectral tokens -> both updated."""
        ns, np_ = self.norm_spatial(s), self.norm_spectral(p)
        return (s + self.to_spatial(torch.cat([ns, np_.mean(1, keepdim=True).expand_as(ns)], dim=-1)),
                p + self.to_spectral(torch.cat([np_, ns.mean(1, keepdim=True).expand_as(np_)], dim=-1)))


class SpatialSpectralViT(nn.Module):
    """The study's spatial-spectral ViT (its flaws fixed): spatial and spectral streams, fused after every
    `fuse_every` blocks. Hiding is exact: what one stream hides, the other cannot see."""

    streams = ("spatial", "spectral")

    def __init__(self, in_chans, img_size=64, patch_size=8, embed_dim=768, depth=12, num_heads=12,
                 spectral_patch=2, spectral_pool=8, fuse_every=3, wavelengths=None, num_registers=4,
                 pos_embed="learned", **kwargs):
        super().__init__()
        self.spatial = VisionTransformer(in_chans, img_size, patch_size, embed_dim, depth, num_heads,
                                         pos_embed=pos_embed, num_registers=num_registers, **kwargs)
        self.spectral = SpectralEncoder(in_chans, spectral_patch, spectral_pool, embed_dim, depth, num_heads,
                                        wavelengths, num_registers=num_registers, **kwargs)
        self.fuse_after = [i for i in range(fuse_every - 1, depth - 1, fuse_every)]
        self.fusions = nn.ModuleList(Fusion(embed_dim) for _ in self.fuse_after)
        self.in_chans, self.patch_size, self.grid = in_chans, patch_size, self.spatial.grid
        self.embed_dim, self.num_prefix, self.init_scheme = embed_dim, self.spatial.num_prefix, self.spatial.init_scheme

    grid_size = VisionTransformer.grid_size

    def flops(self, patches, groups):
        """Forward FLOPs with `patches` spatial and `groups` spectral pieces kept."""
        P = self.num_prefix
        fusion = sum(linear_flops(f.to_spatial, P + patches) + linear_flops(f.to_spectral, P + groups)
                     for f in self.fusions)
        return self.spatial.flops(patches) + self.spectral.flops(groups) + fusion

    def embed_flops(self, patches, groups):
        return self.spatial.embed_flops(patches) + self.spectral.embed_flops(groups)

    def pieces(self, x):
        return [patchify(x, self.patch_size), self.spectral.pieces(x)]

    def hidden(self, B, N, keep, mask, device):
        """(B, N) True where a piece is dropped (not in keep) or masked."""
        hid = torch.zeros(B, N, dtype=torch.bool, device=device)
        if keep is not None:
            hid = torch.ones_like(hid).scatter(1, keep, False)
        return hid | mask if mask is not None else hid

    def embed(self, x, keep=(None, None), mask=(None, None)):
        """-> (spatial tokens, spectral tokens) entering the blocks."""
        B, C, H, W = x.shape
        (h, w), p, g = self.grid_size(x), self.patch_size, self.spectral.group
        pixel_visible = (~self.hidden(B, h * w, keep[0], mask[0], x.device)).reshape(B, 1, h, 1, w, 1)
        pixel_visible = pixel_visible.expand(-1, -1, -1, p, -1, p).reshape(B, 1, H, W).to(x.dtype)
        hid_group = self.hidden(B, self.spectral.num_groups, keep[1], mask[1], x.device)
        x_spatial = x * (~hid_group).repeat_interleave(g, dim=1)[:, :, None, None].to(x.dtype)  # (B, C, H, W)
        s = self.spatial.embed_tokens(patchify(x_spatial, p), self.spatial.interpolate_pos_embed(h, w),
                                      keep[0], mask[0])
        t = self.spectral.embed_tokens(self.spectral.pieces(x, pixel_visible), self.spectral.pos_embed,
                                       keep[1], mask[1])
        return s, t

    def run_blocks(self, tokens, blocks=(), until=None):
        """As `TokenEncoder.run_blocks` on (spatial, spectral) tokens; the normalised outputs are spatial."""
        (s, t), fusions = tokens, iter(self.fusions)
        wanted, outs = wanted_blocks(blocks, len(self.spatial.blocks)), []
        for i, (bs, bt) in enumerate(zip(self.spatial.blocks[:until], self.spectral.blocks[:until])):
            s, t = bs(s), bt(t)
            if i in self.fuse_after:
                s, t = next(fusions)(s, t)
            if i in wanted:
                outs.append(self.spatial.norm(s))
        return (s, t), outs

    def encode(self, x, keep=(None, None), mask=(None, None)):
        """(B, C, H, W) -> normalised [spatial (B, 1 + R + Ks, D), spectral (B, 1 + R + Kg, D)] tokens."""
        (s, t), _ = self.run_blocks(self.embed(x, keep, mask))
        return [self.spatial.norm(s), self.spectral.norm(t)]

    def forward(self, x):
        """(B, C, H, W) -> spatial and spectral CLS features concatenated (B, 2D)."""
        s, t = self.encode(x)
        return torch.cat([s[:, 0], t[:, 0]], dim=-1)

    intermediate_layers = VisionTransformer.intermediate_layers
    feature_dims = VisionTransformer.feature_dims

    @torch.no_grad()
    def attention_maps(self, x):
        """Last blocks' CLS attention: spatial (B, heads, h, w), spectral (B, heads, G)."""
        h, w = self.grid_size(x)
        (s, t), _ = self.run_blocks(self.embed(x), until=-1)
        last_s, last_t, P = self.spatial.blocks[-1], self.spectral.blocks[-1], self.num_prefix
        a_s = last_s.attn.weights(last_s.norm1(s))[:, :, 0, P:].reshape(x.shape[0], -1, h, w)
        a_t = last_t.attn.weights(last_t.norm1(t))[:, :, 0, P:]
        return {"spatial": a_s, "spectral": a_t}


# ----------------------------------------------------------------------------- MaskedSST-style transformer

def block_axes(order, depth):
    """The attention axis of each of `depth` factorised blocks: alternating, or the first half spatial."""
    check_choice("block_order", order, BLOCK_ORDERS)
    if order == "alternating":
        return ["spatial" if i % 2 == 0 else "spectral" for i in range(depth)]
    return ["spatial"] * ((depth + 1) // 2) + ["spectral"] * (depth // 2)


class FactorizedBlock(nn.Module):
    """A transformer block over one axis of a (B, S, N, D) token cube: among patches or spectral blocks."""

    def __init__(self, axis, *args, **kwargs):
        super().__init__()
        self.axis, self.block = axis, Block(*args, **kwargs)

    def sequences(self, t):
        B, S, N, D = t.shape
        return t.reshape(B * S, N, D) if self.axis == "spatial" else t.transpose(1, 2).reshape(B * N, S, D)

    def forward(self, t):
        B, S, N, D = t.shape
        out = self.block(self.sequences(t))
        return out.reshape(B, S, N, D) if self.axis == "spatial" else out.reshape(B, N, S, D).transpose(1, 2)

    def attention(self, t):
        """(B, S, N, D) -> this block's attention (B*S, heads, N, N) or (B*N, heads, S, S)."""
        return self.block.attn.weights(self.block.norm1(self.sequences(t)))


class SpectralSpatialTransformer(nn.Module):
    """MaskedSST-style factorised transformer (Scheibenreif et al., CVPRW 2023; HSG-AIML/MaskedSST) over
    p x p pixel x `spectral_patch` band tokens, without CLS. "spatial-first" is the reference's block order
    (half the blocks each, so both orders cost the same), `embed_norm` its LayerNorms around the embedding."""

    streams = ("spatial",)

    def __init__(self, in_chans, img_size=64, patch_size=8, embed_dim=768, depth=12, num_heads=12,
                 spectral_patch=8, wavelengths=None, mlp_ratio=4.0, ffn="mlp", layerscale=None,
                 drop_path_rate=0.0, num_registers=0, mask_token=True, init="trunc_normal", pos_embed="learned",
                 block_order="alternating", embed_norm=False):
        super().__init__()
        if in_chans % spectral_patch:
            raise ValueError(f"{in_chans} bands do not split into blocks of {spectral_patch} (--spectral-patch)")
        if num_registers:
            raise ValueError("the sst backbone has no register tokens")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.init_scheme, self.in_chans, self.patch_size = init, in_chans, patch_size
        self.spectral_patch, self.num_blocks, self.embed_dim = spectral_patch, in_chans // spectral_patch, embed_dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        piece = spectral_patch * patch_size ** 2
        self.embed_weight = nn.Parameter(torch.empty(self.num_blocks, piece, embed_dim))  # one per block
        self.embed_bias = nn.Parameter(torch.zeros(self.num_blocks, embed_dim))
        bound = (6 / (piece + embed_dim)) ** 0.5
        nn.init.uniform_(self.embed_weight, -bound, bound)
        self.embed_pre_norm = nn.LayerNorm(piece) if embed_norm else nn.Identity()
        self.embed_post_norm = nn.LayerNorm(embed_dim) if embed_norm else nn.Identity()
        set_pos_embed(self, sincos_pos_embed(embed_dim, *self.grid)[None], pos_embed)  # (1, N, D)
        if wavelengths is not None:
            pos = wavelength_pos(wavelengths, in_chans, spectral_patch, embed_dim)[None, :, None]  # (1, S, 1, D)
            self.register_buffer("spectral_pos", pos, persistent=False)
        else:
            self.spectral_pos = nn.Parameter(torch.empty(1, self.num_blocks, 1, embed_dim))
            nn.init.trunc_normal_(self.spectral_pos, std=0.02)
        self.mask_token = nn.Parameter(torch.zeros(embed_dim)) if mask_token else None
        dpr = np.linspace(0, drop_path_rate, depth)
        self.blocks = nn.ModuleList(FactorizedBlock(axis, embed_dim, num_heads, mlp_ratio, ffn, layerscale, float(d))
                                    for axis, d in zip(block_axes(block_order, depth), dpr))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.blocks.apply(partial(init_weights, scheme=init))
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    grid_size = VisionTransformer.grid_size
    interpolate_pos_embed = VisionTransformer.interpolate_pos_embed
    run_blocks = TokenEncoder.run_blocks

    def flops(self, patches):
        S = self.num_blocks
        seq = {"spatial": (S, patches), "spectral": (patches, S)}
        return self.embed_flops(patches) + sum(seq[b.axis][0] * block_flops(b.block, seq[b.axis][1])
                                               for b in self.blocks)

    def embed_flops(self, patches):
        return 2 * self.num_blocks * patches * self.embed_weight.shape[1] * self.embed_dim

    def pieces(self, x):
        """(B, C, H, W) -> (B, S, N, spectral_patch*p*p) token cubes."""
        B, C, H, W = x.shape
        patches = patchify(x.reshape(B * self.num_blocks, self.spectral_patch, H, W), self.patch_size)
        return patches.reshape(B, self.num_blocks, patches.shape[1], -1)

    def embed(self, x, mask=None):
        """(B, C, H, W) -> (B, S, N, D); mask (B, S, N) True -> the mask token."""
        h, w = self.grid_size(x)
        t = torch.einsum("bsnk,skd->bsnd", self.embed_pre_norm(self.pieces(x)), self.embed_weight)
        t = self.embed_post_norm(t + self.embed_bias[:, None])
        if mask is not None:
            t = torch.where(mask[..., None], self.mask_token.to(t.dtype), t)
        return t + self.interpolate_pos_embed(h, w)[:, None] + self.spectral_pos

    def forward_tokens(self, x, mask=None):
        """(B, C, H, W) -> normalised tokens (B, S, N, D)."""
        return self.norm(self.run_blocks(self.embed(x, mask))[0])

    def intermediate_layers(self, x, blocks=4):
        """(mean token (B, D), spectral-block-averaged patch tokens (B, D, h, w)) of the blocks `blocks`."""
        h, w = self.grid_size(x)
        outs = [n.mean(1) for n in self.run_blocks(self.embed(x), blocks)[1]]  # (B, N, D)
        return [(n.mean(1), n.transpose(1, 2).reshape(x.shape[0], -1, h, w)) for n in outs]

    feature_dims = VisionTransformer.feature_dims

    @torch.no_grad()
    def attention_maps(self, x):
        """The attention each patch (spectral block) receives in the last spatial (spectral) block, averaged
        over queries and the other axis: (B, heads, h, w) and (B, heads, S)."""
        (h, w), B, S = self.grid_size(x), x.shape[0], self.num_blocks
        t, maps = self.embed(x), {}
        last = {b.axis: i for i, b in enumerate(self.blocks)}  # the last block of each axis
        for i, blk in enumerate(self.blocks):
            if i == last[blk.axis]:
                a = blk.attention(t).mean(2)  # (B*S, heads, N) or (B*N, heads, S)
                a = a.reshape(B, S, -1, h, w) if blk.axis == "spatial" else a.reshape(B, h * w, -1, S)
                maps[blk.axis] = a.mean(1)
            t = blk(t)
        return maps


class PixelBackbone(nn.Module):
    """Each pixel's normalised spectrum as its feature: a per-pixel linear classifier, the control."""

    def __init__(self, in_chans):
        super().__init__()
        self.in_chans = in_chans

    def intermediate_layers(self, x, blocks=1):
        return [(None, x)]

    def feature_dims(self, levels):
        return [self.in_chans]


BACKBONES = {"vit": VisionTransformer, "ssvit": SpatialSpectralViT, "sst": SpectralSpatialTransformer}

# Argument presets of pretrain_mae.py / finetune_seg.py (argparse names); flags given explicitly win.
PRESETS = {
    # MaskedSST's configs (HSG-AIML/MaskedSST configs/*.yaml): 1 px x 10 band tokens on 8 x 8 windows.
    "maskedsst": dict(backbone="sst", size="micro", patch_size=1, spectral_patch=10, img_size=8,
                      block_order="spatial-first", embed_norm=True),
    # Smaller patches for sharper maps (issue #15): a 16 x 16 token grid on 64 px or 32 px tiles.
    "patch4": dict(patch_size=4),
    "patch2": dict(patch_size=2, img_size=32),
}


def build_backbone(name, size="tiny", in_chans=32, img_size=64, patch_size=8, **kwargs):
    """vit | ssvit | sst of a VIT_SIZES size, pixel, resnet50v1c or cdcnn (in_chans = {domain: bands}). Options
    a backbone lacks must be None. `.config` (with `bands`, so later data is read alike) rebuilds it."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    record = {"bands": kwargs.pop("bands")} if "bands" in kwargs else {}
    if name in ("pixel", "resnet50v1c"):
        model = PixelBackbone(in_chans) if name == "pixel" else ResNetV1c(in_chans)
        model.config = dict(name=name, in_chans=in_chans, **record)
        return model
    if name == "cdcnn":  # pretrain_contrast.py's cross-domain CNN: in_chans = {domain name: band count}
        if not isinstance(in_chans, dict):
            raise ValueError(f"backbone 'cdcnn' needs in_chans = {{domain name: band count}}, got {in_chans!r}")
        model = CrossDomainCNN(in_chans, **kwargs)
        model.config = dict(name=name, in_chans=dict(in_chans), width=model.width, depth=model.depth, **record)
        return model
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; available: {', '.join(BACKBONES)}, pixel, resnet50v1c, cdcnn")
    if size not in VIT_SIZES:
        raise ValueError(f"unknown size {size!r}; available: {', '.join(VIT_SIZES)}")
    if name == "vit":
        kwargs.pop("wavelengths", None)  # only the spectral backbones place tokens by wavelength
    dim, depth, heads = VIT_SIZES[size]
    try:
        model = BACKBONES[name](in_chans, img_size, patch_size, dim, depth, heads, **kwargs)
    except TypeError as e:  # an option this backbone does not have
        raise ValueError(f"backbone {name!r}: {e}") from None
    model.config = dict(name=name, size=size, in_chans=in_chans, img_size=img_size, patch_size=patch_size, **kwargs,
                        **record)
    return model


# ----------------------------------------------------------------------------- MAE

class MAEDecoder(nn.Module):
    """Fills one stream's dropped pieces with a mask token, adds fixed positions, predicts their values."""

    def __init__(self, enc_dim, num_prefix, pos, piece_dim, dim, depth, heads, init="trunc_normal"):
        super().__init__()
        self.num_prefix = num_prefix
        self.decoder_embed = nn.Linear(enc_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos = nn.Parameter(pos[None], requires_grad=False)  # (1, N, dim), fixed sin-cos
        self.decoder_blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dim, piece_dim)
        self.apply(partial(init_weights, scheme=init))
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent, ids_restore, ids_masked):
        """latent (B, prefix + K, D_enc) -> predictions (B, N-K, piece_dim), for the masked pieces only."""
        P = self.num_prefix
        t = self.decoder_embed(latent)
        B, N = ids_restore.shape
        masked = self.mask_token.expand(B, N + P - t.shape[1], -1)
        pieces = gather_tokens(torch.cat([t[:, P:], masked], dim=1), ids_restore)
        t = torch.cat([t[:, :P], pieces + self.decoder_pos], dim=1)
        for blk in self.decoder_blocks:
            t = blk(t)
        return self.decoder_pred(gather_tokens(self.decoder_norm(t)[:, P:], ids_masked))


class MAE(nn.Module):
    """Masked auto-encoder (He et al. 2022) around a ViT or a spatial-spectral ViT: one light decoder per
    stream predicts its dropped pieces; the loss is the MSE on those, averaged over the streams."""

    def __init__(self, encoder, decoder_dim=512, decoder_depth=8, decoder_heads=16, mask_ratio=0.75,
                 norm_pix_loss=True, spectral_mask_ratio=0.5):
        super().__init__()
        self.encoder, self.norm_pix_loss = encoder, norm_pix_loss
        self.ratios = [mask_ratio, spectral_mask_ratio][:len(encoder.streams)]
        h, w = encoder.grid
        pieces = encoder.pieces(torch.zeros(1, encoder.in_chans, h * encoder.patch_size, w * encoder.patch_size))
        positions = [sincos_pos_embed(decoder_dim, h, w), sincos_1d(decoder_dim, np.arange(pieces[-1].shape[1]))]
        self.decoders = nn.ModuleList(
            MAEDecoder(encoder.embed_dim, encoder.num_prefix, pos, piece.shape[-1], decoder_dim, decoder_depth,
                       decoder_heads, encoder.init_scheme) for pos, piece in zip(positions, pieces))

    def flops_per_image(self):
        """Training FLOPs per image (3 x forward, less the input gradient the first layer never needs)."""
        h, w = self.encoder.grid
        counts = [h * w, getattr(getattr(self.encoder, "spectral", None), "num_groups", 0)][:len(self.ratios)]
        kept = [max(1, int(round(n * (1 - r)))) for n, r in zip(counts, self.ratios)]
        total = self.encoder.flops(*kept)
        for d, n, k in zip(self.decoders, counts, kept):
            P = d.num_prefix
            total += linear_flops(d.decoder_embed, P + k) + sum(block_flops(b, P + n) for b in d.decoder_blocks)
            total += linear_flops(d.decoder_pred, n - k)
        return 3 * total - self.encoder.embed_flops(*kept)

    def random_masking(self, B, N, device, ratio=None):
        """-> ids_keep (B, K), ids_masked (B, N-K), ids_restore (B, N) of a per-sample random shuffle."""
        keep = max(1, int(round(N * (1 - (self.ratios[0] if ratio is None else ratio)))))
        ids_shuffle = torch.rand(B, N, device=device).argsort(dim=1)
        return ids_shuffle[:, :keep], ids_shuffle[:, keep:], ids_shuffle.argsort(dim=1)

    def normalise_targets(self, pieces):
        if not self.norm_pix_loss:
            return pieces
        var, mean = torch.var_mean(pieces, dim=-1, keepdim=True)
        return (pieces - mean) * (var + 1e-6).rsqrt()

    def forward(self, x):
        """x (B, C, H, W) -> loss, per stream predictions (B, M, piece_dim) and ids_masked (B, M)."""
        if self.encoder.grid_size(x) != self.encoder.grid:
            raise ValueError(f"MAE is trained at {self.encoder.grid} patches, got input {tuple(x.shape[-2:])}")
        targets = self.encoder.pieces(x)  # per stream (B, N, piece_dim)
        ids = [self.random_masking(x.shape[0], t.shape[1], x.device, r) for t, r in zip(targets, self.ratios)]
        latents = self.encoder.encode(x, keep=[i[0] for i in ids])
        preds, losses = [], []
        for decoder, latent, target, (_, ids_masked, ids_restore) in zip(self.decoders, latents, targets, ids):
            preds.append(decoder(latent, ids_restore, ids_masked))
            target = self.normalise_targets(gather_tokens(target, ids_masked))
            losses.append(F.mse_loss(preds[-1].float(), target.float()))
        return sum(losses) / len(losses), preds, [i[1] for i in ids]

    @torch.no_grad()
    def reconstruct(self, x, preds, ids_masked):
        """Images with the masked patches predicted (in the true patch statistics), and the (B, N) patch mask."""
        p, pred, ids_masked = self.encoder.patch_size, preds[0].float(), ids_masked[0]
        patches = patchify(x.float(), p)
        if self.norm_pix_loss:
            var, mean = torch.var_mean(gather_tokens(patches, ids_masked), dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        patches = patches.scatter(1, ids_masked[..., None].expand(-1, -1, patches.shape[-1]), pred)
        mask = torch.zeros(patches.shape[:2], device=x.device).scatter(1, ids_masked, 1.0)
        return unpatchify(patches, p, x.shape[1], *self.encoder.grid), mask


class SimMIM(nn.Module):
    """SimMIM for the factorised `SpectralSpatialTransformer`: a linear head per spectral block, L1 on the
    masked tokens only; tube masks of `mask_block`^2 patch squares (MaskedSST's `mim_mask_patch_size`)."""

    def __init__(self, encoder, mask_ratio=0.7, mask_block=1):
        super().__init__()
        h, w = encoder.grid
        if mask_block < 1 or h % mask_block or w % mask_block:
            raise ValueError(f"the {h}x{w} patch grid does not split into {mask_block}x{mask_block} mask blocks")
        self.encoder, self.mask_ratio, self.mask_block = encoder, mask_ratio, mask_block
        S, D = encoder.num_blocks, encoder.embed_dim
        piece = encoder.spectral_patch * encoder.patch_size ** 2
        self.pred_weight = nn.Parameter(torch.empty(S, D, piece))
        self.pred_bias = nn.Parameter(torch.zeros(S, piece))
        nn.init.trunc_normal_(self.pred_weight, std=0.02)

    def flops_per_image(self):
        h, w = self.encoder.grid
        S, D, piece = self.pred_weight.shape
        return 3 * (self.encoder.flops(h * w) + 2 * S * h * w * D * piece) - self.encoder.embed_flops(h * w)

    def tube_mask(self, B, N, device):
        """(B, N) boolean with exactly round(ratio * squares) squares of mask_block^2 patches True per row."""
        b = self.mask_block
        h, w = (self.encoder.grid if b > 1 else (1, N))
        if h * w != N:
            raise ValueError(f"mask blocks are drawn on the training grid {h}x{w}, got {N} patches")
        n = (h // b) * (w // b)
        ranks = torch.rand(B, n, device=device).argsort(dim=1).argsort(dim=1)
        mask = (ranks < int(round(self.mask_ratio * n))).reshape(B, h // b, 1, w // b, 1)
        return mask.expand(-1, -1, b, -1, b).reshape(B, N)

    def forward(self, x, mask=None):
        """x (B, C, H, W) -> loss, predictions (B, S, N, piece), mask (B, N)."""
        target = self.encoder.pieces(x)  # (B, S, N, piece)
        B, S, N, _ = target.shape
        mask = self.tube_mask(B, N, x.device) if mask is None else mask
        tokens = self.encoder.forward_tokens(x, mask[:, None].expand(-1, S, -1))
        pred = torch.einsum("bsnd,sdk->bsnk", tokens, self.pred_weight) + self.pred_bias[:, None]
        return masked_l1(pred.float(), target.float(), mask), pred, mask

    @torch.no_grad()
    def reconstruct(self, x, pred, mask):
        """Images with the masked patches predicted, and the (B, N) patch mask."""
        B, C, H, W = x.shape
        S, p = self.encoder.num_blocks, self.encoder.patch_size
        pieces = torch.where(mask[:, None, :, None], pred.float(), self.encoder.pieces(x.float()))
        img = unpatchify(pieces.flatten(0, 1), p, C // S, H // p, W // p)  # (B*S, C/S, H, W)
        return img.reshape(B, C, H, W), mask.float()


def masked_l1(pred, target, mask):
    """Mean absolute error over the tokens where mask (B, N) is True, pred/target (B, S, N, K)."""
    err = (pred - target).abs().mean(-1)  # (B, S, N)
    m = mask[:, None].expand_as(err).to(err.dtype)
    return (err * m).sum() / m.sum().clamp_min(1)


# ----------------------------------------------------------------------------- DINO

class DINOHead(nn.Module):
    """DINO projection head: 3-layer MLP to a bottleneck, L2 normalisation, unit-norm prototypes."""

    def __init__(self, in_dim, num_prototypes, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck_dim))
        self.mlp.apply(init_weights)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x):
        """(..., in_dim) -> (..., num_prototypes) logits in fp32: cosine differences matter at temperature 0.04."""
        x = self.mlp(x)
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1)
            return F.linear(x, F.normalize(self.prototypes.float(), dim=-1))


# ----------------------------------------------------------------------------- segmentation

class MultiscaleLinearDecoder(nn.Module):
    """DINOv2's linear '+ms' head: several blocks' patch features at the finest grid, BatchNorm, 1x1 conv."""

    def __init__(self, in_dims, num_classes, stride=8):
        super().__init__()
        self.bn = nn.BatchNorm2d(sum(in_dims))
        self.classifier = nn.Conv2d(sum(in_dims), num_classes, 1)
        nn.init.trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features, out_size):
        """features: [(cls (B, D), patches (B, D, h, w)), ...] -> logits (B, K, H, W)."""
        size = max(f.shape[-2:] for _, f in features)
        maps = [resize(f, size) for _, f in features]
        return resize(self.classifier(self.bn(torch.cat(maps, dim=1))), out_size)


class ConvDecoder(nn.Module):
    """UNet-like decoder (as in UNETR): the deepest block's output upsampled 2x per stage, each fused with a
    shallower block's output brought to that resolution by transposed convs, down to the pixels."""

    def __init__(self, in_dims, num_classes, stride=8, width=256):
        super().__init__()
        stages = int(round(math.log2(stride)))
        if 2 ** stages != stride or len(in_dims) < stages + 1 and stages:
            raise ValueError(f"the conv decoder needs a power-of-two stride and {stages + 1} feature levels")
        chans = [max(width >> i, 32) for i in range(stages + 1)]  # e.g. 256, 128, 64, 32
        self.bottom = conv_bn_relu(in_dims[-1], chans[0], 3)
        self.ups = nn.ModuleList(nn.ConvTranspose2d(chans[i], chans[i + 1], 2, stride=2) for i in range(stages))
        # Skip i (shallower as i grows) is upsampled by i + 1 transposed convs to stage i's resolution.
        self.skips = nn.ModuleList(
            nn.Sequential(*[nn.ConvTranspose2d(in_dims[-2 - i] if j == 0 else chans[i + 1], chans[i + 1], 2, stride=2)
                            for j in range(i + 1)]) for i in range(stages))
        self.fuse = nn.ModuleList(nn.Sequential(conv_bn_relu(2 * chans[i + 1], chans[i + 1], 3),
                                                conv_bn_relu(chans[i + 1], chans[i + 1], 3)) for i in range(stages))
        self.classifier = nn.Conv2d(chans[-1], num_classes, 1)

    def forward(self, features, out_size):
        maps = [f for _, f in features]  # shallow -> deep, all (B, D, h, w)
        x = self.bottom(maps[-1])
        for i, (up, skip, fuse) in enumerate(zip(self.ups, self.skips, self.fuse)):
            x = fuse(torch.cat([up(x), skip(maps[-2 - i])], dim=1))
        return resize(self.classifier(x), out_size)


class SegmenterDecoder(nn.Module):
    """Segmenter's mask transformer (Strudel et al. 2021) on the last block's patch tokens and one learned
    token per class; class masks are the patch-class cosines, LayerNormed over classes."""

    def __init__(self, in_dims, num_classes, stride=8, depth=2, head_dim=64):
        super().__init__()
        dim = in_dims[-1]
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(dim, dim)
        self.cls_emb = nn.Parameter(torch.randn(1, num_classes, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, max(1, dim // head_dim)) for _ in range(depth))  # 12 heads at 768
        self.decoder_norm = nn.LayerNorm(dim)
        self.proj_patch = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.proj_classes = nn.Parameter(dim ** -0.5 * torch.randn(dim, dim))
        self.mask_norm = nn.LayerNorm(num_classes)
        for m in (self.proj_dec, self.blocks, self.decoder_norm):
            m.apply(init_weights)

    def forward(self, features, out_size):
        f = features[-1][1]  # (B, D, h, w)
        B, D, h, w = f.shape
        t = torch.cat([self.proj_dec(f.flatten(2).transpose(1, 2)), self.cls_emb.expand(B, -1, -1)], dim=1)
        for blk in self.blocks:
            t = blk(t)
        t = self.decoder_norm(t)
        patches = F.normalize(t[:, :-self.num_classes] @ self.proj_patch, dim=-1)
        classes = F.normalize(t[:, -self.num_classes:] @ self.proj_classes, dim=-1)
        masks = self.mask_norm(patches @ classes.transpose(1, 2))  # (B, N, K)
        return resize(masks.transpose(1, 2).reshape(B, self.num_classes, h, w), out_size)


def conv_bn_relu(cin, cout, k, dilation=1, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def resize(x, size):
    """Bilinear resize to `size`; None keeps the map as it is (a decoder's native resolution)."""
    if size is None or x.shape[-2:] == tuple(size):
        return x
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


class FullResolution(nn.Module):
    """Per-pixel linear classifier on the pixel's own spectrum, added to the decoder's upsampled logits:
    decoders at the patch stride lose thin structures."""

    def __init__(self, in_chans, num_classes):
        super().__init__()
        self.pixel = nn.Conv2d(in_chans, num_classes, 1)
        nn.init.trunc_normal_(self.pixel.weight, std=0.01)
        nn.init.zeros_(self.pixel.bias)

    def forward(self, x, context):
        """x (B, C, H, W) the normalised input, context (B, K, h, w) the decoder's logits -> (B, K, H, W)."""
        return resize(context, x.shape[-2:]) + self.pixel(x)


# ----------------------------------------------------------------------------- CNN baseline

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1, dilation=1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv_bn_relu(cin, width, 1)
        self.conv2 = conv_bn_relu(width, width, 3, dilation, stride)  # V1b/c: the stride sits in the 3x3
        self.conv3 = nn.Sequential(nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        nn.init.zeros_(self.conv3[1].weight)  # each residual block starts as the identity
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNetV1c(nn.Module):
    """ResNet-50-V1c for C bands (deep 3x3 stem) at output stride 8: stages 3 and 4 dilate instead of
    striding. Features: stages 1 (stride 4), 3 (the auxiliary head's) and 4."""

    streams = ()
    feature_stride = 8

    def __init__(self, in_chans, depths=(3, 4, 6, 3)):
        super().__init__()
        self.in_chans = in_chans
        self.stem = nn.Sequential(conv_bn_relu(in_chans, 32, 3, stride=2), conv_bn_relu(32, 32, 3),
                                  conv_bn_relu(32, 64, 3), nn.MaxPool2d(3, 2, 1))
        cin, self.stages = 64, nn.ModuleList()
        for i, (n, width) in enumerate(zip(depths, (64, 128, 256, 512))):
            stride, dilation = (1, 1) if i == 0 else (2, 1) if i == 1 else (1, 2 ** (i - 1))
            cout = width * Bottleneck.expansion
            self.stages.append(nn.Sequential(*(Bottleneck(cin if j == 0 else cout, width, stride if j == 0 else 1,
                                                          dilation) for j in range(n))))
            cin = cout
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def intermediate_layers(self, x, blocks=None):
        x, outs = self.stem(x), []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return [(None, outs[0]), (None, outs[2]), (None, outs[3])]

    def feature_dims(self, levels=None):
        return [256, 1024, 2048]


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLabV3+ (mmseg's recipe) on ResNet stages 1, 3, 4: ASPP on stage 4 fused at stride 4 with stage 1;
    an FCN auxiliary head on stage 3 gives extra logits in training."""

    def __init__(self, in_dims, num_classes, stride=8, channels=512, rates=(12, 24, 36)):
        super().__init__()
        if len(in_dims) != 3:
            raise ValueError("deeplabv3plus needs the ResNet backbone: --backbone resnet50v1c")
        low, mid, high = in_dims
        self.aspp = nn.ModuleList([conv_bn_relu(high, channels, 1)] +
                                  [conv_bn_relu(high, channels, 3, r) for r in rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(high, channels, 1))
        self.aspp_proj = conv_bn_relu(channels * (len(rates) + 2), channels, 1)
        self.low_proj = conv_bn_relu(low, 48, 1)
        self.fuse = nn.Sequential(conv_bn_relu(channels + 48, channels, 3), conv_bn_relu(channels, channels, 3))
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))
        self.aux = nn.Sequential(conv_bn_relu(mid, 256, 3), nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1))

    def forward(self, features, out_size):
        """-> logits (B, K, H, W); in training (logits, aux_logits)."""
        (_, low), (_, mid), (_, high) = features
        pooled = self.image_pool(high).expand(-1, -1, *high.shape[-2:])
        x = self.aspp_proj(torch.cat([branch(high) for branch in self.aspp] + [pooled], dim=1))
        x = self.fuse(torch.cat([resize(x, low.shape[-2:]), self.low_proj(low)], dim=1))
        logits = resize(self.classifier(x), out_size)
        if self.training:
            return logits, resize(self.aux(mid), out_size)
        return logits


DECODERS = {"linear": MultiscaleLinearDecoder, "conv": ConvDecoder, "segmenter": SegmenterDecoder,
            "deeplabv3plus": DeepLabV3PlusDecoder}


class SegmentationModel(nn.Module):
    """A backbone and a decoder on the blocks it reads. `frozen_backbone`: no gradients, eval mode (a linear
    probe); `full_res` adds `FullResolution` where features are coarser than the pixels."""

    def __init__(self, backbone, decoder, num_classes, frozen_backbone=True, full_res=False):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; available: {', '.join(DECODERS)}")
        self.backbone, self.frozen_backbone = backbone, frozen_backbone
        depth = backbone_depth(backbone)  # conv: four evenly spaced blocks as skips; segmenter: the last
        self.blocks = ([depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1] if decoder == "conv"
                       else 1 if decoder == "segmenter" else 4)
        dims = backbone.feature_dims(self.blocks if isinstance(self.blocks, int) else len(self.blocks))
        stride = getattr(backbone, "feature_stride", getattr(backbone, "patch_size", 1))
        self.decoder = DECODERS[decoder](dims, num_classes, stride)
        # Backbones at stride 1 (pixel, cdcnn, 1 px tokens) already see every pixel's spectrum.
        self.full_res = FullResolution(backbone.in_chans, num_classes) if full_res and stride > 1 else None
        self.backbone.requires_grad_(not frozen_backbone)
        for name, p in backbone.named_parameters():
            if name.endswith("mask_token"):
                p.requires_grad_(False)  # unused here; DDP rejects parameters without grads

    def train(self, mode=True):
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()  # no dropout/drop-path in a frozen feature extractor
        return self

    def forward(self, x):
        """(B, C, H, W) -> logits (B, K, H, W) (in training, DeepLabV3+ also returns its auxiliary logits)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_backbone):
            features = self.backbone.intermediate_layers(x, self.blocks)
        if self.full_res is None:
            return self.decoder(features, x.shape[-2:])
        logits = self.decoder(features, None)  # at the decoder's own resolution; the path upsamples
        if isinstance(logits, tuple):  # DeepLabV3+ in training: (logits, auxiliary logits)
            return self.full_res(x, logits[0]), resize(logits[1], x.shape[-2:])
        return self.full_res(x, logits)

    def head_modules(self):
        """The trained-from-scratch part: the decoder and the full-resolution path."""
        return nn.ModuleList([self.decoder] + ([self.full_res] if self.full_res is not None else []))


def backbone_depth(backbone):
    blocks = getattr(backbone, "blocks", None) or getattr(getattr(backbone, "spatial", None), "blocks", None)
    return len(blocks) if blocks is not None else 1


def layer_ids(backbone):
    """{parameter name: layer} for layer-wise lr decay (0 embeddings, i + 1 block i and the fusion after
    it, depth + 1 the final norm), and depth + 1."""
    depth, fuse_after = backbone_depth(backbone), getattr(backbone, "fuse_after", [])
    ids = {}
    for name, _ in backbone.named_parameters():
        block, fusion = re.search(r"blocks\.(\d+)\.", name), re.match(r"fusions\.(\d+)\.", name)
        if block:
            ids[name] = int(block.group(1)) + 1
        elif fusion:
            ids[name] = fuse_after[int(fusion.group(1))] + 1
        elif re.match(r"(spatial\.|spectral\.)?norm\.", name):
            ids[name] = depth + 1
        else:
            ids[name] = 0
    return ids, depth + 1


# ----------------------------------------------------------------------------- cross-domain CNN

class ResidualModule(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class CrossDomainCNN(nn.Module):
    """Lee & Kwon's cross-domain CNN: a 5x5 first conv per domain ({name: band count}), then a shared trunk
    of `depth` residual modules of 1x1 convs and a 1x1 conv; features at full resolution."""

    def __init__(self, domains, width=128, depth=5):
        super().__init__()
        for name in domains:
            if not name or "." in name:
                raise ValueError(f"domain name {name!r}: must be non-empty and without '.' (a module name)")
        self.width, self.depth = width, depth
        self.first = nn.ModuleDict({name: nn.Conv2d(bands, width, 5, padding=2) for name, bands in domains.items()})
        self.trunk = nn.Sequential(*(ResidualModule(width) for _ in range(depth)), nn.Conv2d(width, width, 1))

    def first_layer(self, domain, x):
        if domain not in self.first:
            raise ValueError(f"no domain {domain!r} in this cross-domain CNN (domains: {', '.join(self.first)})")
        conv = self.first[domain]
        if x.shape[1] != conv.in_channels:
            raise ValueError(f"domain {domain!r} has {conv.in_channels} bands, got an input with {x.shape[1]}")
        return F.relu(conv(x))

    def forward(self, x, domains=None):
        """x (B, C, H, W) of one domain (the only one when None) -> (B, width, H, W); or lists x[i] of
        domains[i], through the trunk together -> (sum of B_i, width, H, W)."""
        if torch.is_tensor(x):
            if domains is None and len(self.first) != 1:
                raise ValueError(f"this cross-domain CNN has domains {', '.join(self.first)}: say which one")
            x, domains = [x], [next(iter(self.first)) if domains is None else domains]
        return self.trunk(torch.cat([self.first_layer(d, xi) for xi, d in zip(x, domains)]))

    def intermediate_layers(self, x, blocks=1):
        return [(None, self(x))]

    def feature_dims(self, levels):
        return [self.width]
