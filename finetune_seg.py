"""Semantic segmentation on top of a (pre-)trained backbone: a linear probe (frozen backbone, the default)
or full fine-tuning (`--finetune`).

    python finetune_seg.py --init runs/demo_mae/ckpt.pt --out runs/probe        # bundled scene, 10% labels
    python finetune_seg.py --backbone pixel --out runs/pixel                     # per-pixel linear baseline
    python finetune_seg.py --init runs/mae_vitb/ckpt.pt --data /data/WHU-OHS --eval-every 2000 --out runs/whu
    python finetune_seg.py --init runs/contrast/ckpt.pt --optimizer sgd --lr 0.01 --img-size 24 --batch-size 8 --out runs/cd
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
from eval import (add_backbone_args, add_split_args, colorize, evaluate, format_table, fully_convolutional,
                  load_backbone, split_scene)
from models import SegmentationModel, build_backbone, layer_ids


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/indian_pines", help="a scene folder or a WHU-OHS root")
    add_backbone_args(p)
    p.add_argument("--decoder", default="linear", choices=["linear", "conv", "segmenter", "deeplabv3plus"],
                   help="linear: multiscale linear head on the last 4 blocks; conv: UNet-like on 4 blocks; segmenter: "
                   "mask transformer; deeplabv3plus: with --backbone resnet50v1c (the CNN baseline)")
    p.add_argument("--full-res", action=argparse.BooleanOptionalAction, default=True, help="the full-resolution "
                   "path: each pixel's own spectrum (a per-pixel linear classifier) joins the decoder's logits, so no "
                   "decoder loses the pixel; --no-full-res: the study's heads")
    p.add_argument("--full-res-stem", type=int, default=0, help="with --full-res: also a 3x3 conv stem of this many "
                   "channels on the spectrum (0 = the linear path alone)")
    p.add_argument("--upsample", default="bilinear", choices=models.UPSAMPLING, help="how the decoder's logits reach "
                   "full resolution; guided (needs --full-res): joint bilateral upsampling guided by the spectrum")
    p.add_argument("--aux-weight", type=float, default=0.4, help="DeepLabV3+ auxiliary FCN head loss weight")
    p.add_argument("--layer-decay", type=float, default=1.0, help="layer-wise lr decay for transformer backbones "
                   "with --finetune (block i gets lr x decay^(depth + 1 - i)); 0.65-0.75 is usual for ViT-B")
    p.add_argument("--drop-path", type=float, default=None, help="stochastic depth of the backbone (default: the "
                   "pre-training checkpoint's, else 0)")
    p.add_argument("--pca", type=int, default=None, help="train on the first K principal components of the bands "
                   "(fitted on training pixels only) instead of the raw bands, e.g. 3")
    p.add_argument("--finetune", action="store_true", help="train the backbone too (default: frozen)")
    p.add_argument("--backbone-lr-scale", type=float, default=0.1, help="backbone lr = lr x this, with --finetune")
    add_split_args(p)
    p.add_argument("--loss", default="ce", choices=["ce", "focal"])
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--class-weights", default="none", choices=["none", "inverse", "sqrt-inverse"],
                   help="weight classes by their inverse (square-root) training frequency")
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", default="poly", choices=["poly", "step"], help="poly: warm-up then (1 - t)^0.9 "
                   "(the segmentation standard); step: x0.1 at each of --lr-milestones (Lee & Kwon's transfer)")
    p.add_argument("--lr-milestones", type=float, nargs="*", default=(0.6, 0.8), help="--schedule step: fractions "
                   "of --steps")
    p.add_argument("--clip-grad", type=float, default=0.0, help="max grad norm; 0 = off")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"], help="sgd: with --momentum")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--flips", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--eval-every", type=int, default=100, help="evaluate every N steps (and at the end)")
    p.add_argument("--eval-batch-size", type=int, default=16)
    common.add_run_args(p, out="runs/seg")
    return common.parse_with_preset(p, argv, models.PRESETS)  # maskedsst: 8 px tiles, a per-pixel linear head


def build_model(args, ds):
    if args.backbone == "cdcnn" or args.init and common.load_checkpoint(args.init)["backbone"]["name"] == "cdcnn":
        return cross_domain_model(args, ds, common.load_checkpoint(args.init) if args.init else None)
    backbone, _ = load_backbone(args, ds, drop_path_rate=args.drop_path)
    return SegmentationModel(backbone, args.decoder, ds.num_classes, frozen_backbone=not args.finetune,
                             full_res=args.full_res, stem=args.full_res_stem, upsample=args.upsample)


def cross_domain_model(args, ds, ckpt=None):
    """Lee & Kwon's transfer: a cross-domain CNN with one new domain, this scene (a new first layer), and a
    new classifier, both initialised N(0, 0.001); the shared trunk comes from `ckpt` (pretrain_contrast.py)
    or is random (scratch). The whole model is trained; `param_groups` gives the new layers 10x the
    trunk's lr."""
    config = {"depth": args.depth} if ckpt is None else ckpt["backbone"]
    if ckpt is not None and config["name"] != "cdcnn":
        raise ValueError(f"{args.init}: --backbone cdcnn needs a pretrain_contrast.py checkpoint, this one holds a "
                         f"{config['name']!r} backbone")
    if ckpt is not None and args.depth not in (None, config["depth"]):
        raise ValueError(f"{args.init}: --depth {args.depth} differs from the checkpoint's trunk ({config['depth']})")
    shape = {k: v for k, v in config.items() if k not in ("name", "in_chans")}  # width, depth
    backbone = build_backbone("cdcnn", in_chans={ds.name: ds.bands}, **shape)
    if ckpt is not None and args.twin:
        common.print0(f"random twin of {args.init}: cdcnn trunk {shape} with random weights")
    elif ckpt is not None:
        trunk = {k[len("trunk."):]: v for k, v in common.backbone_weights(ckpt, args.init_weights).items()
                 if k.startswith("trunk.")}
        backbone.trunk.load_state_dict(trunk)
        common.print0(f"cdcnn trunk {shape} from {args.init} (step {ckpt['step']}, pre-trained on "
                      f"{config['in_chans']}); new first layer for {ds.name} ({ds.bands} bands)")
    model = SegmentationModel(backbone, args.decoder, ds.num_classes, frozen_backbone=False)
    for new in (backbone.first[ds.name], model.decoder.classifier):
        nn.init.normal_(new.weight, std=0.001)
        nn.init.zeros_(new.bias)
    return model


