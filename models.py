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

VIT_SIZES = {  # embed_dim, depth, heads
    "micro": (96, 8, 8),     # MaskedSST's model (configs/config.yaml: 96-d, 8 heads, 4 spatial + 4 spectral blocks)
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),   # the study's ViT-B
}
MAE_DECODER_SIZES = {  # decoder dim, depth, heads; base = the MAE paper's 512-d, 8 blocks
    "micro": (96, 4, 4),
    "tiny": (128, 4, 4),
    "small": (256, 4, 8),
    "base": (512, 8, 16),
}


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


def sincos_pos_embed(dim, h, w):
    """Fixed 2-D sin-cos position embedding, (h*w, dim): half the channels encode y, half x."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2))
        out = np.outer(pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    yy, xx = np.meshgrid(np.arange(h, dtype=float), np.arange(w, dtype=float), indexing="ij")
    emb = np.concatenate([one_axis(dim // 2, yy.ravel()), one_axis(dim // 2, xx.ravel())], axis=1)
    return torch.from_numpy(emb).float()


def gather_tokens(t, ids):
    """t (B, N, D), ids (B, K) -> (B, K, D)."""
    return torch.gather(t, 1, ids[..., None].expand(-1, -1, t.shape[-1]))


def drop_path(x, p, training):
    """Stochastic depth: drop the residual branch per sample."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


INIT_SCHEMES = ("trunc_normal", "xavier")
POS_EMBEDS = ("learned", "fixed")


def init_weights(module, scheme="trunc_normal"):
    """Linear weights: trunc_normal (std 0.02, timm/DINO) or xavier (xavier_uniform, as MAE's code: 2-4x
    larger at ViT widths, so the blocks of a random network really transform their input); biases 0,
    LayerNorm 1/0 in both."""
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
    weight-decayed). Same state_dict key either way, so checkpoints load into both."""
    check_choice("pos_embed", kind, POS_EMBEDS)
    if kind == "fixed":
        module.register_buffer("pos_embed", table)
    else:
        module.pos_embed = nn.Parameter(table)


def linear_flops(layer, n):
    """Forward FLOPs (2 x multiply-adds) of an nn.Linear applied to n vectors."""
    return 2 * n * layer.in_features * layer.out_features


def block_flops(block, n):
    """Forward FLOPs of a transformer block on n tokens, counted from its layers: qkv, the two attention
    matmuls (4 n^2 D), output projection, FFN. Norms and activations are not matmuls and not counted."""
    linears = [block.attn.qkv, block.attn.proj, *(m for m in block.mlp.modules() if isinstance(m, nn.Linear))]
    return sum(linear_flops(layer, n) for layer in linears) + 4 * n * n * block.attn.qkv.in_features


# ----------------------------------------------------------------------------- transformer blocks

class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x):
        B, N, D = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv_heads(x)
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels where available
        return self.proj(x.transpose(1, 2).reshape(B, N, D))

    def weights(self, x):
        """The softmax attention matrix (B, heads, N, N), which SDPA never materialises; for pictures."""
        q, k, _ = self.qkv_heads(x)
        return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU FFN; hidden size 2/3 of the MLP's (rounded up to a multiple of 8) keeps the parameter
    count comparable, as in DINOv2."""

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
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, ffn="mlp", layerscale=None, drop_path=0.0):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.mlp = {"mlp": Mlp, "swiglu": SwiGLU}[ffn](dim, int(dim * mlp_ratio))
        self.ls1 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.ls2 = LayerScale(dim, layerscale) if layerscale else nn.Identity()
        self.drop_path = drop_path

    def forward(self, x):
        x = x + drop_path(self.ls1(self.attn(self.norm1(x))), self.drop_path, self.training)
        return x + drop_path(self.ls2(self.mlp(self.norm2(x))), self.drop_path, self.training)


# ----------------------------------------------------------------------------- token encoders

class TokenEncoder(nn.Module):
    """A pre-norm transformer over linearly embedded input pieces with a CLS token, optional register
    tokens and an optional mask token. Subclasses say what a piece is and where it sits (`pos`)."""

    def __init__(self, piece_dim, embed_dim, depth, num_heads, mlp_ratio=4.0, num_registers=0, ffn="mlp",
                 layerscale=None, drop_path_rate=0.0, mask_token=False, init="trunc_normal"):
        super().__init__()
        check_choice("init", init, INIT_SCHEMES)
        self.embed_dim, self.num_prefix = embed_dim, 1 + num_registers
        self.patch_embed = nn.Linear(piece_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.registers = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        # iBOT replaces masked pieces by a learned token; only trainers that mask this way ask for it.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None
        dpr = np.linspace(0, drop_path_rate, depth)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, True, ffn, layerscale, float(d))
                                    for d in dpr)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.init_scheme = init
        self.apply(partial(init_weights, scheme=init))
        nn.init.xavier_uniform_(self.patch_embed.weight)  # as a conv patch embedding, per MAE
        nn.init.normal_(self.cls_token, std=0.02)
        if self.registers is not None:
            nn.init.normal_(self.registers, std=0.02)

    def embed_tokens(self, pieces, pos, ids_keep=None, mask=None):
        """pieces (B, N, piece_dim), pos (1, N, D) -> tokens (B, 1 + R + K, D): CLS, registers, then the
        pieces in ids_keep (B, K) (all N when None). Dropped pieces are never embedded; pieces where
        mask (B, N) is True are replaced by the mask token."""
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

    def run_blocks(self, t):
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def flops(self, pieces):
        """Forward FLOPs of embedding `pieces` pieces and running the blocks on them + prefix tokens."""
        n = self.num_prefix + pieces
        return self.embed_flops(pieces) + sum(block_flops(b, n) for b in self.blocks)

    def embed_flops(self, pieces):
        return linear_flops(self.patch_embed, pieces)

    def last_attention(self, t):
        """Tokens entering the blocks -> the last block's attention (B, heads, N, N)."""
        for blk in self.blocks[:-1]:
            t = blk(t)
        return self.blocks[-1].attn.weights(self.blocks[-1].norm1(t))


