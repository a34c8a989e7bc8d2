"""Cross-domain contrastive pre-training (Lee & Kwon 2022; docs/cross_domain_cnn.md) of a CNN on unlabelled scenes
of different sensors: one first layer per scene, one shared trunk. A step's positives are the pixels of one p x p
region per scene, its negatives the other regions'. Transfer with `finetune_seg.py --init <out>/ckpt.pt`.

    python pretrain_contrast.py                           # every scene in ../shared/data but indian_pines
    python pretrain_contrast.py --data a,b,c --region-size 7 --steps 2000 --out runs/contrast_p7
"""
import argparse
import os

import torch
import torch.nn.functional as F
from tqdm import tqdm

import common
import data
from models import build_backbone

MARGIN = 2  # the 5x5 first layer's reach: regions are read with this much context around them


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data", help="scene folders (one domain each), or a folder of them")
    p.add_argument("--exclude", default="indian_pines", help="scenes of a --data folder left out (the downstream one)")
    p.add_argument("--region-size", type=int, default=5, help="p: one p x p region per scene and iteration")
    p.add_argument("--temperature", type=float, default=0.07, help="InfoNCE temperature (the paper's 0.07)")
    p.add_argument("--width", type=int, default=128, help="channels of the first layers and the trunk")
    p.add_argument("--depth", type=int, default=5, help="residual modules (two 1x1 convs each) in the trunk")
    p.add_argument("--steps", type=int, default=200, help="iterations (the paper's 200; longer runs are fine)")
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--weight-decay", type=float, default=0.005)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max grad norm; 0 = off (the paper's: can collapse)")
    common.add_run_args(p, out="runs/contrast")
    return p.parse_args(argv)


def source_scenes(spec, exclude):
    """--data as comma-separated scene folders; a folder of them expands to its scenes (sorted) but `exclude`."""
    if "," in spec or os.path.isfile(os.path.join(spec, "image.tif")):
        return spec
    if not os.path.isdir(spec):
        raise data.DataError(f"{spec}: no such folder; pass --data scene folders, comma-separated")
    skip = {s.strip() for s in exclude.split(",")}
    scenes = sorted(d for d in os.listdir(spec) if os.path.isfile(os.path.join(spec, d, "image.tif")) and d not in skip)
    if not scenes:
        raise data.DataError(f"{spec}: no scene folders (with image.tif) other than {sorted(skip)}")
    return ",".join(os.path.join(spec, d) for d in scenes)


class SceneRegions(torch.utils.data.Dataset):
    """Item i: a random flipped/rotated normalised window per dataset, a pure function of (seed, i): exact resume."""

    def __init__(self, datasets, size, seed=0):
        self.tiles = [data.RandomTiles([ds], size, seed, data.Augment(flips=True)) for ds in datasets]

    def __len__(self):
        return 2 ** 62

    def __getitem__(self, i):
        return [tiles[i * len(self.tiles) + d][0] for d, tiles in enumerate(self.tiles)]  # [(C_d, size, size)]


def region_features(model, regions, domains, p):
    """regions [(1, C_d, p + 2 * MARGIN, same)] -> features (D*p*p, width) of the central pixels, region ids."""
    f = model(regions, domains)[:, :, MARGIN:MARGIN + p, MARGIN:MARGIN + p]  # (D, width, p, p)
    region = torch.arange(len(regions) * p * p, device=f.device) // (p * p)
    return f.flatten(2).transpose(1, 2).reshape(-1, f.shape[1]), region


def multi_positive_infonce(z, region, temperature):
    """Pixel features z (N, D), region ids (N,). With s_ij = cos(z_i, z_j) / temperature, P(i) the other pixels of
    i's region, N(i) the other regions': mean_i sum_{j in P(i)} -log(e^s_ij / (e^s_ij + sum_{k in N(i)} e^s_ik))."""
    z = F.normalize(z.float(), dim=1)
    s = z @ z.T / temperature  # (N, N)
    same = region[:, None] == region[None, :]
    negatives = s.masked_fill(same, float("-inf")).logsumexp(dim=1, keepdim=True)  # (N, 1): log sum_k exp(s_ik)
    positives = same & ~torch.eye(len(z), dtype=torch.bool, device=z.device)
    terms = torch.logaddexp(s, negatives) - s  # (N, N): the single-positive term for every pair
    return terms.masked_fill(~positives, 0.0).sum(1).mean()


