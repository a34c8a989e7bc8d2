"""compare.py: the protocol runner's arithmetic (paired differences over split seeds), its parsing of configs and
budgets, and the runner itself: results written, finished cells skipped, recorded cells reused."""
import json
import math
import os
import shutil

import pytest

import compare
import eval as evaluation
import finetune_seg
from conftest import write_scene


def test_paired_difference_on_a_hand_made_table():
    a = {0: 70.0, 1: 72.0, 2: 71.0, 3: 99.0}   # seed 3 has no partner: left out of the pairing
    b = {0: 68.0, 1: 73.0, 2: 69.0}
    mean, std, wins, n = compare.paired(a, b)  # differences 2, -1, 2
    assert (mean, wins, n) == (1.0, 2, 3)
    assert std == pytest.approx(math.sqrt(3))  # sample std: ((1)^2 + (-2)^2 + (1)^2) / (3 - 1) = 3
    rows = [{"name": "pre", "mode": "knn", "labels": "5/class", "reference": "pre-twin", "split_seeds": [0, 1, 2, 3],
             "oa": [70, 72, 71, 99], "aa": [1, 1, 1, 1], "miou": [50, 50, 50, 50], "kappa": [0, 0, 0, 0]},
            {"name": "pre-twin", "mode": "knn", "labels": "5/class", "reference": None, "split_seeds": [0, 1, 2],
             "oa": [68, 73, 69], "aa": [1, 1, 1], "miou": [40, 52, 50], "kappa": [0, 0, 0]}]
    md = compare.table(rows)
    pre = next(line for line in md.splitlines() if line.startswith("| pre |"))
    assert "| +1.00 ± 1.73 |" in pre and "| 2/3 |" in pre
    assert "| +2.67 ± 6.43 |" in pre  # mIoU differences 10, -2, 0: sqrt((7.33^2 + 4.67^2 + 2.67^2) / 2)
    assert "78.00 ± 14.02" in pre     # OA over the row's own 4 seeds: sqrt((64 + 36 + 49 + 441) / 3)


def test_compare_reports_the_boundary_oa_paired():
    rows = [{"name": "a", "mode": "finetune", "labels": "10%", "reference": "b", "split_seeds": [0, 1],
             "oa": [80, 82], "aa": [1, 1], "miou": [1, 1], "kappa": [1, 1], "boundary_oa": [60, 64]},
            {"name": "b", "mode": "finetune", "labels": "10%", "reference": None, "split_seeds": [0, 1],
             "oa": [79, 80], "aa": [1, 1], "miou": [1, 1], "kappa": [1, 1], "boundary_oa": [58, 60]}]
    line = compare.table(rows).splitlines()[2]
    assert line.endswith("| 62.00 ± 2.83 | +3.00 ± 1.41 |"), line


def test_a_row_is_paired_with_each_of_its_references():
    """'semi vs sup, sup-long': one table line per reference, each with its own paired difference."""
    metrics = lambda oa: {"oa": oa, "aa": [1, 1], "miou": [1, 1], "kappa": [1, 1]}  # noqa: E731
    rows = [{"name": "semi", "mode": "finetune", "labels": "10%", "reference": "sup", "also": ["sup-long"],
             "split_seeds": [0, 1], **metrics([80, 82])},
            {"name": "sup", "mode": "finetune", "labels": "10%", "reference": None, "split_seeds": [0, 1],
             **metrics([79, 80])},
            {"name": "sup-long", "mode": "finetune", "labels": "10%", "reference": None, "split_seeds": [0, 1],
             **metrics([78, 78])}]
    semi = [line for line in compare.table(rows).splitlines() if line.startswith("| semi |")]
    assert len(semi) == 2
    assert semi[0].endswith("| sup | +1.50 ± 0.71 | +0.00 ± 0.00 | 2/2 |"), semi[0]
    assert semi[1].endswith("| sup-long | +3.00 ± 1.41 | +0.00 ± 0.00 | 2/2 |"), semi[1]


def test_budget_labels_and_twins_are_parsed():
    assert compare.parse_budget("10/class") == (["--labels-per-class", "10"], "10-per-class")
    assert compare.parse_budget("10%") == (["--train-fraction", "0.1"], "10pct")
    assert compare.parse_budget("200/class, classes >= 400 px") == (
        ["--labels-per-class", "200", "--min-class-pixels", "400"], "200-per-class-min400px")
    with pytest.raises(ValueError, match="'lots'"):
        compare.parse_budget("lots")
    configs, pairs = compare.parse_configs(["mae: --init a.pt", "pixel: --backbone pixel"], twins=True)
    assert configs["mae-twin"] == ["--init", "a.pt", "--twin"] and pairs == {"mae": ["mae-twin"]}
    configs, pairs = compare.parse_configs(["p2 vs mae-twin: --init b.pt"], twins=True)
    assert configs == {"p2": ["--init", "b.pt"]} and pairs == {"p2": ["mae-twin"]}  # an explicit partner, no twin
    configs, pairs = compare.parse_configs(["semi vs sup, sup-long: --semi 1"], twins=False)
    assert configs == {"semi": ["--semi", "1"]} and pairs == {"semi": ["sup", "sup-long"]}
    with pytest.raises(ValueError, match="expected 'name: flags'"):
        compare.parse_configs(["semi vs sup, : --semi 1"], twins=False)