def check_head(path, head):
    """A run resumes only with the head it was trained with (runs from before issue #15: the study's)."""
    saved = common.load_checkpoint(path, mmap=True).get("segmentation", {}).get("head", models.STUDY_HEAD)
    if saved != head:
        raise ValueError(f"{path}: the run was trained with the head {saved}, these flags build {head}; resume with "
                         "its --full-res/--no-full-res, --full-res-stem and --upsample")


def splits(args, ds, out, resume):
    """(training dataset, evaluation dataset, evaluation label mask or None, kept classes or None)."""
    if ds.kind == "whu":
        return ds, data.load_dataset(args.data, "val", args.cache_dir, common.data_bands(args)), None, None
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
        groups += common.decay_groups(params, args.weight_decay, args.backbone_lr_scale * args.layer_decay ** (top - layer))
    return groups


def add_pca(args, train_ds, eval_ds, train_mask):
    """Fit the band PCA on the training pixels and apply it to both datasets; returns the projection."""
    projection, explained = data.fit_pca(train_ds, args.pca, train_mask, seed=args.split_seed)
    train_ds.pca = eval_ds.pca = projection
    common.print0(f"PCA: {train_ds.raw_bands} bands -> {args.pca} components explaining "
                  f"{100 * explained.sum():.1f}% of the variance of the training pixels")
    return projection


def class_weights(ds, mode):
    if mode == "none":
        return None
    counts = sum(np.bincount(np.asarray(r.label).ravel(), minlength=ds.num_classes + 1)[1:ds.num_classes + 1]
                 for r in ds.rasters).astype(np.float64)
    w = 1 / np.maximum(counts, 1)
    w = np.sqrt(w) if mode == "sqrt-inverse" else w
    w[counts == 0] = 0
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)


def segmentation_loss(logits, target, weight=None, focal_gamma=None, aux_weight=0.4):
    """Cross-entropy over labelled pixels (IGNORE_INDEX skipped); focal loss when focal_gamma is set.
    logits may be (main, auxiliary) (DeepLabV3+ in training): main + aux_weight * auxiliary loss."""
    if isinstance(logits, tuple):
        main, aux = logits
        return (segmentation_loss(main, target, weight, focal_gamma)
                + aux_weight * segmentation_loss(aux, target, weight, focal_gamma))
    logits = logits.float()
    if focal_gamma is None:
        return F.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE_INDEX)
    logp = F.log_softmax(logits, dim=1)
    ce = F.nll_loss(logp, target, weight=weight, ignore_index=IGNORE_INDEX, reduction="none")
    p_true = torch.exp(-F.nll_loss(logp, target, ignore_index=IGNORE_INDEX, reduction="none"))
    valid = (target != IGNORE_INDEX).sum().clamp_min(1)
    return ((1 - p_true) ** focal_gamma * ce).sum() / valid


