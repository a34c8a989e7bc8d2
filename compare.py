"""Paired comparisons: configurations x label budgets x split seeds, each cell one run of finetune_seg.py or an
eval.py probe, then per row mean ± std and the *paired* difference to its reference row (same split seeds).
Orchestration only. A config's flags go to every mode's script: keep them to backbone flags (--init, --size, ...).

    python compare.py --study ip_mae --config "mae: --init runs/pre/mae/ckpt.pt" --twins \\
        --config "pixel: --backbone pixel" --modes knn,finetune --budget 5/class --budget 10/class --seeds 0,1,2
"""
import argparse
import importlib
import itertools
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
MODES = {"knn": ("eval.py", ["--probe", "knn"]), "frozen-linear": ("eval.py", ["--probe", "linear"]),  # (script, flags)
         "frozen-decoder": ("finetune_seg.py", []), "finetune": ("finetune_seg.py", ["--finetune"])}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", required=True, help="cells in <runs-dir>/<study>, results <results-dir>/<study>.*")
    p.add_argument("--config", action="append", required=True, help='repeatable: "name: flags" or "name vs ref: flags"')
    p.add_argument("--twins", action="store_true", help="add and pair the random twin of every config with --init")
    p.add_argument("--reference", default=None, help="the row every row without a twin is paired with")
    p.add_argument("--modes", default="knn,finetune", help=f"comma list of {', '.join(MODES)}")
    p.add_argument("--budget", action="append", default=None, help='label budget, repeatable: "10/class", '
                   '"10%%", "200/class, classes >= 400 px" (default: 5/class and 10/class)')
    p.add_argument("--seeds", default="0,1,2", help="split seeds (each also the training seed)")
    p.add_argument("--data", default="data/indian_pines")
    p.add_argument("--finetune-args", default="", help="flags for every finetune_seg.py cell (trainer-only flags)")
    p.add_argument("--probe-args", default="", help="flags for every eval.py probe cell")
    p.add_argument("--jobs", type=int, default=1, help="cells run at once (subprocesses)")
    p.add_argument("--threads", type=int, default=None, help="OMP/torch threads per cell (default: cores / jobs)")
    p.add_argument("--in-process", action="store_true", help="run cells one at a time in this process")
    p.add_argument("--runs-dir", default="runs/compare")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--dry-run", action="store_true", help="print the cells' commands and what is finished")
    p.add_argument("--collect", action="store_true", help="run no cell: write the finished ones' (partial) table")
    common.add_debug_arg(p)
    return p.parse_args(argv)


def parse_configs(specs, twins):
    """['name: flags', ...] -> {name: [flags]} in order, plus {name: [its references' names]}."""
    configs, pairs = {}, {}
    for spec in specs:
        head, sep, flags = spec.partition(":")
        name, _, reference = (part.strip() for part in head.partition(" vs "))
        refs = [r.strip() for r in reference.split(",")] if reference else []
        if not sep or not all(re.fullmatch(r"[\w.+-]+", n) for n in [name, *refs]):
            raise ValueError(f"--config {spec!r}: expected 'name: flags' or 'name vs reference[, another]: flags', "
                             "names of letters, digits, ._+-")
        if name in configs:
            raise ValueError(f"--config: the name {name!r} is used twice")
        configs[name] = shlex.split(flags)
        if refs:  # a semi-supervised row: its supervised run of the same steps, and the one of the same compute
            pairs[name] = refs
        elif twins and "--init" in configs[name] and "--twin" not in configs[name]:
            configs[f"{name}-twin"], pairs[name] = configs[name] + ["--twin"], [f"{name}-twin"]  # next to its row
    return configs, pairs


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
    """Every (name, mode, budget label, seed, out dir, script, argv)."""
    out, seeds = [], [int(s) for s in args.seeds.split(",")]
    # seed-outer: a run cut short leaves whole seeds, so its rows are paired already
    for seed, name, mode, label in itertools.product(seeds, configs, args.modes.split(","), args.budget):
        if mode not in MODES:
            raise ValueError(f"--modes: unknown mode {mode!r}; available: {', '.join(MODES)}")
        script, mode_flags = MODES[mode]
        extra = shlex.split(args.probe_args if script == "eval.py" else args.finetune_args)
        budget_flags, slug = parse_budget(label)
        where = os.path.join(args.runs_dir, args.study, name, mode, slug, f"seed{seed}")
        argv = (["--data", args.data] + configs[name] + mode_flags + budget_flags + extra
                + ["--split-seed", str(seed), "--seed", str(seed), "--out", where])
        out.append((name, mode, label, seed, where, script, argv))
    return out