def test_runner_writes_results_and_skips_finished_cells(tmp_path, monkeypatch):
    scene = write_scene(tmp_path / "scene", bands=8, size=32)
    calls = []
    real_eval, real_ft = evaluation.main, finetune_seg.main
    monkeypatch.setattr(evaluation, "main", lambda argv: calls.append(argv) or real_eval(argv))
    monkeypatch.setattr(finetune_seg, "main", lambda argv: calls.append(argv) or real_ft(argv))
    argv = ["--study", "s", "--data", scene, "--config", "pixel: --backbone pixel",
            "--config", "vit: --backbone vit --img-size 16", "--reference", "pixel", "--modes", "knn,finetune",
            "--budget", "3/class", "--seeds", "0,1", "--in-process", "--runs-dir", str(tmp_path / "runs"),
            "--results-dir", str(tmp_path / "results"),
            "--finetune-args", "--steps 2 --eval-every 2 --batch-size 2 --img-size 16 --workers 0"]
    summary = compare.main(argv)
    assert len(calls) == 8  # 2 configs x 2 modes x 2 seeds
    rows = {(r["name"], r["mode"]): r for r in summary["rows"]}
    vit = rows[("vit", "finetune")]
    assert vit["reference"] == "pixel" and rows[("pixel", "knn")]["reference"] is None
    assert vit["split_seeds"] == [0, 1] and len(vit["oa"]) == 2 and vit["labels"] == "3/class"
    assert rows[("pixel", "knn")]["oa"] == [100.0, 100.0]  # the fixture's class spectra are far apart
    assert "finetune_seg.py" in vit["command"] and "--split-seed 0" in vit["command"]
    with open(tmp_path / "results" / "s.json") as f:
        assert json.load(f)["rows"] == summary["rows"]
    md = tmp_path / "results" / "s.md"
    assert "| vit | finetune | 3/class | 2 |" in md.read_text()
    md.write_text(md.read_text() + "\n## Notes\n\nWritten by hand.\n")  # survives every rewrite below
    # Re-run after one cell was interrupted (no result.json): only that cell runs again.
    os.remove(tmp_path / "runs" / "s" / "vit" / "knn" / "3-per-class" / "seed1" / "result.json")
    calls.clear()
    again = compare.main(argv)
    assert len(calls) == 1 and "--probe" in calls[0] and calls[0][calls[0].index("--seed") + 1] == "1"
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(again["rows"]) == strip(summary["rows"])  # the re-run cell reproduces its result
    assert md.read_text().count("## Notes") == 1 and md.read_text().endswith("\n## Notes\n\nWritten by hand.\n")
    # Another session: no runs/ folder, only the committed results file. Nothing runs; the rows stay.
    shutil.rmtree(tmp_path / "runs")
    calls.clear()
    assert compare.main(argv)["rows"] == again["rows"] and not calls
    # It adds a configuration: while its cells run, the files keep every recorded cell (seed 1's too).
    seen = []
    monkeypatch.setattr(evaluation, "main", lambda a: seen.append(json.loads((tmp_path / "results" / "s.json")
                                                                             .read_text())["rows"]) or real_eval(a))
    more = compare.main(argv[:2] + ["--config", "pixel2: --backbone pixel"] + argv[2:])
    assert len(seen) == 2 and all(len(r["split_seeds"]) == 2 for r in seen[1] if r["name"] != "pixel2")
    assert [r["split_seeds"] for r in more["rows"] if r["name"] == "pixel2"] == [[0, 1], [0, 1]]  # knn, finetune
    monkeypatch.setattr(evaluation, "main", lambda argv: calls.append(argv) or real_eval(argv))
    # ... unless the flags changed: then the recorded cells are not these cells. --collect runs none of them
    # and writes the finished ones (the knn cells here); without it they run.
    changed = [a.replace("--steps 2", "--steps 1") for a in argv]
    calls.clear()
    partial = compare.main(changed + ["--collect"])
    assert not calls and "--collect" not in partial["command"]
    assert [len(r["split_seeds"]) for r in partial["rows"]] == [2, 0, 2, 0]  # (pixel, vit) x (knn, finetune)
    compare.main(changed)
    assert len(calls) == 4 and all("--probe" not in c for c in calls)  # the finetune cells, both configs and seeds
    text = md.read_text()
    assert "| vit | finetune | 3/class | 2 |" in text and text.endswith("## Notes\n\nWritten by hand.\n")