class VisionTransformer(TokenEncoder):
    """ViT for C-band images: patch embedding of C*p*p values per patch, a CLS token, optional register
    tokens, 2-D sin-cos position embeddings (interpolated for other input sizes), learned from there
    (`pos_embed="learned"`) or fixed (`"fixed"`, as MAE's encoder)."""

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
        H, W = x.shape[-2:]
        p = self.patch_size
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
        """(B, C, H, W) -> [normalised tokens (B, 1 + R + K, D)], one entry per stream; keep/mask per
        stream as in `embed_tokens`."""
        return [self.run_blocks(self.embed(x, keep[0], mask[0]))]

    def forward_features(self, x, mask=None):
        """(B, C, H, W) -> normalised tokens (B, 1 + R + N, D); mask (B, N) as in embed_tokens."""
        return self.encode(x, mask=(mask,))[0]

    def forward(self, x):
        """(B, C, H, W) -> CLS features (B, D)."""
        return self.forward_features(x)[:, 0]

    def intermediate_layers(self, x, blocks=4):
        """Normalised outputs of the last `blocks` blocks (or of the listed block indices), each as
        (cls (B, D), patches (B, D, h, w)) — what the segmentation decoders consume."""
        h, w = self.grid_size(x)
        wanted = _wanted_blocks(blocks, len(self.blocks))
        t, outs = self.embed(x), []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i in wanted:
                n = self.norm(t)
                outs.append((n[:, 0], n[:, self.num_prefix:].transpose(1, 2).reshape(x.shape[0], -1, h, w)))
        return outs

    def feature_dims(self, levels):
        return [self.embed_dim] * levels

    @torch.no_grad()
    def attention_maps(self, x):
        """{"spatial": last block's CLS-to-patch attention (B, heads, h, w)}."""
        h, w = self.grid_size(x)
        attn = self.last_attention(self.embed(x))
        return {"spatial": attn[:, :, 0, self.num_prefix:].reshape(x.shape[0], -1, h, w)}


def _wanted_blocks(blocks, depth):
    return set(range(depth - blocks, depth)) if isinstance(blocks, int) else set(blocks)


# ----------------------------------------------------------------------------- spatial-spectral ViT

