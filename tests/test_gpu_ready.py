"""Issue #14: what would hang or crash on the first multi-GPU run, tested on CPU where CPU can show it
(2-process gloo runs), and the GPU-only check (no host syncs in a training step), skipped without CUDA."""
import argparse
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import bench
import common
import data
import finetune_seg
import pretrain_contrast
import pretrain_dino
import pretrain_mae
from conftest import write_whu
from models import MAE
from test_contrast import contrast_args, sources as contrast_sources
from test_pretrain_dino import dino_args, losses as dino_losses
from test_pretrain_mae import args_for as mae_args
from test_segmentation import seg_args


# ----------------------------------------------------------------------------- resume elsewhere

def test_resume_restores_only_this_gpus_rng_state(monkeypatch):
    """A checkpoint holds each process's own GPU's RNG state, so a run resumed where fewer GPUs are
    visible finds it; older checkpoints (every visible GPU's state) give the process its own device's."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("sets every GPU's state"))
    state = common.rng_state()
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    common.set_rng_state(state)
    common.set_rng_state({**state, "cuda": [torch.tensor([g], dtype=torch.uint8) for g in range(4)]})  # 4 GPUs then
    assert [s.item() for s in restored] == [7, 0]


def test_resume_with_another_process_count_continues(capsys):
    states = [common.rng_state(), common.rng_state()]
    common.restore_rng(states, 0, world=1, seed=(0, 5))
    first = torch.rand(3)
    common.restore_rng(states, 2, world=3, seed=(0, 5))  # more processes than saved: no IndexError
    assert "not bit-exactly" in capsys.readouterr().out
    common.restore_rng(states, 0, world=1, seed=(0, 5))
    assert torch.equal(torch.rand(3), first)  # fresh streams, but reproducible ones


def test_resume_a_bf16_run_in_fp16(tmp_path):
    """A bf16/fp32 run saves a disabled GradScaler's empty state; resuming with --dtype fp16 starts a
    fresh scaler instead of failing on it."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    path, config = str(tmp_path / "ckpt.pt"), {"name": "linear", "in_chans": 2}
    common.save_checkpoint(path, 3, argparse.Namespace(seed=0), config, ("model", ""), model=model,
                           optimizer=optimizer, scaler=torch.amp.GradScaler("cpu", enabled=False))
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    assert common.resume(path, 0, config, model=model, optimizer=optimizer, scaler=scaler) == 3
    assert scaler.get_scale() == 2.0 ** 16


def test_device_flag_picks_the_gpu():
    assert common.pick_device("cuda:1", 0, 1) == torch.device("cuda:1")
    assert common.pick_device("cuda", 3, 4) == torch.device("cuda:3")
    assert common.pick_device("cpu", 3, 4) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        common.pick_device("cuda:1", 0, 2)


# ----------------------------------------------------------------------------- MFU

def test_gpu_peaks_by_whole_words_and_unknown_gpus(monkeypatch):
    bf16, fp32 = torch.bfloat16, torch.float32
    assert common.gpu_peak("NVIDIA L40", bf16) == (181.0, "L40")  # not the L4
    assert common.gpu_peak("NVIDIA L4", bf16) == (121.0, "L4")
    assert common.gpu_peak("NVIDIA A10G", bf16) == (None, None)  # not the A10
    assert common.gpu_peak("NVIDIA H100 PCIe", fp32) == (378.0, "H100 PCIe")
    assert common.gpu_peak("NVIDIA H100 80GB HBM3", bf16) == (989.4, "H100")
    assert common.gpu_peak("NVIDIA A100-SXM4-80GB", bf16) == (312.0, "A100")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10G")
    peak, source = common.peak_tflops(torch.device("cuda"), bf16)
    assert peak is None and "GPU_PEAK_TFLOPS" in source
    assert bench.mfu_text(1.5, None) == "n/a" and bench.mfu_text(1.5, 10.0) == "15.0%"


def test_logged_mfu_never_exceeds_one(tmp_path):
    """A CPU peak probed while other jobs had the cores reads low; the share stays <= 100%."""
    logger = common.Logger(str(tmp_path), argparse.Namespace(), 0, flops_per_image=1e12, peak=1e-3)
    values = logger.scalars(1, {"loss": 1.0}, images=8)
    assert values["mfu"] == 1.0 and logger.peak == values["tflops"]
    logger.close()
    assert common.matmul_tflops(torch.float32, n=64, seconds=0.02, probes=3) > 0


