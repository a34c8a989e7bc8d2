"""What every trainer needs: launch, seeding, precision, schedules, checkpoints with exact resume, logging."""
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def init_distributed(device_arg="auto"):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_arg, int(os.environ.get("LOCAL_RANK", 0)), world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its convolution kernels once (CNNs, blur)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def pick_device(device_arg, local_rank, world):
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", local_rank)
    if device.type == "cuda" and world > 1:
        raise ValueError(f"--device {device_arg}: under torchrun process i uses cuda:LOCAL_RANK; choose the GPUs "
                         "with CUDA_VISIBLE_DEVICES instead")
    return device


def wrap_ddp(model, world):
    return model if world == 1 else DistributedDataParallel(model, gradient_as_bucket_view=True)


def add_run_args(p, out):
    """The options every trainer shares. Decoded rasters are cached in $HSI_SSL_CACHE (~/.cache/hsi-ssl)."""
    p.add_argument("--out", default=out, help="run directory: ckpt.pt, TensorBoard (tb/), metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 where fast")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default: GPU 4, CPU 0)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU; a minute or two of warm-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="log and check the checkpoint clock every N steps")
    p.add_argument("--ckpt-minutes", type=float, default=10.0, help="every N minutes, at the end, on SIGTERM/SIGUSR1")
    p.add_argument("--ckpt-every", type=int, default=0, help="also checkpoint every N steps (0: off)")
    p.add_argument("--sync-debug", action="store_true", help="CUDA: raise on any host-device sync inside a step")
    add_debug_arg(p)


def parse_with_preset(parser, argv, presets):
    """With --preset NAME, presets[NAME] become the defaults and argv is parsed again: explicit flags win."""
    parser.add_argument("--preset", default=None, choices=sorted(presets), help="a named set of defaults: "
                        + "; ".join(f"{k}: {' '.join(f'{a}={v}' for a, v in d.items())}" for k, d in presets.items()))
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**presets[args.preset])
        args = parser.parse_args(argv)
    return args


def add_debug_arg(parser):
    parser.add_argument("--debug", action="store_true", help="show the traceback of input errors (HSI_SSL_DEBUG=1)")


class DataError(ValueError):
    """Bad input data; the message names the file or folder and the problem (no traceback needed)."""