def sincos_1d(dim, positions):
    """(len(positions), dim) sin-cos embedding of arbitrary (e.g. wavelength) positions."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2) / (dim / 2))
    out = np.outer(np.asarray(positions, dtype=float), omega)
    return torch.from_numpy(np.concatenate([np.sin(out), np.cos(out)], axis=1)).float()


def group_centres(wavelengths, group):
    """Centre wavelength of each consecutive group of `group` bands."""
    return np.asarray(wavelengths, dtype=float).reshape(-1, group).mean(1)


class SpectralEncoder(TokenEncoder):
    """The spectral stream: one token per group of `group` consecutive bands. A group's whole crop is
    average-pooled to a fixed pool x pool grid and the group*pool*pool values are projected to D by one
    linear layer shared by all groups, so the weights do not depend on the crop size (global and local
    crops share them). Position = the group's centre wavelength (fixed sin-cos) when wavelengths are
    known, else a learned embedding per group."""

    def __init__(self, in_chans, group=2, pool=8, embed_dim=768, depth=12, num_heads=12, wavelengths=None,
                 **kwargs):
        if in_chans % group:
            raise ValueError(f"{in_chans} bands do not split into groups of {group} (--spectral-patch)")
        super().__init__(group * pool * pool, embed_dim, depth, num_heads, **kwargs)
        self.group, self.pool, self.num_groups = group, pool, in_chans // group
        if wavelengths is not None:
            if len(wavelengths) != in_chans:
                raise ValueError(f"{len(wavelengths)} wavelengths for {in_chans} bands")
            self.register_buffer("pos_embed", sincos_1d(embed_dim, group_centres(wavelengths, group))[None],
                                 persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.empty(1, self.num_groups, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def pieces(self, x, visible=None):
        """(B, C, H, W) -> (B, G, group*pool*pool). With visible (B, 1, H, W) in {0, 1} only visible
        pixels enter the pooled averages (a cell with none of them is 0, the band mean)."""
        if visible is None:
            pooled = F.adaptive_avg_pool2d(x, self.pool)
        else:
            pooled = F.adaptive_avg_pool2d(x * visible, self.pool) / \
                F.adaptive_avg_pool2d(visible, self.pool).clamp_min(1e-6)
        return pooled.reshape(x.shape[0], self.num_groups, -1)


class Fusion(nn.Module):
    """Cross-stream exchange between groups of blocks. Every token of each stream is concatenated with
    the mean of the other stream's (layer-normalised) tokens, and a linear map 2D -> D (a 1x1 projection
    of the concatenation) gives an update added back to that token. The maps are zero-initialised, so
    fusion starts as the identity and each stream begins as a plain ViT."""

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
        ms, mp = ns.mean(1, keepdim=True), np_.mean(1, keepdim=True)
        s = s + self.to_spatial(torch.cat([ns, mp.expand_as(ns)], dim=-1))
        p = p + self.to_spectral(torch.cat([np_, ms.expand_as(np_)], dim=-1))
        return s, p


class SpatialSpectralViT(nn.Module):
    """The study's spatial-spectral ViT (its flaws fixed). Two streams of equal width and depth:

    - spatial: a `VisionTransformer` over p x p patches of all bands (CLS, registers, 2-D positions);
    - spectral: a `SpectralEncoder` over groups of `spectral_patch` bands (CLS, registers, wavelength
      positions); 64x64x32 input, patch 8, groups of 2 -> 64 + 16 tokens + 2 CLS + 2x4 registers = 90.

    After every `fuse_every` blocks (not after the last) a `Fusion` block exchanges information between
    the streams. Hiding is exact across streams: a masked/dropped spatial patch is excluded from the
    spectral stream's pooling, and a masked/dropped band group is zeroed (= its band mean) in the
    spatial stream's patches, so no stream sees what the other one hides. Dense features for the
    decoders are the spatial stream's patch tokens (informed by the spectral stream through fusion).
    `pos_embed` is the spatial stream's (learned or fixed); the spectral stream's positions are always
    as in `SpectralEncoder`."""

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

    def grid_size(self, x):
        return self.spatial.grid_size(x)

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
        hid_patch = self.hidden(B, h * w, keep[0], mask[0], x.device)
        pixel_visible = (~hid_patch).reshape(B, 1, h, 1, w, 1).expand(-1, -1, -1, p, -1, p)
        pixel_visible = pixel_visible.reshape(B, 1, H, W).to(x.dtype)
        hid_group = self.hidden(B, self.spectral.num_groups, keep[1], mask[1], x.device)
        x_spatial = x * (~hid_group).repeat_interleave(g, dim=1)[:, :, None, None].to(x.dtype)  # (B, C, H, W)
        s = self.spatial.embed_tokens(patchify(x_spatial, p), self.spatial.interpolate_pos_embed(h, w),
                                      keep[0], mask[0])
        t = self.spectral.embed_tokens(self.spectral.pieces(x, pixel_visible), self.spectral.pos_embed,
                                       keep[1], mask[1])
        return s, t

    def run_blocks(self, s, t, collect=()):
        """Both streams through their blocks with fusion in between; also the normalised spatial
        tokens after each block index in `collect`."""
        outs, fusions = [], iter(self.fusions)
        for i, (bs, bt) in enumerate(zip(self.spatial.blocks, self.spectral.blocks)):
            s, t = bs(s), bt(t)
            if i in self.fuse_after:
                s, t = next(fusions)(s, t)
            if i in collect:
                outs.append(self.spatial.norm(s))
        return self.spatial.norm(s), self.spectral.norm(t), outs

    def encode(self, x, keep=(None, None), mask=(None, None)):
        """(B, C, H, W) -> [spatial tokens (B, 1 + R + Ks, D), spectral tokens (B, 1 + R + Kg, D)],
        normalised; keep/mask per stream as in `TokenEncoder.embed_tokens`."""
        s, t, _ = self.run_blocks(*self.embed(x, keep, mask))
        return [s, t]

    def forward(self, x):
        """(B, C, H, W) -> spatial and spectral CLS features concatenated (B, 2D)."""
        s, t = self.encode(x)
        return torch.cat([s[:, 0], t[:, 0]], dim=-1)

    def intermediate_layers(self, x, blocks=4):
        h, w = self.grid_size(x)
        _, _, outs = self.run_blocks(*self.embed(x), collect=_wanted_blocks(blocks, len(self.spatial.blocks)))
        P = self.num_prefix
        return [(n[:, 0], n[:, P:].transpose(1, 2).reshape(x.shape[0], -1, h, w)) for n in outs]

    def feature_dims(self, levels):
        return [self.embed_dim] * levels

    @torch.no_grad()
    def attention_maps(self, x):
        """Last block of each stream: spatial CLS-to-patch (B, heads, h, w) and spectral
        CLS-to-band-group (B, heads, G) attention."""
        h, w = self.grid_size(x)
        s, t = self.embed(x)
        depth = len(self.spatial.blocks)
        fusions = iter(self.fusions)
        for i in range(depth - 1):
            s, t = self.spatial.blocks[i](s), self.spectral.blocks[i](t)
            if i in self.fuse_after:
                s, t = next(fusions)(s, t)
        last_s, last_t, P = self.spatial.blocks[-1], self.spectral.blocks[-1], self.num_prefix
        a_s = last_s.attn.weights(last_s.norm1(s))[:, :, 0, P:].reshape(x.shape[0], -1, h, w)
        a_t = last_t.attn.weights(last_t.norm1(t))[:, :, 0, P:]
        return {"spatial": a_s, "spectral": a_t}


# ----------------------------------------------------------------------------- MaskedSST-style transformer

BLOCK_ORDERS = ("alternating", "spatial-first")


def block_axes(order, depth):
    """The attention axis of each of `depth` factorised blocks: alternating spatial/spectral, or
    spatial-first (the first half spatial, the rest spectral)."""
    check_choice("block_order", order, BLOCK_ORDERS)
    if order == "alternating":
        return ["spatial" if i % 2 == 0 else "spectral" for i in range(depth)]
    return ["spatial"] * ((depth + 1) // 2) + ["spectral"] * (depth // 2)


class FactorizedBlock(nn.Module):
    """A transformer block over one axis of a (B, S, N, D) token cube: "spatial" attends among the N
    patches of each spectral block, "spectral" among the S spectral blocks of each patch."""

    def __init__(self, axis, *args, **kwargs):
        super().__init__()
        self.axis, self.block = axis, Block(*args, **kwargs)

    def forward(self, t):
        B, S, N, D = t.shape
        if self.axis == "spatial":
            return self.block(t.reshape(B * S, N, D)).reshape(B, S, N, D)
        t = t.transpose(1, 2).reshape(B * N, S, D)
        return self.block(t).reshape(B, N, S, D).transpose(1, 2)

    def attention(self, t):
        """(B, S, N, D) -> this block's attention (B*S, heads, N, N) or (B*N, heads, S, S)."""
        B, S, N, D = t.shape
        t = t.reshape(B * S, N, D) if self.axis == "spatial" else t.transpose(1, 2).reshape(B * N, S, D)
        return self.block.attn.weights(self.block.norm1(t))


