"""tools/gpu_check.sh (issue #25): the one call that fills the GPU rows. Its --smoke run on the CPU, its
--dry-run (every command of the GPU run, each command's flags parsed by its script), and the runner's
promises: a failed or hung part is a row and the script goes on, the budget bounds the whole run."""
import os
import re
import shlex
import subprocess
import sys


import bench
import finetune_seg
import pretrain_contrast
import pretrain_dino
import pretrain_mae
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "tools", "gpu_check.sh")
BENCH_ROWS = ["mae vit", "mae sst", "dino vit", "dino ssvit", "seg vit", "seg resnet50v1c"]
LOADER_ROWS = ["raw windows only (the workers' part with --device-augment), -"] + [
    f"{view}, {where}" for view in ("cut only", "MAE augment (flips + random resized crop)",
                                    "DINO multi-crop (2 global + 8 local, jitter, blur)")
    for where in ("per tile in the workers", "batched on cpu")]
TRAINERS = ["pretrain_mae", "pretrain_dino", "pretrain_contrast", "finetune_seg"]


def env(tmp_path, **extra):
    return {**os.environ, "OUT": str(tmp_path / "out"), "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
            "OMP_NUM_THREADS": "1", **extra}


def table(tmp_path):
    """{check: (status, notes)} of OUT/gpu_check.md."""
    rows = [line.split(" | ") for line in (tmp_path / "out" / "gpu_check.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| check")]
    return {r[0][2:]: (r[1], r[-1]) for r in rows}


def flags_parse(tmp_path):
    """Whether every script the smoke run calls accepts its flags (argparse exits on an unknown one)."""
    try:
        for command in dry_run(tmp_path, "--smoke").values():
            for script, args in scripts_called(shlex.split(command)):
                PARSERS[script](args)
    except SystemExit:
        return False
    return True


def test_smoke_run_fills_every_row(tmp_path):
    assert flags_parse(tmp_path)  # fail fast: a script refusing its flags would fail the whole run
    proc = subprocess.run(["bash", SCRIPT, "--smoke"], cwd=ROOT, env=env(tmp_path), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = table(tmp_path)
    loaders = ["loader WHU-OHS-shaped", "loader any-sensor, WHU-OHS-shaped + Indian Pines"]
    expected = (["environment", "synthetic data"] + [f"{kind}: {r}" for kind in ("fp32 eager", "fp32 compile")
                                                     for r in BENCH_ROWS]
                + [f"{name}: {r}, 0 workers" for name in loaders for r in LOADER_ROWS]
                + ["training: MAE, torchrun, SIGTERM, --resume"] + [f"sync-debug: {t}" for t in TRAINERS])
    assert sorted(rows) == sorted(expected)
    assert not any("FAILED" in status for status, _ in rows.values())
    assert all(rows[r][0] == "ok" for r in expected if "compile" not in r)
    assert all(rows[f"fp32 compile: {r}"][0].startswith("skipped") for r in BENCH_ROWS)
    assert "SIGTERM" in rows["training: MAE, torchrun, SIGTERM, --resume"][1]
    assert (tmp_path / "out" / "gpu_check.log").read_text().count("==== ") == 12  # every part's output


def dry_run(tmp_path, *flags):
    proc = subprocess.run(["bash", SCRIPT, "--dry-run", *flags], cwd=ROOT, env=env(tmp_path), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return dict(re.match(r"^(.+) \[\d+ s\]: (.+)$", line).groups() for line in proc.stdout.splitlines()
                if not line.startswith("#"))


PARSERS = {"bench.py": bench.parse_args, "pretrain_mae.py": pretrain_mae.parse_args,
           "pretrain_dino.py": pretrain_dino.parse_args, "pretrain_contrast.py": pretrain_contrast.parse_args,
           "finetune_seg.py": finetune_seg.parse_args}


def scripts_called(words):
    """[(script, its args)] of a command line: bench.py ..., tools/gpu_check.py steps a.py ... :: b.py ...,
    tools/gpu_check.py resume ... -- torchrun ... pretrain_mae.py ..."""
    for i, w in enumerate(words):
        if w in PARSERS:
            rest = words[i + 1:]
            return [(w, rest[:rest.index("::")] if "::" in rest else rest)] + (
                scripts_called(rest[rest.index("::") + 1:]) if "::" in rest else [])
    return []


def test_dry_run_prints_every_command_of_the_gpu_run_and_their_flags_parse(tmp_path):
    """Nothing runs and nothing is written; every part of the full run is there, at the study's sizes, and
    every script it calls accepts its flags (argparse exits on an unknown one)."""
    parts = dry_run(tmp_path)
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()
    assert list(parts) == [
        "environment", "bench warm-up mae", "bench warm-up seg", "bench warm-up dino", "synthetic data", "sync-debug",
        "training: MAE, torchrun, SIGTERM, --resume", "bench bf16 eager mae", "bench bf16 eager dino",
        "bench bf16 eager seg", "bench bf16 compile mae", "bench bf16 compile dino", "loader WHU-OHS-shaped",
        "loader any-sensor, WHU-OHS-shaped + Indian Pines", "bench bf16 compile seg"]
    called = {}
    for name, command in parts.items():
        for script, args in scripts_called(shlex.split(command)):
            PARSERS[script](args)
            called.setdefault(script, []).append((name, args))
    assert len(called["bench.py"]) == 11 and len(called["pretrain_mae.py"]) == 2
    for name, args in called["bench.py"]:
        assert ("--loader" in args) != ("--size" in args and args[args.index("--size") + 1] == "base")
        assert ("--compile" in args) == ("compile" in name or "warm-up" in name)
    mae = pretrain_mae.parse_args(called["pretrain_mae.py"][1][1])
    assert (mae.size, mae.batch_size) == ("base", 128)
    dino = pretrain_dino.parse_args(called["pretrain_dino.py"][0][1])
    assert (dino.size, dino.batch_size, dino.local_crops, dino.prototypes) == ("base", 128, 8, 65536)
    assert all("--sync-debug" in args for s in ("pretrain_dino.py", "pretrain_contrast.py", "finetune_seg.py")
               for _, args in called[s])
    torchrun = "-m torch.distributed.run --standalone --nproc_per_node 1 pretrain_mae.py"
    assert torchrun in parts["training: MAE, torchrun, SIGTERM, --resume"]
    smoke = dry_run(tmp_path, "--smoke")
    assert list(smoke)[:3] == ["environment", "synthetic data", "bench fp32 eager mae"]


RUNNER = """
source tools/gpu_check.sh
part "fails" 30 "" false
part "hangs" 1 "" sleep 30
part "runs" 30 "" true
lane() { part "background" 60 "" sleep 60; }
background lane
stop_background
DEADLINE=$((SECONDS + 3)) MIN_LEFT=2
part "meets the budget's end" 60 "" sleep 30
part "after the budget" 60 "" true
"""


def test_a_failed_or_hung_part_is_a_row_and_the_run_goes_on(tmp_path):
    """And the background lane stops when told (its part is not a failure), the budget cuts a part's limit
    and leaves later parts unrun."""
    proc = subprocess.run(["bash", "-c", RUNNER], cwd=ROOT, env=env(tmp_path), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    status = {k: v[0] for k, v in table(tmp_path).items()}
    assert status == {"fails": "FAILED (exit 1)", "hangs": "FAILED (timeout 1 s)", "runs": "ok",
                      "background": "stopped: the untimed parts were done",
                      "meets the budget's end": "stopped at the end of the 480 s budget",
                      "after the budget": "not run: the 480 s budget was spent"}
