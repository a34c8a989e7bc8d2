"""What every training script needs: distributed init/teardown, seeding, precision, schedules,
checkpoints with exact resume, and logging. Nothing model- or data-specific lives here."""
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


# ----------------------------------------------------------------------------- distributed

def init_distributed(device_arg="auto"):
    """Works with and without torchrun. Returns (rank, world_size, device)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device_arg, int(os.environ.get("LOCAL_RANK", 0)), world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN times its convolution kernels once (CNNs, blur)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def pick_device(device_arg, local_rank, world):
    """--device: auto (a GPU when there is one), cpu, cuda (cuda:LOCAL_RANK under torchrun) or cuda:N
    (one process only; under torchrun pick the GPUs with CUDA_VISIBLE_DEVICES)."""
    if device_arg == "auto":
        device_arg = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_arg)
    if device.type != "cuda":
        return device
    if device.index is None:
        return torch.device("cuda", local_rank)
    if world > 1:
        raise ValueError(f"--device {device_arg}: under torchrun process i uses cuda:LOCAL_RANK; choose the GPUs "
                         "with CUDA_VISIBLE_DEVICES instead")
    return device


def wrap_ddp(model, world, **kwargs):
    """DistributedDataParallel with more than one process (gradients reduced straight from the buckets,
    no second copy), the model itself otherwise."""
    if world == 1:
        return model
    return DistributedDataParallel(model, gradient_as_bucket_view=True, **kwargs)


def add_run_args(parser, out):
    """The options every training script shares: where the run lives, precision, device, loader, seed,
    logging and checkpoint intervals. Decoded rasters are cached in $HSI_SSL_CACHE (~/.cache/hsi-ssl)."""
    p = parser
    p.add_argument("--out", default=out, help="run directory: ckpt.pt, TensorBoard (tb/), metrics.jsonl")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on GPU and on CPUs with native bf16, else fp32")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default: 4 on GPU, 0 on CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model: faster steps on GPU after a "
                   "compile warm-up of a minute or two")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10, help="log, and check the checkpoint clock and stop "
                   "signals, every N steps (the only host syncs of the loop)")
    p.add_argument("--ckpt-minutes", type=float, default=10.0, help="write the checkpoint every N minutes, at the "
                   "end, and on SIGTERM/SIGUSR1 (then stop: what cluster schedulers send before killing a job)")
    p.add_argument("--ckpt-every", type=int, default=0, help="also write it every N steps (0: off)")
    p.add_argument("--sync-debug", action="store_true", help="CUDA: raise on any host-device synchronisation inside "
                   "a training step (torch.cuda.set_sync_debug_mode), to find what stalls the GPU")
    add_debug_arg(p)


def parse_with_preset(parser, argv, presets):
    """Parse argv; with --preset NAME, presets[NAME] (argparse names -> values) become the defaults
    and argv is parsed again, so flags given explicitly still win."""
    parser.add_argument("--preset", default=None, choices=sorted(presets), help="a named set of defaults: "
                        + "; ".join(f"{k}: {' '.join(f'{a}={v}' for a, v in d.items())}" for k, d in presets.items()))
    args = parser.parse_args(argv)
    if args.preset:
        parser.set_defaults(**presets[args.preset])
        args = parser.parse_args(argv)
    return args


def add_debug_arg(parser):
    parser.add_argument("--debug", action="store_true", help="on an error in the input, show the Python traceback "
                        "instead of the one-line message (also: HSI_SSL_DEBUG=1)")


class DataError(ValueError):
    """Bad input data; the message names the file or folder and the problem (no traceback needed)."""


USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)


def run_cli(main):
    """Every script's entry point: main() runs; a mistake in the input (bad data, a missing file, a
    checkpoint that does not fit, a diverged run) prints `error: <message>` on one line to stderr and exits
    with status 2, without a traceback. `--debug` or HSI_SSL_DEBUG=1 lets the exception through."""
    try:
        main()
    except USER_ERRORS as e:
        if "--debug" in sys.argv[1:] or os.environ.get("HSI_SSL_DEBUG", "0") not in ("", "0"):
            raise
        hint = " (--debug for the traceback)" if isinstance(e, ValueError) and not isinstance(e, DataError) else ""
        print(f"error: {e}{hint}", file=sys.stderr, flush=True)
        cleanup_distributed()
        sys.exit(2)


def launch(train, args):
    """Run train(args, rank, world, device) single-process or under torchrun; always tear down. A run that
    a stop signal ended early (see Checkpoints) exits with status 128 + the signal's number, as if killed
    by it, so that `train && finetune` chains stop there; its checkpoint is written."""
    rank, world, device = init_distributed(args.device)
    STOP.update(signal=None, stopped=False)
    try:
        with stop_signals():
            result = train(args, rank, world, device)
    finally:
        cleanup_distributed()
    if STOP["stopped"]:
        raise SystemExit(128 + STOP["signal"])
    return result


# ----------------------------------------------------------------------------- stopping and checkpoint timing

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what SLURM & co send before killing a job (SIGUSR1: --signal)
STOP = {"signal": None, "stopped": False}


def _request_stop(signum, frame):
    STOP["signal"] = signum


@contextmanager
def stop_signals():
    """While training, SIGTERM and SIGUSR1 only ask the run to save and stop (Checkpoints acts on it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _request_stop) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Checkpoints:
    """When to write the checkpoint: every --ckpt-minutes (rank 0's clock), every --ckpt-every steps if
    set, at the last step, and after a stop signal reached any rank (then the run stops: `due` returns
    stop=True). Clock and signals are checked every --log-every steps with one small all-reduce, so all
    ranks decide together and the other steps never wait for the host."""

    def __init__(self, args, steps, device):
        self.steps, self.every, self.check_every = steps, args.ckpt_every, max(1, args.log_every)
        self.seconds, self.device, self.last = 60 * args.ckpt_minutes, device, time.time()

    def due(self, done):
        """(save, stop) after step `done`."""
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
            STOP["stopped"] = True
            STOP["signal"] = STOP["signal"] or signal.SIGTERM  # the signal reached another rank
        return save, stop

    @staticmethod
    def report(done, path):
        print0(f"stopped by {signal.Signals(STOP['signal']).name} after step {done}; checkpoint {path}; "
               "continue with --resume")