class SpectralSpatialTransformer(nn.Module):
    """MaskedSST-style factorised transformer (Scheibenreif et al., CVPRW 2023). Tokens are cubes of
    p x p pixels x `spectral_patch` bands: (B, S, N, D) with S spectral blocks and N = h*w patches. Each
    spectral block has its own linear embedding (blockwise patch embedding); a token's position is the
    sum of a 2-D spatial embedding (sin-cos, learned from there or `pos_embed="fixed"`) and a spectral
    one (fixed sin-cos of the block's centre wavelength, or learned when wavelengths are unknown). No CLS
    token: dense features are the tokens averaged over the spectral blocks.

    `block_order`: "alternating" (blocks alternate attention over space and over spectrum) or
    "spatial-first" (the reference, HSG-AIML/MaskedSST src/vit_spatial_spectral.py `ViTSpatialSpectral`:
    one Transformer of spatial blocks - every spectral block's N tokens attend among themselves - then
    one Transformer of spectral blocks - every pixel's S tokens; the reference stacks `depth` of each,
    here the first half of the `depth` blocks is spatial and the second half spectral, so both orders
    have the same blocks and FLOPs). `embed_norm` adds the reference's `BlockwisePatchEmbedding` norms:
    one LayerNorm over a token's raw p*p*spectral_patch values (shared by all spectral blocks) before the
    blockwise linear embedding, and one LayerNorm over D after it, before the positions are added (and
    before masked tokens are replaced by the mask token, as the reference's SimMIM does). The reference's
    configs use 1 x 1 pixel x 10 band tokens on 8 x 8 windows (`models.PRESETS["maskedsst"]`)."""

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
        check_choice("init", init, INIT_SCHEMES)
        self.init_scheme = init
        self.in_chans, self.patch_size, self.spectral_patch = in_chans, patch_size, spectral_patch
        self.num_blocks, self.embed_dim = in_chans // spectral_patch, embed_dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        piece = spectral_patch * patch_size ** 2
        self.embed_weight = nn.Parameter(torch.empty(self.num_blocks, piece, embed_dim))  # one per block
        self.embed_bias = nn.Parameter(torch.zeros(self.num_blocks, embed_dim))
        bound = (6 / (piece + embed_dim)) ** 0.5
        nn.init.uniform_(self.embed_weight, -bound, bound)
        # The reference's LayerNorms around the embedding (default eps, as there); absent by default.
        self.embed_pre_norm = nn.LayerNorm(piece) if embed_norm else None
        self.embed_post_norm = nn.LayerNorm(embed_dim) if embed_norm else None
        set_pos_embed(self, sincos_pos_embed(embed_dim, *self.grid)[None], pos_embed)  # (1, N, D)
        if wavelengths is not None:
            if len(wavelengths) != in_chans:
                raise ValueError(f"{len(wavelengths)} wavelengths for {in_chans} bands")
            centres = group_centres(wavelengths, spectral_patch)
            self.register_buffer("spectral_pos", sincos_1d(embed_dim, centres)[None, :, None], persistent=False)
        else:
            self.spectral_pos = nn.Parameter(torch.empty(1, self.num_blocks, 1, embed_dim))
            nn.init.trunc_normal_(self.spectral_pos, std=0.02)
        self.mask_token = nn.Parameter(torch.zeros(embed_dim)) if mask_token else None
        dpr = np.linspace(0, drop_path_rate, depth)
        self.blocks = nn.ModuleList(FactorizedBlock(axis, embed_dim, num_heads, mlp_ratio, True, ffn, layerscale,
                                                    float(d)) for axis, d in zip(block_axes(block_order, depth), dpr))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.blocks.apply(partial(init_weights, scheme=init))
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)

    grid_size = VisionTransformer.grid_size
    interpolate_pos_embed = VisionTransformer.interpolate_pos_embed

    def flops(self, patches):
        """Forward FLOPs on `patches` spatial positions: S sequences of them per spatial block, `patches`
        sequences of S per spectral block."""
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
        pieces = self.pieces(x)
        if self.embed_pre_norm is not None:
            pieces = self.embed_pre_norm(pieces)
        t = torch.einsum("bsnk,skd->bsnd", pieces, self.embed_weight) + self.embed_bias[:, None]
        if self.embed_post_norm is not None:
            t = self.embed_post_norm(t)
        if mask is not None:
            t = torch.where(mask[..., None], self.mask_token.to(t.dtype), t)
        return t + self.interpolate_pos_embed(h, w)[:, None] + self.spectral_pos

    def forward_tokens(self, x, mask=None):
        """(B, C, H, W) -> normalised tokens (B, S, N, D)."""
        t = self.embed(x, mask)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def intermediate_layers(self, x, blocks=4):
        """(mean token (B, D), spectral-block-averaged patch tokens (B, D, h, w)) of the last blocks."""
        h, w = self.grid_size(x)
        wanted = _wanted_blocks(blocks, len(self.blocks))
        t, outs = self.embed(x), []
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i in wanted:
                n = self.norm(t).mean(1)  # (B, N, D)
                outs.append((n.mean(1), n.transpose(1, 2).reshape(x.shape[0], -1, h, w)))
        return outs

    def feature_dims(self, levels):
        return [self.embed_dim] * levels

    @torch.no_grad()
    def attention_maps(self, x):
        """Without a CLS token: the attention each patch (spectral block) receives in the last spatial
        (spectral) block, averaged over queries and over the other axis: (B, heads, h, w) and (B, heads, S)."""
        (h, w), B = self.grid_size(x), x.shape[0]
        t, maps = self.embed(x), {}
        last = {ax: max(i for i, b in enumerate(self.blocks) if b.axis == ax) for ax in ("spatial", "spectral")}
        for i, blk in enumerate(self.blocks):
            if i == last["spatial"]:
                a = blk.attention(t).mean(2)  # (B*S, heads, N)
                maps["spatial"] = a.reshape(B, self.num_blocks, -1, h, w).mean(1)
            if i == last["spectral"]:
                a = blk.attention(t).mean(2)  # (B*N, heads, S)
                maps["spectral"] = a.reshape(B, h * w, -1, self.num_blocks).mean(1)
            t = blk(t)
        return maps


