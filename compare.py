"""Compare representations the way a claim needs it: named configurations x label budgets x split seeds,
each cell one run of finetune_seg.py or an eval.py probe, then mean ± std per row and the *paired*
difference of every row to its reference (same split seeds). Orchestration only: no training code here.

    python compare.py --study ip_mae --config "mae: --init runs/pre/mae/ckpt.pt" --twins \\
        --config "pixel: --backbone pixel" --modes knn,finetune --budget 5/class --budget 10/class --seeds 0,1,2
    python compare.py --study ip_cd --modes finetune --budget "200/class, classes >= 400 px" --seeds 0,1,2,3,4 \\
        --config "scratch: --backbone cdcnn" --config "pre: --init runs/contrast/ckpt.pt" --reference scratch

Configurations are `name: flags` (or `name vs other: flags` to pair the row with `other`); the flags go to every script a mode runs (finetune_seg.py for
frozen-decoder/finetune, eval.py for knn/frozen-linear), so keep them to the backbone flags both take
(--init, --twin, --backbone, --size, ...) and put trainer-only flags in --finetune-args. `--twins` adds
`<name>-twin` (the checkpoint's backbone with random weights, trained identically) for every config with
--init and pairs the two. Cell k of seed s runs with `--split-seed s --seed s`. A cell is finished when
its result.json exists, or when its folder does not exist and results/<study>.json already holds it with
the same flags (a table built across sessions or machines: commit the results file, not runs/); an
interrupted study re-run with the same arguments runs only the missing cells. Writes, after every
finished cell, results/<study>.json (every row: per-seed metrics, its reference, the command) and
results/<study>.md (the table).
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import common

METRICS = ("oa", "aa", "miou", "kappa")
REGION_METRICS = ("boundary_oa", "boundary_miou")  # eval.py's boundary metric, where the cell's script gives it
MODES = {  # mode -> (script, flags it adds)
    "knn": ("eval.py", ["--probe", "knn"]),
    "frozen-linear": ("eval.py", ["--probe", "linear"]),
    "frozen-decoder": ("finetune_seg.py", []),
    "finetune": ("finetune_seg.py", ["--finetune"]),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="name: cells live in <runs-dir>/<study>, results in "
                   "<results-dir>/<study>.json and .md")
    p.add_argument("--config", action="append", required=True, help='"name: flags", repeatable')
    p.add_argument("--twins", action="store_true", help="add the random twin of every config with --init")
    p.add_argument("--reference", default=None, help="the row every row without a twin is paired with "
                   "(e.g. a scratch baseline)")
    p.add_argument("--modes", default="knn,finetune", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--budget", action="append", default=None, help='label budget, repeatable: "10/class", '
                   '"10%%", "200/class, classes >= 400 px" (default: 5/class and 10/class)')
    p.add_argument("--seeds", default="0,1,2", help="split seeds (each also the training seed)")
    p.add_argument("--data", default="data/indian_pines")
    p.add_argument("--finetune-args", default="", help="flags for every finetune_seg.py cell, e.g. '--backbone-lr-scale 1'")
    p.add_argument("--probe-args", default="", help="flags for every eval.py probe cell, e.g. '--k 10'")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (subprocesses)")
    p.add_argument("--threads", type=int, default=None, help="OMP/torch threads per cell (default: cores / jobs)")
    p.add_argument("--in-process", action="store_true", help="run cells in this process (one at a time; no "
                   "interpreter start-up per cell)")
    p.add_argument("--runs-dir", default="runs/compare")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--dry-run", action="store_true", help="print the cells' commands and what is finished")
    p.add_argument("--collect", action="store_true", help="run no cell: write the results of the finished ones "
                   "(a partial table, e.g. when a session ends; the rest runs with the same command later)")
    common.add_debug_arg(p)
    return p.parse_args(argv)


def parse_configs(specs, twins):
    """['name: flags', ...] -> {name: [flags]} in order, plus {name: its twin's name}."""
    configs, pairs = {}, {}
    for spec in specs:
        head, sep, flags = spec.partition(":")
        name, _, reference = (part.strip() for part in head.partition(" vs "))
        if not sep or not re.fullmatch(r"[\w.+-]+", name) or (reference and not re.fullmatch(r"[\w.+-]+", reference)):
            raise ValueError(f"--config {spec!r}: expected 'name: flags' or 'name vs reference: flags', names of "
                             "letters, digits, ._+-")
        if name in configs:
            raise ValueError(f"--config: the name {name!r} is used twice")
        configs[name] = shlex.split(flags)
        if reference:
            pairs[name] = reference
    ordered = {}
    for name, flags in configs.items():
        ordered[name] = flags
        if twins and "--init" in flags and "--twin" not in flags and name not in pairs:
            ordered[f"{name}-twin"], pairs[name] = flags + ["--twin"], f"{name}-twin"  # listed next to its row
    return ordered, pairs


def parse_budget(label):
    """'10/class' | '10%' | '200/class, classes >= 400 px' -> (flags, directory-safe slug)."""
    m = re.fullmatch(r"\s*(\d+)/class|\s*(\d+(?:\.\d+)?)%", label.split(",")[0])
    rest = label.split(",", 1)[1].strip() if "," in label else ""
    keep = re.fullmatch(r"classes >= (\d+) px", rest)
    if not m or (rest and not keep):
        raise ValueError(f"--budget {label!r}: expected 'N/class' or 'P%', optionally ', classes >= M px'")
    flags = ["--labels-per-class", m.group(1)] if m.group(1) else ["--train-fraction", str(float(m.group(2)) / 100)]
    slug = f"{m.group(1)}-per-class" if m.group(1) else f"{m.group(2)}pct"
    if keep:
        flags, slug = flags + ["--min-class-pixels", keep.group(1)], f"{slug}-min{keep.group(1)}px"
    return flags, slug


def cells(args, configs):
    """Every (name, mode, budget label, seed, out dir, argv of the script)."""
    out = []
    for name, flags in configs.items():
        for mode in args.modes.split(","):
            if mode not in MODES:
                raise ValueError(f"--modes: unknown mode {mode!r}; available: {', '.join(MODES)}")
            script, mode_flags = MODES[mode]
            extra = shlex.split(args.probe_args if script == "eval.py" else args.finetune_args)
            for label in args.budget:
                budget_flags, slug = parse_budget(label)
                for seed in [int(s) for s in args.seeds.split(",")]:
                    where = os.path.join(args.runs_dir, args.study, name, mode, slug, f"seed{seed}")
                    argv = (["--data", args.data] + flags + mode_flags + budget_flags + extra
                            + ["--split-seed", str(seed), "--seed", str(seed), "--out", where])
                    out.append((name, mode, label, seed, where, script, argv))
    return out


def command_line(script, argv):
    return " ".join(["python", script] + [shlex.quote(a) for a in argv])


def recorded_cells(path, todo):
    """{(name, mode, label, seed): result} of the cells an earlier results/<study>.json holds, e.g. one
    committed by another session or machine whose runs/ folder is not here. A row counts only if it was
    made with the same flags: its command must be the one this invocation gives its first seed."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = json.load(f)["rows"]
    commands = {(c[0], c[1], c[2], c[3]): command_line(c[5], c[6]) for c in todo}
    found = {}
    for r in rows:
        seeds = r["split_seeds"]
        if not seeds or commands.get((r["name"], r["mode"], r["labels"], seeds[0])) != r["command"]:
            continue
        for i, seed in enumerate(seeds):
            found[(r["name"], r["mode"], r["labels"], seed)] = {
                **{k: r[k][i] for k in METRICS + REGION_METRICS if k in r}, "seconds": r["seconds"][i],
                "command": commands.get((r["name"], r["mode"], r["labels"], seed))}
    return found


def finished(cell, recorded):
    """A finished cell's result, else None. Finished: its result.json exists, or its folder does not and
    `recorded` (recorded_cells) holds it."""
    name, mode, label, seed, where = cell[:5]
    if os.path.isfile(os.path.join(where, "result.json")):
        with open(os.path.join(where, "result.json")) as f:
            return json.load(f)
    return None if os.path.isdir(where) else recorded.get((name, mode, label, seed))


def run_cell(cell, args, recorded=None):
    """Run one cell unless finished; returns its result. An interrupted cell's folder is cleared first."""
    name, mode, label, seed, where, script, argv = cell
    result_path = os.path.join(where, "result.json")
    done = finished(cell, recorded or {})
    if done is not None:
        return done
    if os.path.isdir(where):
        shutil.rmtree(where)  # an interrupted cell: its run starts again (cells are minutes long)
    os.makedirs(where)
    start = time.time()
    if args.in_process:
        if script == "eval.py":
            import eval as module
        else:
            import finetune_seg as module
        module.main(argv)
    else:
        threads = str(args.threads or max(1, (os.cpu_count() or 1) // args.jobs))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        with open(os.path.join(where, "log.txt"), "w") as log:
            proc = subprocess.run([sys.executable, script] + argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            raise ValueError(f"cell {name}/{mode}/{label}/seed {seed} failed (exit {proc.returncode}); see "
                             f"{os.path.join(where, 'log.txt')}")
    with open(os.path.join(where, "metrics.json" if script == "eval.py" else "eval.json")) as f:
        m = json.load(f)
    regions = {f"boundary_{k}": 100 * m["boundary"][k] for k in ("oa", "miou")} if "boundary" in m else {}
    result = {**{k: 100 * m[k] for k in METRICS}, **regions, "seconds": round(time.time() - start, 1),
              "command": command_line(script, argv)}
    with open(result_path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(result_path + ".tmp", result_path)  # written last: its presence means the cell is finished
    print(f"{name} {mode} {label} seed {seed}: OA {result['oa']:.2f} mIoU {result['miou']:.2f} "
          f"({result['seconds']:.0f} s)", flush=True)
    return result


def paired(a, b):
    """Paired difference of two {seed: value} maps over their common seeds -> (mean, sample std, wins, n)."""
    common = sorted(set(a) & set(b))
    d = np.array([a[s] - b[s] for s in common], float)
    if not len(d):
        return math.nan, math.nan, 0, 0
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else math.nan, int((d > 0).sum()), len(d)


def mean_std(values):
    v = np.asarray(values, float)
    return (float(v.mean()) if len(v) else math.nan), (float(v.std(ddof=1)) if len(v) > 1 else math.nan)


def summarise(args, configs, pairs, results):
    """results: {(name, mode, label): {seed: result}} -> the JSON rows, in the order of the configs."""
    rows = []
    for (name, mode, label), by_seed in results.items():
        seeds = sorted(by_seed)
        flags = configs[name]
        reference = pairs.get(name) or (args.reference if name != args.reference else None)
        rows.append({
            "name": name, "init": flags[flags.index("--init") + 1] if "--init" in flags else None,
            "twin": "--twin" in flags, "labels": label, "mode": mode, "reference": reference,
            "split_seeds": seeds, **{k: [by_seed[s][k] for s in seeds] for k in METRICS},
            **{k: [by_seed[s][k] for s in seeds] for k in REGION_METRICS if seeds and all(k in by_seed[s] for s in seeds)},
            "seconds": [by_seed[s]["seconds"] for s in seeds],
            "command": by_seed[seeds[0]]["command"] if seeds else None,
        })
    return rows


def table(rows):
    """Markdown: mean ± sample std per metric, then OA and mIoU paired with the reference row."""
    index = {(r["name"], r["mode"], r["labels"]): r for r in rows}
    regions = any("boundary_oa" in r for r in rows)
    lines = ["| row | mode | labels | seeds | OA | AA | mIoU | kappa x100 | reference | ΔOA paired | ΔmIoU paired | wins (OA) |"
             + (" boundary OA | Δboundary OA paired |" if regions else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if regions else "")]
    fmt = lambda m, s: "-" if math.isnan(m) else f"{m:.2f} ± {s:.2f}" if not math.isnan(s) else f"{m:.2f}"  # noqa: E731
    for r in rows:
        cols = [fmt(*mean_std(r[k])) for k in METRICS]
        ref = index.get((r["reference"], r["mode"], r["labels"]))
        pair = lambda k: paired(dict(zip(r["split_seeds"], r[k])), dict(zip(ref["split_seeds"], ref[k])))  # noqa: E731
        diff = ["-", "-", "-"]
        if ref is not None:
            oa, miou = pair("oa"), pair("miou")
            diff = [f"{oa[0]:+.2f} ± {oa[1]:.2f}", f"{miou[0]:+.2f} ± {miou[1]:.2f}", f"{oa[2]}/{oa[3]}"]
        if regions:
            diff.append(fmt(*mean_std(r["boundary_oa"])) if "boundary_oa" in r else "-")
            both = ref is not None and "boundary_oa" in r and "boundary_oa" in ref
            edge = pair("boundary_oa") if both else None
            diff.append(f"{edge[0]:+.2f} ± {edge[1]:.2f}" if both else "-")
        lines.append(f"| {r['name']} | {r['mode']} | {r['labels']} | {len(r['split_seeds'])} | " + " | ".join(cols)
                     + f" | {r['reference'] or '-'} | " + " | ".join(diff) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    args.budget = args.budget or ["5/class", "10/class"]
    configs, pairs = parse_configs(args.config, args.twins)
    for ref in [args.reference] + list(pairs.values()):
        if ref and ref not in configs:
            raise ValueError(f"reference {ref!r} is not a configuration ({', '.join(configs)})")
    todo = cells(args, configs)
    base = os.path.join(args.results_dir, args.study)
    recorded = recorded_cells(base + ".json", todo)
    if args.dry_run:
        for c in todo:
            done = finished(c, recorded) is not None
            print(("done  " if done else "to do ") + command_line(c[5], c[6]))
        return None
    results = {(c[0], c[1], c[2]): {} for c in todo}
    if args.collect:
        total, todo = len(todo), [c for c in todo if finished(c, recorded) is not None]
        print(f"{len(todo)} of {total} cells finished; collecting them, running none")
    lock = threading.Lock()

    def run(c):
        r = run_cell(c, args, recorded)
        with lock:  # the results files follow every finished cell: a cut-off session keeps what it ran
            results[(c[0], c[1], c[2])][c[3]] = r
            summary = write_results(args, argv, base, summarise(args, configs, pairs, results))
        return summary
    if args.jobs > 1 and not args.in_process:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, todo))
    else:
        for c in todo:
            run(c)
    summary = write_results(args, argv, base, summarise(args, configs, pairs, results))
    print(f"`{summary['command']}`\n\n{table(summary['rows'])}\n-> {base}.json, {base}.md")
    return summary


def write_results(args, argv, base, rows):
    """results/<study>.json and .md (written whole, then renamed into place)."""
    os.makedirs(args.results_dir, exist_ok=True)
    made_by = [a for a in (argv or sys.argv[1:]) if a != "--collect"]  # the command that makes the cells
    summary = {"study": args.study, "command": " ".join(["python", "compare.py"] + [shlex.quote(a) for a in made_by]),
               "units": "percent (kappa x 100); per-seed lists follow split_seeds", "rows": rows}
    for ext, text in ((".json", json.dumps(summary, indent=1)), (".md", f"`{summary['command']}`\n\n{table(rows)}\n")):
        with open(base + ext + ".tmp", "w") as f:
            f.write(text)
        os.replace(base + ext + ".tmp", base + ext)
    return summary


if __name__ == "__main__":
    common.run_cli(main)