@contextmanager
def no_host_sync(enabled, device):
    """With --sync-debug on CUDA, any host-device synchronisation inside raises."""
    if not (enabled and device.type == "cuda"):
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main():
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)


def all_reduce_sum(t):
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def all_reduce_mean(t):
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def broadcast_buffers(module):
    """Rank 0's buffers (BatchNorm running statistics) on every rank, e.g. before evaluating."""
    if dist.is_initialized():
        for b in module.buffers():
            dist.broadcast(b, 0)


def seed_everything(seed, rank=0):
    # Ranks get different streams so that, e.g., MAE masks differ across GPUs.
    random.seed(seed + rank)
    np.random.seed(seed + rank)
    torch.manual_seed(seed + rank)


# ----------------------------------------------------------------------------- precision

def cpu_has_native_bf16():
    """bf16 matmuls are only fast on CPUs with AVX512-BF16 or AMX; elsewhere oneDNN emulates them and
    they run ~3x slower than fp32 (measured on this project's 2-core Xeon without those flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name, device):
    if name == "auto":
        name = "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"
    if name == "fp16" and device.type != "cuda":
        raise ValueError("--dtype fp16 needs a GPU; use bf16 or fp32 on CPU")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast(device, dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- schedules

def _warmup_then(base, total_steps, warmup_steps, start_warmup, decay):
    """Per-iteration values: linear warm-up from start_warmup to base, then decay(t) for t in [0, 1)."""
    warmup_steps = min(warmup_steps, total_steps)
    warmup = np.linspace(start_warmup, base, warmup_steps, endpoint=False)
    t = np.arange(total_steps - warmup_steps) / max(1, total_steps - warmup_steps)
    return np.concatenate([warmup, decay(t)])


def cosine_schedule(base, final, total_steps, warmup_steps=0, start_warmup=0.0):
    """Per-iteration values: linear warm-up from start_warmup to base, then cosine to final."""
    return _warmup_then(base, total_steps, warmup_steps, start_warmup,
                        lambda t: final + 0.5 * (base - final) * (1 + np.cos(math.pi * t)))


def poly_schedule(base, total_steps, power=0.9, warmup_steps=0):
    """Per-iteration values: linear warm-up, then base * (1 - t/T)^power (the segmentation standard)."""
    return _warmup_then(base, total_steps, warmup_steps, 0.0, lambda t: base * (1 - t) ** power)


def step_schedule(base, total_steps, milestones=(0.6, 0.8), gamma=0.1):
    """Per-iteration values: base, multiplied by gamma at each milestone (a fraction of the run)."""
    passed = np.searchsorted(np.asarray(milestones) * total_steps, np.arange(total_steps), side="right")
    return base * gamma ** passed


def scaled_lr(base_lr, batch_size, world_size, reference_batch=None, rule="linear"):
    """lr for a global batch of batch_size x world_size: linear, base_lr x batch / reference (256; MAE,
    DINO), or sqrt, base_lr x sqrt(batch / reference) (1024; DINOv2's rule for AdamW)."""
    if rule == "sqrt":
        return base_lr * math.sqrt(batch_size * world_size / (reference_batch or 1024))
    if rule != "linear":
        raise ValueError(f"unknown lr scaling rule {rule!r}; available: linear, sqrt")
    return base_lr * batch_size * world_size / (reference_batch or 256)


def decay_groups(params, weight_decay, lr_scale=1.0):
    """Parameter groups (of a module or a list of parameters) without weight decay on biases, norms and
    tokens (every parameter with < 2 dims); the decayed group comes first. lr_scale is applied by set_lr."""
    params = [p for p in (params.parameters() if hasattr(params, "parameters") else params) if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay, "lr_scale": lr_scale},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0, "lr_scale": lr_scale}]
    return [g for g in groups if g["params"]]


