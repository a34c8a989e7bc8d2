"""Backbones and heads. Every script builds its backbone through `build_backbone`.

Shapes: images are (B, C, H, W) with C spectral bands; tokens are (B, N, D).
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

VIT_SIZES = {  # embed_dim, depth, heads
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),   # the study's ViT-B
}
MAE_DECODER_SIZES = {  # decoder dim, depth, heads; base = the MAE paper's 512-d, 8 blocks
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


def init_weights(module):
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


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


# ----------------------------------------------------------------------------- ViT

class VisionTransformer(nn.Module):
    """ViT for C-band images: patch embedding of C*p*p values per patch, a CLS token, optional register
    tokens, learned position embeddings (sin-cos initialised, interpolated for other input sizes)."""

    def __init__(self, in_chans, img_size=64, patch_size=8, embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, num_registers=0, ffn="mlp", layerscale=None, drop_path_rate=0.0, mask_token=False):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.in_chans, self.patch_size, self.embed_dim = in_chans, patch_size, embed_dim
        self.grid = (img_size // patch_size, img_size // patch_size)
        self.num_prefix = 1 + num_registers
        self.patch_embed = nn.Linear(in_chans * patch_size ** 2, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.registers = nn.Parameter(torch.zeros(1, num_registers, embed_dim)) if num_registers else None
        self.pos_embed = nn.Parameter(sincos_pos_embed(embed_dim, *self.grid)[None])
        # iBOT replaces masked patches by a learned token; only trainers that mask this way ask for it.
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim)) if mask_token else None
        dpr = np.linspace(0, drop_path_rate, depth)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, True, ffn, layerscale, float(d))
                                    for d in dpr)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(init_weights)
        nn.init.xavier_uniform_(self.patch_embed.weight)  # as a conv patch embedding, per MAE
        nn.init.normal_(self.cls_token, std=0.02)
        if self.registers is not None:
            nn.init.normal_(self.registers, std=0.02)

    def grid_size(self, x):
        H, W = x.shape[-2:]
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input {H}x{W} is not a multiple of the patch size {p}")
        return H // p, W // p

    def interpolate_pos_embed(self, h, w):
        """(1, h*w, D): the learned grid resized bicubically when the input size differs from training."""
        if (h, w) == self.grid:
            return self.pos_embed
        pe = self.pos_embed.reshape(1, *self.grid, -1).permute(0, 3, 1, 2)
        pe = F.interpolate(pe, size=(h, w), mode="bicubic", align_corners=False)
        return pe.permute(0, 2, 3, 1).reshape(1, h * w, -1)

    def embed_patches(self, patches, grid, ids_keep=None, mask=None):
        """patches (B, N, C*p*p) from `patchify` -> tokens (B, 1 + R + K, D): CLS, registers, then the
        patches in ids_keep (B, K) (all N when None). Dropped patches are never embedded; patches where
        mask (B, N) is True are replaced by the mask token."""
        pos = self.interpolate_pos_embed(*grid).expand(patches.shape[0], -1, -1)
        if ids_keep is not None:
            patches, pos = gather_tokens(patches, ids_keep), gather_tokens(pos, ids_keep)
        t = self.patch_embed(patches)
        if mask is not None:
            t = torch.where(mask[..., None], self.mask_token.to(t.dtype), t)
        t = t + pos
        prefix = [(self.cls_token + self.cls_pos).expand(t.shape[0], -1, -1)]
        if self.registers is not None:
            prefix.append(self.registers.expand(t.shape[0], -1, -1))
        return torch.cat(prefix + [t], dim=1)

    def embed(self, x, mask=None):
        grid = self.grid_size(x)
        return self.embed_patches(patchify(x, self.patch_size), grid, mask=mask)

    def run_blocks(self, t):
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def forward_features(self, x, mask=None):
        """(B, C, H, W) -> normalised tokens (B, 1 + R + N, D); mask (B, N) as in embed_patches."""
        return self.run_blocks(self.embed(x, mask))

    def forward(self, x):
        """(B, C, H, W) -> CLS features (B, D)."""
        return self.forward_features(x)[:, 0]

    def intermediate_layers(self, x, blocks=4):
        """Normalised outputs of the last `blocks` blocks (or of the listed block indices), each as
        (cls (B, D), patches (B, D, h, w)) — what the segmentation decoders consume."""
        h, w = self.grid_size(x)
        wanted = set(range(len(self.blocks) - blocks, len(self.blocks))) if isinstance(blocks, int) else set(blocks)
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
    def cls_attention(self, x):
        """Last block's attention from CLS to every patch, (B, heads, h, w)."""
        h, w = self.grid_size(x)
        t = self.embed(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        attn = self.blocks[-1].attn.weights(self.blocks[-1].norm1(t))
        return attn[:, :, 0, self.num_prefix:].reshape(x.shape[0], -1, h, w)


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


def build_backbone(name, size="tiny", in_chans=32, img_size=64, patch_size=8, **kwargs):
    """The one factory every script uses. The returned module carries `.config`, which checkpoints store
    and `build_backbone(**config)` rebuilds."""
    if name == "pixel":
        model = PixelBackbone(in_chans)
        model.config = dict(name=name, in_chans=in_chans)
        return model
    if name == "cdcnn":  # pretrain_contrast.py's cross-domain CNN: in_chans = {domain name: band count}
        if not isinstance(in_chans, dict):
            raise ValueError(f"backbone 'cdcnn' needs in_chans = {{domain name: band count}}, got {in_chans!r}")
        model = CrossDomainCNN(in_chans, **kwargs)
        model.config = dict(name=name, in_chans=dict(in_chans), width=model.width, depth=model.depth)
        return model
    if name != "vit":
        raise ValueError(f"unknown backbone {name!r}; available: vit, pixel, cdcnn")
    if size not in VIT_SIZES:
        raise ValueError(f"unknown size {size!r}; available: {', '.join(VIT_SIZES)}")
    dim, depth, heads = VIT_SIZES[size]
    model = VisionTransformer(in_chans, img_size, patch_size, dim, depth, heads, **kwargs)
    model.config = dict(name=name, size=size, in_chans=in_chans, img_size=img_size, patch_size=patch_size, **kwargs)
    return model


# ----------------------------------------------------------------------------- MAE

class MAE(nn.Module):
    """Masked auto-encoder (He et al. 2022) around a VisionTransformer encoder. The encoder sees only the
    visible patches (plus CLS and registers); a light decoder reconstructs every band of the masked
    patches; the loss is the MSE on masked patches only, optionally against per-patch normalised targets."""

    def __init__(self, encoder, decoder_dim=512, decoder_depth=8, decoder_heads=16, mask_ratio=0.75,
                 norm_pix_loss=True):
        super().__init__()
        self.encoder, self.mask_ratio, self.norm_pix_loss = encoder, mask_ratio, norm_pix_loss
        p, C = encoder.patch_size, encoder.in_chans
        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos = nn.Parameter(sincos_pos_embed(decoder_dim, *encoder.grid)[None])
        self.decoder_blocks = nn.ModuleList(Block(decoder_dim, decoder_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, C * p * p)
        for m in [self.decoder_embed, *self.decoder_blocks, self.decoder_norm, self.decoder_pred]:
            m.apply(init_weights)
        nn.init.normal_(self.mask_token, std=0.02)

    def random_masking(self, B, N, device):
        """Per-sample random permutation: ids_keep (B, K) visible and ids_masked (B, N-K) masked patches,
        ids_restore (B, N) undoing the shuffle."""
        keep = max(1, int(round(N * (1 - self.mask_ratio))))
        ids_shuffle = torch.rand(B, N, device=device).argsort(dim=1)
        return ids_shuffle[:, :keep], ids_shuffle[:, keep:], ids_shuffle.argsort(dim=1)

    def forward_decoder(self, latent, ids_restore, ids_masked):
        """latent (B, prefix + K, D_enc) -> predictions (B, N-K, C*p*p) for the masked patches only (the
        prediction layer is the widest matrix here: C*p*p outputs per token)."""
        n_prefix = self.encoder.num_prefix
        t = self.decoder_embed(latent)
        B, N = ids_restore.shape
        masked = self.mask_token.expand(B, N + n_prefix - t.shape[1], -1)
        patches = gather_tokens(torch.cat([t[:, n_prefix:], masked], dim=1), ids_restore)
        t = torch.cat([t[:, :n_prefix], patches + self.decoder_pos], dim=1)
        for blk in self.decoder_blocks:
            t = blk(t)
        return self.decoder_pred(gather_tokens(self.decoder_norm(t)[:, n_prefix:], ids_masked))

    def normalize_targets(self, patches):
        if not self.norm_pix_loss:
            return patches
        var, mean = torch.var_mean(patches, dim=-1, keepdim=True)
        return (patches - mean) * (var + 1e-6).rsqrt()

    def forward(self, x):
        """x (B, C, H, W) -> loss, predictions (B, M, C*p*p) of the M masked patches, ids_masked (B, M)."""
        grid = self.encoder.grid_size(x)
        if grid != self.encoder.grid:
            raise ValueError(f"MAE is trained at {self.encoder.grid} patches, got input {tuple(x.shape[-2:])}")
        patches = patchify(x, self.encoder.patch_size)  # (B, N, C*p*p)
        ids_keep, ids_masked, ids_restore = self.random_masking(x.shape[0], patches.shape[1], x.device)
        latent = self.encoder.run_blocks(self.encoder.embed_patches(patches, grid, ids_keep))
        pred = self.forward_decoder(latent, ids_restore, ids_masked)
        target = self.normalize_targets(gather_tokens(patches, ids_masked))
        return F.mse_loss(pred.float(), target.float()), pred, ids_masked

    @torch.no_grad()
    def reconstruct(self, x, pred, ids_masked):
        """Images from predictions: visible patches copied from x, masked ones predicted (de-normalised
        with the true patch statistics when the targets were normalised), and the (B, N) mask."""
        p = self.encoder.patch_size
        patches = patchify(x.float(), p)
        pred = pred.float()
        if self.norm_pix_loss:
            var, mean = torch.var_mean(gather_tokens(patches, ids_masked), dim=-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        patches = patches.scatter(1, ids_masked[..., None].expand(-1, -1, patches.shape[-1]), pred)
        mask = torch.zeros(patches.shape[:2], device=x.device).scatter(1, ids_masked, 1.0)
        return unpatchify(patches, p, x.shape[1], *self.encoder.grid), mask


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
        """(..., in_dim) -> (..., num_prototypes) logits."""
        x = F.normalize(self.mlp(x), dim=-1)
        return F.linear(x, F.normalize(self.prototypes, dim=-1))


# ----------------------------------------------------------------------------- segmentation

class MultiscaleLinearDecoder(nn.Module):
    """DINOv2's linear '+ms' head: patch features of several blocks resized to the finest grid,
    concatenated, BatchNorm, a 1x1 conv to class logits, bilinear upsampling to pixels."""

    def __init__(self, in_dims, num_classes):
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
        logits = self.classifier(self.bn(torch.cat(maps, dim=1)))
        if logits.shape[-2:] != tuple(out_size):
            logits = F.interpolate(logits, out_size, mode="bilinear", align_corners=False)
        return logits


DECODERS = {"linear": MultiscaleLinearDecoder}


class SegmentationModel(nn.Module):
    """A backbone, the outputs of its last `levels` blocks, and a decoder. With `frozen_backbone` the
    backbone runs without gradients in eval mode (a linear probe)."""

    def __init__(self, backbone, decoder, num_classes, levels=4, frozen_backbone=True):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"unknown decoder {decoder!r}; available: {', '.join(DECODERS)}")
        self.backbone, self.frozen_backbone = backbone, frozen_backbone
        dims = backbone.feature_dims(levels)
        self.levels = len(dims)
        self.decoder = DECODERS[decoder](dims, num_classes)
        self.backbone.requires_grad_(not frozen_backbone)
        if getattr(backbone, "mask_token", None) is not None:
            backbone.mask_token.requires_grad_(False)  # unused here; DDP rejects parameters without grads

    def train(self, mode=True):
        super().train(mode)
        if self.frozen_backbone:
            self.backbone.eval()  # no dropout/drop-path in a frozen feature extractor
        return self

    def forward(self, x):
        """(B, C, H, W) -> logits (B, K, H, W)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_backbone):
            features = self.backbone.intermediate_layers(x, self.levels)
        return self.decoder(features, x.shape[-2:])


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
