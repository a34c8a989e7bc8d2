"""Speed of each trainer's step on synthetic tensors of the real shapes, against the hardware's limit.

    python bench.py --size tiny                                # mae, dino, seg x vit, ssvit, sst
    python bench.py --size base --dtype bf16 --compile --trainers mae --backbones vit
    python bench.py --loader --data /data/WHU-OHS              # tiles/s of the real input pipeline

Per row: img/s, ms/step, training FLOPs per image from the architecture (the MAE encoder on visible
tokens only, the DINO teacher forward-only) and as torch.utils.flop_counter counts them, achieved TFLOP/s,
MFU against the device's peak (GPU data sheets; on CPU the fp32 and bf16 matmul rates measured in this
run), and peak memory. Prints one markdown table.
"""
import argparse
import resource
import time
from types import SimpleNamespace

import numpy as np
import torch

import common
import data
import finetune_seg
import pretrain_dino
import pretrain_mae
from models import SegmentationModel, build_backbone


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trainers", default="mae,dino,seg", help="comma list of mae, dino, seg")
    p.add_argument("--backbones", default="vit,ssvit,sst", help="comma list; sst runs SimMIM under 'mae' and no DINO; "
                   "resnet50v1c runs only under 'seg' (with deeplabv3plus)")
    p.add_argument("--decoders", default="linear", help="seg: comma list of linear, conv, segmenter")
    p.add_argument("--frozen", action="store_true", help="seg: frozen backbone (linear probe) instead of fine-tuning")
    p.add_argument("--full-res", action=argparse.BooleanOptionalAction, default=True, help="seg: the decoders' "
                   "full-resolution path (finetune_seg.py's default)")
    p.add_argument("--patch-sizes", default="8", help="comma list of transformer patch sizes, e.g. 8,4,2 (64 px tiles)")
    p.add_argument("--size", default="tiny")
    p.add_argument("--bands", type=int, default=32, help="WHU-OHS: 32")
    p.add_argument("--batch-size", type=int, default=None, help="default: the study's (MAE 128, DINO ViT 128, "
                   "DINO SS-ViT 64, seg 32) on GPU, 16 on CPU")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--device", default="auto")
    p.add_argument("--loader", action="store_true", help="measure the data pipeline instead (needs --data)")
    p.add_argument("--any-sensor", action="store_true", help="--loader: read --data through the wavelength grid "
                   "(several sensors mixed in every batch)")
    p.add_argument("--data", default="data/indian_pines")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    common.add_debug_arg(p)
    return p.parse_args(argv)


def wavelengths(args):
    return data.WHU_WAVELENGTHS if args.bands == len(data.WHU_WAVELENGTHS) else None


STUDY_BATCH = {("mae", "vit"): 128, ("mae", "ssvit"): 64, ("mae", "sst"): 64, ("dino", "vit"): 128,
               ("dino", "ssvit"): 64, ("seg", "vit"): 32, ("seg", "ssvit"): 32, ("seg", "sst"): 32}



def mae_case(args, backbone, B, device):
    targs = pretrain_mae.parse_args(["--backbone", backbone, "--size", args.size, "--patch-size", str(args.patch)])
    wl = wavelengths(args)
    ds = SimpleNamespace(bands=args.bands, wavelengths=wl, input_wavelengths=wl, band_info=None, grid=None)
    model = pretrain_mae.build_model(targs, [ds]).to(device)
    x = torch.randn(B, args.bands, 64, 64, device=device)
    return model, model.parameters(), lambda m: m(x)[0], model.flops_per_image()


def dino_case(args, backbone, B, device):
    targs = pretrain_dino.parse_args(["--backbone", backbone, "--size", args.size, "--patch-size", str(args.patch), "--prototypes",
                                      "65536" if args.size == "base" else "1024", "--local-crops", "8"])
    student, teacher = (m.to(device) for m in pretrain_dino.build(targs, args.bands, wavelengths(args)))
    criterion = pretrain_dino.DINOLoss(student.backbone.streams).to(device)
    g = torch.randn(2 * B, args.bands, 64, 64, device=device)
    loc = torch.randn(8 * B, args.bands, 32, 32, device=device)
    masks = pretrain_dino.token_masks(targs, 0, 0, 1, B, student.backbone, device)

    def loss(m):  # the EMA update is part of the step
        with torch.no_grad():
            common.ema_update(teacher, student, 0.999)
        return criterion(m(g, loc, masks), pretrain_dino.teacher_forward(teacher, g, masks), masks, 0.07)[0]
    return student, student.parameters(), loss, pretrain_dino.flops_per_tile(targs, student)


def seg_case(args, backbone, B, device, decoder="linear"):
    kw = {"wavelengths": wavelengths(args)} if backbone in ("ssvit", "sst") else {}
    if backbone != "resnet50v1c":
        kw["patch_size"] = args.patch
    model = SegmentationModel(build_backbone(backbone, args.size, args.bands, **kw), decoder, 24,
                              frozen_backbone=args.frozen, full_res=args.full_res).to(device)
    x = torch.randn(B, args.bands, 64, 64, device=device)
    y = torch.randint(0, 24, (B, 64, 64), device=device)
    targs = finetune_seg.parse_args(["--img-size", "64"])
    flops = finetune_seg.train_flops(model, args.bands, targs, device)[0]
    return model, model.parameters(), lambda m: finetune_seg.segmentation_loss(m(x), y), flops


CASES = {"mae": mae_case, "dino": dino_case, "seg": seg_case}


def counted(model, loss_fn, B):
    """torch.utils.flop_counter's FLOPs of one forward + backward, per image."""
    def step():
        loss_fn(model).backward()
    flops = common.counted_flops(step) / B
    model.zero_grad(set_to_none=True)
    return flops


