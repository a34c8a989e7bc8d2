"""common.py: schedules and lr rules, checkpoints (atomic, exact resume, RNG per process, bands), when runs
checkpoint and stop (time, signals), devices and MFU, and run_cli's one-line errors for every script."""
import argparse
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

import common
import finetune_seg
import pretrain_contrast
import pretrain_dino
import pretrain_mae
from conftest import (ROOT, Interrupt, contrast_args, contrast_sources, dino_args, fail_at_call, mae_args,
                      seg_args)


# ----------------------------------------------------------------------------- schedules and lr

def test_cosine_schedule():
    s = common.cosine_schedule(1.0, 0.1, 10, 3)
    assert len(s) == 10 and s[0] == 0 and abs(s[3] - 1.0) < 1e-9 and 0.1 <= s[-1] < 0.2
    assert all(a >= b for a, b in zip(s[3:], s[4:]))
    assert len(common.cosine_schedule(1.0, 0.0, 4, 40)) == 4


def test_step_schedule():
    s = common.step_schedule(0.03, 10)
    assert s.tolist() == pytest.approx([0.03] * 6 + [0.003] * 2 + [0.0003] * 2)


def test_lr_scaling_rules():
    assert common.scaled_lr(2e-3, 16, 1) == 2e-3 * 16 / 256  # linear: MAE's and DINO's
    assert common.scaled_lr(0.004, 1024, 1, rule="sqrt") == pytest.approx(0.004)
    assert common.scaled_lr(0.004, 8, 2, rule="sqrt") == pytest.approx(0.004 * math.sqrt(16 / 1024))
    with pytest.raises(ValueError, match="unknown lr scaling rule 'cubic'"):
        common.scaled_lr(1e-3, 8, 1, rule="cubic")


# ----------------------------------------------------------------------------- checkpoints

def test_backbone_weights_follow_the_backbone_key():
    dino = {"backbone_key": ("teacher", "backbone."),
            "teacher": {"backbone.w": torch.zeros(2), "dino_heads.0.p": torch.zeros(1)},
            "student": {"backbone.w": torch.ones(2), "dino_heads.0.p": torch.ones(1)}}
    weights = common.backbone_weights(dino)  # DINO's: the EMA teacher's backbone, without the heads
    assert set(weights) == {"w"} and torch.equal(weights["w"], torch.zeros(2))
    mae = {"backbone_key": ("model", "encoder."), "model": {"encoder.w": torch.ones(2), "decoders.0.x": torch.ones(1)}}
    assert set(common.backbone_weights(mae)) == {"w"}


def test_check_config_names_the_band_difference():
    saved = {"name": "pixel", "in_chans": 4}
    common.check_config({**saved, "bands": {"ids": [0, 1, 2, 3]}}, {**saved, "bands": {"ids": [0, 1, 2, 3]}}, "x.pt")
    with pytest.raises(ValueError, match=r"only the checkpoint reads \[3\], only the data \[4\]"):
        common.check_config({**saved, "bands": {"ids": [0, 1, 2, 3]}}, {**saved, "bands": {"ids": [0, 1, 2, 4]}},
                            "x.pt")
    with pytest.raises(ValueError, match=r"x.pt: checkpoint model config does not match \(size: checkpoint 'tiny' "
                                         r"vs now 'small'\)"):
        common.check_config({**saved, "size": "tiny"}, {**saved, "size": "small"}, "x.pt")


