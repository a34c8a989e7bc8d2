"""Issue #14: what would hang or crash on the first multi-GPU run, tested on CPU where CPU can show it
(2-process gloo runs), and the GPU-only check (no host syncs in a training step), skipped without CUDA."""
import argparse
import os

import pytest
import torch

import bench
import common


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