# ----------------------------------------------------------------------------- hangs under torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torchrun(script, args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script, *args]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_dino_rank_without_masked_tokens_runs_the_same_collectives(scene, cache_dir, tmp_path):
    """One image in four masked (--mask-probability 0.25), 2 tiles per rank: at step 1 every masked crop
    is on rank 0. Rank 1 still runs the iBOT path (zero masked tokens: the same Sinkhorn all-reduces, a
    zero gradient for the mask token and the separate iBOT head, the same meter keys)."""
    extra = ["--mask-probability", "0.25", "--separate-ibot-head", "--patch-size", "4", "--steps", "2"]
    args = pretrain_dino.parse_args(dino_args(scene, tmp_path / "x", cache_dir, 2, 2, *extra))
    backbone = pretrain_dino.build(args, 16)[0].backbone
    for seed in range(100):
        args.seed = seed
        counts = pretrain_dino.mask_counts(args, 0, 2, 2, backbone)[0]  # (2 crops, 4 global tiles)
        if counts[:, 2:].sum() == 0:
            break
    assert counts[:, :2].sum() > 0 and counts[:, 2:].sum() == 0, "no seed leaves rank 1 without masks"
    out = tmp_path / "ddp"
    torchrun(os.path.join(ROOT, "pretrain_dino.py"), dino_args(scene, out, cache_dir, 2, 2, *extra, "--seed", str(seed)))
    rows = dino_losses(out)
    assert set(rows) == {1, 2} and all(math.isfinite(rows[s]["ibot"]) and rows[s]["ibot"] > 0 for s in rows)


FAKE_PREDICTIONS = '''
import sys

import numpy as np
import torch
import torch.distributed as dist

import eval as evaluation
import finetune_seg

STEP = [0]
real_log_evaluation = finetune_seg.log_evaluation


def log_evaluation(*args):
    STEP[0] = args[-1]
    return real_log_evaluation(*args)


def predict_raster(model, ds, index, *args):
    """Rank 0's predictions get better from one evaluation to the next and rank 1's worse: on its own,
    each rank would decide differently whether the model improved."""
    labels = ds.crop(index, 0, 0, *ds.rasters[index].image.shape[1:])[1]
    share = 0.15 * STEP[0] if dist.get_rank() == 0 else 1 - 0.15 * STEP[0]
    right = np.arange(labels.size).reshape(labels.shape) < share * labels.size
    pred = np.where(right, labels.clip(0), (labels.clip(0) + 1) % ds.num_classes)
    return torch.nn.functional.one_hot(torch.from_numpy(pred), ds.num_classes).permute(2, 0, 1).float(), labels


finetune_seg.log_evaluation = log_evaluation
evaluation.predict_raster = predict_raster
finetune_seg.main(sys.argv[1:])
'''


def test_best_checkpoint_decision_is_the_same_on_every_rank(tmp_path, cache_dir):
    """Ranks whose own evaluations disagree about an improvement: the evaluation is sharded and its
    confusion matrices summed, so all ranks take the same decision and enter the collective save of
    best.pt together (before: a deadlock)."""
    root = write_whu(tmp_path / "whu", tiles=2, size=32)
    script = tmp_path / "fake_predictions.py"
    script.write_text(FAKE_PREDICTIONS)
    out = tmp_path / "seg"
    torchrun(str(script), ["--data", root, "--out", str(out), "--cache-dir", cache_dir, "--backbone", "pixel",
                           "--img-size", "16", "--batch-size", "2", "--steps", "4", "--eval-every", "2",
                           "--log-every", "2", "--eval-batch-size", "8", "--workers", "0"], timeout=240)
    assert torch.load(out / "best.pt", weights_only=False)["step"] in (2, 4)


# ----------------------------------------------------------------------------- shared memory, stopping, checkpoints

