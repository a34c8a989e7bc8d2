"""DINOv2 pre-training (self-distillation: DINO on CLS tokens + iBOT on masked patches + KoLeo) of a
hyperspectral ViT, with HSI multi-crop.

    python pretrain_dino.py                                  # small real run on the bundled Indian Pines
    torchrun --nproc_per_node 2 pretrain_dino.py --out runs/dino2
    python pretrain_dino.py --data /data/WHU-OHS --size base --registers 4 --ffn swiglu --layerscale 1e-5 \\
        --drop-path 0.1 --prototypes 65536 --batch-size 128 --local-crops 8 --steps 100000 --out runs/dino_vitb
"""
import argparse
import copy
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import models
from models import DINOHead, build_backbone, linear_flops


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/indian_pines", help="scene folder or WHU-OHS root; comma-separate several")
    p.add_argument("--split", default="tr")
    p.add_argument("--backbone", default="vit", help="vit | ssvit (spatial-spectral ViT: DINO and iBOT on "
                   "both streams, averaged)")
    p.add_argument("--size", default="tiny", help=" | ".join(models.VIT_SIZES))
    p.add_argument("--img-size", type=int, default=64, help="tile and global-crop size")
    p.add_argument("--local-size", type=int, default=32)
    p.add_argument("--local-crops", type=int, default=4, help="local crops per tile (DINOv2: 8)")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--spectral-patch", type=int, default=None, help="ssvit: bands per spectral token (default 2)")
    p.add_argument("--registers", type=int, default=4, help="register tokens (per stream; the study: 4)")
    p.add_argument("--ffn", default="swiglu", choices=["mlp", "swiglu"])
    p.add_argument("--layerscale", type=float, default=0.0, help="LayerScale init, 0 = off; the study used 1e-5, "
                   "which keeps every residual branch ~0 (teacher targets uniform) for hundreds of steps")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    p.add_argument("--prototypes", type=int, default=1024, help="DINO prototypes (DINOv2: 65536; small on CPU)")
    p.add_argument("--head-hidden", type=int, default=2048)
    p.add_argument("--head-bottleneck", type=int, default=256)
    p.add_argument("--separate-ibot-head", action="store_true", help="iBOT gets its own head (default: shared)")
    p.add_argument("--centering", default="sinkhorn", choices=["sinkhorn", "center"],
                   help="teacher centering: Sinkhorn-Knopp (DINOv2) or running-mean softmax centering (DINO)")
    p.add_argument("--ibot-weight", type=float, default=1.0)
    p.add_argument("--koleo-weight", type=float, default=0.1)
    p.add_argument("--mask-ratio", type=float, nargs=2, default=(0.1, 0.5))
    p.add_argument("--mask-probability", type=float, default=0.5, help="share of images with masked patches (and, "
                   "for ssvit, drawn separately, with masked band groups)")
    p.add_argument("--student-temp", type=float, default=0.1)
    p.add_argument("--teacher-temp", type=float, default=0.07, help="lower it if training is unstable")
    p.add_argument("--warmup-teacher-temp", type=float, default=0.04)
    p.add_argument("--teacher-temp-warmup-steps", type=int, default=100)
    p.add_argument("--momentum", type=float, nargs=2, default=None, help="teacher EMA, cosine start/end. Default: "
                   "min(0.992, max(0.9, 1 - 2 ln(100) / steps)) -> 1, which leaves ~1%% of the random initial teacher in the "
                   "saved one (printed at start; the probe reads the teacher). DINOv2's 0.992 -> 1 is for 125k "
                   "iterations: over 300 steps it leaves ~30%%. Or probe the student (--init-weights student)")
    # The multi-crop (data.MultiCrop), every knob: DINOv2's values where they fit HSI, changed where they do not.
    p.add_argument("--global-scale", type=float, nargs=2, default=(0.32, 1.0), help="global crops' area range")
    p.add_argument("--local-scale", type=float, nargs=2, default=(0.05, 0.32), help="local crops' area range")
    p.add_argument("--brightness", type=float, default=0.2, help="illumination gain jitter (x 1 +- this) of "
                   "reflectance; scenes without a value_scale (sensor counts with an offset, e.g. the bundled "
                   "Indian Pines) get no spectral jitter, with a printed notice")
    p.add_argument("--contrast", type=float, default=0.2, help="contrast jitter around each band's tile mean")
    p.add_argument("--band-gain", type=float, default=0.05, help="per-band gain jitter (calibration, atmosphere)")
    p.add_argument("--jitter-spread", type=float, default=0.25, help="bound on the spectral jitter: no band's tile "
                   "mean moves by more than this share of its within-tile std (gains clipped per band), so the "
                   "student is not taught to ignore the spectral differences classes are made of (Indian Pines' "
                   "closest class means differ by 0.14-0.20 std per band). <= 0: unbounded")
    p.add_argument("--jitter-p", type=float, default=0.8, help="probability of the spectral jitter, per view")
    p.add_argument("--blur-sigma", type=float, nargs=2, default=None, help="Gaussian blur sigma range in pixels "
                   "(default: DINOv2's (0.1, 2.0) for 14 px patches, scaled to --patch-size: (0.057, 1.14) at 8)")
    p.add_argument("--blur-p", type=float, nargs=3, default=(1.0, 0.1, 0.5), help="blur probability of the first "
                   "global, second global and each local view (DINOv2's)")
    p.add_argument("--solarize-p", type=float, default=0.0, help="probability of solarizing the second global view "
                   "(DINOv2: 0.2). Off: it mirrors every normalised band about its mean, erasing whether a band "
                   "is above or below it, which is what land covers differ by")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per process (each gives 2 + --local-crops views)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--freeze-prototypes-steps", type=int, default=30, help="prototypes frozen at first (DINO: 1 epoch)")
    p.add_argument("--lr-scaling", default="linear", choices=["linear", "sqrt"], help="linear: lr = blr x global "
                   "batch / 256 (blr 2e-3 by default); sqrt: DINOv2's rule, lr = blr x sqrt(global batch / 1024) (blr "
                   "0.004 by default), for adaptive optimisers the rule that keeps the update noise level across "
                   "batch sizes: 4x the linear lr at batch 16, the same at 1024")
    p.add_argument("--blr", type=float, default=None, help="base lr for --lr-scaling (default: linear 2e-3, sqrt 0.004)")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--weight-decay", type=float, nargs=2, default=(0.04, 0.4), help="cosine start/end")
    p.add_argument("--clip-grad", type=float, default=3.0)
    p.add_argument("--device-augment", action=argparse.BooleanOptionalAction, default=None, help="multi-crop "
                   "batched on the device, the loader workers only cut raw windows (default: on with CUDA, off on "
                   "CPU); a GPU needs ~10x more tiles/s than CPU workers multi-crop")
    common.add_recipe_args(p)
    common.add_any_sensor_arg(p)
    common.add_scene_sampling_arg(p)
    common.add_run_args(p, out="runs/dino")
    # The patch presets; patch2's 32 px global crops take 16 px local crops (the same 1:2 ratio).
    args = common.parse_with_preset(p, argv, {"patch4": models.PRESETS["patch4"],
                                              "patch2": {**models.PRESETS["patch2"], "local_size": 16}})
    if args.blr is None:
        args.blr = {"linear": 2e-3, "sqrt": 4e-3}[args.lr_scaling]
    if args.momentum is None:
        args.momentum = (auto_momentum(args.steps), 1.0)
    if args.blur_sigma is None:
        args.blur_sigma = tuple(round(s * args.patch_size / 14, 4) for s in (0.1, 2.0))
    return args


