"""DINOv2 pre-training (DINO on CLS tokens, iBOT on masked patches, KoLeo) of a hyperspectral ViT, HSI multi-crop.

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

# DINOv2's constants (facebookresearch/dinov2 ssl_default_config.yaml), and the bound on the spectral jitter.
STUDENT_TEMP, IBOT_WEIGHT, KOLEO_WEIGHT = 0.1, 1.0, 0.1
CLIP_GRAD, MIN_LR = 3.0, 1e-6
MASK_PROBABILITY = 0.5  # share of global crops with masked patches (for ssvit, drawn apart, band groups too)
JITTER_SPREAD = 0.25  # no band's tile mean moves by more than this share of its within-tile std
MASK_BLOCKS = 10  # rectangles tried per block mask (BEiT: 10 attempts per block)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/indian_pines", help="scene folder or WHU-OHS root; comma-separate several")
    p.add_argument("--backbone", default="vit", help="vit | ssvit (spatial-spectral ViT: losses of both streams)")
    p.add_argument("--size", default="tiny", help=" | ".join(models.VIT_SIZES))
    p.add_argument("--img-size", type=int, default=64, help="tile and global-crop size")
    p.add_argument("--local-crops", type=int, default=4, help="local crops per tile (DINOv2: 8)")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--spectral-patch", type=int, default=None, help="ssvit: bands per spectral token (default 2)")
    p.add_argument("--registers", type=int, default=4, help="register tokens (per stream; the study: 4)")
    p.add_argument("--ffn", default="swiglu", choices=["mlp", "swiglu"])
    p.add_argument("--layerscale", type=float, default=0.0, help="LayerScale init, 0 = off (the study: 1e-5)")
    p.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    p.add_argument("--prototypes", type=int, default=1024, help="DINO prototypes (DINOv2: 65536; small on CPU)")
    p.add_argument("--mask-ratio", type=float, nargs=2, default=(0.1, 0.5))
    p.add_argument("--teacher-temp", type=float, default=0.07, help="lower it if training is unstable")
    p.add_argument("--warmup-teacher-temp", type=float, default=0.04)
    p.add_argument("--teacher-temp-warmup-steps", type=int, default=100)
    p.add_argument("--momentum", type=float, nargs=2, default=None, help="teacher EMA, cosine start/end (default: "
                   "a start in [0.9, 0.992] set by --steps, -> 1; DINOv2's 0.992 -> 1 is for 125k steps)")
    p.add_argument("--global-scale", type=float, nargs=2, default=(0.32, 1.0), help="global crops' area range")
    p.add_argument("--local-scale", type=float, nargs=2, default=(0.05, 0.32), help="local crops' area range")
    p.add_argument("--brightness", type=float, default=0.2, help="illumination gain jitter (x 1 +- this)")
    p.add_argument("--contrast", type=float, default=0.2, help="contrast jitter around each band's tile mean")
    p.add_argument("--band-gain", type=float, default=0.05, help="per-band gain jitter (calibration, atmosphere)")
    p.add_argument("--solarize-p", type=float, default=0.0, help="probability of solarising the second global view "
                   "(DINOv2: 0.2; off: it erases whether a band is above or below its mean)")
    p.add_argument("--batch-size", type=int, default=16, help="tiles per process (each gives 2 + --local-crops views)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--lr-scaling", default="linear", choices=["linear", "sqrt"], help="lr = blr x global batch / 256, "
                   "or blr x sqrt(global batch / 1024) (DINOv2's rule)")
    p.add_argument("--blr", type=float, default=None, help="base lr (default: linear 2e-3, sqrt 4e-3)")
    p.add_argument("--weight-decay", type=float, nargs=2, default=(0.04, 0.4), help="cosine start/end")
    p.add_argument("--device-augment", action=argparse.BooleanOptionalAction, default=None, help="multi-crop on the "
                   "device, the loader only cuts windows (default: with CUDA: CPU workers cannot feed a GPU)")
    p.add_argument("--any-sensor", action="store_true", help="resample every scene onto data.GRID (any sensor)")
    common.add_run_args(p, out="runs/dino")
    args = common.parse_with_preset(p, argv, {k: models.PRESETS[k] for k in ("patch4", "patch2")})
    if args.blr is None:
        args.blr = {"linear": 2e-3, "sqrt": 4e-3}[args.lr_scaling]
    if args.momentum is None:  # leaves prod(m_t) ~ exp(-(1 - m0) steps / 2) = 1% of the random teacher
        args.momentum = (round(min(0.992, max(0.9, 1 - 2 * math.log(100) / args.steps)), 4), 1.0)
    return args


def multi_crop(args, datasets):
    """Local crops half the global size (DINOv2: 98 of 224 px); DINOv2's blur sigmas for 14 px patches scaled."""
    crops = data.MultiCrop(args.img_size, args.img_size // 2, args.local_crops, global_scale=tuple(args.global_scale),
                          local_scale=tuple(args.local_scale), brightness=args.brightness, contrast=args.contrast,
                          band_gain=args.band_gain, spread=JITTER_SPREAD, global_solarize_p=(0.0, args.solarize_p),
                          blur_sigma=tuple(round(s * args.patch_size / 14, 4) for s in (0.1, 2.0)))
    data.jitter_notice(datasets, crops, common.print0)
    return crops