class PixelBackbone(nn.Module):
    """No parameters: the 'features' are the normalised spectrum of every pixel at full resolution, so a
    linear decoder on top is a per-pixel linear classifier, the control any spatial model must beat."""

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
    # MaskedSST's configs (HSG-AIML/MaskedSST configs/*.yaml, src/vit_spatial_spectral.py): 1 x 1 pixel x
    # 10 band tokens on 8 x 8 windows, spatial blocks before spectral ones, LayerNorms around the blockwise
    # embedding, and its model size (micro: 96-d, 4 + 4 blocks; at tiny a window costs 6x the FLOPs).
    # pretrain_mae.py adds its pre-training augmentation (flips, no random resized crop) and SimMIM masks
    # of 4 x 4 pixels.
    "maskedsst": dict(backbone="sst", size="micro", patch_size=1, spectral_patch=10, img_size=8,
                      block_order="spatial-first", embed_norm=True),
    # Smaller patches for sharper maps (issue #15). patch4 keeps 64 px tiles: a 16 x 16 token grid, 4x the
    # tokens of patch 8 (~4x the block FLOPs, more in attention). patch2 cuts 32 px tiles so the grid stays
    # 16 x 16: patch4's cost at half the context. Position embeddings follow the grid (img_size / patch).
    "patch4": dict(patch_size=4),
    "patch2": dict(patch_size=2, img_size=32),
}