def run(args, trainer, backbone, device, dtype, decoder=None):
    B = args.batch_size or (STUDY_BATCH.get((trainer, backbone), 32) if device.type == "cuda" else 16)
    torch.manual_seed(0)
    model, params, loss_fn, arch_flops = CASES[trainer](args, backbone, B, device, *([decoder] if decoder else []))
    params = [p for p in params if p.requires_grad]
    counter_flops = counted(model, loss_fn, B) if trainer != "seg" else arch_flops
    optimizer = common.adamw(common.decay_groups(params, 0.05), 1e-4, device=device)
    fwd = torch.compile(model) if args.compile else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        with common.autocast(device, dtype):
            loss = loss_fn(fwd)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # process high-water mark, GiB
    return dict(batch=B, img_s=B / dt, ms=1e3 * dt, arch=arch_flops / 1e9, counted=counter_flops / 1e9,
                tflops=B / dt * arch_flops / 1e12, mem=mem)


def mfu_text(tflops, peak, bf16=None):
    """'12.3%' (and ' / 45%' of the bf16 matmul rate on CPU); 'n/a' for a GPU missing from the peak table."""
    if peak is None:
        return "n/a"
    return f"{tflops / peak:.1%}" + (f" / {tflops / bf16:.0%}" if bf16 else "")


def bench_models(args):
    _, _, device = common.init_distributed(args.device)
    dtype = common.resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        peak, source = common.peak_tflops(device, dtype)
        peaks, bf16 = f"peak {peak} TFLOP/s ({source})", None
    else:  # both rates: the CPU target is stated against the bf16 matmul rate
        rates = {n: common.matmul_tflops(t) for n, t in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        peak, bf16 = rates["bf16" if dtype == torch.bfloat16 else "fp32"], rates["bf16"]
        peaks = f"measured matmul fp32 {rates['fp32']:.3f} / bf16 {rates['bf16']:.3f} TFLOP/s"
    print(f"{device} {torch.cuda.get_device_name(device) if device.type == 'cuda' else ''} | {dtype} | "
          f"compile {args.compile} | size {args.size} | {args.bands} bands, 64 px | {peaks}")
    extra = " / of bf16 matmul" if bf16 else ""
    print(f"| trainer | backbone | patch | batch | img/s | ms/step | GFLOP/img (arch) | GFLOP/img (counter) | TFLOP/s | MFU{extra} | peak mem GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for trainer in args.trainers.split(","):
        for backbone in args.backbones.split(","):
            if (trainer == "dino" and backbone == "sst") or (backbone == "resnet50v1c" and trainer != "seg"):
                continue
            decoders = [None] if trainer != "seg" else ["deeplabv3plus"] if backbone == "resnet50v1c" else \
                args.decoders.split(",")
            patches = [8] if backbone == "resnet50v1c" else [int(p) for p in args.patch_sizes.split(",")]
            for decoder in decoders:
                for args.patch in patches:
                    r = run(args, trainer, backbone, device, dtype, decoder)
                    mfu = mfu_text(r["tflops"], peak, bf16)
                    name = trainer if decoder is None else f"seg {decoder}{' frozen' if args.frozen else ''}" + \
                        ("" if args.full_res else " study head")
                    print(f"| {name} | {backbone} | {'-' if backbone == 'resnet50v1c' else args.patch} | {r['batch']} | "
                          f"{r['img_s']:.1f} | {r['ms']:.0f} | {r['arch']:.2f} | {r['counted']:.2f} | "
                          f"{r['tflops']:.3f} | {mfu} | {r['mem']:.2f} |", flush=True)


def bench_loader(args):
    """Tiles/s of the trainers' input pipeline (data.augmented_batches: what pretrain_mae.py and
    pretrain_dino.py read), per augmentation, where it runs (per tile in the loader workers, or batched
    on --device with the workers only cutting raw windows) and worker count."""
    _, _, device = common.init_distributed(args.device)
    datasets = data.load_datasets(args.data, band_info=data.ANY_SENSOR if args.any_sensor else None)
    B = args.batch_size or 32
    views = {"cut only": data.Augment(), "MAE augment (flips + random resized crop)": data.Augment(True, (0.2, 1.0)),
             "DINO multi-crop (2 global + 8 local, jitter, blur)": data.MultiCrop(64, 32, 8)}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"{args.data} | batch {B} | device {device} | torch threads {torch.get_num_threads()}")
    print("| pipeline | augmented | workers | tiles/s |")
    print("|---|---|---|---|")
    raw = data.RandomTiles(datasets, 64, 0, labels=False, raw=True)
    for workers in args.workers:  # the workers' part with --device-augment
        batches = iter(data.StepLoader(raw, B, 0, 0, 1, workers, device))
        next(batches)
        t0 = time.perf_counter()
        for _ in range(args.steps * 4):
            next(batches)
        print(f"| raw windows only (the workers' part with --device-augment) | - | {workers} | "
              f"{args.steps * 4 * B / (time.perf_counter() - t0):.0f} |", flush=True)
    for name, augment in views.items():
        for on_device in (False, True):
            for workers in args.workers:
                batches = data.augmented_batches(datasets, 64, augment, 0, B, 0, 0, 1, workers, device, on_device)
                next(batches)  # workers started
                sync()
                t0 = time.perf_counter()
                for _ in range(args.steps * 4):
                    next(batches)
                sync()
                where = f"batched on {device.type}" if on_device else "per tile in the workers"
                print(f"| {name} | {where} | {workers} | {args.steps * 4 * B / (time.perf_counter() - t0):.0f} |",
                      flush=True)


def main(argv=None):
    a = parse_args(argv)
    np.set_printoptions(precision=3)
    bench_loader(a) if a.loader else bench_models(a)


if __name__ == "__main__":
    common.run_cli(main)