def auto_momentum(steps, keep=0.01):
    """The start of a cosine momentum -> 1 schedule that leaves about `keep` of the initial teacher after
    `steps`: prod(m_t) ~ exp(-(1 - m0) steps / 2), capped at DINOv2's 0.992 for long runs and kept >= 0.9
    for very short ones (under ~90 steps the teacher then keeps more than `keep`)."""
    return round(min(0.992, max(0.9, 1 - 2 * math.log(1 / keep) / steps)), 4)


def multi_crop(args, datasets):
    """The multi-crop of the flags; prints which scenes get no spectral jitter (no value scale)."""
    crops = data.MultiCrop(args.img_size, args.local_size, args.local_crops, global_scale=tuple(args.global_scale),
                          local_scale=tuple(args.local_scale), brightness=args.brightness, contrast=args.contrast,
                          band_gain=args.band_gain, spread=args.jitter_spread if args.jitter_spread > 0 else None,
                          jitter_p=args.jitter_p, blur_sigma=tuple(args.blur_sigma),
                          global_blur_p=tuple(args.blur_p[:2]), local_blur_p=args.blur_p[2],
                          global_solarize_p=(0.0, args.solarize_p))
    data.jitter_notice(datasets, crops, common.print0)
    return crops


# ----------------------------------------------------------------------------- losses