def build_backbone(name, size="tiny", in_chans=32, img_size=64, patch_size=8, **kwargs):
    """The one factory every script uses: vit | ssvit | sst at size micro | tiny | small | base, pixel, the CNN
    baseline resnet50v1c (for `--decoder deeplabv3plus`), or cdcnn (in_chans = {domain: bands}).
    Options a backbone does not have must be None (so a script can pass e.g. `spectral_patch=None` to
    any backbone). The returned module carries `.config`, which checkpoints store and
    `build_backbone(**config)` rebuilds. `bands` (HSIDataset.band_info: the file's band indices the
    model reads and their wavelengths) is only recorded in the config, so that data read later with this
    checkpoint is read with the same bands."""
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
    """A light transformer that fills the dropped pieces of one stream with a mask token, adds fixed
    positions and predicts the dropped pieces' values."""

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
        """latent (B, prefix + K, D_enc) -> predictions (B, N-K, piece_dim) for the masked pieces only
        (the prediction layer is the widest matrix here: C*p*p outputs per token)."""
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
    """Masked auto-encoder (He et al. 2022) around a ViT or a spatial-spectral ViT. Each stream drops a
    random share of its pieces (75% of the patches; `spectral_mask_ratio` of the band groups); the encoder
    sees only what is left (plus CLS and registers); one light decoder per stream reconstructs its
    dropped pieces (all bands of a patch; a band group's pooled image); the loss is the MSE on dropped
    pieces only, optionally against per-piece normalised targets, averaged over the streams. The decoders
    are initialised with the encoder's scheme (`init`)."""

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

    @property
    def mask_ratio(self):
        return self.ratios[0]

    def flops_per_image(self):
        """Training FLOPs per image (forward + backward = 3 x forward, less the input gradient the first
        layer never needs): the encoder on the kept pieces only, each decoder on all its pieces, the
        prediction layer on the dropped ones."""
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
        """Per-sample random permutation: ids_keep (B, K) visible and ids_masked (B, N-K) masked pieces,
        ids_restore (B, N) undoing the shuffle."""
        keep = max(1, int(round(N * (1 - (self.mask_ratio if ratio is None else ratio)))))
        ids_shuffle = torch.rand(B, N, device=device).argsort(dim=1)
        return ids_shuffle[:, :keep], ids_shuffle[:, keep:], ids_shuffle.argsort(dim=1)

    def normalize_targets(self, pieces):
        if not self.norm_pix_loss:
            return pieces
        var, mean = torch.var_mean(pieces, dim=-1, keepdim=True)
        return (pieces - mean) * (var + 1e-6).rsqrt()

    def forward(self, x):
        """x (B, C, H, W) -> loss, per stream: predictions (B, M, piece_dim) of the M dropped pieces and
        ids_masked (B, M)."""
        grid = self.encoder.grid_size(x)
        if grid != self.encoder.grid:
            raise ValueError(f"MAE is trained at {self.encoder.grid} patches, got input {tuple(x.shape[-2:])}")
        targets = self.encoder.pieces(x)  # per stream (B, N, piece_dim)
        ids = [self.random_masking(x.shape[0], t.shape[1], x.device, r) for t, r in zip(targets, self.ratios)]
        latents = self.encoder.encode(x, keep=[i[0] for i in ids])
        preds, losses = [], []
        for decoder, latent, target, (_, ids_masked, ids_restore) in zip(self.decoders, latents, targets, ids):
            preds.append(decoder(latent, ids_restore, ids_masked))
            target = self.normalize_targets(gather_tokens(target, ids_masked))
            losses.append(F.mse_loss(preds[-1].float(), target.float()))
        return sum(losses) / len(losses), preds, [i[1] for i in ids]

    @torch.no_grad()
    def reconstruct(self, x, preds, ids_masked):
        """Images from the spatial stream's predictions (forward's outputs): visible patches copied from
        x, masked ones predicted (de-normalised with the true patch statistics when the targets were
        normalised), and the (B, N) patch mask."""
        p, pred, ids_masked = self.encoder.patch_size, preds[0].float(), ids_masked[0]
        patches = patchify(x.float(), p)
        if self.norm_pix_loss:
            var, mean = torch.var_mean(gather_tokens(patches, ids_masked), dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        patches = patches.scatter(1, ids_masked[..., None].expand(-1, -1, patches.shape[-1]), pred)
        mask = torch.zeros(patches.shape[:2], device=x.device).scatter(1, ids_masked, 1.0)
        return unpatchify(patches, p, x.shape[1], *self.encoder.grid), mask


class SimMIM(nn.Module):
    """SimMIM-style masked image modelling for the factorised `SpectralSpatialTransformer`: masked tokens
    are replaced by a mask token inside the encoder (factorised attention needs the full token cube), a
    linear head per spectral block predicts each token's pixels, and the loss is the L1 error on masked
    tokens only. Tube masking: a sample's masked patches are masked in every spectral block. Every
    sample masks exactly round(ratio * N) patches and the loss reads the boolean mask itself, so unlike
    the reference implementation no visible token can enter the loss. `mask_block` k > 1 masks squares
    of k x k patches (exactly round(ratio * squares) of them), as the reference's mask generator
    (`mim_mask_patch_size: 4` with 1-pixel patches): single masked pixels are easy to fill in from
    their visible neighbours."""

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
        """Training FLOPs per image: the encoder on every token, the per-block pixel heads on all tokens."""
        h, w = self.encoder.grid
        S, D, piece = self.pred_weight.shape
        return 3 * (self.encoder.flops(h * w) + 2 * S * h * w * D * piece) - self.encoder.embed_flops(h * w)

    def tube_mask(self, B, N, device):
        """(B, N) boolean, exactly round(ratio * N) True per row, chosen uniformly (in squares of
        mask_block x mask_block patches: round(ratio * squares) squares)."""
        b = self.mask_block
        h, w = (self.encoder.grid if b > 1 else (1, N))
        if h * w != N:
            raise ValueError(f"mask blocks are drawn on the training grid {h}x{w}, got {N} patches")
        n = (h // b) * (w // b)
        ranks = torch.rand(B, n, device=device).argsort(dim=1).argsort(dim=1)
        mask = ranks < int(round(self.mask_ratio * n))
        if b == 1:
            return mask
        mask = mask.reshape(B, h // b, 1, w // b, 1).expand(-1, -1, b, -1, b)
        return mask.reshape(B, N)

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
        """Images with the masked patches predicted (all spectral blocks), and the (B, N) patch mask."""
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
    """DINO projection head: 3-layer MLP to a bottleneck, L2 normalisation, then a weight-normalised
    prototype layer (unit-norm prototypes, i.e. weight norm with the gain fixed to 1) giving logits."""

    def __init__(self, in_dim, num_prototypes, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        self.prototypes = nn.Parameter(torch.empty(num_prototypes, bottleneck_dim))
        self.mlp.apply(init_weights)
        nn.init.trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x):
        """(..., in_dim) -> (..., num_prototypes) logits, always fp32: the MLP runs under autocast, the
        normalisation and the prototype layer (65536-way at base, cosines whose differences matter at
        temperature 0.04-0.1) do not."""
        x = self.mlp(x)
        with torch.autocast(x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1)
            return F.linear(x, F.normalize(self.prototypes.float(), dim=-1))


# ----------------------------------------------------------------------------- segmentation

class MultiscaleLinearDecoder(nn.Module):
    """DINOv2's linear '+ms' head: patch features of several blocks resized to the finest grid,
    concatenated, BatchNorm, a 1x1 conv to class logits, bilinear upsampling to pixels."""

    def __init__(self, in_dims, num_classes, stride=8):
        super().__init__()
        self.bn = nn.BatchNorm2d(sum(in_dims))
        self.classifier = nn.Conv2d(sum(in_dims), num_classes, 1)
        nn.init.trunc_normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features, out_size):
        """features: [(cls (B, D), patches (B, D, h, w)), ...] -> logits (B, K, H, W)."""
        maps = [f for _, f in features]
        size = max(m.shape[-2:] for m in maps)
        maps = [m if m.shape[-2:] == size else F.interpolate(m, size, mode="bilinear", align_corners=False)
                for m in maps]
        return resize(self.classifier(self.bn(torch.cat(maps, dim=1))), out_size)


class ConvDecoder(nn.Module):
    """UNet-like decoder (as in UNETR): the deepest of four encoder-block outputs is upsampled in stages,
    each a 2x transposed conv followed by two 3x3 conv-BN-ReLU on the concatenation with the next
    shallower block's output (itself brought to that resolution by transposed convs), down to the input
    resolution; a 1x1 conv gives the class logits."""

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
    """Segmenter's mask transformer (Strudel et al. 2021) on the last block's patch tokens: projected
    patch tokens and one learned embedding per class go through transformer blocks together; patch and
    class outputs are projected and L2-normalised, their dot products are the class masks (a per-patch
    LayerNorm over classes, 'mask norm'), upsampled bilinearly."""

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


def conv_bn_relu(cin, cout, k, dilation=1, stride=1, groups=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, dilation * (k // 2), dilation, groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def resize(x, size):
    """Bilinear resize to `size`; None keeps the map as it is (a decoder's native resolution)."""
    if size is None or x.shape[-2:] == tuple(size):
        return x
    return F.interpolate(x, size, mode="bilinear", align_corners=False)


class FullResolution(nn.Module):
    """The full-resolution path of a segmentation head. Every decoder starts from tokens at the patch
    stride, so it loses thin structures; this path is a per-pixel linear classifier on the pixel's own
    normalised spectrum whose logits are added to the decoder's (contextual) ones. With the backbone's
    features zeroed the head is a per-pixel linear classifier, so trained it can learn at least what the
    per-pixel baseline learns."""

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
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.down is None else self.down(x)
        return F.relu(self.conv3(self.conv2(self.conv1(x))) + identity)


class ResNetV1c(nn.Module):
    """ResNet-50-V1c for C input bands: a deep stem of three 3x3 convs (C -> 32 -> 32 -> 64, the first
    with stride 2) and max pooling, then 3/4/6/3 bottleneck blocks. Output stride 8: stages 3 and 4 keep
    the resolution and dilate by 2 and 4 instead. Features: stage 1 (low level, stride 4), stage 3 (for
    the auxiliary head) and stage 4, as (None, (B, C_i, h_i, w_i))."""

    streams = ()
    feature_stride = 8

    def __init__(self, in_chans, depths=(3, 4, 6, 3)):
        super().__init__()
        self.in_chans = in_chans
        self.stem = nn.Sequential(conv_bn_relu(in_chans, 32, 3, stride=2), conv_bn_relu(32, 32, 3),
                                  conv_bn_relu(32, 64, 3), nn.MaxPool2d(3, 2, 1))
        cin, stages = 64, []
        for i, (n, width) in enumerate(zip(depths, (64, 128, 256, 512))):
            stride, dilation = (1, 1) if i == 0 else (2, 1) if i == 1 else (1, 2 ** (i - 1))
            blocks = []
            for j in range(n):
                blocks.append(Bottleneck(cin, width, stride if j == 0 else 1, dilation))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def intermediate_layers(self, x, blocks=None):
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return [(None, outs[0]), (None, outs[2]), (None, outs[3])]

    def feature_dims(self, levels=None):
        return [256, 1024, 2048]


class DeepLabV3PlusDecoder(nn.Module):
    """DeepLabV3+ head on ResNet features (stage 1, stage 3, stage 4): ASPP on stage 4 (1x1, three
    dilated 3x3 at rates 12/24/36 for output stride 8, image pooling) -> 1x1 projection; bilinear
    upsampling to stride 4, concatenation with the 48-channel projection of the low-level features, two
    3x3 convs, 1x1 classifier, bilinear upsampling. An FCN auxiliary head on stage 3 gives extra logits
    during training (loss weight 0.4, in finetune_seg.py)."""

    def __init__(self, in_dims, num_classes, stride=8, channels=512, rates=(12, 24, 36)):
        super().__init__()
        if len(in_dims) != 3:
            raise ValueError("deeplabv3plus needs the ResNet backbone: --backbone resnet50v1c")
        low, mid, high = in_dims
        self.aspp = nn.ModuleList([conv_bn_relu(high, channels, 1)] + [conv_bn_relu(high, channels, 3, r) for r in rates])
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), conv_bn_relu(high, channels, 1))
        self.aspp_proj = conv_bn_relu(channels * (len(rates) + 2), channels, 1)
        self.low_proj = conv_bn_relu(low, 48, 1)
        self.fuse = nn.Sequential(conv_bn_relu(channels + 48, channels, 3), conv_bn_relu(channels, channels, 3))
        self.classifier = nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, num_classes, 1))
        self.aux = nn.Sequential(conv_bn_relu(mid, 256, 3), nn.Dropout2d(0.1), nn.Conv2d(256, num_classes, 1))

    def forward(self, features, out_size):
        """-> logits (B, K, H, W); in training also the auxiliary logits: (logits, aux_logits)."""
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


