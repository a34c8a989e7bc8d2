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
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

import common
import data
from data import IGNORE_INDEX
from models import SegmentationModel, backbone_depth, build_backbone
from segmentation import (PALETTE, add_backbone_args, add_split_args, boundary_mask, colourise, evaluate,
                          format_table, fully_convolutional, load_backbone, read_init, region_confusions,
                          region_metrics, sliding, split_scene)

KNN_NEIGHBOURS, KNN_TEMPERATURE = 20, 0.07  # DINO's weighted k-NN
PROBE_WEIGHT_DECAY = 1e-3                   # the linear probe's L2 penalty


# ----------------------------------------------------------------------------- frozen-representation probes

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


def knn_predict(train_x, train_y, test_x, num_classes, k=KNN_NEIGHBOURS, temperature=KNN_TEMPERATURE, chunk=4096):
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


def linear_probe(train_x, train_y, test_x, num_classes, weight_decay=PROBE_WEIGHT_DECAY, steps=200):
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
    init, band_info = read_init(args)
    if (init["backbone"]["name"] if init else args.backbone) == "cdcnn":
        raise ValueError("cdcnn gets a new first layer for every scene, so it has no frozen representation to "
                         "probe; evaluate it fine-tuned (finetune_seg.py)")
    ds, train, test, classes, info = split_scene(args, data.load_dataset(args.data, "tr", band_info=band_info))
    backbone = load_backbone(args, ds, init).to(device)
    window = None if fully_convolutional(backbone.config) else args.img_size
    feats = pixel_features(backbone, ds, window, args.img_size // 4, args.batch_size, device, dtype, args.probe_block)
    labels = torch.from_numpy(data.scene_labels(ds))
    X = feats.flatten(1).T  # (H*W, D)
    tr, te = torch.from_numpy(train.ravel()), torch.from_numpy(test.ravel())
    if args.probe == "knn":
        pred = knn_predict(X[tr], labels.ravel()[tr], X[te], ds.num_classes)
    else:
        pred = linear_probe(X[tr], labels.ravel()[tr], X[te], ds.num_classes)
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
    row = panels([true_c, false_c, colourise(labels), colourise(pred), error_map(pred, labels)],
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
    inp = torch.from_numpy(ds.normalise(img.copy()))[None].to(device)
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

def load_model(ckpt_path, device, teacher=False):
    """A checkpoint -> (model, ckpt). Segmentation checkpoints give a SegmentationModel (`teacher`: a --semi
    run's EMA teacher, not the model it reported); pre-training checkpoints give their backbone alone (enough
    for attention maps)."""
    ckpt = common.load_checkpoint(ckpt_path)
    backbone = build_backbone(**ckpt["backbone"])
    if teacher and ("segmentation" not in ckpt or "teacher" not in ckpt):
        raise ValueError(f"{ckpt_path}: --teacher needs a checkpoint of finetune_seg.py --semi (this one has no "
                         "segmentation teacher)")
    if "segmentation" not in ckpt:
        backbone.load_state_dict(common.backbone_weights(ckpt))
        return backbone.to(device).eval(), ckpt
    seg = ckpt["segmentation"]
    model = SegmentationModel(backbone, seg["decoder"], seg["num_classes"], full_res=seg["full_res"])
    model.load_state_dict(ckpt["teacher" if teacher else "model"])
    return model.to(device).eval(), ckpt


def check_data(ckpt, ckpt_path, ds):
    common.check_bands(ckpt["backbone"], ds.bands, ckpt_path, ds.name)
    seg = ckpt.get("segmentation")
    if seg and seg["num_classes"] != ds.num_classes:
        raise ValueError(f"{ckpt_path}: checkpoint predicts {seg['num_classes']} classes but {ds.name} has "
                         f"{ds.num_classes}")


def load_eval_data(args, ckpt):
    """The dataset and, for a scene, the label mask of the requested part of the run's saved split."""
    spec = args.data or ckpt["args"]["data"]
    if "," in spec:
        raise ValueError("eval.py evaluates one dataset at a time; pass --data")
    split = {"test": "ts", "train": "tr"}.get(args.split, args.split)
    if split not in data.WHU_SPLITS:
        raise ValueError(f"--split must be val, ts/test or tr/train, got {args.split!r}")
    ds = data.load_dataset(spec, split, band_info=ckpt["backbone"].get("bands"))
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
    p.add_argument("--window", type=int, default=None, help="sliding window (default: the training tile size; "
                   "the whole scene for fully convolutional backbones); e.g. 512 for whole WHU-OHS tiles")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="default: <checkpoint dir>/eval-<split> (probes: runs/probe)")
    p.add_argument("--teacher", action="store_true", help="a finetune_seg.py --semi checkpoint's EMA teacher "
                   "(default: its student, what the run reported; measured level, results/ip_semi900.md)")
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
        if args.teacher:
            raise ValueError("--teacher: a probe reads a pre-trained backbone, not a --semi run's teacher")
        return probe_main(args, device, dtype)
    model, ckpt = load_model(args.ckpt, device, args.teacher)
    ds, label_mask = load_eval_data(args, ckpt)
    if ckpt.get("segmentation", {}).get("pca"):  # trained on principal components: project the same way
        ds.pca = np.asarray(ckpt["segmentation"]["pca"], np.float32)
    check_data(ckpt, args.ckpt, ds)
    # Default window = the fine-tuning tile size; any multiple of the patch size works (e.g. whole 512 px
    # WHU-OHS tiles with a 64 px backbone: its position embeddings are interpolated).
    window = args.window or (None if fully_convolutional(ckpt["backbone"]) else
                             ckpt["args"].get("img_size") or ckpt["backbone"].get("img_size", 64))
    overlap = (window or 0) // 4
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)),
                                   f"eval-{args.split}" + ("-teacher" if args.teacher else ""))
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
