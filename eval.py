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
import torch.nn.functional as F
from PIL import Image, ImageDraw

import common
import data
from data import IGNORE_INDEX
from models import SegmentationModel, build_backbone

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


def format_table(m):
    lines = [f"{'class':<32} {'IoU':>7} {'acc':>7} {'pixels':>9}"]
    for c in m["per_class"]:
        fmt = lambda v: "    -  " if v is None else f"{100 * v:7.2f}"  # noqa: E731
        lines.append(f"{c['name'][:32]:<32} {fmt(c['iou'])} {fmt(c['acc'])} {c['support']:>9}")
    lines.append(f"OA {100 * m['oa']:.2f} | AA {100 * m['aa']:.2f} | mIoU {100 * m['miou']:.2f} | "
                 f"mIoU (classes in GT) {100 * m['miou_present']:.2f} | kappa {m['kappa']:.4f} | {m['pixels']} px")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- inference

@torch.no_grad()
def predict_raster(model, ds, index, window, overlap, batch_size, device, dtype):
    """Sliding-window logits (K, H, W) for one raster (overlapping windows, logits averaged) and its
    (H, W) labels, assembled from the same windows."""
    H, W = ds.rasters[index].image.shape[1:]
    tiles = data.GridTiles(ds, window, overlap, rasters=[index])
    total, count = None, torch.zeros(1, H, W)
    labels = np.full((H, W), IGNORE_INDEX, np.int64)
    for x, lab, where in torch.utils.data.DataLoader(tiles, batch_size=batch_size):
        with common.autocast(device, dtype):
            logits = model(x.to(device)).float().cpu()
        if total is None:
            total = torch.zeros(logits.shape[1], H, W)
        for out, win_lab, (_, y, x0) in zip(logits, lab.numpy(), where.tolist()):
            h, w = min(window, H - y), min(window, W - x0)
            total[:, y:y + h, x0:x0 + w] += out[:, :h, :w]
            count[:, y:y + h, x0:x0 + w] += 1
            labels[y:y + h, x0:x0 + w] = win_lab[:h, :w]
    return total / count, labels


def evaluate(model, ds, window, overlap, batch_size, device, dtype, label_mask=None, on_raster=None):
    """Metrics over every raster of ds (only pixels in label_mask for a one-raster scene split).
    on_raster(index, prediction, labels) is called for each raster, e.g. to draw pictures."""
    was_training = model.training
    model.eval()
    cm = np.zeros((ds.num_classes, ds.num_classes), np.int64)
    for r in range(len(ds.rasters)):
        logits, labels = predict_raster(model, ds, r, window, overlap, batch_size, device, dtype)
        pred = logits.argmax(0).numpy()
        if label_mask is not None:
            labels[~label_mask] = IGNORE_INDEX
        cm += confusion_matrix(pred, labels, ds.num_classes)
        if on_raster is not None:
            on_raster(r, pred, labels)
    model.train(was_training)
    return metrics_from_confusion(cm, ds.class_names)


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
    model = SegmentationModel(backbone, seg["decoder"], seg["num_classes"])
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
    train_mask, test_mask = data.load_split(split_path, ds.rasters[0].image.shape[1:])
    return ds, test_mask if split == "ts" else train_mask


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint of finetune_seg.py (or of a pre-training run with --attention)")
    p.add_argument("--data", default=None, help="default: the data the checkpoint was trained on")
    p.add_argument("--split", default="test", help="WHU-OHS: val | ts (test); scenes: test | train of the run's saved split")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--window", type=int, default=None, help="sliding window (default: the training tile size); "
                   "e.g. 512 for whole WHU-OHS tiles")
    p.add_argument("--overlap", type=int, default=None, help="window overlap in px (default: window / 4)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="default: <checkpoint dir>/eval-<split>")
    p.add_argument("--attention", action="store_true", help="also save last-block attention maps per head "
                   "(spatial; and spectral for ssvit/sst)")
    p.add_argument("--pictures", type=int, default=4, help="rasters (or attention windows) to draw")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    common.add_debug_arg(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    _, _, device = common.init_distributed(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    model, ckpt = load_model(args.ckpt, device)
    ds, label_mask = load_eval_data(args, ckpt)
    if ckpt.get("segmentation", {}).get("pca"):  # trained on principal components: project the same way
        ds.pca = np.asarray(ckpt["segmentation"]["pca"], np.float32)
    check_data(ckpt, args.ckpt, ds)
    # Default window = the fine-tuning tile size; any multiple of the patch size works (e.g. whole 512 px
    # WHU-OHS tiles with a 64 px backbone: its position embeddings are interpolated).
    window = args.window or ckpt["args"].get("img_size") or ckpt["backbone"].get("img_size", 64)
    overlap = window // 4 if args.overlap is None else args.overlap
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