def train_flops(model, bands, weight, gamma, args, device):
    """Training FLOPs per image, counted by torch.utils.flop_counter on one step of a copy of the model
    (decoders and the CNN make an architecture formula long; the copy keeps BatchNorm statistics)."""
    copy_ = copy.deepcopy(model).train()
    x = torch.zeros(2, bands, args.img_size, args.img_size, device=device)
    y = torch.zeros(2, args.img_size, args.img_size, dtype=torch.long, device=device)
    return common.counted_flops(lambda: segmentation_loss(copy_(x), y, weight, gamma).backward()) / 2


def log_evaluation(logger, model, eval_ds, mask, args, device, dtype, step):
    """Evaluate, sharded over the ranks with rank 0's BatchNorm statistics, the confusion matrices summed:
    every rank gets the same metrics, so all take the same best-checkpoint decision (a collective save);
    log metrics and the first map."""
    common.broadcast_buffers(model)
    pictures = []

    def keep_first(r, pred, labels):
        if r == 0:
            pictures.append(np.concatenate([colorize(labels), colorize(pred)], axis=1))
    window = None if fully_convolutional(model.backbone.config) else args.img_size  # whole scene: no tile borders
    m = evaluate(model, eval_ds, window, args.img_size // 4, args.eval_batch_size, device, dtype, mask, keep_first,
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
    datasets = data.load_datasets(args.data, "tr", args.cache_dir, common.data_bands(args))
    if len(datasets) != 1 or datasets[0].num_classes == 0:
        raise data.DataError(f"{args.data}: finetune_seg.py needs exactly one labelled dataset")
    train_ds, eval_ds, eval_mask, classes = splits(args, datasets[0], args.out, args.resume)
    pca = add_pca(args, train_ds, eval_ds, train_ds.rasters[0].label > 0 if eval_mask is not None else None) \
        if args.pca else None
    model = build_model(args, train_ds).to(device)
    channels_last = device.type == "cuda" and args.backbone == "resnet50v1c"  # faster cuDNN convolutions
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    weight = class_weights(train_ds, args.class_weights)
    weight = None if weight is None else weight.to(device)
    groups = param_groups(args, model)
    optimizer = (common.sgd(groups, args.lr, args.momentum) if args.optimizer == "sgd"
                 else common.adamw(groups, args.lr, (0.9, 0.999), device))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    lr_schedule = (common.poly_schedule(args.lr, args.steps, 0.9, args.warmup_steps) if args.schedule == "poly"
                   else common.step_schedule(args.lr, args.steps, args.lr_milestones))
    state = dict(model=model, optimizer=optimizer, scaler=scaler)
    backbone_config = model.backbone.config
    if args.resume:
        check_head(ckpt_path, model.head)
    start = common.resume(ckpt_path, rank, backbone_config, **state) if args.resume else 0
    ddp = common.wrap_ddp(model, world)
    ddp = torch.compile(ddp) if args.compile else ddp
    tiles = data.RandomTiles([train_ds], args.img_size, args.seed, data.Augment(flips=args.flips), min_labelled=1)
    batches = iter(data.step_loader(tiles, args.batch_size, start, rank, world, args.workers, device))
    gamma = args.focal_gamma if args.loss == "focal" else None
    peak, source = common.peak_tflops(device, dtype)
    flops = train_flops(model, train_ds.bands, weight, gamma, args, device)
    common.print0(f"{flops / 1e9:.2f} GFLOP per image (training) | peak {peak or 0:.1f} TFLOP/s ({source})")
    logger = common.Logger(args.out, args, start, flops, peak)
    meters, best_path = common.Meters(), os.path.join(args.out, "best.pt")
    checkpoints, metrics = common.Checkpoints(args, args.steps, device), None
    best = common.load_checkpoint(best_path)["val"]["miou"] if args.resume and os.path.isfile(best_path) else -1.0
    extra = {"segmentation": {"decoder": args.decoder, "num_classes": train_ds.num_classes, "blocks": model.blocks,
                              "head": model.head,
                              "pca": None if pca is None else pca.tolist(), "classes": classes,
                              "class_names": train_ds.class_names, "frozen_backbone": model.frozen_backbone}}
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not common.is_main())
    for step in bar:
        with common.no_host_sync(args.sync_debug, device):
            x, y, _ = next(batches)  # (B, C, H, W), (B, H, W) on the device
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            common.set_lr(optimizer, lr_schedule[step])
            with common.autocast(device, dtype):
                logits = ddp(x)
            loss = segmentation_loss(logits, y, weight, gamma, args.aux_weight)
            common.optimizer_step(loss, optimizer, scaler, model.parameters(), args.clip_grad)
            meters.add(loss=loss)
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