def decoder_blocks(decoder, depth):
    """Which encoder blocks a decoder reads: the last four (linear), four evenly spaced ones as skip
    connections (conv), the last one (segmenter)."""
    if decoder == "conv":
        return [depth // 4 - 1, depth // 2 - 1, 3 * depth // 4 - 1, depth - 1]
    return 1 if decoder == "segmenter" else 4


class SegmentationModel(nn.Module):
    """A backbone, the outputs of the encoder blocks its decoder reads, and the decoder. With
    `frozen_backbone` the backbone runs without gradients in eval mode (a linear probe). `full_res` adds
    the full-resolution path (`FullResolution`) to backbones whose features are coarser than the pixels; without it the
    heads are the study's. `head` records these options for checkpoints."""

    def __init__(self, backbone, decoder, num_classes, frozen_backbone=True, full_res=False):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; available: {', '.join(DECODERS)}")
        self.backbone, self.frozen_backbone = backbone, frozen_backbone
        self.blocks = decoder_blocks(decoder, backbone_depth(backbone))
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
    """{parameter name: layer} for layer-wise lr decay: 0 = embeddings and tokens, i + 1 = block i (a
    fusion block counts with the block it follows), depth + 1 = the final norm; and depth + 1."""
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
    """Two 1x1 convolutions with a ReLU between them, added to the input, then a ReLU."""

    def __init__(self, dim):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(dim, dim, 1), nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        return F.relu(x + self.conv2(F.relu(self.conv1(x))))


class CrossDomainCNN(nn.Module):
    """Lee & Kwon's cross-domain CNN for scenes from different sensors. Each domain (scene or sensor) has
    its own first layer, a 5x5 conv from its band count to `width` channels (padding 2, so features stay
    at full resolution); all domains share the trunk: `depth` two-layer residual modules of 1x1 convs and
    a final 1x1 conv. A pixel's feature (width-d) depends on its 5x5 neighbourhood only.
    `domains`: {name: band count}, in a fixed order."""

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
        """x (B, C, H, W) of one domain (the only one when `domains` is None) -> (B, width, H, W). Or
        lists: x[i] (B_i, C_i, H, W) of domain domains[i], each through its own first layer, then
        together through the shared trunk -> (sum of B_i, width, H, W)."""
        if torch.is_tensor(x):
            if domains is None and len(self.first) != 1:
                raise ValueError(f"this cross-domain CNN has domains {', '.join(self.first)}: say which one")
            x, domains = [x], [next(iter(self.first)) if domains is None else domains]
        return self.trunk(torch.cat([self.first_layer(d, xi) for xi, d in zip(x, domains)]))

    def intermediate_layers(self, x, blocks=1):
        return [(None, self(x))]

    def feature_dims(self, levels):
        return [self.width]