def run_cli(main):
    """Every script's entry point: an input mistake prints `error: <message>` on one line, exit status 2."""
    try:
        main()
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        if "--debug" in sys.argv[1:] or os.environ.get("HSI_SSL_DEBUG", "0") not in ("", "0"):
            raise
        hint = " (--debug for the traceback)" if isinstance(e, ValueError) and not isinstance(e, DataError) else ""
        print(f"error: {e}{hint}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.exit(2)


def launch(train, args):
    """Run train(args, rank, world, device); stopped by a signal, exit 128 + it so `train && finetune` stops."""
    rank, world, device = init_distributed(args.device)
    STOP.update(signal=None, stopped=False)
    in_main = threading.current_thread() is threading.main_thread()  # SLURM & co's signals ask to save and stop
    previous = {s: signal.signal(s, _request_stop) for s in (signal.SIGTERM, signal.SIGUSR1)} if in_main else {}
    try:
        result = train(args, rank, world, device)
        if dist.is_initialized():
            dist.barrier()  # a rank tearing gloo down while rank 0 still logged aborted once in CI
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if dist.is_initialized():
            dist.destroy_process_group()
    if STOP["stopped"]:
        raise SystemExit(128 + STOP["signal"])
    return result


STOP = {"signal": None, "stopped": False}


def _request_stop(signum, frame):
    STOP["signal"] = signum


class Checkpoints:
    """When to checkpoint and stop: checked every --log-every steps by one small all-reduce, so all ranks agree."""

    def __init__(self, args, steps, device):
        self.steps, self.every, self.check_every = steps, args.ckpt_every, max(1, args.log_every)
        self.seconds, self.device, self.last = 60 * args.ckpt_minutes, device, time.time()

    def due(self, done):
        save = done == self.steps or bool(self.every and done % self.every == 0)
        stop = False
        if done % self.check_every == 0 and done < self.steps:
            flags = torch.tensor([float(is_main() and time.time() - self.last >= self.seconds),
                                  float(STOP["signal"] is not None)], device=self.device)
            if dist.is_initialized():
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
            late, stop = (bool(v) for v in flags.tolist())
            save = save or late or stop
        if save:
            self.last = time.time()
        if stop:
            STOP.update(stopped=True, signal=STOP["signal"] or signal.SIGTERM)  # SIGTERM: another rank's signal
        return save, stop

    @staticmethod
    def report(done, path):
        print0(f"stopped by {signal.Signals(STOP['signal']).name} after step {done}; checkpoint {path}; "
               "continue with --resume")


@contextmanager
def no_host_sync(enabled, device):
    if not (enabled and device.type == "cuda"):
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def ema_update(teacher, student, momentum):
    """teacher <- momentum * teacher + (1 - momentum) * student, parameters and floating buffers
    (BatchNorm statistics) alike; integer buffers (counters) are copied. DINO's teacher and --semi's."""
    pairs = list(zip([*teacher.parameters(), *teacher.buffers()], [*student.parameters(), *student.buffers()],
                     strict=True))
    floats = [(t, s.detach()) for t, s in pairs if t.is_floating_point()]
    if floats:
        torch._foreach_lerp_(*map(list, zip(*floats)), 1 - momentum)
    for t, s in pairs:
        if not t.is_floating_point():
            t.copy_(s)


def broadcast_buffers(module):
    """Rank 0's buffers (BatchNorm running statistics) on every rank, before evaluating."""
    if dist.is_initialized():
        for b in module.buffers():
            dist.broadcast(b, 0)


def seed_everything(seed, rank=0):
    # Ranks get different streams so that, e.g., MAE masks differ across GPUs.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


def cpu_has_native_bf16():
    """Without AVX512-BF16 or AMX, oneDNN emulates bf16 matmuls, slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        return False


def resolve_dtype(name, device):
    if name == "auto":
        name = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--dtype fp16 needs a GPU; use bf16 or fp32 on CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device, dtype):
    return nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)


def _warmup_then(base, total_steps, warmup_steps, decay):
    """Per-iteration values: linear warm-up from 0 to base, then decay(t), t in [0, 1)."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(0.0, base, warmup_steps, endpoint=False)
    t = np.arange(total_steps - warmup_steps) / max(1, total_steps - warmup_steps)
    return np.concatenate([warmup, decay(t)])


def cosine_schedule(base, final, total_steps, warmup_steps=0):
    """Per-iteration values: linear warm-up, then cosine from base to final."""
    return _warmup_then(base, total_steps, warmup_steps,
                        lambda t: final + 0.5 * (base - final) * (1 + np.cos(math.pi * t)))


def poly_schedule(base, total_steps, power=0.9, warmup_steps=0):
    """Per-iteration values: linear warm-up, then base * (1 - t/T)^power (the segmentation standard)."""
    return _warmup_then(base, total_steps, warmup_steps, lambda t: base * (1 - t) ** power)


def step_schedule(base, total_steps, milestones=(0.6, 0.8), gamma=0.1):
    """Per-iteration values: base, multiplied by gamma at each milestone (a fraction of the run)."""
    passed = np.searchsorted(np.asarray(milestones) * total_steps, np.arange(total_steps), side="right")
    return base * gamma ** passed


def scaled_lr(base_lr, batch_size, world_size, rule="linear"):
    """lr for the global batch: linear, x batch / 256 (MAE, DINO), or sqrt, x sqrt(batch / 1024) (DINOv2)."""
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size * world_size / 1024)
    if rule != "linear":
        raise ValueError(f"unknown lr scaling rule {rule!r}; available: linear, sqrt")
    return base_lr * batch_size * world_size / 256


def decay_groups(params, weight_decay, lr_scale=1.0):
    """No weight decay on biases, norms and tokens (< 2 dims); the decayed group first; set_lr applies lr_scale."""
    params = [p for p in (params.parameters() if hasattr(params, "parameters") else params) if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "lr_scale": lr_scale},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": lr_scale}]
    return [g for g in groups if g["params"]]