def adamw(groups, lr, betas=(0.9, 0.95), device=torch.device("cpu")):
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device.type == "cuda")


def sgd(groups, lr, momentum=0.9):
    return torch.optim.SGD(groups, lr=lr, momentum=momentum)


def optimizer_step(loss, optimizer, scaler, params, clip_grad=0.0):
    """Backward (scaled for fp16), optional gradient-norm clipping of `params`, step, zero the grads."""
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


# ----------------------------------------------------------------------------- checkpoints

def rng_state():
    """This process's RNG states; CUDA: only its own device's (set_device), so that a run resumed where
    fewer GPUs are visible (one per process under torchrun) finds what it needs."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(cuda)


def gather_rng_states():
    """Every rank's RNG state, so a resumed DDP run continues each rank's stream exactly."""
    state = rng_state()
    if not dist.is_initialized():
        return [state]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def save_checkpoint(path, step, args, backbone, backbone_key, extra=None, **stateful):
    """Atomic: write to a temporary file, then rename, so a crash never leaves a half-written checkpoint.
    `stateful`: name -> object with state_dict() (model, optimizer, scaler, ...). `backbone` is the
    backbone's config and `backbone_key` = (stateful name, key prefix) says where its weights are, so any
    trainer's checkpoint can initialise another (`backbone_weights`). Weights are checked first so a
    diverged model never replaces the last good checkpoint."""
    for name, obj in stateful.items():
        if isinstance(obj, torch.nn.Module) and not params_finite(obj):
            raise FloatingPointError(f"non-finite weights in {name} at step {step}; "
                                     f"the last good checkpoint is kept at {path}")
    state = {name: obj.state_dict() for name, obj in stateful.items()}
    state.update(step=step, args=vars(args), backbone=backbone, backbone_key=backbone_key, **(extra or {}))
    state["rng"] = gather_rng_states()  # collective: every rank must call this function
    if is_main():
        tmp = f"{path}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def resume(path, rank, backbone, **stateful):
    """Load everything save_checkpoint wrote back into `stateful` and this rank's RNG; returns the step.
    A GradScaler's empty state (saved by a bf16/fp32 run) leaves the scaler fresh, so such a run can go on
    in fp16. Another process count continues the run, not bit-exactly (see restore_rng)."""
    ckpt = load_checkpoint(path)
    check_config(ckpt["backbone"], backbone, path)
    for name, obj in stateful.items():
        if isinstance(obj, torch.amp.GradScaler) and not ckpt[name]:
            continue  # a disabled scaler's state: nothing to restore
        try:
            obj.load_state_dict(ckpt[name])
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. another head or decoder than the run had
            raise ValueError(f"{path}: its {name} does not fit this run's ({str(e).splitlines()[0]}); resume with "
                             "the flags the run started with") from e
    restore_rng(ckpt["rng"], rank, dist.get_world_size() if dist.is_initialized() else 1,
                seed=(ckpt["args"].get("seed", 0), ckpt["step"]))
    print0(f"resumed {path} at step {ckpt['step']}")
    return ckpt["step"]


def load_checkpoint(path, mmap=False):
    """mmap=True maps the tensors instead of reading them (to look at a big checkpoint's config)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no checkpoint there")
    try:
        return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise ValueError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e


def brief(config):
    """A backbone config for printing: long lists (wavelengths, band ids) as their length."""
    def short(v):
        if isinstance(v, dict):
            return {k: short(x) for k, x in v.items()}
        return f"<{len(v)} values>" if isinstance(v, list) and len(v) > 8 else v
    return short(config)


def backbone_weights(ckpt):
    """The backbone's state dict from any trainer's checkpoint: the network it names as its backbone
    (for DINO the EMA teacher)."""
    key, prefix = ckpt["backbone_key"]
    return {k[len(prefix):]: v for k, v in ckpt[key].items() if k.startswith(prefix)}


def check_bands(config, bands, path, data_name="the data"):
    """`bands`: the data's band count. A cross-domain backbone's config holds {domain: bands}; with one
    domain it reads any data with that band count."""
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
    """The bands read, checkpoint vs now: which band indices only one of them reads."""
    a, b = set((saved or {}).get("ids") or []), set((current or {}).get("ids") or [])
    if a == b:
        return "bands: same band indices, different wavelengths"
    return (f"bands: the checkpoint reads {len(a)} bands, the data now {len(b)}; only the checkpoint reads "
            f"{sorted(a - b)[:20]}, only the data {sorted(b - a)[:20]} (changed bad_bands or nodata?)")


def restore_rng(states, rank, world=1, seed=(0, 0)):
    """This rank's saved RNG state. Saved by another number of processes, the run goes on (the data
    order per rank changes anyway) with fresh streams from (seed, step, rank), and says it is not exact."""
    if len(states) == world:
        set_rng_state(states[rank])
        return
    print0(f"warning: the checkpoint was written by {len(states)} processes, this run has {world}: it continues, "
           "but not bit-exactly as the original run would have (each rank's data and random streams change)")
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
    """Per-step scalars kept on the device and averaged over steps and ranks only when flushed, so the
    training loop syncs with the host once per log interval, not every step."""

    def __init__(self):
        self.sums, self.count = {}, 0

    def add(self, **values):
        for k, v in values.items():
            v = v.detach().float()
            self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def flush(self, step, ckpt_path):
        """Means since the last flush. Raises on a non-finite loss: one NaN anywhere poisons its sum."""
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k] for k in keys]) / max(self.count, 1)
        means = all_reduce_mean(means).tolist()
        self.sums, self.count = {}, 0
        out = dict(zip(keys, means))
        if not math.isfinite(out.get("loss", 0.0)):
            raise FloatingPointError(f"non-finite loss at or before step {step}; stopping. The last good "
                                     f"checkpoint is kept at {ckpt_path} (if one was written). Lower the lr "
                                     "or check the data.")
        return out