@torch.no_grad()
def similarities(z, region):
    """Mean cosine of positive and of negative pairs (both near 1: collapse); masked sums need no device sync."""
    z = F.normalize(z.float(), dim=1)
    cos = z @ z.T
    same = region[:, None] == region[None, :]
    pos = (same & ~torch.eye(len(z), dtype=torch.bool, device=z.device)).float()
    neg = (~same).float()
    return (cos * pos).sum() / pos.sum(), (cos * neg).sum() / neg.sum()


def main(argv=None):
    common.launch(train, parse_args(argv))


def train(args, rank, world, device):
    common.seed_everything(args.seed, rank)
    dtype = common.resolve_dtype(args.dtype, device)
    ckpt_path = common.prepare_out_dir(args.out, args.resume)
    datasets = data.load_datasets(source_scenes(args.data, args.exclude))
    domains = {ds.name: ds.bands for ds in datasets}
    if len(domains) < 2 or len(domains) != len(datasets):
        raise data.DataError(f"{args.data}: contrastive pre-training needs two or more scenes with distinct names "
                             f"(negatives come from the other scenes), got {[ds.name for ds in datasets]}")
    model = build_backbone("cdcnn", in_chans=domains, width=args.width, depth=args.depth).to(device)
    p = args.region_size
    common.print0(f"{sum(q.numel() for q in model.parameters()) / 1e6:.2f}M params | domains {domains} | "
                  f"{p}x{p} regions | {dtype} on {device}")
    optimizer = common.sgd(common.decay_groups(model, args.weight_decay), args.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    lr_schedule = common.step_schedule(args.lr, args.steps)  # x0.1 at 60% and 80% (the paper's)
    state = dict(model=model, optimizer=optimizer, scaler=scaler)
    start = common.resume(ckpt_path, rank, model.config, **state) if args.resume else 0
    ddp = common.wrap_ddp(model, world)
    ddp = torch.compile(ddp) if args.compile else ddp
    regions = SceneRegions(datasets, p + 2 * MARGIN, args.seed)
    batches = iter(data.step_loader(regions, 1, start, rank, world, args.workers, device))
    logger = common.Logger(args.out, args, start)
    meters, checkpoints = common.Meters(), common.Checkpoints(args, args.steps, device)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not common.is_main())
    for step in bar:
        with common.no_host_sync(args.sync_debug, device):
            xs = next(batches)  # per domain (1, C_d, p+4, p+4), on the device
            common.set_lr(optimizer, lr_schedule[step])
            with common.autocast(device, dtype):
                z, region = region_features(ddp, xs, list(domains), p)
            loss = multi_positive_infonce(z, region, args.temperature)  # one region per scene; DDP averages ranks
            common.optimizer_step(loss, optimizer, scaler, model.parameters(), args.clip_grad)
            pos_sim, neg_sim = similarities(z.detach(), region)
            meters.add(loss=loss, pos_sim=pos_sim, neg_sim=neg_sim)
        done = step + 1
        save, stop = checkpoints.due(done)
        if save or done % args.log_every == 0:  # the only host syncs: every log interval
            stats = {**meters.flush(done, ckpt_path), "lr": float(lr_schedule[step])}
            logger.scalars(done, stats, images=len(xs) * world)
            bar.set_postfix(loss=f"{stats['loss']:.3f}", pos=f"{stats['pos_sim']:.2f}", neg=f"{stats['neg_sim']:.2f}")
        if save:
            common.save_checkpoint(ckpt_path, done, args, model.config, ("model", ""), **state)
        if stop:
            checkpoints.report(done, ckpt_path)
            break
    logger.close()
    if not common.STOP["stopped"]:
        common.print0(f"done: {args.steps} steps, checkpoint {ckpt_path}")


if __name__ == "__main__":
    common.run_cli(main)