@torch.no_grad()
def sinkhorn_knopp(logits, temp, iterations=3):
    """Teacher targets (n, K): rows sum to 1, columns to n/K over all ranks (every prototype used equally)."""
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


def cross_entropy(student_logits, teacher_probs, temp):
    return -(teacher_probs * F.log_softmax(student_logits.float() / temp, dim=-1)).sum(-1)


def koleo(features, eps=1e-8):
    """-mean log distance of each normalised feature to its nearest neighbour in the global batch."""
    with torch.autocast(features.device.type, enabled=False):  # fp32 search and distances under autocast
        x = F.normalize(features.float(), dim=-1, eps=eps)
        everyone, offset = x, 0
        if dist.is_initialized():  # every rank's rows; gradients flow to this rank's own only
            parts = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, x.detach().contiguous())
            parts[dist.get_rank()] = x
            everyone, offset = torch.cat(parts), dist.get_rank() * x.shape[0]
        with torch.no_grad():
            sim = x @ everyone.t()
            sim.narrow(1, offset, len(x)).diagonal().fill_(-2)  # not itself
            nearest = sim.argmax(dim=1)
        return -torch.log((x - everyone[nearest]).norm(dim=-1) + eps).mean()


class Student(nn.Module):
    """Backbone + one DINO head per stream (ssvit has two), shared by DINO and iBOT as in DINOv2."""

    def __init__(self, backbone, dino_heads):
        super().__init__()
        self.backbone, self.dino_heads = backbone, nn.ModuleList(dino_heads)

    def heads(self, tokens, masks):
        """Per stream: tokens (n, prefix + N, D), TokenMask or None -> (CLS, its DINO logits, iBOT logits or None)."""
        out, P = [], self.backbone.num_prefix
        for s, (t, m) in enumerate(zip(tokens, masks)):
            ibot = None if m is None else self.dino_heads[s](t[:, P:].flatten(0, 1).index_select(0, m.index))
            out.append((t[:, 0], self.dino_heads[s](t[:, 0]), ibot))
        return out

    def forward(self, global_crops, local_crops=None, masks=None):
        """global_crops (2B, C, G, G), local_crops (nB, C, L, L), a TokenMask or None per stream -> per stream:
        CLS (2B, D), DINO logits of global (2B, K) and local (nB, K) CLS tokens, iBOT logits (M, K)."""
        masks = masks or [None] * len(self.dino_heads)
        out = self.heads(self.backbone.encode(global_crops, mask=[m and m.bool for m in masks]), masks)
        local = [None] * len(out)
        if local_crops is not None and len(local_crops):
            local = [head(t[:, 0]) for head, t in zip(self.dino_heads, self.backbone.encode(local_crops))]
        return [(cls, g, loc, ibot) for (cls, g, ibot), loc in zip(out, local)]


