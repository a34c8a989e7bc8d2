"""Semantic segmentation on top of a (pre-)trained backbone: a linear probe (frozen backbone, the default)
or full fine-tuning (`--finetune`).

    python finetune_seg.py --init runs/demo_mae/ckpt.pt --out runs/probe        # bundled scene, 10% labels
    python finetune_seg.py --backbone pixel --out runs/pixel                     # per-pixel linear baseline
    python finetune_seg.py --init runs/mae_vitb/ckpt.pt --data /data/WHU-OHS --eval-every 2000 --out runs/whu
    python finetune_seg.py --init runs/contrast/ckpt.pt --preset leekwon --lr 0.3 --out runs/cd     # Lee & Kwon
Scenes: trains on a seeded sparse-label split (saved as <out>/split.npz) and reports the held-out pixels.
WHU-OHS: trains on `tr`, evaluates on `val` and keeps the best checkpoint as <out>/best.pt.
"""
import argparse
import copy
import json
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
import models
from data import IGNORE_INDEX
from models import SegmentationModel, layer_ids
from segmentation import (add_backbone_args, add_split_args, colourise, evaluate, format_table, fully_convolutional,
                          load_backbone, read_init, split_scene)

AUX_WEIGHT = 0.4  # DeepLabV3+'s auxiliary FCN head (mmseg's recipe)
# Lee & Kwon's transfer of a cross-domain CNN: SGD with momentum 0.9, lr x0.1 at 60% and 80% of 100 steps
# (the `step` schedule), 24 px tiles; the gradient clipping is ours (without it the new layers diverge).
# Without the preset: AdamW and the poly schedule of segmentation (warm-up, then (1 - t)^0.9).
PRESETS = {**models.PRESETS, "leekwon": dict(weight_decay=0.005, steps=100, warmup_steps=0, img_size=24,
                                             batch_size=8, clip_grad=1.0, eval_every=100)}  # and SGD, `step`


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/indian_pines", help="a scene folder or a WHU-OHS root")
    add_backbone_args(p)
    p.add_argument("--decoder", default="linear", choices=list(models.DECODERS), help="linear: multiscale linear "
                   "head on the last 4 blocks; conv: UNet-like on 4 blocks; segmenter: mask transformer; "
                   "deeplabv3plus: with --backbone resnet50v1c (the CNN baseline)")
    p.add_argument("--full-res", action=argparse.BooleanOptionalAction, default=True, help="the full-resolution "
                   "path: a per-pixel linear classifier on each pixel's spectrum joins the decoder's logits; "
                   "--no-full-res: the study's heads")
    p.add_argument("--finetune", action="store_true", help="train the backbone too (default: frozen, a probe)")
    p.add_argument("--backbone-lr-scale", type=float, default=0.1, help="backbone lr = lr x this, with --finetune")
    p.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise lr decay of transformer backbones "
                   "with --finetune (block i: lr x decay^(depth + 1 - i)); 0.65-0.75 is usual for ViT-B")
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth of the backbone (default: the "
                   "checkpoint's, else 0)")
    p.add_argument("--pca", type=int, default=None, help="train on the first K principal components of the bands "
                   "(fitted on the training pixels only), as the study's proof of concept")
    add_split_args(p)
    p.add_argument("--batch-size", type=int, default=16, help="per process (also for evaluation)")
    p.add_argument("--steps", type=int, default=1000, help="where the per-pixel model's curve flattens on Indian "
                   "Pines (300 steps left it below the per-pixel probe; results/ip_steps.md)")
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--clip-grad", type=float, default=0.0, help="max grad norm; 0 = off")
    p.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (and at the end)")
    p.add_argument("--semi", type=float, default=0.0, help="semi-supervised: weight of the loss on unlabelled tiles "
                   "of the whole scene, where an EMA teacher's confident predictions on a flipped tile teach the "
                   "student a CutMix of two tiles; 0 = supervised only")
    p.add_argument("--semi-threshold", type=float, default=0.9, help="with --semi: pixels the teacher predicts with "
                   "less confidence teach nothing")
    p.add_argument("--semi-rampup", type=int, default=0, help="with --semi: steps over which its weight grows "
                   "linearly from 0")
    p.add_argument("--semi-mix", default="cutmix", choices=["cutmix", "classmix"], help="with --semi: what of the "
                   "next tile the strong view pastes in: a box of half the side (CutMix), or the pixels of a random "
                   "half of the classes the teacher predicts there (ClassMix)")
    common.add_run_args(p, out="runs/seg")
    return common.parse_with_preset(p, argv, PRESETS)


