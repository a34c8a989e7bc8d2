"""What finetune_seg.py and eval.py share: the flags that name a backbone and a scene's label split, the
backbone those flags and a checkpoint give, sliding-window inference and the metrics."""
import numpy as np
import torch
import torch.distributed as dist

import common
import data
from data import IGNORE_INDEX
from models import VIT_SIZES, build_backbone

PALETTE = np.array([  # fixed class colours; index = class id
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128), (255, 255, 255), (100, 60, 160), (40, 90, 40), (200, 120, 120),
    (90, 160, 200), (160, 200, 90), (200, 160, 40), (40, 40, 200), (200, 40, 120), (120, 200, 200),
    (80, 80, 80), (180, 100, 20)], np.uint8)
BOUNDARY_PX = 2


# ----------------------------------------------------------------------------- flags and backbones

def add_backbone_args(p):
    """The flags that name a backbone, the same in finetune_seg.py and the probes of eval.py, so that one
    compare.py configuration (e.g. `--init runs/mae/ckpt.pt --twin`) means the same network in both."""
    p.add_argument("--init", default=None, help="pre-training checkpoint of any trainer; its backbone config wins "
                   "over --backbone/--size/...; none = random init")
    p.add_argument("--twin", action="store_true", help="with --init: the checkpoint's exact backbone with random "
                   "weights, the same-architecture control of every 'pre-training helps' claim")
    p.add_argument("--backbone", default="vit", help="vit | ssvit | sst | pixel (the per-pixel spectrum) | "
                   "resnet50v1c (with --decoder deeplabv3plus) | cdcnn (cross-domain CNN, always fine-tuned)")
    p.add_argument("--size", default="tiny", help=" | ".join(VIT_SIZES))
    p.add_argument("--img-size", type=int, default=64, help="tile size (training tiles and inference windows)")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--spectral-patch", type=int, default=None, help="ssvit/sst: bands per spectral token")
    p.add_argument("--depth", type=int, default=None, help="cdcnn from scratch: residual modules (default 5; "
                   "Lee & Kwon's scratch baseline has 4)")
    p.add_argument("--any-sensor", action="store_true", help="read the scene through the common wavelength grid "
                   "(automatic with a checkpoint trained so)")


def add_split_args(p):
    """A scene's sparse-label protocol (data.scene_split)."""
    p.add_argument("--labels-per-class", type=int, default=None, help="N labelled training pixels per class "
                   "(at most half of a class)")
    p.add_argument("--train-fraction", type=float, default=None, help="share of each class for training "
                   "(default 0.1 unless --labels-per-class)")
    p.add_argument("--min-class-pixels", type=int, default=0, help="only classes with at least M labelled pixels "
                   "take part (e.g. 400: Lee & Kwon's 9 Indian Pines classes)")
    p.add_argument("--split-seed", type=int, default=0)


def split_scene(args, ds):
    """(dataset with the kept classes, train mask, test mask, kept classes or None, split info)."""
    fraction = args.train_fraction if args.train_fraction is not None or args.labels_per_class else 0.1
    ds, train, test, classes = data.scene_split(ds, args.split_seed, args.labels_per_class, fraction,
                                                args.min_class_pixels)
    info = dict(seed=args.split_seed, per_class=args.labels_per_class, fraction=fraction, classes=classes,
                min_class_pixels=args.min_class_pixels)
    return ds, train, test, classes, info


def read_init(args):
    """The --init checkpoint (read once) or None, and how data must be read for it: the bands it was
    trained on; else, with --any-sensor, the common wavelength grid; else (None) the data's own bands."""
    ckpt = common.load_checkpoint(args.init) if args.init else None
    if args.twin and ckpt is None:
        raise ValueError("--twin needs --init CKPT: the twin is that checkpoint's backbone with random weights")
    band_info = ckpt["backbone"].get("bands") if ckpt else None  # the backbone config's band record
    return ckpt, data.ANY_SENSOR if band_info is None and args.any_sensor else band_info