class DINOLoss(nn.Module):
    """DINOv2's objective and normalisation, averaged over streams: DINO over (teacher, student) crop pairs / pairs,
    iBOT on masked tokens weighted 1 / (that image's masked tokens), KoLeo on each global crop's CLS."""

    def __init__(self, streams=("spatial",)):
        super().__init__()
        self.streams = streams

    def forward(self, student_out, teacher_out, masks, teacher_temp):
        loss, terms = 0.0, {}
        for s, name in enumerate(self.streams):
            stream_loss, stream_terms = self.stream_loss(student_out[s], teacher_out[s], masks[s], teacher_temp)
            loss = loss + stream_loss / len(self.streams)
            prefix = "" if len(self.streams) == 1 else f"{name}/"
            terms.update({prefix + k: v for k, v in stream_terms.items()})
        return loss, terms

    def stream_loss(self, student_out, teacher_out, masks, teacher_temp):
        cls, s_global, s_local, s_ibot = student_out
        t_global, t_ibot = teacher_out
        t_probs = sinkhorn_knopp(t_global, teacher_temp)
        t_swapped = torch.cat(t_probs.chunk(2)[::-1])  # crop 1's student learns from crop 2's teacher
        n_local = 0 if s_local is None else s_local.shape[0] // (s_global.shape[0] // 2)
        pairs = 2 + 2 * n_local
        terms = {"dino_global": 2 * cross_entropy(s_global, t_swapped, STUDENT_TEMP).mean() / pairs}
        if n_local:
            terms["dino_local"] = sum(cross_entropy(s, t, STUDENT_TEMP).mean() for s in s_local.chunk(n_local)
                                      for t in t_probs.chunk(2)) / pairs
        if s_ibot is not None:
            ce = cross_entropy(s_ibot, sinkhorn_knopp(t_ibot, teacher_temp), STUDENT_TEMP)
            terms["ibot"] = (ce * masks.weight).sum() / masks.bool.shape[0]
        terms["koleo"] = sum(koleo(c) for c in cls.chunk(2))
        loss = (terms["dino_global"] + terms.get("dino_local", 0) + IBOT_WEIGHT * terms.get("ibot", 0)
                + KOLEO_WEIGHT * terms["koleo"])
        with torch.no_grad():  # diagnostics
            terms["teacher_entropy"] = -(t_probs * t_probs.clamp_min(1e-12).log()).sum(-1).mean()
            s_probs = F.softmax(s_global.float() / STUDENT_TEMP, dim=-1)
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
                              wavelengths=wavelengths, bands=bands)
    student = Student(backbone, [DINOHead(backbone.embed_dim, args.prototypes) for _ in backbone.streams])
    return student, copy.deepcopy(student).requires_grad_(False).eval()  # the teacher: no stochastic depth