def test_resume_restores_only_this_gpus_rng_state(monkeypatch):
    """A checkpoint holds each process's own GPU's RNG state, so a run resumed where fewer GPUs are
    visible finds it."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(state))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("sets every GPU's state"))
    state = common.rng_state()
    assert torch.equal(state["cuda"], torch.tensor([7], dtype=torch.uint8))
    common.set_rng_state(state)
    assert [s.item() for s in restored] == [7]


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


# ----------------------------------------------------------------------------- stopping and checkpoint timing

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_saves_and_exits(scene, tmp_path, monkeypatch, signum):
    """SIGTERM/SIGUSR1 during step 2: the run saves at the next check (--log-every 3), exits with status
    128 + signal, and --resume finishes it."""
    out = tmp_path / "m"
    with monkeypatch.context() as m:
        fail_at_call(m, 2, lambda result: os.kill(os.getpid(), signum) or result)
        with pytest.raises(SystemExit) as e:
            pretrain_mae.main(mae_args(scene, out, 8, "--log-every", "3", "--ckpt-every", "0"))
    assert e.value.code == 128 + signum
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 3
    assert signal.getsignal(signum) is not common._request_stop  # handlers restored
    pretrain_mae.main(mae_args(scene, out, 8, "--log-every", "3", "--ckpt-every", "0", "--resume"))
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 8


def test_checkpoints_by_time(scene, tmp_path, monkeypatch):
    """--ckpt-minutes: checked every --log-every steps; the default 10 minutes writes nothing in a short
    run until its end, 0 writes at every check."""
    def interrupt(result):
        raise Interrupt()
    for minutes, expected in (("10", None), ("0", 2)):
        out = tmp_path / minutes
        with monkeypatch.context() as m:
            fail_at_call(m, 3, interrupt)
            with pytest.raises(Interrupt):
                pretrain_mae.main(mae_args(scene, out, 4, "--log-every", "2", "--ckpt-every", "0",
                                           "--ckpt-minutes", minutes))
        saved = os.path.isfile(out / "ckpt.pt") and torch.load(out / "ckpt.pt", weights_only=False)["step"]
        assert (saved or None) == expected


# ----------------------------------------------------------------------------- devices and MFU

def test_device_flag_picks_the_gpu():
    assert common.pick_device("cuda:1", 0, 1) == torch.device("cuda:1")
    assert common.pick_device("cuda", 3, 4) == torch.device("cuda:3")
    assert common.pick_device("cpu", 3, 4) == torch.device("cpu")
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        common.pick_device("cuda:1", 0, 2)


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


def test_logged_mfu_never_exceeds_one(tmp_path):
    """A CPU peak probed while other jobs had the cores reads low; the share stays <= 100%."""
    logger = common.Logger(str(tmp_path), argparse.Namespace(), 0, flops_per_image=1e12, peak=1e-3)
    values = logger.scalars(1, {"loss": 1.0}, images=8)
    assert values["mfu"] == 1.0 and logger.peak == values["tflops"]
    logger.close()
    assert common.matmul_tflops(torch.float32, n=64, seconds=0.02, probes=3) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("trainer", ["mae", "dino", "seg", "contrast"])
def test_training_step_never_waits_for_the_host(trainer, scene, tmp_path):
    """--sync-debug: torch.cuda.set_sync_debug_mode('error') around every training step (data, forward,
    backward, optimizer, meters), device-side augmentation on; any host-device sync raises."""
    run = ["--sync-debug", "--dtype", "bf16", "--log-every", "100"]
    if trainer == "mae":
        pretrain_mae.main(mae_args(scene, tmp_path / "m", 3, *run, "--device-augment"))
    elif trainer == "dino":
        pretrain_dino.main(dino_args(scene, tmp_path / "d", 3, 4, *run, "--device-augment"))
    elif trainer == "seg":
        for backbone in ("vit", "resnet50v1c"):
            finetune_seg.main(seg_args(scene, tmp_path / backbone, "--backbone", backbone, "--finetune",
                                       "--steps", "3", "--eval-every", "100", *run))
    else:
        spec, _ = contrast_sources(tmp_path)
        pretrain_contrast.main(contrast_args(spec, tmp_path / "c", 3, *run))


# ----------------------------------------------------------------------------- run_cli: one-line errors

SCRIPTS = [
    ("pretrain_mae.py", ["--data", "/nonexistent", "--out", "{tmp}/r"], "/nonexistent: no such folder"),
    ("pretrain_dino.py", ["--data", "/nonexistent", "--out", "{tmp}/r"], "/nonexistent: no such folder"),
    ("pretrain_contrast.py", ["--data", "/nonexistent", "--out", "{tmp}/r"], "/nonexistent: no such folder"),
    ("finetune_seg.py", ["--data", "/nonexistent", "--out", "{tmp}/r"], "/nonexistent: no such folder"),
    ("eval.py", ["--ckpt", "/nonexistent/ckpt.pt"], "/nonexistent/ckpt.pt: no checkpoint there"),
    ("bench.py", ["--loader", "--data", "/nonexistent"], "/nonexistent: no such folder"),
    ("formats.py", ["/nonexistent.hdr", "--out", "{tmp}/r"], "/nonexistent.hdr: no such file"),
    ("compare.py", ["--study", "s", "--config", "nameless", "--runs-dir", "{tmp}/r"], "--config 'nameless': expected"),
]
DEBUG = [(["--debug"], {}), ([], {"HSI_SSL_DEBUG": "1"})]  # finetune_seg.py's error, with the traceback asked for

# Runs each script as `python script args` does (runpy, __name__ == "__main__"), in one process so that
# torch is imported once: the exit status, stderr, and any exception that escaped (what would print a traceback).
RUN_SCRIPTS = """
import contextlib, io, json, os, runpy, sys
results = []
for script, args, env in json.loads(sys.argv[1]):
    os.environ.pop("HSI_SSL_DEBUG", None)
    os.environ.update(env)
    sys.argv, err, code, escaped = [script, *args], io.StringIO(), 0, None
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code
    except Exception as e:
        escaped = f"{type(e).__name__}: {e}"
    results.append({"code": code, "stderr": err.getvalue(), "escaped": escaped})
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def script_errors(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    runs = [(s, [a.format(tmp=tmp / s) for a in args], {}) for s, args, _ in SCRIPTS]
    runs += [("finetune_seg.py", ["--data", "/nonexistent", "--out", str(tmp / "d"), *extra], env)
             for extra, env in DEBUG]
    env = {k: v for k, v in os.environ.items() if k != "HSI_SSL_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", RUN_SCRIPTS, json.dumps(runs)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**env, "HSI_SSL_CACHE": str(tmp / "cache"), "PYTHONPATH": ROOT})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_script_prints_one_line_errors_without_traceback(script_errors):
    """Every script turns a mistake in the input into one line, `error: <file>: <problem>`, and exit status 2."""
    for (script, _, message), r in zip(SCRIPTS, script_errors):
        assert r["escaped"] is None and r["code"] == 2 and "Traceback" not in r["stderr"], (script, r)
        assert r["stderr"].strip().splitlines()[-1].startswith(f"error: {message}"), (script, r)


def test_debug_flag_or_environment_brings_the_traceback_back(script_errors):
    for r in script_errors[len(SCRIPTS):]:
        assert r["escaped"] == "DataError: /nonexistent: no such folder" and not r["stderr"], r