def command_line(script, argv):
    return " ".join(["python", script] + [shlex.quote(a) for a in argv])


def recorded_cells(path, todo):
    """{(name, mode, label, seed): result} of an earlier results/<study>.json (another machine's, say), from the
    rows made with the same flags: the command this invocation gives the row's first seed."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        rows = json.load(f)["rows"]
    commands = {c[:4]: command_line(c[5], c[6]) for c in todo}
    found = {}
    for r in rows:
        row = (r["name"], r["mode"], r["labels"])
        if r["split_seeds"] and commands.get((*row, r["split_seeds"][0])) == r["command"]:
            for i, seed in enumerate(r["split_seeds"]):
                found[(*row, seed)] = {**{k: r[k][i] for k in METRICS + REGION_METRICS if k in r},
                                       "seconds": r["seconds"][i], "command": commands.get((*row, seed))}
    return found


def finished(cell, recorded):
    """A finished cell's result (its result.json, or without its folder what `recorded` holds), else None."""
    where = cell[4]
    if os.path.isfile(os.path.join(where, "result.json")):
        with open(os.path.join(where, "result.json")) as f:
            return json.load(f)
    return None if os.path.isdir(where) else recorded.get(cell[:4])


def run_cell(cell, args):
    """Run one cell; returns its result. An interrupted cell's folder is cleared first."""
    name, mode, label, seed, where, script, argv = cell
    if os.path.isdir(where):
        shutil.rmtree(where)  # an interrupted cell: its run starts again (cells are minutes long)
    os.makedirs(where)
    start = time.time()
    if args.in_process:
        importlib.import_module(script.removesuffix(".py")).main(argv)
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
    path = os.path.join(where, "result.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)  # written last: its presence means the cell is finished
    print(f"{name} {mode} {label} seed {seed}: OA {result['oa']:.2f} mIoU {result['miou']:.2f} "
          f"({result['seconds']:.0f} s)", flush=True)
    return result


def paired(a, b):
    """Paired difference of two {seed: value} maps over their common seeds -> (mean, sample std, wins, n)."""
    d = np.array([a[s] - b[s] for s in sorted(set(a) & set(b))], float)
    if not len(d):
        return math.nan, math.nan, 0, 0
    return float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else math.nan, int((d > 0).sum()), len(d)


def mean_std(values):
    """'mean ± sample std' of a row's per-seed values: 'mean' for one seed, '-' for none."""
    v = np.asarray(values, float)
    m, s = (float(v.mean()) if len(v) else math.nan), (float(v.std(ddof=1)) if len(v) > 1 else math.nan)
    return "-" if math.isnan(m) else f"{m:.2f} ± {s:.2f}" if not math.isnan(s) else f"{m:.2f}"


def write_results(args, argv, base, configs, pairs, results):
    """results: {(name, mode, label): {seed: result}} -> results/<study>.json and .md (written whole, renamed)."""
    rows = []
    for (name, mode, label), by_seed in results.items():
        seeds, flags = sorted(by_seed), configs[name]
        metrics = METRICS + tuple(k for k in REGION_METRICS if seeds and all(k in by_seed[s] for s in seeds))
        rows.append({"name": name, "init": flags[flags.index("--init") + 1] if "--init" in flags else None,
                     "twin": "--twin" in flags, "labels": label, "mode": mode,
                     "reference": (pairs.get(name) or [None])[0] or (args.reference if name != args.reference else None),
                     **({"also": pairs[name][1:]} if len(pairs.get(name, [])) > 1 else {}),
                     "split_seeds": seeds, **{k: [by_seed[s][k] for s in seeds] for k in metrics},
                     "seconds": [by_seed[s]["seconds"] for s in seeds],
                     "command": by_seed[seeds[0]]["command"] if seeds else None})
    os.makedirs(args.results_dir, exist_ok=True)
    made_by = [a for a in (argv or sys.argv[1:]) if a != "--collect"]  # the command that makes the cells
    summary = {"study": args.study, "command": command_line("compare.py", made_by),
               "units": "percent (kappa x 100); per-seed lists follow split_seeds", "rows": rows}
    notes = ""  # a "## Notes" section written by hand below the table survives the rewrite
    if os.path.isfile(base + ".md"):
        with open(base + ".md") as f:
            old = f.read()
        notes = old[old.index("\n## Notes"):] if "\n## Notes" in old else ""
    md = f"`{summary['command']}`\n\n{table(rows)}\n{notes}"
    for ext, text in ((".json", json.dumps(summary, indent=1)), (".md", md)):
        with open(base + ext + ".tmp", "w") as f:
            f.write(text)
        os.replace(base + ext + ".tmp", base + ext)
    return summary


def table(rows):
    """Markdown: mean ± sample std per metric, then OA and mIoU paired with the reference row."""
    index = {(r["name"], r["mode"], r["labels"]): r for r in rows}
    regions = any("boundary_oa" in r for r in rows)
    header = ["row", "mode", "labels", "seeds", "OA", "AA", "mIoU", "kappa x100", "reference", "ΔOA paired",
              "ΔmIoU paired", "wins (OA)"] + (["boundary OA", "Δboundary OA paired"] if regions else [])
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for r, reference in ((r, ref) for r in rows for ref in [r["reference"], *r.get("also", [])]):
        ref = index.get((reference, r["mode"], r["labels"]))
        d = {k: paired(dict(zip(r["split_seeds"], r[k])), dict(zip(ref["split_seeds"], ref[k])))
             for k in ("oa", "miou", "boundary_oa") if ref is not None and k in r and k in ref}
        d = {k: v for k, v in d.items() if v[3]}  # no common seed yet: no difference to show
        oa, miou, edge = (f"{d[k][0]:+.2f} ± {d[k][1]:.2f}" if k in d else "-" for k in ("oa", "miou", "boundary_oa"))
        row = [r["name"], r["mode"], r["labels"], str(len(r["split_seeds"]))] + [mean_std(r[k]) for k in METRICS]
        row += [reference or "-", oa, miou, f"{d['oa'][2]}/{d['oa'][3]}" if "oa" in d else "-"]
        if regions:
            row += [mean_std(r["boundary_oa"]) if "boundary_oa" in r else "-", edge]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    args.budget = args.budget or ["5/class", "10/class"]
    configs, pairs = parse_configs(args.config, args.twins)
    for ref in [args.reference] + [r for refs in pairs.values() for r in refs]:
        if ref and ref not in configs:
            raise ValueError(f"reference {ref!r} is not a configuration ({', '.join(configs)})")
    todo = cells(args, configs)
    base = os.path.join(args.results_dir, args.study)
    recorded = recorded_cells(base + ".json", todo)
    if args.dry_run:
        for c in todo:
            print(("to do " if finished(c, recorded) is None else "done  ") + command_line(c[5], c[6]))
        return None
    results = {c[:3]: {} for c in todo}
    for c in todo:  # every finished cell first: the files never drop a recorded one while the others run
        r = finished(c, recorded)
        if r is not None:
            results[c[:3]][c[3]] = r
    total, todo = len(todo), [c for c in todo if c[3] not in results[c[:3]]]
    if args.collect:
        print(f"{total - len(todo)} of {total} cells finished; collecting them, running none")
        todo = []
    lock = threading.Lock()

    def run(c):
        r = run_cell(c, args)
        with lock:  # the results files follow every finished cell: a cut-off session keeps what it ran
            results[c[:3]][c[3]] = r
            write_results(args, argv, base, configs, pairs, results)
    if args.jobs > 1 and not args.in_process:
        with ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(run, todo))
    else:
        for c in todo:
            run(c)
    summary = write_results(args, argv, base, configs, pairs, results)
    print(f"`{summary['command']}`\n\n{table(summary['rows'])}\n-> {base}.json, {base}.md")
    return summary


if __name__ == "__main__":
    common.run_cli(main)