def build_model(args, ds, ckpt):
    """The segmentation model of the flags on the backbone of `ckpt` (or a random one). Lee & Kwon's
    transfer of a cross-domain CNN: a new first layer for this scene and a new classifier, both
    N(0, 0.001), and the whole model trained (param_groups gives the new layers 10x the trunk's lr)."""
    backbone = load_backbone(args, ds, ckpt, drop_path_rate=args.drop_path)
    cdcnn = backbone.config["name"] == "cdcnn"
    model = SegmentationModel(backbone, args.decoder, ds.num_classes, frozen_backbone=not (args.finetune or cdcnn),
                              full_res=args.full_res)
    if cdcnn:
        for new in (backbone.first[ds.name], model.decoder.classifier):
            nn.init.normal_(new.weight, std=0.001)
            nn.init.zeros_(new.bias)
    return model


def splits(args, ds, band_info, out, resume):
    """(training dataset, evaluation dataset, evaluation label mask or None, kept classes or None)."""
    if ds.kind == "whu":
        return ds, data.load_dataset(args.data, "val", band_info=band_info), None, None
    split_path = os.path.join(out, "split.npz")
    if resume:
        train, test, info = data.load_split(split_path, ds.rasters[0].image.shape[1:])
        classes = info.get("classes")
        ds = ds if classes is None else data.select_classes(ds, classes)
    else:
        ds, train, test, classes, info = split_scene(args, ds)
        if common.is_main():
            data.save_split(split_path, train, test, **info)
    kept = "" if classes is None else f" of the {len(classes)} classes with >= {args.min_class_pixels} px"
    common.print0(f"{ds.name}: {int(train.sum())} training / {int(test.sum())} held-out labelled pixels{kept}")
    return data.with_labels(ds, train), ds, test, classes


def param_groups(args, model):
    """Decoder at lr; backbone at lr x --backbone-lr-scale, and with --layer-decay each transformer
    layer at a further decay^(depth + 1 - layer). A cross-domain CNN's new first layer is a new layer too:
    it learns with the decoder (10x the transferred trunk at the default scale 0.1)."""
    groups = common.decay_groups(model.head_modules(), args.weight_decay)
    if model.backbone.config["name"] == "cdcnn":  # its new first layer learns with the decoder (10x the trunk)
        return (groups + common.decay_groups(model.backbone.first, args.weight_decay)
                + common.decay_groups(model.backbone.trunk, args.weight_decay, args.backbone_lr_scale))
    if args.layer_decay == 1.0 or not hasattr(model.backbone, "streams") or not model.backbone.streams:
        return groups + common.decay_groups(model.backbone, args.weight_decay, args.backbone_lr_scale)
    ids, top = layer_ids(model.backbone)
    for layer in range(top + 1):
        params = [p for n, p in model.backbone.named_parameters() if ids[n] == layer]
        scale = args.backbone_lr_scale * args.layer_decay ** (top - layer)
        groups += common.decay_groups(params, args.weight_decay, scale)
    return groups


def add_pca(args, train_ds, eval_ds, train_mask):
    """Fit the band PCA on the training pixels and apply it to both datasets; returns the projection."""
    projection, explained = data.fit_pca(train_ds, args.pca, train_mask, seed=args.split_seed)
    train_ds.pca = eval_ds.pca = projection
    common.print0(f"PCA: {train_ds.raw_bands} bands -> {args.pca} components explaining "
                  f"{100 * explained.sum():.1f}% of the variance of the training pixels")
    return projection