def params_finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------- speed

GPU_PEAK_TFLOPS = {  # dense tensor-core peaks from the vendors' data sheets: (bf16/fp16, tf32)
    "H200": (989.4, 494.7), "H200 NVL": (835.5, 417.8), "H100": (989.4, 494.7), "H100 PCIe": (756.0, 378.0),
    "H100 NVL": (835.5, 417.8), "A100": (312.0, 156.0), "L40S": (362.1, 181.0), "L40": (181.0, 90.5),
    "L4": (121.0, 60.0), "A10": (125.0, 62.5), "RTX 4090": (165.2, 82.6), "V100": (125.0, 15.7),
}


def gpu_peak(name, dtype):
    """The data-sheet peak of the GPU called `name` (torch.cuda.get_device_name), matched by whole words
    so that an L40 is not read as an L4 nor an A10G as an A10; the longest matching entry wins (H100 PCIe
    over H100). None for GPUs not in the table."""
    words = re.split(r"[\s_-]+", name.upper())
    best = None
    for key, (half, tf32) in GPU_PEAK_TFLOPS.items():
        k = key.upper().split()
        if any(words[i:i + len(k)] == k for i in range(len(words))) and (best is None or len(k) > len(best[0])):
            best = (k, tf32 if dtype == torch.float32 else half, key)
    return (None, None) if best is None else best[1:]


