"""Masked image modelling of a hyperspectral backbone: MAE for `vit` and `ssvit` (both streams masked
and reconstructed), SimMIM for the factorised `sst` (MaskedSST-style: mask tokens, tube masking, L1).

    python pretrain_mae.py                                   # small real run on the bundled Indian Pines
    python pretrain_mae.py --backbone sst --spectral-patch 25 --out runs/mim_sst
    python pretrain_mae.py --preset maskedsst --out runs/maskedsst   # MaskedSST's tokens, windows and order
    torchrun --nproc_per_node 2 pretrain_mae.py --out runs/mae2
    python pretrain_mae.py --data /data/WHU-OHS --size base --batch-size 128 --steps 50000 --out runs/mae_b
"""
import argparse

import torch
from tqdm import tqdm

import common
import data
import models
from models import MAE, MAE_DECODER_SIZES, SimMIM, build_backbone, unpatchify

# MaskedSST pre-trains on random 8 x 8 windows without resampling: a random resized crop blends
# neighbouring spectra. SimMIM masks 4 x 4 pixel squares.
PRESETS = {**models.PRESETS, "maskedsst": {**models.PRESETS["maskedsst"], "crop_scale": (1.0, 1.0), "mask_block": 4}}
IMAGE_EVERY = 100  # reconstructions to TensorBoard every N steps


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/indian_pines", help="scene folder or WHU-OHS root; comma-separate several")
    p.add_argument("--backbone", default="vit", help="vit | ssvit (spatial-spectral ViT) | sst (MaskedSST-style)")
    p.add_argument("--size", default="tiny", help=f"{' | '.join(models.VIT_SIZES)} (micro: MaskedSST's model)")
    p.add_argument("--img-size", type=int, default=64, help="tile size in pixels; tiles are cut, never resized")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--spectral-patch", type=int, default=None, help="bands per spectral token: ssvit band groups "
                   "(default 2), sst spectral blocks (default 8; bands must divide evenly)")
    p.add_argument("--registers", type=int, default=None, help="register tokens (default: vit 0, ssvit 4 per stream)")
    p.add_argument("--ffn", default="mlp", choices=["mlp", "swiglu"])
    p.add_argument("--init-scheme", default="trunc_normal", choices=models.INIT_SCHEMES, help="MAE: xavier")
    p.add_argument("--pos-embed", default="learned", choices=models.POS_EMBEDS, help="sin-cos, trained or fixed (MAE)")
    p.add_argument("--block-order", default="alternating", choices=models.BLOCK_ORDERS,
                   help="sst; MaskedSST: spatial-first")
    p.add_argument("--embed-norm", action=argparse.BooleanOptionalAction, default=False, help="sst (MaskedSST: on)")
    p.add_argument("--mask-ratio", type=float, default=None, help="share of patches masked (MAE 0.75; sst 0.7)")
    p.add_argument("--spectral-mask-ratio", type=float, default=0.5, help="ssvit: share of band groups dropped")
    p.add_argument("--mask-block", type=int, default=1, help="sst (SimMIM): mask squares of N x N patches "
                   "(MaskedSST: 4, as 1-pixel patches are otherwise filled in from their neighbours)")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True, help="MAE's per-patch "
                   "normalised targets")
    p.add_argument("--decoder-dim", type=int, default=None, help="default by --size (micro 96 ... base 512 as MAE)")
    p.add_argument("--decoder-depth", type=int, default=None, help="default by --size (4; base 8 as MAE)")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--blr", type=float, default=1.5e-3, help="base lr; lr = blr x global batch / 256 (MAE: 1.5e-4 "
                   "for 800 epochs; short runs need more)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.2, 1.0), help="random resized crop area; "
                   "1 1 = none (crops blend neighbouring spectra)")
    p.add_argument("--device-augment", action=argparse.BooleanOptionalAction, default=None, help="augment on the "
                   "device, the loader only cuts windows (default: with CUDA: CPU workers cannot feed a GPU)")
    p.add_argument("--any-sensor", action="store_true", help="resample every scene onto data.GRID (any sensor)")
    common.add_run_args(p, out="runs/mae")
    return common.parse_with_preset(p, argv, PRESETS)