def flops_per_tile(args, student):
    """Training FLOPs per tile: student forward + backward (3x) on every crop, teacher forward on the global ones."""
    bb, head = student.backbone, student.dino_heads[0]
    head_flops = sum(linear_flops(m, 1) for m in head.mlp if isinstance(m, nn.Linear)) + 2 * head.prototypes.numel()
    spectral = [bb.spectral.num_groups] if len(bb.streams) == 2 else []
    encode = lambda px: bb.flops((px // args.patch_size) ** 2, *spectral)  # noqa: E731
    tokens = [(args.img_size // args.patch_size) ** 2, *spectral]
    masked = MASK_PROBABILITY * sum(args.mask_ratio) / 2 * sum(tokens)  # per global crop
    streams, crops = len(bb.streams), 2 + args.local_crops
    student_flops = 2 * encode(args.img_size) + args.local_crops * encode(args.img_size // 2) \
        + (crops * streams + 2 * masked) * head_flops
    teacher_flops = 2 * encode(args.img_size) + (2 * streams + 2 * masked) * head_flops
    embed = 2 * bb.embed_flops(tokens[0], *spectral) + args.local_crops * bb.embed_flops(
        (args.img_size // 2 // args.patch_size) ** 2, *spectral)  # no input gradient for the first layer
    return 3 * student_flops + teacher_flops - embed


@torch.no_grad()
def teacher_forward(teacher, global_crops, masks):
    """Per stream: DINO logits of the CLS tokens and iBOT logits of the tokens the student has masked."""
    return [(g, ibot) for _, g, ibot in teacher.heads(teacher.backbone.encode(global_crops), masks)]


def initial_teacher_share(momentum_schedule):
    """The weight of the initial (random) teacher in the teacher after the schedule: prod(momentum)."""
    return float(np.prod(momentum_schedule))


class TokenMask(NamedTuple):
    """One stream's iBOT mask: (n, N) bool, the flat indices of the M masked tokens, their weights (M may be 0)."""
    bool: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor


def mask_counts(args, step, world, batch, backbone):
    """Per stream, (2, world * batch) crop-major masked-token counts, drawn on the host from (seed, step): any
    process count masks the same crops, and the host knows the counts without a device sync."""
    n, ratio, prob = world * batch, tuple(args.mask_ratio), MASK_PROBABILITY
    rng = np.random.default_rng((args.seed, 7, step))
    counts = [np.stack([data.ibot_mask_counts(n, math.prod(backbone.grid), rng, ratio, prob) for _ in range(2)])]
    if "spectral" in backbone.streams:
        rng = np.random.default_rng((args.seed, 8, step))
        counts.append(data.spectral_mask_counts(2 * n, backbone.spectral.num_groups, rng, ratio, prob).reshape(2, n))
    return counts


def token_masks(args, step, rank, world, batch, backbone, device):
    """This rank's TokenMask per stream (block masks; band groups for the spectral stream), even with no masked
    token: every rank runs the same collectives, and DDP sees a (zero) gradient for the mask token and iBOT head."""
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
    datasets = data.load_datasets(args.data, band_info=data.ANY_SENSOR if args.any_sensor else None)
    in_chans = data.check_same_bands(datasets, args.backbone)
    student, teacher = (m.to(device) for m in build(args, in_chans, datasets[0].input_wavelengths,
                                                                   data.bands_record(datasets)))
    common.seed_everything(args.seed, rank)  # then per-rank streams (stochastic depth)
    criterion = DINOLoss(student.backbone.streams).to(device)
    lr = common.scaled_lr(args.blr, args.batch_size, world, rule=args.lr_scaling)
    common.print0(f"{sum(p.numel() for p in student.parameters()) / 1e6:.1f}M student params | {in_chans} bands | "
                  f"lr {lr:.2e} ({args.lr_scaling} scaling of blr {args.blr}, global batch "
                  f"{args.batch_size * world}) | {dtype} on {device}")
    optimizer = common.adamw(common.decay_groups(student, args.weight_decay[0]), lr, (0.9, 0.999), device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    warm_temps = np.linspace(args.warmup_teacher_temp, args.teacher_temp, args.teacher_temp_warmup_steps)
    sched = {"lr": common.cosine_schedule(lr, MIN_LR, args.steps, args.warmup_steps),
             "wd": common.cosine_schedule(args.weight_decay[0], args.weight_decay[1], args.steps),
             "momentum": common.cosine_schedule(args.momentum[0], args.momentum[1], args.steps),
             "teacher_temp": np.concatenate([warm_temps, np.full(args.steps, args.teacher_temp)])[:args.steps]}
    common.print0(f"teacher momentum {args.momentum[0]} -> {args.momentum[1]} (cosine over {args.steps} steps): the "
                  f"final teacher keeps {initial_teacher_share(sched['momentum']):.1%} of its random initialisation")
    state = dict(student=student, teacher=teacher, criterion=criterion, optimizer=optimizer, scaler=scaler)
    start = common.resume(ckpt_path, rank, student.backbone.config, **state) if args.resume else 0
    ddp = common.wrap_ddp(student, world)
    ddp = torch.compile(ddp) if args.compile else ddp
    teacher_fn = torch.compile(teacher_forward) if args.compile else teacher_forward
    on_device = device.type == "cuda" if args.device_augment is None else args.device_augment
    batches = data.augmented_batches(datasets, args.img_size, multi_crop(args, datasets), args.seed, args.batch_size,
                                     start, rank, world, args.workers, device, on_device)
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
            with common.autocast(device, dtype):
                teacher_out = teacher_fn(teacher, g, masks)
                loss, terms = criterion(ddp(g, loc, masks), teacher_out, masks, float(sched["teacher_temp"][step]))
            scaler.scale(loss).backward()
            if step < args.warmup_steps:  # prototypes frozen while the lr warms up (DINO: the first epoch)
                for head in student.dino_heads:
                    head.prototypes.grad = None
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(student.parameters(), CLIP_GRAD)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            common.ema_update(teacher, student, float(sched["momentum"][step]))
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