def load_backbone(args, ds, ckpt, **overrides):
    """The backbone the flags and `ckpt` (read_init) name: random from the flags; or the checkpoint's
    config (with `overrides`, e.g. drop_path_rate) and weights; with --twin its config and fresh random
    weights from the current torch seed. A cross-domain CNN gets a new first layer for this scene (its
    pre-training scenes' first layers stay behind) and only its shared trunk is transferred."""
    if ckpt is None:
        config = dict(name=args.backbone, size=args.size, in_chans=ds.bands, img_size=args.img_size,
                      patch_size=args.patch_size, bands=ds.band_info)
        if args.backbone == "cdcnn":
            config = dict(name="cdcnn", in_chans={ds.name: ds.bands}, depth=args.depth)
        elif args.backbone not in ("pixel", "resnet50v1c"):  # the transformers; --preset maskedsst sets the last two
            config.update(spectral_patch=args.spectral_patch, **overrides,
                          wavelengths=None if getattr(args, "pca", None) else ds.input_wavelengths,
                          **{k: getattr(args, k) for k in ("block_order", "embed_norm") if hasattr(args, k)})
        return build_backbone(**config)
    config = {**ckpt["backbone"], **{k: v for k, v in overrides.items() if v is not None}}
    cdcnn = config["name"] == "cdcnn"
    if cdcnn:
        if args.depth not in (None, config["depth"]):
            raise ValueError(f"{args.init}: --depth {args.depth} differs from the checkpoint's trunk ({config['depth']})")
        config["in_chans"] = {ds.name: ds.bands}
    else:
        common.check_bands(config, ds.bands, args.init, ds.name)
    backbone = build_backbone(**config)
    if args.twin:
        common.print0(f"random twin of {args.init}: backbone {common.brief(config)}, random weights")
        return backbone
    weights = common.backbone_weights(ckpt)
    if cdcnn:
        weights = {k: v for k, v in weights.items() if k.startswith("trunk.")}
        weights.update({k: v for k, v in backbone.state_dict().items() if k.startswith("first.")})
    backbone.load_state_dict(weights)
    common.print0(f"backbone {common.brief(config)} from {args.init} (step {ckpt['step']})")
    return backbone


def fully_convolutional(config):
    """Backbones whose output at a pixel depends on a small neighbourhood only: inference runs on the
    whole scene at once (no tile borders, no padded context)."""
    return config["name"] in ("pixel", "cdcnn")


# ----------------------------------------------------------------------------- inference

@torch.no_grad()
def sliding(fn, ds, index, window, overlap, batch_size, device, dtype):
    """fn(x) -> (B, K, h, w) maps at the window's resolution, averaged over overlapping windows of raster
    `index` -> (K, H, W), and the raster's (H, W) labels. window None: the whole raster in one pass, for
    fully convolutional models, which then see no tile borders."""
    H, W = ds.rasters[index].image.shape[1:]
    if window is None:
        img, labels = ds.crop(index, 0, 0, H, W)
        with common.autocast(device, dtype):
            return fn(torch.from_numpy(ds.normalise(img))[None].to(device)).float().cpu()[0], labels
    total, count = None, torch.zeros(1, H, W)
    labels = np.full((H, W), IGNORE_INDEX, np.int64)
    for x, lab, where in torch.utils.data.DataLoader(data.GridTiles(ds, window, overlap, [index]), batch_size):
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


def evaluate(model, ds, window, overlap, batch_size, device, dtype, label_mask=None, on_raster=None, shard=False):
    """Metrics over every raster of ds (only pixels in label_mask for a one-raster scene split).
    on_raster(index, prediction, labels) is called for each raster this process predicts (pictures).
    shard=True under torchrun: rank r predicts rasters r, r + world, ... and the confusion matrices are
    summed over the ranks, so every rank returns the same metrics (and takes the same decisions)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if shard and dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    cms = np.zeros((2, ds.num_classes, ds.num_classes), np.int64)  # boundary, interior pixels
    for r in range(rank, len(ds.rasters), world):
        logits, labels = sliding(model, ds, r, window, overlap, batch_size, device, dtype)
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


# ----------------------------------------------------------------------------- metrics

def confusion_matrix(pred, target, num_classes):
    """(K, K) counts, rows = ground truth, columns = prediction; IGNORE_INDEX pixels are skipped."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    keep = target != IGNORE_INDEX
    idx = target[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def metrics_from_confusion(cm, class_names):
    """OA, AA (mean accuracy over the classes in the ground truth), mIoU over the classes in the ground
    truth or the prediction (`miou`) and over those in the ground truth only (`miou_present`, the
    WHU-OHS authors' convention), Cohen's kappa, and per-class IoU/accuracy."""
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


def boundary_mask(labels, radius=BOUNDARY_PX):
    """(H, W) labels -> True at every labelled pixel with a pixel of another label within `radius` px.
    Unlabelled pixels count as another label (they are other land cover); beyond the image border is no
    boundary. Computed on the whole ground truth, training pixels included."""
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
    """Metrics of all scored pixels, plus ['boundary'] / ['interior']: OA, AA, mIoU and pixels within
    BOUNDARY_PX of a class boundary and of the rest (sharpness as a number)."""
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


def colourise(labels):
    """(H, W) class ids -> (H, W, 3) uint8 in the fixed class colours; unlabelled black."""
    out = PALETTE[np.clip(labels, 0, len(PALETTE) - 1) % len(PALETTE)].copy()
    out[labels == IGNORE_INDEX] = 0
    return out
