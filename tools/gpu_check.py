"""Helpers of tools/gpu_check.sh: its synthetic data, the stop-and-resume check, its table, the environment.
Only `env` imports torch (the table is rewritten after every part, in well under a second).

    python tools/gpu_check.py synthetic ROOT --tiles 32 --size 512
    python tools/gpu_check.py resume --seconds 90 --resume-seconds 25 -- torchrun ... pretrain_mae.py --out DIR ...
    python tools/gpu_check.py table WORK OUT       # OUT/gpu_check.md and OUT/gpu_check.log from WORK/parts.tsv
    python tools/gpu_check.py env
    python tools/gpu_check.py steps pretrain_mae.py ARGS :: pretrain_dino.py ARGS ...
"""
import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback

# ----------------------------------------------------------------------------- synthetic WHU-OHS


def synthetic(root, tiles, size, val_tiles=2, block=32, seed=0):
    """A WHU-OHS-shaped folder (data.load_whu): tr/ and val/, image/*.tif (32, size, size) int16 reflectance
    x 1e4 and label/*.tif (size, size) uint8 classes 1..24. Land-cover blocks of `block` px, each class with
    its own smooth spectrum, under a smooth illumination field, plus noise: a masked patch is predictable
    from its neighbours, so a pre-training loss can fall (on i.i.d. noise it cannot)."""
    import numpy as np
    import tifffile
    rng = np.random.default_rng(seed)
    wl = np.linspace(0, 1, 32)
    spectra = np.stack([2500 + 1500 * np.sin(2 * np.pi * (f * wl + p)) + 800 * wl * s
                        for f, p, s in rng.uniform((0.3, 0, -1), (1.5, 1, 1), (24, 3))]).astype(np.float32)
    yy, xx = np.mgrid[:size, :size] / size
    for split, n in (("tr", tiles), ("val", val_tiles)):
        for sub in ("image", "label"):
            os.makedirs(os.path.join(root, split, sub), exist_ok=True)
        for i in range(n):
            cells = rng.integers(1, 25, (size // block + 1,) * 2)
            label = np.kron(cells, np.ones((block, block), np.int64))[:size, :size].astype(np.uint8)
            a, b = rng.uniform(0, 2 * np.pi, 2)
            light = (1 + 0.2 * np.sin(3 * yy + a) * np.cos(2 * xx + b)).astype(np.float32)
            img = spectra[label - 1].transpose(2, 0, 1) * light + rng.normal(0, 60, (32, size, size)).astype(np.float32)
            name = f"S{i:04d}.tif"
            tifffile.imwrite(os.path.join(root, split, "image", name), img.clip(0, 10000).astype(np.int16))
            tifffile.imwrite(os.path.join(root, split, "label", name), label)
    print(f"RESULT: {tiles} + {val_tiles} tiles of (32, {size}, {size}) int16 in {root}")


# ----------------------------------------------------------------------------- stop with SIGTERM, resume

def losses(metrics):
    """[(step, loss)] logged in metrics.jsonl, in order (a line being written is not read yet)."""
    if not os.path.isfile(metrics):
        return []
    with open(metrics) as f:
        return [(r["step"], r["loss"]) for r in (json.loads(ln) for ln in f if ln.endswith("\n")) if "loss" in r]


def run_until_sigterm(cmd, out, seconds, intervals, log):
    """Start cmd; once the run has logged for `seconds` since its first new metrics line and logged
    `intervals` new lines, send it SIGTERM (torchrun passes it on to the trainer, as from a cluster scheduler)
    and wait. It stays in our process group, so a `timeout` around us ends it too.
    -> (exit status, seconds from its first logged line to the signal)."""
    metrics, before = os.path.join(out, "metrics.jsonl"), len(losses(os.path.join(out, "metrics.jsonl")))
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    first = last = None
    while proc.poll() is None:
        time.sleep(0.2)
        logged = len(losses(metrics)) - before
        if first is None and logged:
            first = time.time()
        if first is not None and time.time() - first >= seconds and logged >= intervals:
            last = time.time()
            proc.send_signal(signal.SIGTERM)
            break
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    with open(log) as f:
        print(f.read(), flush=True)
    return proc.returncode, 0.0 if last is None else last - first


def resume(cmd, seconds, resume_seconds, intervals, fell=0.9):
    """Train, stop with SIGTERM, resume, stop again. Checks: the loss fell (the mean of the last third of
    the logged losses below `fell` x the first), the run stopped with a checkpoint at the step it logged
    last, the resumed run said so and logged the next interval first, and its loss went on from where it
    had got to (not back to the start). Exactness is tested on CPU (tests/test_pretrain_mae.py, test_common.py)."""
    import numpy as np
    out = cmd[cmd.index("--out") + 1]
    metrics, ckpt = os.path.join(out, "metrics.jsonl"), os.path.join(out, "ckpt.pt")
    os.makedirs(out, exist_ok=True)
    status, t1 = run_until_sigterm(cmd, out, seconds, intervals, os.path.join(out, "run1.log"))
    first = losses(metrics)
    stopped = re.search(r"stopped by SIGTERM after step (\d+)", open(os.path.join(out, "run1.log")).read())
    problems = []
    if not first or not stopped or not os.path.isfile(ckpt):
        sys.exit(f"RESULT: the run did not stop with a checkpoint on SIGTERM (exit {status}, {len(first)} losses "
                 "logged)")
    saved = int(stopped.group(1))
    start, end = first[0][1], np.mean([v for _, v in first[len(first) * 2 // 3:]])
    if first[-1][0] != saved:
        problems.append(f"last logged step {first[-1][0]} != checkpoint step {saved}")
    if not end < fell * start:
        problems.append(f"loss did not fall below {fell} x its first value")
    run_until_sigterm(cmd + ["--resume"], out, resume_seconds, 2, os.path.join(out, "run2.log"))
    second = losses(metrics)[len(first):]
    every = first[1][0] - first[0][0] if len(first) > 1 else 1
    if f"at step {saved}" not in open(os.path.join(out, "run2.log")).read() or not second:
        problems.append(f"the resumed run did not say it resumed at step {saved} or logged nothing")
    elif second[0][0] != saved + every:
        problems.append(f"the resumed run logged step {second[0][0]} first, expected {saved + every}")
    elif not np.mean([v for _, v in second]) < min(1.1 * end, start):
        problems.append("the resumed run's loss went back up")
    again = np.mean([v for _, v in second]) if second else float("nan")
    img_s = np.median([r["img_per_s"] for r in map(json.loads, open(metrics)) if "img_per_s" in r][1:len(first)] or [0])
    print(f"RESULT: {'; '.join(problems) + '. ' if problems else ''}loss {start:.3f} -> {end:.3f} (last third) in "
          f"{saved} steps, {t1:.0f} s logged, {img_s:.0f} img/s (median); SIGTERM to torchrun (exit {status}): "
          f"the trainer's checkpoint at step {saved}; resumed at {saved} -> {second[-1][0] if second else '?'}, loss "
          f"{again:.3f}; continuation checked, bit-exactness is tested on CPU", flush=True)
    sys.exit(1 if problems else 0)


# ----------------------------------------------------------------------------- the table

BENCH_ROW = re.compile(r"^\| (mae|dino|seg [\w ]+?) \| (\w+) \| [\w-]+ \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| "
                       r"([\d.]+) \| ([\d.]+) \| ([^|]+) \| ([\d.]+) \|$")
LOADER_ROW = re.compile(r"^\| ([^|]+) \| ([^|]+) \| (\d+) \| (\d+) \|$")


def bench_rows(text):
    """{(trainer, backbone): row fields} from bench.py's table."""
    rows = {}
    for line in text.splitlines():
        m = BENCH_ROW.match(line.strip())
        if m:
            trainer, backbone, batch, img_s, ms, arch, counted, tflops, mfu, mem = m.groups()
            rows[trainer.split()[0], backbone] = dict(img_s=img_s, mfu=mfu.strip(), mem=mem, note=(
                f"batch {batch}, {float(ms):.1f} ms/step, {arch} GFLOP/img (counter {counted}), {tflops} TFLOP/s"))
    return rows


def result_line(text):
    """The part's RESULT line, else its last error-looking line, else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("RESULT: "):
            return ln[len("RESULT: "):]
    for ln in reversed(lines):
        if re.match(r"^(error: |[\w.]*(Error|Exception)\b)", ln):
            return ln
    return lines[-1] if lines else ""


def read(path):
    return open(path, errors="replace").read() if path and os.path.isfile(path) else ""


def table_rows(part):
    """(check, status, seconds, img/s, MFU, mem, notes) rows of one part (a parts.tsv record)."""
    name, status, seconds, log, expect = part
    text, kind = read(log), name[len("bench "):name.rfind(" ")]
    cell = lambda s: s.replace("|", "/")[:300]  # noqa: E731 - a log line inside a table cell
    if name.startswith("sync-debug"):
        found = dict(re.findall(r"^RESULT (\w+): (.*)$", text, re.M))  # one process, a line per script
        return [(f"{name}: {script}", ("ok" if found[script].startswith("ok") else "FAILED") if script in found
                 else status, seconds, "-", "-", "-", cell(found.get(script, result_line(text))))
                for script in expect.split()]
    if name.startswith("bench warm-up"):  # not a measurement: a compile failure is the timed row's to show
        return [(f"{name} ({expect})", status.replace("FAILED", "incomplete"), seconds, "-", "-", "-",
                 "wall s = cold --compile of each model + 2 steps, beside the untimed parts: no measurement")]
    if name.startswith("bench"):
        rows, out = bench_rows(text), []
        for key in expect.split():
            trainer, backbone = key.split("/")
            r = rows.get((trainer, backbone))
            label = f"{kind}: {trainer} {backbone}"
            if r:
                out.append((label, status, seconds, r["img_s"], r["mfu"], r["mem"], r["note"]))
            else:
                out.append((label, status if status != "ok" else "FAILED (no row)", seconds, "-", "-", "-",
                            cell(result_line(text))))
        return out
    if name.startswith("loader"):
        rows = [m.groups() for m in map(LOADER_ROW.match, map(str.strip, text.splitlines())) if m]
        rows = [r for r in rows if r[0] != "pipeline"]
        if rows:
            return [(f"{name}: {p}, {where.strip()}, {w} workers", status, seconds, v, "-", "-", "tiles/s")
                    for p, where, w, v in rows]
    return [(name, status, seconds, "-", "-", "-", cell(result_line(text)))]


# The table's order (warm-ups last among the bench rows): parts may finish in another, --smoke runs two at a time.
ORDER = ("environment", "synthetic", "bench", "loader", "training", "sync-debug")


def table(work, out):
    """out/gpu_check.md (the table) and out/gpu_check.log (every part's output) from work/parts.tsv, each
    replaced whole: two parts that finish together never interleave their logs."""
    with open(os.path.join(work, "parts.tsv")) as f:
        parts = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    parts.sort(key=lambda p: (next((i for i, o in enumerate(ORDER) if p[0].startswith(o)), len(ORDER)),
                              "warm-up" in p[0]))
    env = next((result_line(read(p[3])) for p in parts if p[0] == "environment"), "")
    lines = [f"GPU check: {env}", "", "| check | status | wall s | img/s (tiles/s) | MFU | peak mem GiB | notes |",
             "|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for part in parts for row in table_rows(part)]
    logs = [f"==== {p[0]}: {p[1]} ({p[2]} s)\n{read(p[3])}" for p in parts]
    for name, text in (("gpu_check.md", "\n".join(lines) + "\n"), ("gpu_check.log", "\n".join(logs))):
        tmp = os.path.join(out, f".{name}.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def environment():
    """One line: GPU, driver, torch and its CUDA, Python, CPUs, git commit, date. Read without importing
    torch (seconds on a busy CPU): the other parts show whether torch sees the GPU."""
    import importlib.util
    import platform
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    gpu = smi.stdout.strip().replace("\n", "; ") if smi and smi.returncode == 0 else "no GPU (no nvidia-smi)"
    version = {}
    exec(open(os.path.join(os.path.dirname(importlib.util.find_spec("torch").origin), "version.py")).read(), version)
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"RESULT: {gpu} | torch {version['__version__']}, built for CUDA {version['cuda']} | Python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs | git {sha or '?'} | {time.strftime('%Y-%m-%d %H:%M')}")


def steps(commands):
    """Each `script.py args...` (separated by ::) run in this one process, one after the other, each
    error caught: a RESULT line per script. One process saves each script's imports (seconds)."""
    sys.path.insert(0, os.getcwd())
    failed = 0
    while commands:
        end = commands.index("::") if "::" in commands else len(commands)
        (script, *args), commands = commands[:end], commands[end + 1:]
        name, t0 = script.removesuffix(".py"), time.time()
        try:
            __import__(name).main(args)
            print(f"RESULT {name}: ok ({time.time() - t0:.0f} s)", flush=True)
        except (Exception, SystemExit) as e:
            failed += 1
            print(f"RESULT {name}: FAILED: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}", flush=True)
            traceback.print_exc()
    sys.exit(1 if failed else 0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("env")
    sub.add_parser("steps").add_argument("commands", nargs=argparse.REMAINDER)
    s = sub.add_parser("synthetic")
    s.add_argument("root")
    s.add_argument("--tiles", type=int, default=32)
    s.add_argument("--size", type=int, default=512)
    r = sub.add_parser("resume")
    r.add_argument("--seconds", type=float, default=90)
    r.add_argument("--resume-seconds", type=float, default=25)
    r.add_argument("--intervals", type=int, default=3, help="log lines before the SIGTERM, at least")
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    t = sub.add_parser("table")
    t.add_argument("work")
    t.add_argument("out")
    a = p.parse_args(argv)
    if a.what == "env":
        environment()
    elif a.what == "steps":
        steps(a.commands)
    elif a.what == "synthetic":
        synthetic(a.root, a.tiles, a.size)
    elif a.what == "resume":
        resume(a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd, a.seconds, a.resume_seconds, a.intervals)
    else:
        table(a.work, a.out)


if __name__ == "__main__":
    main()
