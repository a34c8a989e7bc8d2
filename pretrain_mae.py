"""Masked image modelling of a hyperspectral backbone: MAE for `vit` and `ssvit` (both streams masked
and reconstructed), SimMIM for the factorised `sst` (MaskedSST-style: mask tokens, tube masking, L1).

    python pretrain_mae.py                                   # small real run on the bundled Indian Pines
    python pretrain_mae.py --backbone ssvit --out runs/mae_ssvit
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
# neighbouring spectra. Flips stay (they move pixels, never mix them); SimMIM masks 4 x 4 pixel squares.
PRESETS = {**models.PRESETS,
           "maskedsst": {**models.PRESETS["maskedsst"], "crop_scale": (1.0, 1.0), "flips": True, "mask_block": 4}}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="data/indian_pines", help="scene folder or WHU-OHS root; comma-separate several")
    p.add_argument("--split", default="tr", help="WHU-OHS split to pre-train on (ignored for scene folders)")
    p.add_argument("--backbone", default="vit", help="vit | ssvit (spatial-spectral ViT) | sst (MaskedSST-style)")
    p.add_argument("--size", default="tiny", help=f"{' | '.join(models.VIT_SIZES)} (base = the study's ViT-B; "
                   "micro = MaskedSST's 96-d model)")
    p.add_argument("--img-size", type=int, default=64, help="tile size in pixels; tiles are cut, never resized")
    p.add_argument("--patch-size", type=int, default=8)
    p.add_argument("--spectral-patch", type=int, default=None, help="bands per spectral token: ssvit band groups "
                   "(default 2), sst spectral blocks (default 8; bands must divide evenly)")
    p.add_argument("--registers", type=int, default=None, help="register tokens (default: vit 0, ssvit 4 per stream)")
    p.add_argument("--ffn", default="mlp", choices=["mlp", "swiglu"])
    p.add_argument("--mask-ratio", type=float, default=None, help="share of patches masked (MAE 0.75; sst 0.7)")
    p.add_argument("--spectral-mask-ratio", type=float, default=0.5, help="ssvit: share of band groups dropped")
    p.add_argument("--hide-bands-from-spatial", action=argparse.BooleanOptionalAction, default=True,
                   help="ssvit: zero the band groups dropped for the spectral stream in the spatial stream's patches too "
                   "(exact hiding; but then the spatial encoder never sees all bands until fine-tuning). With --no-... "
                   "the spatial stream sees all bands of its visible patches, and through fusion the spectral "
                   "decoder can read the dropped groups at those pixels (part of its target)")
    p.add_argument("--mask-block", type=int, default=1, help="sst (SimMIM): mask squares of N x N patches "
                   "(MaskedSST: 4 with 1-pixel patches; single masked pixels are filled in from their neighbours)")
    p.add_argument("--norm-pix-loss", action=argparse.BooleanOptionalAction, default=True,
                   help="per-patch normalised targets (MAE paper: better representations)")
    p.add_argument("--decoder-dim", type=int, default=None, help="default by --size (micro 96, tiny 128, small 256, "
                   "base 512 as the MAE paper). The decoder must be large enough for the encoder: a tiny one (128 x 4 at tiny) "
                   "leaves the reconstruction to the encoder's last blocks, whose features then suit pixels, not "
                   "probes (MAE paper Table 1a: deeper decoders give better linear probes)")
    p.add_argument("--decoder-depth", type=int, default=None, help="default by --size (micro/tiny/small 4, base 8 as the "
                   "MAE paper); see --decoder-dim")
    p.add_argument("--decoder-heads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--warmup-steps", type=int, default=30)
    p.add_argument("--blr", type=float, default=1.5e-3, help="base lr; lr = blr * effective batch / 256. The MAE "
                   "paper's 1.5e-4 is for batch 4096 and 800 epochs; short runs need ~10x more")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--clip-grad", type=float, default=0.0, help="max grad norm; 0 = off (MAE uses none)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.2, 1.0), help="random resized crop area; "
                   "pass 1 1 to disable")
    p.add_argument("--flips", action=argparse.BooleanOptionalAction, default=True, help="random rot90/flips")
    p.add_argument("--device-augment", action=argparse.BooleanOptionalAction, default=None, help="augment batched "
                   "on the device, the loader workers only cut raw windows (default: on with CUDA, off on CPU): "
                   "CPU workers cannot feed a GPU (~2.4 ms per tile for crop and flips)")
    p.add_argument("--brightness", type=float, default=0.0, help="global reflectance gain jitter, e.g. 0.1")
    p.add_argument("--contrast", type=float, default=0.0)
    p.add_argument("--band-gain", type=float, default=0.0, help="per-band gain jitter, e.g. 0.02")
    p.add_argument("--jitter-spread", type=float, default=0.25, help="no band's tile mean moves by more than this "
                   "share of its within-tile std (pretrain_dino.py's); <= 0: unbounded. The jitter applies to "
                   "reflectance only: scenes without a value_scale get none, with a printed notice")
    p.add_argument("--image-every", type=int, default=100, help="reconstructions to TensorBoard every N steps")
    p.add_argument("--rgb-bands", type=int, nargs=3, default=None, help="bands shown in pictures (default: true colour)")
    common.add_recipe_args(p, sst=True)
    common.add_any_sensor_arg(p)
    common.add_scene_sampling_arg(p)
    common.add_run_args(p, out="runs/mae")
    return common.parse_with_preset(p, argv, PRESETS)


def build_model(args, datasets):
    ds = datasets[0]
    encoder = build_backbone(args.backbone, args.size, ds.bands, args.img_size, args.patch_size,
                             num_registers=args.registers, ffn=args.ffn, spectral_patch=args.spectral_patch,
                             wavelengths=ds.input_wavelengths, bands=data.bands_record(datasets), init=args.init_scheme,
                             pos_embed=args.pos_embed, block_order=args.block_order, embed_norm=args.embed_norm)
    if args.backbone == "sst":
        return SimMIM(encoder, args.mask_ratio or 0.7, args.mask_block)
    if args.mask_block != 1:
        raise ValueError("--mask-block is for --backbone sst (SimMIM)")
    dim, depth, heads = MAE_DECODER_SIZES[args.size]
    return MAE(encoder, args.decoder_dim or dim, args.decoder_depth or depth, args.decoder_heads or heads,
               args.mask_ratio or 0.75, args.norm_pix_loss, args.spectral_mask_ratio, args.hide_bands_from_spatial)


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
    datasets = data.load_datasets(args.data, args.split, args.cache_dir, data.ANY_SENSOR if args.any_sensor else None)
    in_chans = data.check_same_bands(datasets, args.backbone)
    model = build_model(args, datasets).to(device)
    lr = common.scaled_lr(args.blr, args.batch_size, world)
    common.print0(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params | {in_chans} bands | "
                  f"lr {lr:.2e} (blr {args.blr} x {args.batch_size * world} / 256) | {dtype} on {device}")
    optimizer = common.adamw(common.decay_groups(model, args.weight_decay), lr, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    lr_schedule = common.cosine_schedule(lr, args.min_lr, args.steps, args.warmup_steps)
    state = dict(model=model, optimizer=optimizer, scaler=scaler)
    start = common.resume(ckpt_path, rank, model.encoder.config, **state) if args.resume else 0
    ddp = common.wrap_ddp(model, world)
    ddp = torch.compile(ddp) if args.compile else ddp
    crop = None if tuple(args.crop_scale) == (1, 1) else tuple(args.crop_scale)
    augment = data.Augment(args.flips, crop, args.brightness, args.contrast, args.band_gain,
                           args.jitter_spread if args.jitter_spread > 0 else None)
    data.jitter_notice(datasets, augment, common.print0)
    on_device = args.device_augment if args.device_augment is not None else device.type == "cuda"
    batches = data.augmented_batches(datasets, args.img_size, augment, args.seed, args.batch_size, start, rank, world,
                                     args.workers, device, on_device, args.scene_sampling)
    bands = args.rgb_bands or data.display_bands(datasets[0])
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
            common.optimizer_step(loss, optimizer, scaler, model.parameters(), args.clip_grad)
            meters.add(loss=loss)
        done = step + 1
        save, stop = checkpoints.due(done)
        if save or done % args.log_every == 0:  # the only host syncs: every log interval
            stats = {**meters.flush(done, ckpt_path), "lr": float(lr_schedule[step])}
            stats = logger.scalars(done, stats, images=args.batch_size * world)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", lr=f"{stats['lr']:.1e}", mfu=f"{stats.get('mfu', 0):.1%}")
        if done % args.image_every == 0 and common.is_main():
            log_reconstructions(logger, model, x, outputs, bands, done)
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