def adamw(groups, lr, betas=(0.9, 0.95), device=torch.device("cpu")):
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def sgd(groups, lr, momentum=0.9):
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def optimizer_step(loss, optimizer, scaler, params, clip_grad=0.0):
    scaler.scale(loss).backward()
    if clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def rng_state():
    """This process's RNG states; CUDA: only its own device's, so a run resumed with fewer visible GPUs finds it."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(path, step, args, backbone, backbone_key, extra=None, **stateful):
    """Atomic, never over the last good one with a diverged model; backbone_key = (name in stateful, key prefix)."""
    for name, obj in stateful.items():
        if isinstance(obj, torch.nn.Module) and not all(torch.isfinite(p).all() for p in obj.parameters()):
            raise FloatingPointError(f"non-finite weights in {name} at step {step}; "
                                     f"the last good checkpoint is kept at {path}")
    state = {name: obj.state_dict() for name, obj in stateful.items()}
    state.update(step=step, args=vars(args), backbone=backbone, backbone_key=backbone_key, **(extra or {}))
    state["rng"] = [rng_state()]  # every rank's (a collective: all ranks call this), for an exact resume
    if dist.is_initialized():
        state["rng"] = [None] * dist.get_world_size()
        dist.all_gather_object(state["rng"], rng_state())
    if is_main():
        torch.save(state, f"{path}.tmp")
        os.replace(f"{path}.tmp", path)
    if dist.is_initialized():
        dist.barrier()


def resume(path, rank, backbone, **stateful):
    """Load what save_checkpoint wrote into `stateful` and this rank's RNG; returns the step."""
    ckpt = load_checkpoint(path)
    check_config(ckpt["backbone"], backbone, path)
    for name, obj in stateful.items():
        if isinstance(obj, torch.amp.GradScaler) and not ckpt[name]:
            continue  # a bf16/fp32 run's disabled scaler: a fresh one lets the run go on in fp16
        try:
            obj.load_state_dict(ckpt[name])
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. another head or decoder than the run had
            raise ValueError(f"{path}: its {name} does not fit this run's ({str(e).splitlines()[0]}); resume with "
                             "the flags the run started with") from e
    restore_rng(ckpt["rng"], rank, dist.get_world_size() if dist.is_initialized() else 1,
                seed=(ckpt["args"].get("seed", 0), ckpt["step"]))
    print0(f"resumed {path} at step {ckpt['step']}")
    return ckpt["step"]


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no checkpoint there")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise ValueError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e


def brief(config):
    """A config for printing: long lists (wavelengths, band ids) as their length."""
    if isinstance(config, dict):
        return {k: brief(v) for k, v in config.items()}
    return f"<{len(config)} values>" if isinstance(config, list) and len(config) > 8 else config


def backbone_weights(ckpt):
    """The backbone's state dict from any trainer's checkpoint (for DINO the EMA teacher's)."""
    key, prefix = ckpt["backbone_key"]
    return {k[len(prefix):]: v for k, v in ckpt[key].items() if k.startswith(prefix)}


def check_bands(config, bands, path, data_name="the data"):
    """A cross-domain config's {domain: bands} with one domain reads any data with that band count."""
    trained = config["in_chans"]
    if isinstance(trained, dict) and len(trained) == 1 and not isinstance(bands, dict):
        trained = next(iter(trained.values()))
    if trained != bands:
        raise ValueError(f"{path}: checkpoint was trained on {trained} bands but {data_name} has {bands} bands")


def check_config(saved, current, path):
    """Refuse a checkpoint whose model config differs, naming the difference (band count first)."""
    check_bands(saved, current["in_chans"], path)
    diffs = {k: (saved.get(k), current.get(k)) for k in set(saved) | set(current) if saved.get(k) != current.get(k)}
    if diffs:
        text = ", ".join(_band_diff(s, c) if k == "bands" else f"{k}: checkpoint {s!r} vs now {c!r}"
                         for k, (s, c) in sorted(diffs.items()))
        raise ValueError(f"{path}: checkpoint model config does not match ({text})")


def _band_diff(saved, current):
    a, b = set((saved or {}).get("ids") or []), set((current or {}).get("ids") or [])
    if a == b:
        return "bands: same band indices, different wavelengths"
    return (f"bands: the checkpoint reads {len(a)} bands, the data now {len(b)}; only the checkpoint reads "
            f"{sorted(a - b)[:20]}, only the data {sorted(b - a)[:20]} (changed bad_bands or nodata?)")


def restore_rng(states, rank, world=1, seed=(0, 0)):
    """This rank's saved RNG state; saved by another process count, fresh streams from (seed, step, rank)."""
    if len(states) == world:
        set_rng_state(states[rank])
        return
    print0(f"warning: {len(states)} processes wrote the checkpoint, {world} resume it: it goes on, not bit-exactly")
    seed_everything(int(np.random.SeedSequence(list(seed)).generate_state(1)[0]), rank)


def prepare_out_dir(out, resume):
    """Never overwrite a previous run by accident: an existing checkpoint needs --resume."""
    ckpt = os.path.join(out, "ckpt.pt")
    if resume and not os.path.isfile(ckpt):
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt}")
    if not resume and os.path.isfile(ckpt):
        raise FileExistsError(f"{ckpt} exists; pass --resume to continue that run or choose another --out")
    if is_main():
        os.makedirs(out, exist_ok=True)
    return ckpt