# ----------------------------------------------------------------------------- semi-supervised (--semi)

TEACHER_MOMENTUM = 0.99  # Mean Teacher's EMA of the student
CUTMIX_BOX = 0.5         # side of the pasted box, as a share of the tile's (CutMix-Seg)


def cutmix_masks(u, size):
    """(B, 1, size, size) bool: per sample one square box of side CUTMIX_BOX x size at the uniforms u (B, 2)."""
    side = max(1, int(round(CUTMIX_BOX * size)))
    y0, x0 = ((u * (size - side + 1)).floor().long()).unbind(1)
    r = torch.arange(size, device=u.device)
    rows = (r >= y0[:, None]) & (r < y0[:, None] + side)
    cols = (r >= x0[:, None]) & (r < x0[:, None] + side)
    return (rows[:, :, None] & cols[:, None, :])[:, None]


def classmix_masks(pred, u):
    """(B, 1, H, W) bool: per sample the pixels of the next sample whose class in `pred` (B, H, W) is among a
    random half (rounded up) of the classes it holds, picked by the uniforms u (B, K) (ClassMix)."""
    nxt = pred.roll(-1, 0).flatten(1)
    present = F.one_hot(nxt, u.shape[1]).amax(1).bool()
    rank = torch.where(present, u, 2.0).argsort(1).argsort(1)  # the present classes first, in random order
    chosen = rank < (present.sum(1, keepdim=True) + 1) // 2
    return chosen.gather(1, nxt).view_as(pred)[:, None]


def cutmix(t, mask):
    """Where each sample's mask is set, the next sample of the batch (the last one takes the first's): (B, ...)."""
    return torch.where(mask, t.roll(-1, 0), t)


def semi_loss(student_logits, teacher_probs, threshold):
    """Cross-entropy to the teacher's most likely class where its confidence reaches `threshold`; the
    other pixels contribute 0 but still count in the mean (UniMatch's normalisation), so a teacher that is
    rarely confident teaches little. -> (loss, share of confident pixels)."""
    confidence, target = teacher_probs.max(1)
    keep = (confidence >= threshold).float()
    ce = F.cross_entropy(student_logits.float(), target, reduction="none")
    return (ce * keep).mean(), keep.mean()


@torch.no_grad()
def semi_views(teacher, x_u, rnd, mix="cutmix"):
    """The weak view x_u (B, C, H, W) (flipped tiles) -> the strong view (each tile with part of the next one
    pasted in: `mix`) and the teacher's class probabilities on the weak view mixed the same way."""
    probs = teacher(x_u).float().softmax(1)
    mask = (cutmix_masks(rnd.uniform(2), x_u.shape[-1]) if mix == "cutmix"
            else classmix_masks(probs.argmax(1), rnd.uniform(probs.shape[1])))
    return cutmix(x_u, mask), cutmix(probs, mask)


def split_logits(logits, n):
    """The first n samples' logits and the rest's main logits (DeepLabV3+ in training: (main, auxiliary);
    the auxiliary head learns from labels only)."""
    if isinstance(logits, tuple):
        return tuple(t[:n] for t in logits), logits[0][n:]
    return logits[:n], logits[n:]


def segmentation_loss(logits, target):
    """Cross-entropy over labelled pixels; logits may be (main, auxiliary) (DeepLabV3+ in training)."""
    if isinstance(logits, tuple):
        return segmentation_loss(logits[0], target) + AUX_WEIGHT * segmentation_loss(logits[1], target)
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)


def train_flops(model, bands, args, device):
    """Training FLOPs per labelled image, counted by torch.utils.flop_counter on one step of a copy of the
    model (decoders and the CNN make an architecture formula long; the copy keeps BatchNorm statistics).
    With --semi also the student's step on a strong view and the teacher's forward on a weak one; and
    the ratio to a supervised step."""
    copy_ = copy.deepcopy(model).train()
    x = torch.zeros(2, bands, args.img_size, args.img_size, device=device)
    y = torch.zeros(2, args.img_size, args.img_size, dtype=torch.long, device=device)
    step = common.counted_flops(lambda: segmentation_loss(copy_(x), y).backward()) / 2
    if not args.semi:
        return step, 1.0
    with torch.no_grad():
        teacher = common.counted_flops(lambda: copy_.eval()(x)) / 2
    return 2 * step + teacher, 2 + teacher / step