def test_loader_batches_fit_small_shared_memory(scene, cache_dir, monkeypatch, capsys):
    """With little /dev/shm the workers ship a batch in chunks that fit (the same batch arrives); with
    too little, the error says what to do."""
    ds = data.load_dataset(scene, cache_dir=cache_dir)
    tiles = data.RandomTiles([ds], 16, 0, data.Augment(flips=True), labels=False)
    item = data.nbytes(tiles[0])
    monkeypatch.setattr(data, "shm_free_bytes", lambda: 2 * 2 * data.PREFETCH * 3 * item)  # chunks of 3 fit
    chunked = iter(data.StepLoader(tiles, 8, 5, 0, 1, 2, torch.device("cpu")))
    whole = iter(data.StepLoader(tiles, 8, 5, 0, 1, 0, torch.device("cpu")))
    for _ in range(2):
        a, b = next(chunked), next(whole)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert "chunks of 3" in capsys.readouterr().out
    monkeypatch.setattr(data, "shm_free_bytes", lambda: item)
    with pytest.raises(data.DataError, match="--shm-size.*--workers 0"):
        data.StepLoader(tiles, 8, 0, 0, 1, 2, torch.device("cpu"))


def stop_at_forward(monkeypatch, n, action):
    real, calls = MAE.forward, [0]

    def forward(self, x):
        calls[0] += 1
        if calls[0] == n:
            action()
        return real(self, x)
    monkeypatch.setattr(MAE, "forward", forward)


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_and_exits(scene, cache_dir, tmp_path, monkeypatch, signum):
    """SIGTERM/SIGUSR1 during step 2: the run saves at the next check (--log-every 3), exits with status
    128 + signal, and --resume finishes it."""
    out = tmp_path / "m"
    with monkeypatch.context() as m:
        stop_at_forward(m, 2, lambda: os.kill(os.getpid(), signum))
        with pytest.raises(SystemExit) as e:
            pretrain_mae.main(mae_args(scene, out, cache_dir, 8, "--log-every", "3", "--ckpt-every", "0"))
    assert e.value.code == 128 + signum
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 3
    assert signal.getsignal(signum) is not common._request_stop  # handlers restored
    pretrain_mae.main(mae_args(scene, out, cache_dir, 8, "--log-every", "3", "--ckpt-every", "0", "--resume"))
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 8


def test_checkpoints_by_time(scene, cache_dir, tmp_path, monkeypatch):
    """--ckpt-minutes: checked every --log-every steps; the default 10 minutes writes nothing in a short
    run until its end, 0 writes at every check."""
    for minutes, expected in (("10", None), ("0", 2)):
        out = tmp_path / minutes
        with monkeypatch.context() as m:
            stop_at_forward(m, 3, lambda: (_ for _ in ()).throw(Interrupt()))
            with pytest.raises(Interrupt):
                pretrain_mae.main(mae_args(scene, out, cache_dir, 4, "--log-every", "2", "--ckpt-every", "0",
                                           "--ckpt-minutes", minutes))
        saved = os.path.isfile(out / "ckpt.pt") and torch.load(out / "ckpt.pt", weights_only=False)["step"]
        assert (saved or None) == expected


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the session that wrote it had no GPU)")
@pytest.mark.parametrize("trainer", ["mae", "dino", "seg", "contrast"])
def test_training_step_never_waits_for_the_host(trainer, scene, cache_dir, tmp_path):
    """--sync-debug: torch.cuda.set_sync_debug_mode('error') around every training step (data, forward,
    backward, optimizer, meters), device-side augmentation on; any host-device sync raises."""
    run = ["--sync-debug", "--dtype", "bf16", "--log-every", "100"]
    if trainer == "mae":
        pretrain_mae.main(mae_args(scene, tmp_path / "m", cache_dir, 3, *run, "--device-augment"))
    elif trainer == "dino":
        pretrain_dino.main(dino_args(scene, tmp_path / "d", cache_dir, 3, 4, *run, "--device-augment"))
    elif trainer == "seg":
        for backbone in ("vit", "resnet50v1c"):
            finetune_seg.main(seg_args(scene, tmp_path / backbone, cache_dir, "--backbone", backbone, "--finetune",
                                       "--steps", "3", "--eval-every", "100", *run))
    else:
        spec, _ = contrast_sources(tmp_path)
        pretrain_contrast.main(contrast_args(spec, tmp_path / "c", cache_dir, 3, *run))