def build_model(args, datasets):
    ds, sst = datasets[0], args.backbone == "sst"
    encoder = build_backbone(args.backbone, args.size, ds.bands, args.img_size, args.patch_size,
                             num_registers=args.registers, ffn=args.ffn, spectral_patch=args.spectral_patch,
                             wavelengths=ds.input_wavelengths, bands=data.bands_record(datasets), init=args.init_scheme,
                             pos_embed=args.pos_embed, block_order=args.block_order if sst else None,
                             embed_norm=args.embed_norm if sst else None)
    if sst:
        return SimMIM(encoder, args.mask_ratio or 0.7, args.mask_block)
    if args.mask_block != 1:
        raise ValueError("--mask-block is for --backbone sst (SimMIM)")
    dim, depth, heads = MAE_DECODER_SIZES[args.size]
    return MAE(encoder, args.decoder_dim or dim, args.decoder_depth or depth, heads, args.mask_ratio or 0.75,
               args.norm_pix_loss, args.spectral_mask_ratio)


def log_reconstructions(logger, model, x, outputs, bands, step, n=4):
    """Input | masked input | reconstruction, for the first n images, from three bands."""
    recon, mask = model.reconstruct(x.float(), *outputs)
    x, recon, mask = x[:n].float(), recon[:n], mask[:n]
    p, (h, w) = model.encoder.patch_size, model.encoder.grid
    pixel_mask = unpatchify(mask[..., None].expand(-1, -1, p * p), p, 1, h, w)  # (n, 1, H, W)
    rows = [torch.cat([data.render_bands(x[i], bands), data.render_bands(x[i], bands) * (1 - pixel_mask[i]),
                       data.render_bands(recon[i], bands, ref=x[i])], dim=2) for i in range(len(x))]
    logger.image("reconstruction", torch.cat(rows, dim=1), step)


def main(argv=None):
    common.launch(train, parse_args(argv))


def train(args, rank, world, device):
    common.seed_everything(args.seed, rank)
    dtype = common.resolve_dtype(args.dtype, device)
    ckpt_path = common.prepare_out_dir(args.out, args.resume)
    datasets = data.load_datasets(args.data, band_info=data.ANY_SENSOR if args.any_sensor else None)
    in_chans = data.check_same_bands(datasets, args.backbone)
    model = build_model(args, datasets).to(device)
    lr = common.scaled_lr(args.blr, args.batch_size, world)
    common.print0(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | {in_chans} bands | "
                  f"lr {lr:.2e} (blr {args.blr} x {args.batch_size * world} / 256) | {dtype} on {device}")
    optimizer = common.adamw(common.decay_groups(model, args.weight_decay), lr, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    lr_schedule = common.cosine_schedule(lr, 0.0, args.steps, args.warmup_steps)
    state = dict(model=model, optimizer=optimizer, scaler=scaler)
    start = common.resume(ckpt_path, rank, model.encoder.config, **state) if args.resume else 0
    ddp = common.wrap_ddp(model, world)
    ddp = torch.compile(ddp) if args.compile else ddp
    augment = data.Augment(flips=True, crop_scale=None if tuple(args.crop_scale) == (1, 1) else tuple(args.crop_scale))
    on_device = device.type == "cuda" if args.device_augment is None else args.device_augment
    batches = data.augmented_batches(datasets, args.img_size, augment, args.seed, args.batch_size, start, rank, world,
                                     args.workers, device, on_device)
    peak, source = common.peak_tflops(device, dtype)
    flops = model.flops_per_image()
    common.print0(f"{flops / 1e9:.2f} GFLOP per image (training) | peak {peak or 0:.1f} TFLOP/s ({source})")
    logger = common.Logger(args.out, args, start, flops, peak)
    meters, checkpoints = common.Meters(), common.Checkpoints(args, args.steps, device)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not common.is_main())
    for step in bar:
        with common.no_host_sync(args.sync_debug, device):
            x = next(batches)  # (B, C, H, W) augmented, normalised
            common.set_lr(optimizer, lr_schedule[step])
            with common.autocast(device, dtype):
                loss, *outputs = ddp(x)
            common.optimizer_step(loss, optimizer, scaler, model.parameters())
            meters.add(loss=loss)
        done = step + 1
        save, stop = checkpoints.due(done)
        if save or done % args.log_every == 0:  # the only host syncs: every log interval
            stats = {**meters.flush(done, ckpt_path), "lr": float(lr_schedule[step])}
            stats = logger.scalars(done, stats, images=args.batch_size * world)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.1e}", mfu=f"{stats.get('mfu', 0):.1%}")
        if done % IMAGE_EVERY == 0 and common.is_main():
            log_reconstructions(logger, model, x, outputs, data.display_bands(datasets[0]), done)
        if save:
            common.save_checkpoint(ckpt_path, done, args, model.encoder.config, ("model", "encoder."), **state)
        if stop:
            checkpoints.report(done, ckpt_path)
            break
    logger.close()
    if not common.STOP["stopped"]:
        common.print0(f"done: {args.steps} steps, checkpoint {ckpt_path}")


if __name__ == "__main__":
    common.run_cli(main)