class Meters:
    """Per-step scalars kept on the device, averaged over steps and ranks when flushed: one host sync per log."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, **values):
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def flush(self, step, ckpt_path):
        """Means since the last flush. Raises on a non-finite loss: one NaN anywhere poisons its sum."""
        keys, world = sorted(self.sums), dist.get_world_size() if dist.is_initialized() else 1
        means = all_reduce_sum(torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)) / world
        self.sums, self.count = {}, 0
        out = dict(zip(keys, means.tolist()))
        if not math.isfinite(out.get("loss", 0.0)):
            raise FloatingPointError(f"non-finite loss at or before step {step}; stopping. The last good checkpoint "
                                     f"is kept at {ckpt_path} (if one was written). Lower the lr or check the data.")
        return out


GPU_PEAK_TFLOPS = {  # dense tensor-core peaks from the vendors' data sheets: (bf16/fp16, tf32)
    "H200": (989.4, 494.7), "H200 NVL": (835.5, 417.8), "H100": (989.4, 494.7), "H100 PCIe": (756.0, 378.0),
    "H100 NVL": (835.5, 417.8), "A100": (312.0, 156.0), "L40S": (362.1, 181.0), "L40": (181.0, 90.5),
    "L4": (121.0, 60.0), "A10": (125.0, 62.5), "RTX 4090": (165.2, 82.6), "V100": (125.0, 15.7),
}


def gpu_peak(name, dtype):
    """(peak, key): whole words match (an L40 is no L4, an A10G no A10); the longest wins (H100 PCIe)."""
    words = re.split(r"[\s_-]+", name.upper())
    best = None
    for key, (half, tf32) in GPU_PEAK_TFLOPS.items():
        k = key.upper().split()
        if any(words[i:i + len(k)] == k for i in range(len(words))) and (best is None or len(k) > len(best[0])):
            best = (k, tf32 if dtype == torch.float32 else half, key)
    return (None, None) if best is None else best[1:]


def matmul_tflops(dtype, n=2048, seconds=1.0, probes=5):
    """The CPU's practical peak: the best of `probes` timings of an n x n matmul (other jobs may hold the cores)."""
    a = b = torch.full((n, n), 0.5, dtype=dtype)  # no random draws: runs must stay reproducible
    a @ b  # warm-up
    best = 0.0
    for _ in range(probes):
        reps, t0 = 0, time.perf_counter()
        while reps == 0 or time.perf_counter() - t0 < seconds / probes:
            a @ b
            reps += 1
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12)
    return best


def counted_flops(fn):
    """FLOPs of fn(), RNG untouched; attention as plain matmuls (the counter sees fused attention as zero)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    cuda = [torch.cuda.current_device()] if torch.cuda.is_initialized() else []  # drop-path draws on the device
    with torch.random.fork_rng(devices=cuda), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_tflops(device, dtype):
    """(peak TFLOP/s for MFU, its source): a GPU's data-sheet peak, or the CPU's matmul rate measured now."""
    if device.type != "cuda":
        return matmul_tflops(dtype), "measured CPU matmul, best of 5 probes"
    name = torch.cuda.get_device_name(device)
    peak, key = gpu_peak(name, dtype)
    return peak, f"{key} data sheet" if peak else f"unknown GPU {name}: no MFU; add its peak to common.GPU_PEAK_TFLOPS"


class Logger:
    """TensorBoard + metrics.jsonl on rank 0; given FLOPs per image and the peak, img/s comes with tflops, mfu."""

    def __init__(self, out, args, start_step=0, flops_per_image=None, peak=None):
        self.enabled, self.flops, self.peak = is_main(), flops_per_image, peak
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(out, "tb"))
            self.jsonl = open(os.path.join(out, "metrics.jsonl"), "a")
            self.writer.add_text("args", json.dumps(vars(args), indent=1, default=str))
            try:
                sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
            except (OSError, subprocess.TimeoutExpired):
                sha = None
            print0(f"git {sha or None} | args {json.dumps(vars(args), default=str)}")
        self.t0, self.last_step = time.time(), start_step

    def scalars(self, step, values, images=None):
        """Log values; with `images` (per step, all ranks) also img_per_s since the last call. Returns them."""
        now = time.time()
        if images and step > self.last_step:
            values = {**values, "img_per_s": (step - self.last_step) * images / (now - self.t0)}
            if self.flops:
                world = dist.get_world_size() if dist.is_initialized() else 1
                values["tflops"] = values["img_per_s"] * self.flops / 1e12 / world
                if self.peak:  # a busy machine's CPU probe can read low: the peak is never below what was reached
                    self.peak = max(self.peak, values["tflops"])
                    values["mfu"] = values["tflops"] / self.peak
        self.t0, self.last_step = now, step
        if self.enabled:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        return values

    def image(self, tag, img, step):
        if self.enabled:
            self.writer.add_image(tag, img.clamp(0, 1), step)

    def close(self):
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