@torch.no_grad()
def sinkhorn_knopp(logits, temp, iterations=3):
    """Teacher targets (n, K) whose rows sum to 1 and whose columns sum to n/K over all ranks: equal
    use of every prototype across the global batch (DINOv2/SwAV)."""
    logits = logits.float()  # a rank may have no rows (no masked token): it still joins every all-reduce
    shift = logits.max() if logits.numel() else logits.new_full((), float("-inf"))
    if dist.is_initialized():
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)  # one shift for all ranks, so it cancels out
    q = torch.exp((logits - shift) / temp).t()  # (K, n)
    K = q.shape[0]
    n = common.all_reduce_sum(torch.full((), float(q.shape[1]), device=q.device))
    q /= common.all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= common.all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= K
        q /= q.sum(dim=0, keepdim=True)
        q /= n
    return (q * n).t()


class Centering(nn.Module):
    """DINO's running-mean centering: softmax((t - center) / temp), center <- EMA of the batch mean."""

    def __init__(self, dim, momentum=0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def forward(self, logits, temp):
        probs = F.softmax((logits.float() - self.center) / temp, dim=-1)
        n = common.all_reduce_sum(torch.full((), float(logits.shape[0]), device=logits.device))
        mean = common.all_reduce_sum(logits.float().sum(0, keepdim=True)) / n.clamp(min=1)
        keep = torch.where(n > 0, self.momentum, 1.0)  # no rows on any rank: the centre stays
        self.center.mul_(keep).add_(mean * (1 - keep))
        return probs


def cross_entropy(student_logits, teacher_probs, temp):
    """Per-row -sum(p_teacher * log softmax(student / temp))."""
    return -(teacher_probs * F.log_softmax(student_logits.float() / temp, dim=-1)).sum(-1)


def gather_with_grad(x):
    """All ranks' rows, with gradients flowing to this rank's own rows only."""
    if not dist.is_initialized():
        return x, 0
    parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.cat(parts), dist.get_rank() * x.shape[0]


def koleo(features, eps=1e-8):
    """KoLeo regulariser: -mean log distance of each (L2-normalised) feature to its nearest neighbour,
    neighbours searched over the global batch so the loss does not depend on how it is split into ranks."""
    with torch.autocast(features.device.type, enabled=False):  # fp32 search and distances under autocast
        x = F.normalize(features.float(), dim=-1, eps=eps)
        everyone, offset = gather_with_grad(x)
        with torch.no_grad():
            sim = x @ everyone.t()
            sim.narrow(1, offset, len(x)).diagonal().fill_(-2)  # not itself
            nearest = sim.argmax(dim=1)
        return -torch.log((x - everyone[nearest]).norm(dim=-1) + eps).mean()


# ----------------------------------------------------------------------------- model

class Student(nn.Module):
    """Backbone + one DINO head (+ one iBOT head) per stream of the backbone (the ViT has one stream,
    the spatial-spectral ViT two). The teacher is an EMA copy of this module."""

    def __init__(self, backbone, dino_heads, ibot_heads=None):
        super().__init__()
        self.backbone, self.dino_heads = backbone, nn.ModuleList(dino_heads)
        self.ibot_heads = nn.ModuleList(ibot_heads) if ibot_heads else None

    def heads(self, tokens, masks):
        """Per stream: tokens (n, prefix + N, D), a TokenMask or None -> (CLS (n, D), DINO logits of the
        CLS (n, K), iBOT logits of the masked tokens (M, K) or None)."""
        out, P = [], self.backbone.num_prefix
        for s, (t, m) in enumerate(zip(tokens, masks)):
            ibot_head = (self.ibot_heads or self.dino_heads)[s]
            ibot = None if m is None else ibot_head(t[:, P:].flatten(0, 1).index_select(0, m.index))
            out.append((t[:, 0], self.dino_heads[s](t[:, 0]), ibot))
        return out

    def forward(self, global_crops, local_crops=None, masks=None):
        """global_crops (2B, C, G, G), local_crops (nB, C, L, L), a TokenMask (or None) per stream ->
        per stream: CLS features (2B, D), DINO logits of global (2B, K) and local (nB, K) CLS tokens,
        iBOT logits of masked tokens (M, K)."""
        masks = masks or [None] * len(self.dino_heads)
        out = self.heads(self.backbone.encode(global_crops, mask=[m and m.bool for m in masks]), masks)
        local = [None] * len(out)
        if local_crops is not None and len(local_crops):
            local = [head(t[:, 0]) for head, t in zip(self.dino_heads, self.backbone.encode(local_crops))]
        return [(cls, g, loc, ibot) for (cls, g, ibot), loc in zip(out, local)]


class DINOLoss(nn.Module):
    """DINOv2's objective with its normalisation, per stream and averaged over streams: DINO
    cross-entropy over (global teacher, other global student) and (global teacher, local student) pairs
    divided by the number of pairs, iBOT cross-entropy on masked tokens weighted 1 / (masked tokens of
    that image) and averaged over images, KoLeo on the student's global CLS features of each crop."""

    def __init__(self, args, num_prototypes, streams=("spatial",)):
        super().__init__()
        self.args, self.streams = args, streams
        if args.centering == "center":
            self.centers = nn.ModuleList(nn.ModuleDict({"dino": Centering(num_prototypes),
                                                        "ibot": Centering(num_prototypes)}) for _ in streams)

    def teacher_probs(self, logits, temp, stream, which):
        if self.args.centering == "sinkhorn":
            return sinkhorn_knopp(logits, temp)
        return self.centers[stream][which](logits, temp)

    def forward(self, student_out, teacher_out, masks, teacher_temp):
        loss, terms = 0.0, {}
        for s, name in enumerate(self.streams):
            stream_loss, stream_terms = self.stream_loss(s, student_out[s], teacher_out[s], masks[s], teacher_temp)
            loss = loss + stream_loss / len(self.streams)
            prefix = "" if len(self.streams) == 1 else f"{name}/"
            terms.update({prefix + k: v for k, v in stream_terms.items()})
        return loss, terms

    def stream_loss(self, stream, student_out, teacher_out, masks, teacher_temp):
        cls, s_global, s_local, s_ibot = student_out
        t_global, t_ibot = teacher_out
        a = self.args
        t_probs = self.teacher_probs(t_global, teacher_temp, stream, "dino")
        t_swapped = torch.cat(t_probs.chunk(2)[::-1])  # crop 1's student learns from crop 2's teacher
        n_local = 0 if s_local is None else s_local.shape[0] // (s_global.shape[0] // 2)
        pairs = 2 + 2 * n_local
        terms = {"dino_global": 2 * cross_entropy(s_global, t_swapped, a.student_temp).mean() / pairs}
        loss = terms["dino_global"]
        if n_local:
            local = sum(cross_entropy(s, t, a.student_temp).mean() for s in s_local.chunk(n_local)
                        for t in t_probs.chunk(2))
            terms["dino_local"] = local / pairs
            loss = loss + terms["dino_local"]
        if s_ibot is not None and a.ibot_weight:
            ce = cross_entropy(s_ibot, self.teacher_probs(t_ibot, teacher_temp, stream, "ibot"), a.student_temp)
            terms["ibot"] = (ce * masks.weight).sum() / masks.bool.shape[0]
            loss = loss + a.ibot_weight * terms["ibot"]
        if a.koleo_weight:
            terms["koleo"] = sum(koleo(c) for c in cls.chunk(2))
            loss = loss + a.koleo_weight * terms["koleo"]
        with torch.no_grad():  # diagnostics
            terms["teacher_entropy"] = -(t_probs * t_probs.clamp_min(1e-12).log()).sum(-1).mean()
            s_probs = F.softmax(s_global.float() / a.student_temp, dim=-1)
            terms["student_entropy"] = -(s_probs * s_probs.clamp_min(1e-12).log()).sum(-1).mean()
            terms["cls_std"] = F.normalize(cls.float(), dim=-1).std(0).mean()  # -> 0 on collapse
        return loss, terms


def build(args, in_chans, wavelengths=None, bands=None):
    if args.backbone not in ("vit", "ssvit"):
        raise ValueError(f"pretrain_dino.py trains vit or ssvit, not {args.backbone!r} (pre-train sst with "
                         "pretrain_mae.py: SimMIM)")
    backbone = build_backbone(args.backbone, args.size, in_chans, args.img_size, args.patch_size,
                              num_registers=args.registers, ffn=args.ffn, layerscale=args.layerscale or None,
                              drop_path_rate=args.drop_path, mask_token=True, spectral_patch=args.spectral_patch,
                              wavelengths=wavelengths, bands=bands, init=args.init_scheme, pos_embed=args.pos_embed)
    heads = lambda: [DINOHead(backbone.embed_dim, args.prototypes, args.head_hidden, args.head_bottleneck)  # noqa
                     for _ in backbone.streams]
    student = Student(backbone, heads(), heads() if args.separate_ibot_head else None)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return student, teacher.eval()  # eval: the teacher has no stochastic depth


def flops_per_tile(args, student):
    """Training FLOPs per tile, from the architecture: forward + backward (3 x forward) of the student on
    2 global and --local-crops local crops with its heads, and the teacher's forward on the 2 global
    crops; iBOT heads on the expected number of masked tokens."""
    bb, head = student.backbone, student.dino_heads[0]
    head_flops = sum(linear_flops(m, 1) for m in head.mlp if isinstance(m, nn.Linear)) + 2 * head.prototypes.numel()
    spectral = [bb.spectral.num_groups] if len(bb.streams) == 2 else []
    encode = lambda px: bb.flops((px // args.patch_size) ** 2, *spectral)  # noqa: E731
    tokens = [(args.img_size // args.patch_size) ** 2, *spectral]
    masked = args.mask_probability * sum(args.mask_ratio) / 2 * sum(tokens)  # per global crop
    streams, crops = len(bb.streams), 2 + args.local_crops
    student_flops = 2 * encode(args.img_size) + args.local_crops * encode(args.local_size) \
        + (crops * streams + 2 * masked) * head_flops
    teacher_flops = 2 * encode(args.img_size) + (2 * streams + 2 * masked) * head_flops
    embed = 2 * bb.embed_flops(tokens[0], *spectral) + args.local_crops * bb.embed_flops(
        (args.local_size // args.patch_size) ** 2, *spectral)  # no input gradient for the first layer
    return 3 * student_flops + teacher_flops - embed


@torch.no_grad()
def teacher_forward(teacher, global_crops, masks):
    """Per stream: DINO logits of the CLS tokens and iBOT logits of the tokens the student has masked."""
    return [(g, ibot) for _, g, ibot in teacher.heads(teacher.backbone.encode(global_crops), masks)]


def initial_teacher_share(momentum_schedule):
    """The weight of the initial (random) teacher in the teacher after the schedule: prod(momentum)."""
    return float(np.prod(momentum_schedule))


@torch.no_grad()
def ema_update(teacher, student, momentum):
    t, s = list(teacher.parameters()), list(student.parameters())
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1 - momentum)


class TokenMask(NamedTuple):
    """One stream's iBOT mask on the device: the (n, N) mask, the flat indices of its masked tokens (M,)
    and their loss weights (M,), 1 / (masked tokens of that image). M may be 0."""
    bool: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor


MASK_BLOCKS = 10  # rectangles tried per block mask (BEiT: 10 attempts per block)


def mask_counts(args, step, world, batch, backbone):
    """Per stream, how many tokens each crop of the step's global batch masks, (2, world * batch) crop-major:
    drawn on the host from (seed, step) alone, so one process and several mask the same crops, and the
    number of masked tokens is known without asking the device."""
    n, ratio, prob = world * batch, tuple(args.mask_ratio), args.mask_probability
    rng = np.random.default_rng((args.seed, 7, step))
    counts = [np.stack([data.ibot_mask_counts(n, math.prod(backbone.grid), rng, ratio, prob) for _ in range(2)])]
    if "spectral" in backbone.streams:
        rng = np.random.default_rng((args.seed, 8, step))
        counts.append(data.spectral_mask_counts(2 * n, backbone.spectral.num_groups, rng, ratio, prob).reshape(2, n))
    return counts


def token_masks(args, step, rank, world, batch, backbone, device):
    """This rank's iBOT masks for its 2 * batch global crops (crop-major), a TokenMask per stream: block
    masks over the patches (and random band groups for the spectral stream) built on the device from
    StepRandom rows of the global batch, with the counts of mask_counts. Always a TokenMask, even with no
    masked token on this rank, so that every rank runs the same iBOT path: the same collectives, the
    same loss terms, a (zero) gradient for the mask token and iBOT head."""
    rnd = data.StepRandom(args.seed, step, rank, world, batch, device, stream=7)
    out = []
    for s, counts in enumerate(mask_counts(args, step, world, batch, backbone)):
        mine = torch.from_numpy(counts[:, rank * batch:(rank + 1) * batch].reshape(-1))
        c = (mine.pin_memory() if device.type == "cuda" else mine).to(device, non_blocking=True)
        if s == 0:
            h, w = backbone.grid
            m = data.block_masks(c, h, w, rnd.views(2, MASK_BLOCKS, 4), rnd.views(2, h * w))
        else:
            m = data.random_subsets(c, rnd.views(2, backbone.spectral.num_groups))
        index = (~m).flatten().int().argsort(stable=True)[:int(mine.sum())]  # the masked tokens, in order
        out.append(TokenMask(m, index, (1 / c.clamp(min=1).float())[index // m.shape[1]]))
    return out


def main(argv=None):
    common.launch(train, parse_args(argv))


def train(args, rank, world, device):
    common.seed_everything(args.seed)  # the same initial student on every rank, so the same teacher copy
    dtype = common.resolve_dtype(args.dtype, device)
    ckpt_path = common.prepare_out_dir(args.out, args.resume)
    datasets = data.load_datasets(args.data, args.split, args.cache_dir, data.ANY_SENSOR if args.any_sensor else None)
    in_chans = data.check_same_bands(datasets, args.backbone)
    student, teacher = (m.to(device) for m in build(args, in_chans, datasets[0].input_wavelengths,
                                                                   data.bands_record(datasets)))
    common.seed_everything(args.seed, rank)  # then per-rank streams (stochastic depth)
    criterion = DINOLoss(args, args.prototypes, student.backbone.streams).to(device)
    lr = common.scaled_lr(args.blr, args.batch_size, world, rule=args.lr_scaling)
    common.print0(f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M student params | {in_chans} bands | "
                  f"lr {lr:.2e} ({args.lr_scaling} scaling of blr {args.blr}, global batch {args.batch_size * world}) | "
                  f"{dtype} on {device}")
    optimizer = common.adamw(common.decay_groups(student, args.weight_decay[0]), lr, (0.9, 0.999), device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    sched = {"lr": common.cosine_schedule(lr, args.min_lr, args.steps, args.warmup_steps),
             "wd": common.cosine_schedule(args.weight_decay[0], args.weight_decay[1], args.steps),
             "momentum": common.cosine_schedule(args.momentum[0], args.momentum[1], args.steps),
             "teacher_temp": np.concatenate([np.linspace(args.warmup_teacher_temp, args.teacher_temp,
                                                         args.teacher_temp_warmup_steps),
                                             np.full(args.steps, args.teacher_temp)])[:args.steps]}
    common.print0(f"teacher momentum {args.momentum[0]} -> {args.momentum[1]} (cosine over {args.steps} steps): the "
                  f"final teacher keeps {initial_teacher_share(sched['momentum']):.1%} of its random initialisation")
    state = dict(student=student, teacher=teacher, criterion=criterion, optimizer=optimizer, scaler=scaler)
    start = common.resume(ckpt_path, rank, student.backbone.config, **state) if args.resume else 0
    # The mask token and iBOT head get a gradient every step (zero without masked tokens): DDP needs no
    # unused-parameter search, unless the iBOT loss is off.
    ddp = common.wrap_ddp(student, world, find_unused_parameters=args.separate_ibot_head and not args.ibot_weight)
    ddp = torch.compile(ddp) if args.compile else ddp
    teacher_fn = torch.compile(teacher_forward) if args.compile else teacher_forward
    crops = multi_crop(args, datasets)
    on_device = args.device_augment if args.device_augment is not None else device.type == "cuda"
    batches = data.augmented_batches(datasets, args.img_size, crops, args.seed, args.batch_size, start, rank, world,
                                     args.workers, device, on_device, args.scene_sampling)
    peak, source = common.peak_tflops(device, dtype)
    flops = flops_per_tile(args, student)
    common.print0(f"{flops / 1e9:.2f} GFLOP per tile (training) | peak {peak or 0:.1f} TFLOP/s ({source})")
    logger = common.Logger(args.out, args, start, flops, peak)
    meters, checkpoints = common.Meters(), common.Checkpoints(args, args.steps, device)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not common.is_main())
    for step in bar:
        with common.no_host_sync(args.sync_debug, device):
            g, loc = next(batches)  # crop-major (2B, C, G, G), (nB, C, L, L)
            masks = token_masks(args, step, rank, world, args.batch_size, student.backbone, device)
            common.set_lr(optimizer, sched["lr"][step])
            optimizer.param_groups[0]["weight_decay"] = sched["wd"][step]  # the decayed group
            temp = float(sched["teacher_temp"][step])
            with common.autocast(device, dtype):
                teacher_out = teacher_fn(teacher, g, masks)
                loss, terms = criterion(ddp(g, loc, masks), teacher_out, masks, temp)
            scaler.scale(loss).backward()
            if step < args.freeze_prototypes_steps:
                for head in [*student.dino_heads, *(student.ibot_heads or [])]:
                    head.prototypes.grad = None
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(student.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            ema_update(teacher, student, float(sched["momentum"][step]))
            meters.add(loss=loss, **terms)
        done = step + 1
        save, stop = checkpoints.due(done)
        if save or done % args.log_every == 0:
            stats = {**meters.flush(done, ckpt_path), **{k: float(v[step]) for k, v in sched.items()}}
            stats = logger.scalars(done, stats, images=args.batch_size * world)
            std = min(v for k, v in stats.items() if k.endswith("cls_std"))
            bar.set_postfix(loss=f"{stats['loss']:.3f}", std=f"{std:.3f}", mfu=f"{stats.get('mfu', 0):.1%}")
        if save:
            common.save_checkpoint(ckpt_path, done, args, student.backbone.config, ("teacher", "backbone."), **state)
        if stop:
            checkpoints.report(done, ckpt_path)
            break
    logger.close()
    if not common.STOP["stopped"]:
        common.print0(f"done: {args.steps} steps, checkpoint {ckpt_path} (teacher backbone for fine-tuning)")


if __name__ == "__main__":
    common.run_cli(main)
