"""The benchmarks run end to end in their quick modes and report by their rules (slow: minutes together); the
committed reports regenerate from their runs byte for byte."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the benchmarks are beside the package, not installed with it


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def benchmarks(*argv: str) -> None:
    """``python -m benchmarks ...`` in this process (no second interpreter to start: seconds per call)."""
    from benchmarks.__main__ import main

    threads = torch.get_num_threads()
    try:
        main(list(argv))
    finally:
        torch.set_num_threads(threads)


def quick(study: str, tmp_path: Path, *tasks: str, report: bool = True) -> dict:
    common = ["--quick", "--runs", str(tmp_path / "runs"), "--tasks", *tasks]
    benchmarks("run", study, *common)
    if not report:
        return {}
    benchmarks("report", study, *common, "--output", str(tmp_path))
    return json.loads((tmp_path / "report.json").read_text())


def rows_of(tmp_path: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "runs" / f"{task}.jsonl").open()]


def test_committed_report_regenerates_byte_for_byte(tmp_path):
    """The golden test: apo_precond_split's report from its committed runs (and apo_lr_peers', which it reads), no
    training; what `python -m benchmarks report --all` does for every study."""
    pytest.importorskip("matplotlib")
    from benchmarks import report, runner

    study = runner.Study("apo_precond_split")
    report.write(study, tmp_path)
    for name in ("report.md", "report.json"):
        assert (tmp_path / name).read_text() == (study.dir / name).read_text(), name
    assert json.loads((tmp_path / "report.json").read_text())["winner"] == "split_same"


def test_an_unfinished_study_lists_its_runs_and_a_finished_one_does_not(tmp_path):
    """Until every LR of a task's grid has every seed, the report lists the runs on file (step 0 → final); with the
    grid complete that section goes and the grid's table takes over. No training: rows written under their keys."""
    from benchmarks import optimizers, report, runner

    root = tmp_path / "studies"
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "study.toml").write_text(
        'title = "t"\nquestion = "q"\nbudget = "long"\ntasks = ["teacher_student"]\n'
        'seeds = { teacher_student = [0, 1] }\n[grids.adamw_linear]\nmethod = { kind = "adamw", schedule = "linear" }\n'
        'lrs = [1e-3, 1e-2]\n[cells]\ngrid = "adamw_linear"\n[methods]\n')
    method = optimizers.resolve({"kind": "adamw", "schedule": "linear"})
    steps = runner.Study("tiny", root=root).budget("teacher_student")[0]
    store = runner.Store(root / "tiny" / "runs")

    def add(lr, seed, final):
        key = runner.run_key("teacher_student", method, lr, seed, steps)
        store.append({"key": key, "task": "teacher_student", "method": method, "lr": lr, "seed": seed,
                      "steps": steps, "precision": "fp32", "losses": [2.0, final], "final": final})

    add(1e-3, 0, 0.5), add(1e-2, 0, 0.25), add(1e-2, 1, 0.75)
    text = (tmp_path / "out" / "report.md").read_text() if report.write(runner.Study("tiny", root=root),
                                                                      tmp_path / "out") else ""
    assert "## Runs on file" in text and "| teacher_student | adamw_linear | 0.01 | 1 |" in text and "2 → 0.75" in text
    add(1e-3, 1, 0.5)  # the grid complete: 1e-3 is best (0.5 against the mean 0.5 of 0.25 and 0.75: the first)
    report.write(runner.Study("tiny", root=root), tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## Runs on file" not in text and "| teacher_student |" in text.split("## The rule")[0]
    assert "| 2 (25% above the floor 0.005) |" in text  # step 0 and the share left: (0.5 - 0.005) / (2 - 0.005)


@pytest.mark.slow
def test_overhead_quick(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for command in (["run", "overhead", "--quick", "--runs", str(tmp_path / "runs")],
                    ["report", "overhead", "--runs", str(tmp_path / "runs"), "--output", str(tmp_path)]):
        completed = subprocess.run([sys.executable, "-m", "benchmarks", *command], cwd=REPO_ROOT, env=env,
                                   capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stderr[-4000:]
    (record_path,) = (tmp_path / "runs").glob("*.json")
    results = json.loads(record_path.read_text())
    env = results["environment"]
    assert env["torch"] and env["device"] and env["threads"] == 1
    (size,) = results["sizes"]
    methods = results["sizes"][size]["methods"]
    for name in ("apo_lr", "apo_lr_paper", "apo_precond"):
        assert positive_finite(methods[name]["step_ratio"]) and positive_finite(methods[name]["peak_mem_ratio"])
        assert len(methods[name]["block_means_s"]) == results["settings"]["reps"]
    assert methods["adamw"]["step_ratio"] == 1.0
    assert methods["adamw"]["peak_mem_ratio"] == 1.0
    for name in ("apo_lr_paper", "apo_precond"):  # the meta step and its parts, from the optimizers' regions
        assert positive_finite(methods[name]["meta_step_in_adamw_steps"])
        parts = methods[name]["meta_step_parts_s"]
        assert parts["meta_step"] > 0 and parts["base_step"] > 0
    # APO-LR keeps AdamW's moments plus φ, its Adam state and the two observed batches; the default ("next" with a
    # horizon) also its displacement D, one float32 copy of the parameters
    param_bytes = results["sizes"][size]["param_bytes"]
    assert methods["apo_lr_paper"]["state_bytes"] > methods["adamw"]["state_bytes"]
    assert methods["apo_lr"]["state_bytes"] >= methods["adamw"]["state_bytes"] + param_bytes
    # APO-Precond keeps SGD's momentum buffer (one copy of the parameters) plus its factors
    assert methods["apo_precond"]["state_bytes"] > param_bytes
    text = (tmp_path / "report.md").read_text()
    assert f"## {record_path.stem}" in text and "| apo_lr |" in text and "step ×AdamW" in text


def check_quality_quick(tmp_path, task: str) -> None:
    """The quality study's quick run on one task: every method of the short-budget study runs, the claims come out as
    targets, bf16 changes are measured."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from benchmarks.runner import load_config

    report = quick("quality", tmp_path, task)
    config = load_config("quality")
    assert [c["task"] for c in report["cells"]] == [task]
    for cell in report["cells"]:
        for name in ("apo_lr_1e-03", "apo_precond_sgdm", "apo_precond_sgd", "prodigy", "sf_adamw", "soap"):
            assert positive_finite(cell[name]), (cell["task"], name, cell[name])
        for grid in ("adamw", "adamw_decay", "sgdm", "sgd"):
            assert report["grids"][cell["task"]][grid], (cell["task"], grid)
    apo = [r for r in rows_of(tmp_path, task) if r["method"]["kind"] == "apo_lr"]
    assert apo and all(r["lr_multiplier"] for r in apo), "APO-LR records its learned LR"
    assert {p["task"] for p in report["precision"]} == {task}
    assert all(math.isfinite(p["change"]) for p in report["precision"])
    assert {t["target"] for t in report["targets"]} == {t["text"] for t in config["targets"]}
    assert "## Targets" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_quality_quick_squared_error(tmp_path):
    """Squared error on tabular data (the seq2seq half, KL between output distributions, is in
    test_benchmarks_quality.py: another file, so the two halves run on both pytest-xdist workers)."""
    check_quality_quick(tmp_path, "diabetes")


@pytest.mark.slow
def test_apo_lr_defaults_quick_applies_the_rule(tmp_path):
    """Stage 1 on the three small tasks (30 steps, 1 seed), then the report: a ranking, finalists, targets."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    small = ("digits_classification", "digits_autoencoder", "teacher_student")
    report = quick("apo_lr_defaults", tmp_path, *small)
    from benchmarks.runner import load_config

    candidates = load_config("apo_lr_defaults")["methods"]
    stage1, stage2 = report["rule"]["stages"]
    assert stage1["cells"] == 12 and set(stage1["mean_ranks"]) == set(candidates)
    assert all(1 <= rank <= len(candidates) for rank in stage1["mean_ranks"].values())
    assert "same_fsd10" in stage1["finalists"] and len(stage1["finalists"]) in (3, 4)
    assert report["winner"] in stage1["finalists"]
    targets = [t for t in report["targets"] if t["method"] == report["winner"]]
    assert len(targets) == 4 and all(t["met"] in (True, False) for t in targets)
    assert all(task in targets[0]["detail"] for task in small)
    # a second run finds every run done: nothing is trained again
    lines = len(rows_of(tmp_path, "teacher_student"))
    quick("apo_lr_defaults", tmp_path, "teacher_student", report=False)
    assert len(rows_of(tmp_path, "teacher_student")) == lines
    assert "## The rule" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "lr_traces.png").stat().st_size > 1000


@pytest.mark.slow
def test_apo_precond_compare_quick_applies_the_rule(tmp_path):
    """Two tasks at 30 steps, then the report: the candidates ranked per task, the winner by the stated rule."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("heavyball")
    from benchmarks.runner import load_config

    tasks = ("digits_classification", "teacher_student")
    report = quick("apo_precond_compare", tmp_path, *tasks)
    config = load_config("apo_precond_compare")
    candidates = config["rule"]["candidates"]
    (stage,) = report["rule"]["stages"]
    assert stage["cells"] == 2 and set(stage["mean_ranks"]) == set(candidates)
    # the winner has the best mean rank, or is within the tie margin of it
    assert stage["mean_ranks"][report["winner"]] <= min(stage["mean_ranks"].values()) + 0.25
    ranks = {name: [] for name in candidates}
    for cell in report["cells"]:
        assert {*candidates, "soap", "psgd_kron", "shampoo"} <= set(cell)
        assert report["grids"][cell["task"]]["sgdm"] and report["grids"][cell["task"]]["adamw"]
        for position, name in enumerate(sorted(candidates, key=lambda n: cell[n]), start=1):
            ranks[name].append(position)
    assert stage["mean_ranks"] == pytest.approx({name: sum(r) / len(r) for name, r in ranks.items()})
    precision = {(p["task"], p["method"], p["mode"]): p["change"] for p in report["precision"]}
    for task in tasks:  # bf16 weights and autocast of the four, both roundings paired with float32
        for method in ("sgdm", "spectral", "adamw", "soap"):
            assert math.isfinite(precision[(task, method, "bf16_autocast")])
        assert math.isfinite(precision[(task, "spectral_nearest", "bf16_weights")])
    assert len(report["targets"]) == 5 + len(candidates)
    assert (tmp_path / "curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_apo_lr_peers_quick_applies_the_rule(tmp_path):
    """A small task at 30 steps, every run, then the report: the tuned baseline is the best of the linear grid, the
    initial LRs are its multiples, the lr-free peers at lr 1 serve every cell, the ranks are recomputed here."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    for package in ("prodigyopt", "schedulefree", "mechanic_pytorch", "dog", "dadaptation"):
        pytest.importorskip(package)
    from benchmarks import score
    from benchmarks.optimizers import resolve
    from benchmarks.runner import load_config

    task = "digits_classification"
    report = quick("apo_lr_peers", tmp_path, task)
    config = load_config("apo_lr_peers")
    rows = rows_of(tmp_path, task)
    adamw_linear = resolve(config["grids"]["adamw_linear"]["method"])
    linear = {r["lr"]: score.run_score(r, "best") for r in rows
              if r["method"] == adamw_linear and r["lr"] in config["grids"]["adamw_linear"]["lrs"]}
    best = min(linear, key=linear.get)
    assert report["grids"][task]["adamw_linear"] == {str(lr): v for lr, v in linear.items()}
    cells = [c for c in report["cells"] if c["task"] == task]
    assert sorted(c["lr"] for c in cells) == sorted(float(f"{best * f:.3g}") for f in config["cells"]["factors"])
    for peer in ("prodigy", "dog", "dadapt_adam"):
        assert len({c[peer] for c in cells}) == 1  # one run at lr 1, the same value in every cell
    for c in cells:
        assert c["adamw_at_initial_lr"] == linear.get(c["lr"], c["adamw_at_initial_lr"])
    # digits_classification is judged by the best validation loss along the run, not the last one
    row = next(r for r in rows if r["method"]["kind"] == "apo_lr")
    assert score.run_score(row, "best") == min(row["losses"])
    ranks = {}
    for c in cells:
        values = {k: c[k] for k in config["rule"]["candidates"]}
        for position, method in enumerate(sorted(values, key=values.get), start=1):
            ranks.setdefault(method, []).append(position)
    (stage1, stage2) = report["rule"]["stages"]
    assert stage1["mean_ranks"] == pytest.approx({m: sum(r) / len(r) for m, r in ranks.items()})
    assert set(report["mean_ranks"]["stage 1's tasks"]["mean_ranks"]) == set(config["rank_all"])
    assert (tmp_path / "cells.png").stat().st_size > 1000
    # a second run trains nothing again
    lines = len(rows)
    quick("apo_lr_peers", tmp_path, task, report=False)
    assert len(rows_of(tmp_path, task)) == lines


@pytest.mark.slow
def test_apo_precond_split_quick_applies_the_rule(tmp_path):
    """Baselines and the four candidates on a small task at 30 steps, then the report: the baseline is the better of
    AdamW-linear and AdamW cosine at their best LRs, SOAP's the best of its three, the candidates run at the tuned LR,
    and the stage-1 ranks and percentages are recomputed here from the rows."""
    pytest.importorskip("sklearn")
    pytest.importorskip("heavyball")
    from benchmarks.runner import load_config

    task = "digits_autoencoder"
    quick("apo_precond_split", tmp_path, task, report=False)
    # the spectra of the learned factors, at the tuned LR those runs found
    benchmarks("run", "apo_precond_split", "--quick", "--runs", str(tmp_path / "runs"), "--tasks", task,
               "--spectra", task)
    report = quick("apo_precond_split", tmp_path, task)
    config = load_config("apo_precond_split")
    by = {}
    for r in rows_of(tmp_path, task):
        if r["precision"] == "fp32":
            name = next((n for n, m in {**config["methods"], **{g: c["method"] for g, c in config["grids"].items()}
                                         }.items() if all(r["method"].get(k) == v for k, v in m.items())), None)
            by.setdefault(name, {})[r["lr"]] = r["final"]
    tuned = min(by["adamw_linear"], key=by["adamw_linear"].get)
    baseline = min(min(by["adamw_linear"].values()), min(by["adamw_cosine"].values()))
    assert sorted(by["soap_linear"]) == sorted(float(f"{tuned * f:.3g}") for f in (1 / 3, 1.0, 3.0))
    candidates = config["rule"]["candidates"]
    values = {c: by[c][tuned] for c in candidates}
    order = sorted(values, key=values.get)
    assert report["rule"]["stages"][0]["mean_ranks"] == {c: float(order.index(c) + 1) for c in candidates}
    assert (tmp_path / "curves.png").stat().st_size > 1000
    (precision,) = report["precision"]
    pair = {r["precision"]: r["final"] for r in rows_of(tmp_path, task) if r["seed"] == 0 and r["lr"] == tuned
            and r["method"]["kind"] == "apo_precond" and r["method"]["size"] == "lr"
            and r["method"]["loss_batch"] == "same"}
    assert precision["change"] == pytest.approx(pair["bf16_autocast"] / pair["fp32"] - 1)
    for c in candidates:
        target = next(t for t in report["targets"] if t["method"] == c and t["target"].startswith("never"))
        assert f"{task} {100 * (values[c] / baseline - 1):+.1f}%" in target["detail"]
    spectra = json.loads((tmp_path / "runs" / "spectra.json").read_text())
    assert [r["lr"] for r in spectra["runs"]] == [tuned] * len(candidates)
    for run in spectra["runs"]:  # shape-only factors keep mean eigenvalue 1
        if config["methods"][run["candidate"]]["size"] in ("shape", "lr"):
            shape_only = run["points"][-1]["spectra"]
            assert shape_only and all(sum(v) / len(v) == pytest.approx(1.0, rel=1e-4) for v in shape_only.values())
    assert (tmp_path / "spectra.png").stat().st_size > 1000