def log_evaluation(logger, model, eval_ds, mask, args, device, dtype, step):
    """Evaluate, sharded over the ranks with rank 0's BatchNorm statistics, the confusion matrices summed:
    every rank gets the same metrics, so all take the same best-checkpoint decision (a collective save);
    log metrics and the first map."""
    common.broadcast_buffers(model)
    pictures = []

    def keep_first(r, pred, labels):
        if r == 0:
            pictures.append(np.concatenate([colourise(labels), colourise(pred)], axis=1))
    window = None if fully_convolutional(model.backbone.config) else args.img_size  # whole scene: no tile borders
    m = evaluate(model, eval_ds, window, args.img_size // 4, args.batch_size, device, dtype, mask, keep_first,
                 shard=True)
    logger.scalars(step, {**{f"eval/{k}": m[k] for k in ("oa", "aa", "miou", "miou_present", "kappa")},
                          "eval/boundary_oa": m["boundary"]["oa"], "eval/boundary_miou": m["boundary"]["miou"]})
    if pictures:  # rank 0 predicts raster 0
        logger.image("eval/labels_vs_prediction", torch.from_numpy(pictures[0]).permute(2, 0, 1).float() / 255, step)
    return m


def main(argv=None):
    common.launch(train, parse_args(argv))


def train(args, rank, world, device):
    common.seed_everything(args.seed, rank)
    dtype = common.resolve_dtype(args.dtype, device)
    ckpt_path = common.prepare_out_dir(args.out, args.resume)
    init, band_info = read_init(args)
    datasets = data.load_datasets(args.data, "tr", band_info=band_info)
    if len(datasets) != 1 or datasets[0].num_classes == 0:
        raise data.DataError(f"{args.data}: finetune_seg.py needs exactly one labelled dataset")
    train_ds, eval_ds, eval_mask, classes = splits(args, datasets[0], band_info, args.out, args.resume)
    pca = add_pca(args, train_ds, eval_ds, train_ds.rasters[0].label > 0 if eval_mask is not None else None) \
        if args.pca else None
    model = build_model(args, train_ds, init).to(device)
    del init  # the pre-trained weights are in the model now
    channels_last = device.type == "cuda" and args.backbone == "resnet50v1c"  # faster cuDNN convolutions
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    groups = param_groups(args, model)
    sgd = args.preset == "leekwon"  # its optimizer and schedule, which no flag chooses
    optimizer = common.sgd(groups, args.lr) if sgd else common.adamw(groups, args.lr, (0.9, 0.999), device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    lr_schedule = (common.step_schedule(args.lr, args.steps) if sgd
                   else common.poly_schedule(args.lr, args.steps, 0.9, args.warmup_steps))
    state = dict(model=model, optimizer=optimizer, scaler=scaler)
    teacher = None
    if args.semi:
        teacher = copy.deepcopy(model).requires_grad_(False).eval()  # BatchNorm: the teacher uses its statistics
        state["teacher"] = teacher
    backbone_config = model.backbone.config
    start = common.resume(ckpt_path, rank, backbone_config, **state) if args.resume else 0
    ddp = common.wrap_ddp(model, world)
    if teacher is not None and not args.resume:
        teacher.load_state_dict(model.state_dict())  # DDP gave every rank rank 0's initial weights
    ddp = torch.compile(ddp) if args.compile else ddp
    tiles = data.RandomTiles([train_ds], args.img_size, args.seed, data.Augment(flips=True), min_labelled=1)
    batches = iter(data.step_loader(tiles, args.batch_size, start, rank, world, args.workers, device))
    if teacher is not None:  # every tile of the scene, labelled or not (labels never read)
        unlabelled = data.RandomTiles([train_ds if eval_mask is None else eval_ds], args.img_size, args.seed + 1,
                                      data.Augment(flips=True), labels=False)
        u_batches = iter(data.step_loader(unlabelled, args.batch_size, start, rank, world, args.workers, device))
    peak, source = common.peak_tflops(device, dtype)
    flops, ratio = train_flops(model, train_ds.bands, args, device)
    semi = f" (--semi: {ratio:.2f}x a supervised step)" if args.semi else ""
    common.print0(f"{flops / 1e9:.2f} GFLOP per labelled image (training){semi} | peak {peak or 0:.1f} TFLOP/s "
                  f"({source})")
    logger = common.Logger(args.out, args, start, flops, peak)
    meters, best_path = common.Meters(), os.path.join(args.out, "best.pt")
    checkpoints, metrics = common.Checkpoints(args, args.steps, device), None
    best = common.load_checkpoint(best_path)["val"]["miou"] if args.resume and os.path.isfile(best_path) else -1.0
    extra = {"segmentation": {"decoder": args.decoder, "num_classes": train_ds.num_classes, "blocks": model.blocks,
                              "full_res": model.full_res is not None,
                              "pca": None if pca is None else pca.tolist(), "classes": classes,
                              "class_names": train_ds.class_names, "frozen_backbone": model.frozen_backbone}}
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not common.is_main())
    for step in bar:
        with common.no_host_sync(args.sync_debug, device):
            x, y, _ = next(batches)  # (B, C, H, W), (B, H, W) on the device
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            common.set_lr(optimizer, lr_schedule[step])
            if teacher is None:
                with common.autocast(device, dtype):
                    logits = ddp(x)
                loss, terms = segmentation_loss(logits, y), {}
            else:  # labelled and strong views in one forward (one DDP reduction, shared BatchNorm statistics)
                rnd = data.StepRandom(args.seed, step, rank, world, args.batch_size, device, stream=11)
                with common.autocast(device, dtype):
                    strong, targets = semi_views(teacher, next(u_batches)[0], rnd, args.semi_mix)
                    logits, strong_logits = split_logits(ddp(torch.cat([x, strong])), len(x))
                semi, confident = semi_loss(strong_logits, targets, args.semi_threshold)
                weight = args.semi * min(1.0, step / args.semi_rampup) if args.semi_rampup else args.semi
                loss = segmentation_loss(logits, y) + weight * semi
                terms = {"semi_loss": semi, "confident": confident}
            common.optimizer_step(loss, optimizer, scaler, model.parameters(), args.clip_grad)
            if teacher is not None:
                common.ema_update(teacher, model, TEACHER_MOMENTUM)
                common.broadcast_buffers(teacher)  # each rank's BatchNorm statistics saw its own batch: take rank 0's
            meters.add(loss=loss, **terms)
        done = step + 1
        save, stop = checkpoints.due(done)
        if save or done % args.log_every == 0:
            stats = {**meters.flush(done, ckpt_path), "lr": float(lr_schedule[step])}
            stats = logger.scalars(done, stats, images=args.batch_size * world)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", mfu=f"{stats.get('mfu', 0):.1%}")
        if done % args.eval_every == 0 or done == args.steps:
            metrics = log_evaluation(logger, model, eval_ds, eval_mask, args, device, dtype, done)
            common.print0(f"\nstep {done} {'held-out pixels' if eval_mask is not None else 'val'}:\n"
                          + format_table(metrics))
            if eval_mask is None and metrics["miou"] > best:  # select on val only, never on test pixels
                best = metrics["miou"]
                common.save_checkpoint(best_path, done, args, backbone_config,
                                       ("model", "backbone."), {**extra, "val": metrics}, **state)
        if save:
            common.save_checkpoint(ckpt_path, done, args, backbone_config, ("model", "backbone."), extra, **state)
        if stop:
            checkpoints.report(done, ckpt_path)
            break
    if common.is_main() and metrics is not None and not common.STOP["stopped"]:  # the final evaluation, for scripts
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump({**metrics, "step": args.steps}, f, indent=1)
    logger.close()


if __name__ == "__main__":
    common.run_cli(main)
