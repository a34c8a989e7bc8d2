"""Evaluate a fine-tuned segmentation checkpoint: sliding-window inference over whole WHU-OHS tiles or
whole scenes, metrics from one confusion matrix, pictures; `--attention` saves attention maps of any
checkpoint with a transformer backbone, vit, ssvit or sst (pre-trained or fine-tuned).

    python eval.py --ckpt runs/probe/ckpt.pt                  # scene: the run's saved test pixels
    python eval.py --ckpt runs/whu_probe/best.pt --split ts   # WHU-OHS test split
    python eval.py --ckpt runs/demo_mae/ckpt.pt --attention   # attention maps of a pre-trained backbone
"""
import argparse
import json
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import common
import data
from data import IGNORE_INDEX
from models import VIT_SIZES, SegmentationModel, backbone_depth, build_backbone

PALETTE = np.array([  # fixed class colours; index = class id
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128), (255, 255, 255), (100, 60, 160), (40, 90, 40), (200, 120, 120),
    (90, 160, 200), (160, 200, 90), (200, 160, 40), (40, 40, 200), (200, 40, 120), (120, 200, 200),
    (80, 80, 80), (180, 100, 20)], np.uint8)


# ----------------------------------------------------------------------------- metrics

def confusion_matrix(pred, target, num_classes):
    """(K, K) counts, rows = ground truth, columns = prediction; IGNORE_INDEX pixels are skipped."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    keep = target != IGNORE_INDEX
    idx = target[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm, class_names):
    """OA, AA (mean per-class accuracy over classes in the ground truth), mIoU over classes that occur
    in the ground truth or the prediction (`miou`) and over classes in the ground truth only
    (`miou_present`, the WHU-OHS authors' convention), Cohen's kappa, and per-class IoU/accuracy."""
    cm = cm.astype(np.float64)
    total, tp = cm.sum(), np.diag(cm)
    gt, predicted = cm.sum(1), cm.sum(0)
    union = gt + predicted - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)
    present = gt > 0
    oa = tp.sum() / total if total else float("nan")
    expected = (gt * predicted).sum() / total ** 2 if total else float("nan")
    kappa = (oa - expected) / (1 - expected) if total and expected < 1 else float("nan")

    def mean(v):
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")
    return {
        "oa": float(oa), "aa": mean(acc[present]), "miou": mean(iou), "miou_present": mean(iou[present]),
        "kappa": float(kappa), "pixels": int(total),
        "per_class": [{"name": n, "iou": None if np.isnan(i) else float(i), "acc": None if np.isnan(a) else float(a),
                       "support": int(s)} for n, i, a, s in zip(class_names, iou, acc, gt)],
    }


BOUNDARY_PX = 2


def boundary_mask(labels, radius=BOUNDARY_PX):
    """(H, W) labels -> True at every labelled pixel with a pixel of another label within `radius` px
    (a (2r+1)^2 window). Unlabelled pixels count as another label (they are other land cover); beyond the
    image border is no boundary. Computed on the whole ground-truth map, training pixels included."""
    lab = np.asarray(labels)
    H, W = lab.shape
    padded = np.pad(lab, radius, mode="edge")
    differs = np.zeros((H, W), bool)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            differs |= padded[dy:dy + H, dx:dx + W] != lab
    return differs & (lab != IGNORE_INDEX)


def region_confusions(pred, labels, edge, num_classes):
    """(boundary, interior) confusion matrices: the labelled pixels where `edge` is True, and the rest."""
    pred, labels, edge = np.asarray(pred).ravel(), np.asarray(labels).ravel(), np.asarray(edge).ravel()
    return np.stack([confusion_matrix(pred[edge], labels[edge], num_classes),
                     confusion_matrix(pred[~edge], labels[~edge], num_classes)])


def region_metrics(cms, class_names):
    """Metrics of all scored pixels from region_confusions' matrices, plus metrics['boundary'] /
    ['interior']: OA, AA, mIoU and pixels of the pixels within BOUNDARY_PX of a class boundary and of the
    rest (sharpness as a number)."""
    metrics = metrics_from_confusion(cms.sum(0), class_names)
    for name, cm in zip(("boundary", "interior"), cms):
        m = metrics_from_confusion(cm, class_names)
        metrics[name] = {k: m[k] for k in ("oa", "aa", "miou", "pixels")}
    metrics["boundary_px"] = BOUNDARY_PX
    return metrics


def format_table(m):
    lines = [f"{'class':<32} {'IoU':>7} {'acc':>7} {'pixels':>9}"]
    for c in m["per_class"]:
        fmt = lambda v: "    -  " if v is None else f"{100 * v:7.2f}"  # noqa: E731
        lines.append(f"{c['name'][:32]:<32} {fmt(c['iou'])} {fmt(c['acc'])} {c['support']:>9}")
    lines.append(f"OA {100 * m['oa']:.2f} | AA {100 * m['aa']:.2f} | mIoU {100 * m['miou']:.2f} | "
                 f"mIoU (classes in GT) {100 * m['miou_present']:.2f} | kappa {m['kappa']:.4f} | {m['pixels']} px")
    for part in ("boundary", "interior"):
        if part in m:
            r = m[part]
            where = f"within {m['boundary_px']} px of a class boundary" if part == "boundary" else "the rest"
            lines.append(f"{part} ({where}): OA {100 * r['oa']:.2f} | mIoU {100 * r['miou']:.2f} | {r['pixels']} px")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- inference

@torch.no_grad()
def sliding(fn, ds, index, window, overlap, batch_size, device, dtype):
    """fn(x) -> (B, K, h, w) maps at the window's resolution, averaged over overlapping windows of raster
    `index` -> (K, H, W), and the raster's (H, W) labels, assembled from the same windows. window None:
    the whole raster in one pass - for fully convolutional models, which then see no tile borders."""
    H, W = ds.rasters[index].image.shape[1:]
    if window is None:
        img, labels = ds.crop(index, 0, 0, H, W)
        with common.autocast(device, dtype):
            return fn(torch.from_numpy(ds.normalize(img))[None].to(device)).float().cpu()[0], labels
    tiles = data.GridTiles(ds, window, overlap, rasters=[index])
    total, count = None, torch.zeros(1, H, W)
    labels = np.full((H, W), IGNORE_INDEX, np.int64)
    for x, lab, where in torch.utils.data.DataLoader(tiles, batch_size=batch_size):
        with common.autocast(device, dtype):
            out = fn(x.to(device)).float().cpu()
        if total is None:
            total = torch.zeros(out.shape[1], H, W)
        for o, win_lab, (_, y, x0) in zip(out, lab.numpy(), where.tolist()):
            h, w = min(window, H - y), min(window, W - x0)
            total[:, y:y + h, x0:x0 + w] += o[:, :h, :w]
            count[:, y:y + h, x0:x0 + w] += 1
            labels[y:y + h, x0:x0 + w] = win_lab[:h, :w]
    return total / count, labels


def predict_raster(model, ds, index, window, overlap, batch_size, device, dtype):
    """Sliding-window logits (K, H, W) for one raster and its (H, W) labels."""
    return sliding(model, ds, index, window, overlap, batch_size, device, dtype)


def fully_convolutional(config):
    """Backbones whose output at a pixel depends on a small neighbourhood only: inference runs on the
    whole scene at once (no tile borders, no padded context)."""
    return config["name"] in ("pixel", "cdcnn")


def evaluate(model, ds, window, overlap, batch_size, device, dtype, label_mask=None, on_raster=None, shard=False):
    """Metrics over every raster of ds (only pixels in label_mask for a one-raster scene split).
    on_raster(index, prediction, labels) is called for each raster this process predicts, e.g. to draw
    pictures. shard=True under torchrun: rank r predicts rasters r, r + world, ... and the confusion
    matrices are summed over the ranks, so every rank returns the same metrics (and decides alike)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if shard and dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    cms = np.zeros((2, ds.num_classes, ds.num_classes), np.int64)  # boundary, interior pixels
    for r in range(rank, len(ds.rasters), world):
        logits, labels = predict_raster(model, ds, r, window, overlap, batch_size, device, dtype)
        pred = logits.argmax(0).numpy()
        edge = boundary_mask(labels)  # on the whole ground truth, before the split's mask
        if label_mask is not None:
            labels[~label_mask] = IGNORE_INDEX
        cms += region_confusions(pred, labels, edge, ds.num_classes)
        if on_raster is not None:
            on_raster(r, pred, labels)
    model.train(was_training)
    if world > 1:
        cms = common.all_reduce_sum(torch.from_numpy(cms).to(device)).cpu().numpy()
    return region_metrics(cms, ds.class_names)


# ----------------------------------------------------------------------------- frozen-representation probes

def add_backbone_args(p):
    """The flags that name a backbone, shared by finetune_seg.py and the probes here (so one protocol
    configuration, e.g. `--init runs/mae/ckpt.pt --twin`, means the same network in both)."""
    p.add_argument("--init", default=None, help="pre-training checkpoint of any trainer (its backbone config "
                   "wins over --backbone/--size/...); none = random init")
    p.add_argument("--twin", action="store_true", help="with --init: the checkpoint's exact backbone (sizes, "
                   "registers, FFN, streams, ...) with random weights and none of its weights - the "
                   "same-architecture control every 'pre-training helps' claim is measured against")
    p.add_argument("--backbone", default="vit", help="vit | ssvit | sst | pixel (the per-pixel spectrum) | "
                   "resnet50v1c (with --decoder deeplabv3plus) | cdcnn (cross-domain CNN: a new first layer for this "
                   "scene, the trunk from --init or random; always fine-tuned)")
    p.add_argument("--size", default="tiny", help=" | ".join(VIT_SIZES))
    p.add_argument("--img-size", type=int, default=64, help="tile size (training tiles and inference windows)")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--spectral-patch", type=int, default=None, help="ssvit/sst: bands per spectral token")
    p.add_argument("--registers", type=int, default=None, help="default: vit 0, ssvit 4 per stream")
    p.add_argument("--ffn", default="mlp", choices=["mlp", "swiglu"])
    p.add_argument("--depth", type=int, default=None, help="cdcnn from scratch: residual modules in the trunk "
                   "(default 5, as pre-trained; Lee & Kwon's scratch baseline has 4)")
    p.add_argument("--init-weights", default="teacher", choices=["teacher", "student"], help="with --init: the "
                   "network whose backbone is read; student = the DINO student (the teacher of a short run still holds "
                   "much of its random init: pretrain_dino.py prints how much). Other checkpoints hold one network")
    common.add_recipe_args(p, sst=True)  # for random init; with --init the checkpoint's config wins
    common.add_any_sensor_arg(p)


def add_split_args(p):
    """The sparse-label protocol of a scene (see data.scene_split)."""
    p.add_argument("--labels-per-class", type=int, default=None, help="N labelled training pixels per class "
                   "(at most half of a class)")
    p.add_argument("--train-fraction", type=float, default=None, help="fraction of each class for training "
                   "(default 0.1 unless --labels-per-class)")
    p.add_argument("--min-class-pixels", type=int, default=0, help="only classes with at least M labelled pixels "
                   "take part in training and scoring (the head has that many classes), e.g. 400 for Lee & "
                   "Kwon's protocol on Indian Pines (9 classes)")
    p.add_argument("--split-seed", type=int, default=0)


def split_scene(args, ds):
    """(dataset with the kept classes, train mask, test mask, kept classes or None, split info)."""
    fraction = args.train_fraction if args.train_fraction is not None or args.labels_per_class else 0.1
    ds, train, test, classes = data.scene_split(ds, args.split_seed, args.labels_per_class, fraction,
                                                args.min_class_pixels)
    info = dict(seed=args.split_seed, per_class=args.labels_per_class, fraction=fraction, classes=classes,
                min_class_pixels=args.min_class_pixels)
    return ds, train, test, classes, info


def load_backbone(args, ds, **overrides):
    """The backbone the shared flags name and the checkpoint it came from (None for a random init):
    --init CKPT gives its backbone config (with `overrides`, e.g. drop_path_rate) and weights; with --twin
    the same config and fresh random weights (drawn from the current torch seed)."""
    if not args.init:
        if args.twin:
            raise ValueError("--twin needs --init CKPT: the twin is that checkpoint's backbone with random weights")
        transformer = args.backbone not in ("pixel", "resnet50v1c", "cdcnn")
        options = {} if not transformer else {
            "num_registers": args.registers, "ffn": args.ffn, "spectral_patch": args.spectral_patch,
            "wavelengths": None if getattr(args, "pca", None) else ds.input_wavelengths, "init": args.init_scheme,
            "pos_embed": args.pos_embed, "block_order": args.block_order, "embed_norm": args.embed_norm, **overrides}
        return build_backbone(args.backbone, args.size, ds.bands, args.img_size, args.patch_size, bands=ds.band_info,
                              **options), None
    ckpt = common.load_checkpoint(args.init)
    config = {**ckpt["backbone"], **{k: v for k, v in overrides.items() if v is not None}}
    common.check_bands(config, ds.bands, args.init, ds.name)
    backbone = build_backbone(**config)
    if args.twin:
        common.print0(f"random twin of {args.init}: backbone {common.brief(config)}, random weights")
    else:
        backbone.load_state_dict(common.backbone_weights(ckpt, args.init_weights))
        which = " (student)" if args.init_weights == "student" else ""
        common.print0(f"backbone {common.brief(config)} from {args.init}{which} (step {ckpt['step']})")
    return backbone, ckpt


def pixel_features(backbone, ds, window, overlap, batch_size, device, dtype, block=None):
    """(D, H, W) features of every pixel of raster 0 from a frozen backbone: the tokens of `block`
    (1-based; None = the last) bilinearly interpolated to the pixels and averaged over overlapping windows;
    the per-pixel output for CNNs and the pixel backbone."""
    depth = backbone_depth(backbone)
    if block is not None and not 1 <= block <= depth:
        raise ValueError(f"--probe-block {block}: the backbone has blocks 1..{depth}")
    blocks = 1 if block is None or not hasattr(backbone, "blocks") and not hasattr(backbone, "spatial") else [block - 1]

    def features(x):
        fmap = backbone.intermediate_layers(x, blocks)[-1][1]  # (B, D, h, w)
        return F.interpolate(fmap.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    backbone.eval()
    return sliding(features, ds, 0, window, overlap, batch_size, device, dtype)[0]


def knn_predict(train_x, train_y, test_x, num_classes, k=20, temperature=0.07, chunk=4096):
    """DINO's weighted k-NN: cosine similarity to every training feature, the k nearest vote for their
    class with weight exp(similarity / temperature). (N, D), (N,), (M, D) -> (M,) predictions."""
    train = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train))
    preds = []
    for part in F.normalize(test_x.float(), dim=1).split(chunk):
        sim, idx = (part @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(part), num_classes).scatter_add_(1, train_y[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return torch.cat(preds)


def linear_probe(train_x, train_y, test_x, num_classes, weight_decay=1e-3, steps=200):
    """Multinomial logistic regression on standardised features (statistics of the training pixels),
    L2-penalised, fitted to convergence with L-BFGS from zeros: a convex problem, so the result depends
    on the features alone, not on an optimiser schedule. -> (M,) predictions."""
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    a, b = (train_x - mean) / std, (test_x - mean) / std
    layer = nn.Linear(a.shape[1], num_classes)
    nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(a), train_y) + 0.5 * weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return layer(b).argmax(1)


def run_probe(args, device, dtype):
    """k-NN or linear probe of a frozen backbone on a scene's sparse-label split -> metrics."""
    torch.manual_seed(args.seed)  # a --twin's random weights
    ds, train, test, classes, info = split_scene(args, data.load_dataset(args.data, "tr", args.cache_dir,
                                                                      common.data_bands(args)))
    if args.backbone == "cdcnn" or args.init and common.load_checkpoint(args.init)["backbone"]["name"] == "cdcnn":
        raise ValueError("cdcnn gets a new first layer for every scene, so it has no frozen representation to "
                         "probe; evaluate it fine-tuned (finetune_seg.py)")
    backbone, _ = load_backbone(args, ds)
    backbone.to(device)
    window = None if fully_convolutional(backbone.config) else args.img_size
    feats = pixel_features(backbone, ds, window, args.img_size // 4, args.batch_size, device, dtype, args.probe_block)
    labels = torch.from_numpy(data.scene_labels(ds))
    X = feats.flatten(1).T  # (H*W, D)
    tr, te = torch.from_numpy(train.ravel()), torch.from_numpy(test.ravel())
    if args.probe == "knn":
        pred = knn_predict(X[tr], labels.ravel()[tr], X[te], ds.num_classes, args.k, args.knn_temperature)
    else:
        pred = linear_probe(X[tr], labels.ravel()[tr], X[te], ds.num_classes, args.probe_weight_decay)
    cms = region_confusions(pred.numpy(), labels.ravel()[te].numpy(), boundary_mask(labels.numpy()).ravel()[te.numpy()],
                            ds.num_classes)
    metrics = region_metrics(cms, ds.class_names)
    metrics.update(probe=args.probe, block=args.probe_block or backbone_depth(backbone), init=args.init,
                   twin=args.twin, backbone=backbone.config["name"], data=ds.name, split=info,
                   train_pixels=int(train.sum()), feature_dim=int(X.shape[1]))
    return metrics


# ----------------------------------------------------------------------------- pictures

def to_uint8(rgb):
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (rgb.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)


def colorize(labels):
    out = PALETTE[np.clip(labels, 0, len(PALETTE) - 1) % len(PALETTE)].copy()
    out[labels == IGNORE_INDEX] = 0
    return out


def error_map(pred, labels):
    out = np.zeros((*labels.shape, 3), np.uint8)
    known = labels != IGNORE_INDEX
    out[known & (pred == labels)] = (40, 200, 40)
    out[known & (pred != labels)] = (220, 30, 30)
    return out


def panels(images, titles, scale):
    """Side-by-side (H, W, 3) uint8 panels, nearest-upscaled, with a title above each."""
    h, w = images[0].shape[0] * scale, images[0].shape[1] * scale
    canvas = Image.new("RGB", (len(images) * (w + 8), h + 20), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (img, title) in enumerate(zip(images, titles)):
        canvas.paste(Image.fromarray(img).resize((w, h), Image.NEAREST), (i * (w + 8), 20))
        draw.text((i * (w + 8) + 2, 4), title, fill=(0, 0, 0))
    return canvas


def legend(class_names):
    img = Image.new("RGB", (260, 16 * len(class_names) + 4), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(class_names):
        draw.rectangle([4, 4 + 16 * i, 16, 16 + 16 * i], fill=tuple(int(v) for v in PALETTE[i % len(PALETTE)]))
        draw.text((22, 4 + 16 * i), f"{i}: {name}", fill=(0, 0, 0))
    return img


def stack_vertically(images):
    canvas = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images)), (255, 255, 255))
    y = 0
    for i in images:
        canvas.paste(i, (0, y))
        y += i.height
    return canvas


def save_prediction_picture(path, ds, index, pred, labels):
    """True colour | false colour | ground truth | prediction | errors, with the class legend below."""
    H, W = pred.shape
    img = torch.from_numpy(ds.crop(index, 0, 0, H, W)[0])
    true_c = to_uint8(data.render_bands(img, data.display_bands(ds)))
    false_c = to_uint8(data.render_bands(img, data.display_bands(ds, false_colour=True)))
    row = panels([true_c, false_c, colorize(labels), colorize(pred), error_map(pred, labels)],
                 ["true colour", "false colour", "ground truth", "prediction", "errors (green ok)"],
                 max(1, 256 // max(H, W)))
    stack_vertically([row, legend(ds.class_names)]).save(path)


def heat(values):
    """(H, W) in [0, 1] -> (H, W, 3) float, a dark-blue -> red -> yellow colour map."""
    anchors = np.array([(0, 0, 0.3), (0.6, 0, 0.5), (0.9, 0.3, 0), (1, 0.9, 0.2)])
    pos = values * (len(anchors) - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, len(anchors) - 2)
    t = (pos - lo)[..., None]
    return anchors[lo] * (1 - t) + anchors[lo + 1] * t


def save_attention_picture(path, backbone, ds, index, y, x, window, device):
    """Input rendering, then one panel per head of the last block's spatial attention over the input
    (CLS-to-patch; for sst the attention each patch receives) and, for the spectral backbones, one row
    per head of the attention over band groups / spectral blocks (blue = low, yellow = high)."""
    img = ds.crop(index, y, x, window, window)[0]
    inp = torch.from_numpy(ds.normalize(img.copy()))[None].to(device)
    maps = {k: v.float().cpu()[0] for k, v in backbone.attention_maps(inp).items()}
    attn = F.interpolate(maps["spatial"][None], size=(window, window), mode="bilinear", align_corners=False)[0]
    rgb = data.render_bands(torch.from_numpy(img), data.display_bands(ds)).permute(1, 2, 0).numpy()
    images, titles = [to_uint8(torch.from_numpy(rgb).permute(2, 0, 1))], ["input"]
    for h, a in enumerate(attn.numpy()):
        images.append((255 * (0.35 * rgb + 0.65 * heat(normalise(a)))).astype(np.uint8))
        titles.append(f"head {h}")
    scale = max(1, 128 // window)
    picture = panels(images, titles, scale)
    if "spectral" in maps:  # (heads, G): one row per head, one column per band group, normalised per head
        rows = np.stack([normalise(a) for a in maps["spectral"].numpy()])
        cell = max(2, picture.width // rows.shape[1])
        strip = (255 * heat(rows)).astype(np.uint8).repeat(12, axis=0).repeat(cell, axis=1)
        picture = stack_vertically([picture, panels([strip], ["spectral attention: heads x band groups "
                                                              "(short -> long wavelengths)"], 1)])
    picture.save(path)


def normalise(a):
    return (a - a.min()) / max(a.max() - a.min(), 1e-12)


# ----------------------------------------------------------------------------- checkpoints

def load_model(ckpt_path, device):
    """A checkpoint -> (model, ckpt). Segmentation checkpoints give a SegmentationModel; pre-training
    checkpoints give their backbone alone (enough for attention maps)."""
    ckpt = common.load_checkpoint(ckpt_path)
    backbone = build_backbone(**ckpt["backbone"])
    if "segmentation" not in ckpt:
        backbone.load_state_dict(common.backbone_weights(ckpt))
        return backbone.to(device).eval(), ckpt
    seg = ckpt["segmentation"]
    model = SegmentationModel(backbone, seg["decoder"], seg["num_classes"], **seg.get("head", {}))  # none: the study's
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def check_data(ckpt, ckpt_path, ds):
    common.check_bands(ckpt["backbone"], ds.bands, ckpt_path, ds.name)
    seg = ckpt.get("segmentation")
    if seg and seg["num_classes"] != ds.num_classes:
        raise ValueError(f"{ckpt_path}: checkpoint predicts {seg['num_classes']} classes but {ds.name} has "
                         f"{ds.num_classes}")


def load_eval_data(args, ckpt):
    """The dataset and, for a scene, the label mask of the requested part of the run's saved split."""
    train_args = ckpt["args"]
    spec = args.data or train_args["data"]
    if "," in spec:
        raise ValueError("eval.py evaluates one dataset at a time; pass --data")
    split = {"test": "ts", "train": "tr"}.get(args.split, args.split)
    if split not in data.WHU_SPLITS:
        raise ValueError(f"--split must be val, ts/test or tr/train, got {args.split!r}")
    ds = data.load_dataset(spec, split, args.cache_dir or train_args.get("cache_dir"), ckpt["backbone"].get("bands"))
    if ds.kind != "scene" or "segmentation" not in ckpt:
        return ds, None
    if split == "val":
        raise ValueError(f"{spec}: a scene has no val split; use --split test (held-out pixels) or train")
    split_path = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "split.npz")
    train_mask, test_mask, info = data.load_split(split_path, ds.rasters[0].image.shape[1:])
    if info.get("classes") is not None:  # trained and scored on a class subset (--min-class-pixels)
        ds = data.select_classes(ds, info["classes"])
    return ds, test_mask if split == "ts" else train_mask


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="checkpoint of finetune_seg.py (or of a pre-training run with "
                   "--attention); with --probe use --init (or --backbone pixel for the spectrum itself)")
    p.add_argument("--data", default=None, help="default: the data the checkpoint was trained on (probes: "
                   "data/indian_pines)")
    p.add_argument("--split", default="test", help="WHU-OHS: val | ts (test); scenes: test | train of the run's saved split")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--window", type=int, default=None, help="sliding window (default: the training tile size; "
                   "the whole scene for fully convolutional backbones); e.g. 512 for whole WHU-OHS tiles")
    p.add_argument("--overlap", type=int, default=None, help="window overlap in px (default: window / 4)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="default: <checkpoint dir>/eval-<split> (probes: runs/probe)")
    p.add_argument("--attention", action="store_true", help="also save last-block attention maps per head "
                   "(spatial; and spectral for ssvit/sst)")
    p.add_argument("--pictures", type=int, default=4, help="rasters (or attention windows) to draw")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="probes: the random weights of a --twin or random backbone")
    g = p.add_argument_group("frozen-representation probes (no decoder; a scene's sparse-label split)")
    g.add_argument("--probe", default=None, choices=["knn", "linear"], help="knn: DINO's weighted k-NN on per-pixel "
                   "features; linear: L2-regularised logistic regression on them")
    g.add_argument("--probe-block", type=int, default=None, help="read block i (1..depth) instead of the last, "
                   "to follow a representation block by block")
    g.add_argument("--k", type=int, default=20, help="k-NN neighbours")
    g.add_argument("--knn-temperature", type=float, default=0.07, help="vote weight exp(cos / T), DINO's 0.07")
    g.add_argument("--probe-weight-decay", type=float, default=1e-3, help="linear probe L2 penalty")
    add_backbone_args(g)
    add_split_args(g)
    common.add_debug_arg(p)
    args = p.parse_args(argv)
    if (args.ckpt is None) == (args.probe is None):
        p.error("give --ckpt (evaluate a checkpoint) or --probe knn|linear (probe a frozen backbone), not both")
    return args


def probe_main(args, device, dtype):
    args.data = args.data or "data/indian_pines"
    metrics = run_probe(args, device, dtype)
    out = args.out or "runs/probe"
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(format_table(metrics))
    print(f"{args.probe} probe of block {metrics['block']} ({metrics['train_pixels']} training pixels) -> {out}")
    return metrics


def main(argv=None):
    args = parse_args(argv)
    _, _, device = common.init_distributed(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    if args.probe:
        return probe_main(args, device, dtype)
    model, ckpt = load_model(args.ckpt, device)
    ds, label_mask = load_eval_data(args, ckpt)
    if ckpt.get("segmentation", {}).get("pca"):  # trained on principal components: project the same way
        ds.pca = np.asarray(ckpt["segmentation"]["pca"], np.float32)
    check_data(ckpt, args.ckpt, ds)
    # Default window = the fine-tuning tile size; any multiple of the patch size works (e.g. whole 512 px
    # WHU-OHS tiles with a 64 px backbone: its position embeddings are interpolated).
    window = args.window or (None if fully_convolutional(ckpt["backbone"]) else
                             ckpt["args"].get("img_size") or ckpt["backbone"].get("img_size", 64))
    overlap = (window or 0) // 4 if args.overlap is None else args.overlap
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), f"eval-{args.split}")
    os.makedirs(out, exist_ok=True)
    backbone = model.backbone if "segmentation" in ckpt else model
    if args.attention:
        if not hasattr(backbone, "attention_maps"):
            raise ValueError(f"{args.ckpt}: backbone '{ckpt['backbone']['name']}' has no attention to show")
        wins = [(r, y, x) for r in range(len(ds.rasters)) for y, x in
                data.grid_windows(*ds.rasters[r].image.shape[1:], window, 0)][:args.pictures]
        for i, (r, y, x) in enumerate(wins):
            save_attention_picture(os.path.join(out, f"attention_{i}.png"), backbone, ds, r, y, x, window, device)
        print(f"attention maps of {len(wins)} windows -> {out}")
    if "segmentation" not in ckpt:
        if not args.attention:
            raise ValueError(f"{args.ckpt}: a pre-training checkpoint has no decoder to evaluate; fine-tune it "
                             "with finetune_seg.py --init, or pass --attention for attention maps")
        return None

    def draw(r, pred, labels):
        if r < args.pictures:
            save_prediction_picture(os.path.join(out, f"prediction_{r}.png"), ds, r, pred, labels)
    metrics = evaluate(model, ds, window, overlap, args.batch_size, device, dtype, label_mask, draw)
    metrics.update(checkpoint=os.path.abspath(args.ckpt), data=ds.name, split=args.split, window=window, overlap=overlap)
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    print(format_table(metrics))
    print(f"metrics and pictures -> {out}")
    return metrics


if __name__ == "__main__":
    common.run_cli(main)