def matmul_tflops(dtype, device=torch.device("cpu"), n=2048, seconds=1.0, probes=5):
    """Measured rate of an n x n matmul in `dtype` on this device: the CPU's practical peak. The best of
    `probes` short timings, so that a moment when other jobs had the cores does not pass for the peak."""
    a = b = torch.full((n, n), 0.5, device=device, dtype=dtype)  # no random draws: runs must stay reproducible
    a @ b  # warm-up
    best = 0.0
    for _ in range(probes):
        reps, t0 = 0, time.perf_counter()
        while reps == 0 or time.perf_counter() - t0 < seconds / probes:
            a @ b
            reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12)
    return best


def counted_flops(fn):
    """FLOPs torch.utils.flop_counter sees while fn() runs, leaving every RNG stream untouched. Attention
    runs as plain matmuls here: the counter has no formula for the CPU's fused attention kernel, which it
    would count as zero (e.g. -9% of a patch-4 MAE step)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    with torch.random.fork_rng(devices=[]), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_tflops(device, dtype):
    """(peak TFLOP/s for MFU, where it comes from): a GPU's data-sheet peak, or on CPU the matmul rate
    measured now in that dtype."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak, key = gpu_peak(name, dtype)
        if peak is None:
            return None, f"unknown GPU {name}: no MFU; add its dense peak to common.GPU_PEAK_TFLOPS"
        return peak, f"{key} data sheet"
    return matmul_tflops(dtype), "measured CPU matmul, best of 5 probes"


# ----------------------------------------------------------------------------- logging

def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


class Logger:
    """TensorBoard + metrics.jsonl on rank 0; a no-op elsewhere. Images are (3, H, W) floats in [0, 1]."""

    def __init__(self, out, args, start_step=0, flops_per_image=None, peak=None):
        """With the training FLOPs per image and the peak TFLOP/s, every img/s comes with tflops and mfu."""
        self.enabled, self.flops, self.peak = is_main(), flops_per_image, peak
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(os.path.join(out, "tb"))
            self.jsonl = open(os.path.join(out, "metrics.jsonl"), "a")
            self.writer.add_text("args", json.dumps(vars(args), indent=1, default=str))
            print0(f"git {git_sha()} | args {json.dumps(vars(args), default=str)}")
        self.t0, self.last_step = time.time(), start_step

    def scalars(self, step, values, images=None):
        """Log values; with `images` (per step, all ranks) also img_per_s since the previous call (and
        tflops, mfu). Returns what was logged."""
        now = time.time()
        if images and step > self.last_step:
            values = {**values, "img_per_s": (step - self.last_step) * images / (now - self.t0)}
            if self.flops:
                values["tflops"] = values["img_per_s"] * self.flops / 1e12 / (dist.get_world_size() if dist.is_initialized() else 1)
                if self.peak:  # a busy machine's CPU probe can read low: the peak is never below what was reached
                    self.peak = max(self.peak, values["tflops"])
                    values["mfu"] = values["tflops"] / self.peak
        self.t0, self.last_step = now, step
        if not self.enabled:
            return values
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
