"""The benchmark scripts' --quick modes run end to end and write well-formed results (about 30-40 s together).

Each runs in a subprocess, as a user runs it, so its torch thread setting cannot leak into other tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_script(script: str, output_dir: Path, *extra: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), "--quick", "--output_dir", str(output_dir), *extra],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def run_study(name: str, argv: list[str]) -> None:
    """A study script's command line in this process (no second interpreter to start: seconds per call)."""
    import importlib

    sys.path.insert(0, str(REPO_ROOT))  # the benchmarks are scripts beside the package, not installed with it
    threads = torch.get_num_threads()
    try:
        importlib.import_module(f"benchmarks.{name}").main(argv)
    finally:
        torch.set_num_threads(threads)


def test_overhead_quick(tmp_path):
    run_script("overhead.py", tmp_path)
    results = json.loads((tmp_path / "overhead.json").read_text())
    for key in ("apo_lr_step_ratio", "apo_precond_step_ratio", "apo_lr_peak_mem_ratio", "apo_precond_peak_mem_ratio"):
        assert positive_finite(results[key]), (key, results[key])
    env = results["environment"]
    assert env["torch"] and env["device"] and "overhead.py" in env["command"] and "--quick" in env["command"]
    size = results["headline_size"]
    row = results["per_size"][size]
    assert positive_finite(row["apo_lr_step_ratio"]) and positive_finite(row["apo_precond_step_ratio"])
    methods = results["sizes"][size]["methods"]
    assert methods["adamw"]["step_ratio"] == 1.0
    assert methods["adamw"]["peak_mem_ratio"] == 1.0
    for name in ("apo_lr", "apo_lr_paper", "apo_precond"):
        assert len(methods[name]["block_means_s"]) == results["settings"]["reps"]
    for name in ("apo_lr_paper", "apo_precond"):  # meta steps inside one step(): timed part by part
        assert positive_finite(methods[name]["meta_step_in_adamw_steps"])
        parts = methods[name]["meta_step_breakdown_s"]
        assert parts["lookahead_forward_backward"] > 0 and parts["training_forward_backward"] > 0
    # APO-LR keeps AdamW's moments plus φ, its Adam state and the two observed batches; the default ("next" with a
    # horizon) also its displacement D, one float32 copy of the parameters
    assert methods["apo_lr_paper"]["state_bytes"] > methods["adamw"]["state_bytes"]
    assert methods["apo_lr"]["state_bytes"] >= methods["adamw"]["state_bytes"] + results["sizes"][size]["param_bytes"]
    # APO-Precond keeps SGD's momentum buffer (one copy of the parameters) plus its factors
    assert methods["apo_precond"]["state_bytes"] > results["sizes"][size]["param_bytes"]
    assert set(results["targets"][size]) >= {"apo_lr_step_ratio_le_1.10", "apo_precond_step_ratio_le_1.25",
                                             "apo_lr_peak_le_adamw_plus_one_param_copy"}
    text = (tmp_path / "overhead.md").read_text()
    assert "| APO-LR step time / AdamW |" in text and "Command:" in text


def test_quality_quick(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    # squared error on tabular data and seq2seq token cross-entropy (KL between output distributions); the other
    # tasks are also squared error or classification on small MLPs: the suite keeps under 10 minutes on 2 cores
    tasks = ["diabetes", "translation"]
    run_script("quality.py", tmp_path, "--tasks", *tasks)
    results = json.loads((tmp_path / "quality.json").read_text())
    assert set(results["tasks"]) == set(tasks)
    for name, task in results["tasks"].items():
        assert positive_finite(task["target_loss"]), name
        selected = task["selected"]
        for label in ("adamw_best_constant", "adamw_tuned_decay", "apo_lr_1e-03", "apo_precond_sgdm",
                      "apo_precond_sgd", "prodigy", "sf_adamw", "soap"):
            method = task["methods"][selected[label]]
            assert positive_finite(method["final_mean"]), (name, label, method["final_mean"])
            assert method["final_std"] is not None and method["final_std"] >= 0
            assert "steps_to_tuned_adamw_loss" in method and "seconds_to_tuned_adamw_loss" in method
            assert len(method["mean_curve"]) == len(method["curve_steps"])
        # the tuned AdamW reaches its own final loss by definition
        assert task["methods"][task["tuned_adamw"]]["steps_to_tuned_adamw_loss"] is not None
        assert task["methods"][selected["apo_lr_1e-03"]]["lr_traces"], "APO-LR records its learned LR"
        assert task["bf16"], name
        for entry in task["bf16"].values():
            assert math.isfinite(entry["relative_change"])
        assert (tmp_path / f"quality_{name}_loss.png").stat().st_size > 1000
        assert (tmp_path / f"quality_{name}_apo_lr_schedule.png").stat().st_size > 1000
    assert set(results["claims"]) == {"apo_lr_beats_best_fixed_lr", "apo_lr_within_2pct_of_tuned_decay",
                                      "apo_precond_competitive_with_second_order_and_0.7x_steps",
                                      "bf16_changes_apo_by_lt_1pct"}
    assert "apo_lr_lambda_fsd" in results["defaults"]
    assert results["environment"]["command"].endswith("--output_dir " + str(tmp_path)) or "--quick" in results["environment"]["command"]
    text = (tmp_path / "quality.md").read_text()
    assert "## Claims, as measured" in text and "## Recommended defaults" in text


def test_quality_resumes_from_its_runs_file(tmp_path, monkeypatch):
    """A killed quality.py loses no finished run: each is on file as it ends and a rerun reads it back untrained."""
    pytest.importorskip("sklearn")
    from benchmarks import quality
    from benchmarks.common import MethodSpec
    from benchmarks.tasks import TASKS

    task = dataclasses.replace(TASKS["diabetes"], steps=6, eval_every=3)
    data = task.load(True)
    spec = MethodSpec("adamw_1e-03", "adamw", lr=1e-3)
    path = tmp_path / "quality_runs" / "diabetes.jsonl"
    first = quality.TaskRunner(task, data, [0, 1], None, path).run(spec)
    assert len(path.read_text().splitlines()) == 2
    with path.open("a") as out:
        out.write('{"key": "cut by a ki')  # a line a kill cut short is ignored

    trained = []
    real_run_once = quality.run_once
    monkeypatch.setattr(quality, "run_once", lambda *a, **k: trained.append(a[2].name) or real_run_once(*a, **k))
    runner = quality.TaskRunner(task, data, [0, 1], None, path)
    again = runner.run(spec)
    assert trained == [] and again["finals"] == first["finals"] and again["mean_curve"] == first["mean_curve"]
    assert (runner.read_back, runner.trained) == (2, 0)  # what quality.md reports beside its wall clock
    runner.run(spec.with_(name="adamw_3e-03", lr=3e-3))  # another spec, or another budget, is trained
    longer = quality.TaskRunner(dataclasses.replace(task, steps=9), data, [0], None, path)
    longer.run(spec)
    assert trained == ["adamw_3e-03", "adamw_3e-03", "adamw_1e-03"]


def test_apo_lr_defaults_quick_applies_the_rule(tmp_path):
    """Stage 1 on the three small tasks (30 steps, 1 seed), then the report: a ranking, finalists, targets."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    common = ["--quick", "--output_dir", str(tmp_path)]
    for command in (["run", "--tasks", "digits_classification", "digits_autoencoder", "teacher_student"], ["report"]):
        run_study("apo_lr_defaults", [*command, *common])
    sys.path.insert(0, str(REPO_ROOT))  # the benchmarks are scripts beside the package, not installed with it
    from benchmarks.apo_lr_defaults import CANDIDATES, PAPER

    report = json.loads((tmp_path / "apo_lr_defaults.json").read_text())
    rule = report["rule"]
    assert rule["stage1_cells"] == 12 and set(rule["stage1_mean_rank"]) == set(CANDIDATES)
    assert all(1 <= rank <= len(CANDIDATES) for rank in rule["stage1_mean_rank"].values())
    assert PAPER in rule["finalists"] and len(rule["finalists"]) in (3, 4)
    assert rule["winner"] in rule["finalists"]
    for name in report["target_candidates"]:
        assert set(report["targets"][name]["within_5pct_of_best_fixed_from_every_init"]) == {
            "digits_classification", "digits_autoencoder", "teacher_student"}
    # a second run finds every run done: nothing is trained again
    rows = sum(1 for _ in (tmp_path / "apo_lr_runs" / "teacher_student.jsonl").open())
    run_study("apo_lr_defaults", ["run", "--tasks", "teacher_student", *common])
    assert sum(1 for _ in (tmp_path / "apo_lr_runs" / "teacher_student.jsonl").open()) == rows
    assert "## Stage 1" in (tmp_path / "apo_lr_defaults.md").read_text()
    assert (tmp_path / "apo_lr_teacher_student.png").stat().st_size > 1000


def test_apo_precond_compare_quick_applies_the_rule(tmp_path):
    """Two tasks at 30 steps, then the report: the candidates ranked per task, the winner by the stated rule."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    pytest.importorskip("heavyball")
    common = ["--quick", "--output_dir", str(tmp_path)]
    for command in (["run", "--tasks", "digits_classification", "teacher_student"], ["report"]):
        run_study("apo_precond_compare", [*command, *common])
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.apo_precond_compare import CANDIDATES, PEERS, PRECISION_CANDIDATES

    report = json.loads((tmp_path / "apo_precond_compare.json").read_text())
    rule = report["rule"]
    assert rule["cells"] == 2 and set(rule["scores"]) == set(CANDIDATES)
    # the winner has the best mean rank, or is within the tie margin of it
    assert rule["scores"][rule["winner"]] <= min(rule["scores"].values()) + 0.25
    ranks = {name: [] for name in CANDIDATES}
    for task in ("digits_classification", "teacher_student"):
        methods = report["tasks"][task]["methods"]
        assert {*CANDIDATES, *PEERS, "adamw"} <= set(methods)
        for position, name in enumerate(sorted(CANDIDATES, key=lambda n: methods[n]["final_mean"]), start=1):
            ranks[name].append(position)
        assert set(report["tasks"][task]["precision"]) == {"sgdm", *PRECISION_CANDIDATES, "adamw", "soap"}
        for entry in report["tasks"][task]["rounding"].values():  # bf16 weights, both roundings, paired with fp32
            assert entry["stochastic_seeds"] == entry["nearest_seeds"] == 1
            assert math.isfinite(entry["stochastic"]) and math.isfinite(entry["nearest"])
    assert report["rounding_rule"]["tasks"] == 2  # the quick run has two of the three small tasks
    assert rule["scores"] == pytest.approx({name: sum(r) / len(r) for name, r in ranks.items()})
    assert len(report["targets"]) == 5
    assert (tmp_path / "apo_precond_compare.png").stat().st_size > 1000


def test_apo_lr_peers_quick_applies_the_rule(tmp_path):
    """A small task at 30 steps, every phase, then the report: the tuned baseline is the best of the linear grid,
    the initial LRs are its multiples, the lr-free peers at lr 1 serve every cell, the ranks are recomputed here."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    for package in ("prodigyopt", "schedulefree", "mechanic_pytorch", "dog", "dadaptation"):
        pytest.importorskip(package)
    common = ["--quick", "--output_dir", str(tmp_path)]
    tasks = ["digits_classification"]
    for command in (["run", "--tasks", *tasks, "--phase", "all"], ["report"]):
        run_study("apo_lr_peers", [*command, *common])
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.apo_lr_peers import CANDIDATES, GRIDS, PEERS_AT_ONE, INIT_FACTORS, run_score

    report = json.loads((tmp_path / "apo_lr_peers.json").read_text())
    runs = {task: [json.loads(line) for line in (tmp_path / "apo_lr_runs" / f"{task}.jsonl").open()] for task in tasks}
    for task in tasks:
        linear = {r["lr"]: run_score(task, r) for r in runs[task] if r["method"] == "adamw_linear"}
        best = min(GRIDS[task], key=lambda lr: linear[lr])
        assert report["tuned"][task] == [best, linear[best]]
        cells = [c for c in report["cells"] if c["task"] == task]
        assert sorted(c["lr"] for c in cells) == sorted(float(f"{best * f:.3g}") for f in INIT_FACTORS)
        for peer in PEERS_AT_ONE:
            assert len({c[peer] for c in cells}) == 1  # one run at lr 1, the same value in every cell
        for c in cells:
            assert c["adamw_linear_at_initial_lr"] == linear.get(c["lr"], c["adamw_linear_at_initial_lr"])
    # digits_classification is judged by the best validation loss along the run, not the last one
    row = next(r for r in runs["digits_classification"] if r["method"] == "apo_adam_k10")
    assert run_score("digits_classification", row) == min(row["losses"])
    ranks = {}
    for c in report["cells"]:
        values = {k: v for k, v in c.items() if k not in ("task", "lr")}
        for position, method in enumerate(sorted(values, key=values.get), start=1):
            ranks.setdefault(method, []).append(position)
    assert report["mean_ranks"] == pytest.approx({m: sum(r) / len(r) for m, r in ranks.items()})
    assert set(report["stage1"]) == set(CANDIDATES) and report["winner"] is None  # stage 2 has not run
    assert (tmp_path / "apo_lr_peers.png").stat().st_size > 1000
    # a second run trains nothing again
    lines = sum(1 for _ in (tmp_path / "apo_lr_runs" / "digits_classification.jsonl").open())
    run_study("apo_lr_peers", ["run", "--tasks", "digits_classification", "--phase", "all", *common])
    assert sum(1 for _ in (tmp_path / "apo_lr_runs" / "digits_classification.jsonl").open()) == lines


def test_apo_precond_split_quick_applies_the_rule(tmp_path):
    """Baselines and the four candidates on a small task at 30 steps, then the report: the baseline is the better of
    AdamW-linear and AdamW cosine at their best LRs, SOAP's the best of its three, the candidates run at the tuned LR,
    and the stage-1 ranks and percentages are recomputed here from the rows."""
    pytest.importorskip("sklearn")
    pytest.importorskip("heavyball")
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks import apo_precond_split
    from benchmarks.apo_precond_split import CANDIDATES, SOAP_FACTORS

    common = ["--quick", "--output_dir", str(tmp_path)]
    threads = torch.get_num_threads()
    try:  # in this process: the script's command line, without a second interpreter's start-up
        for command in (["run", "--tasks", "digits_autoencoder", "--phase", "all"],
                        ["run", "--tasks", "digits_autoencoder", "--phase", "precision"], ["report"]):
            apo_precond_split.main([*command, *common])
    finally:
        torch.set_num_threads(threads)

    report = json.loads((tmp_path / "apo_precond_split.json").read_text())
    rows = [json.loads(line) for line in (tmp_path / "apo_lr_runs" / "digits_autoencoder.jsonl").open()]
    by = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["lr"]] = r["final"]
    tuned = min(by["adamw_linear"], key=by["adamw_linear"].get)
    assert report["baseline"]["digits_autoencoder"] == min(min(by["adamw_linear"].values()),
                                                            min(by["adamw_warmup_cosine"].values()))
    assert sorted(by["soap_linear"]) == sorted(float(f"{tuned * f:.3g}") for f in SOAP_FACTORS)
    values = {c: by[f"precond_{c}" if not c.startswith("precond_") else c][tuned] for c in CANDIDATES}
    order = sorted(values, key=values.get)
    assert report["stage1"] == {c: float(order.index(c) + 1) for c in CANDIDATES}
    assert report["winner"] is None  # stage 2 has not run
    assert (tmp_path / "apo_precond_split.png").stat().st_size > 1000
    pair = {r["precision"]: r["final"] for r in map(json.loads, (tmp_path / "apo_precond_split_precision" /
                                                                 "digits_autoencoder.jsonl").open())}
    assert report["bf16_autocast_change"] == {"digits_autoencoder": pytest.approx(pair["bf16_autocast"] /
                                                                                  pair["fp32"] - 1)}
    base = report["baseline"]["digits_autoencoder"]
    for c in CANDIDATES:
        assert report["targets"][c]["versus_adamw"]["digits_autoencoder"] == pytest.approx(values[c] / base - 1)
    # the spectra of the learned factors, at the tuned LR those runs found: shape-only factors keep mean eigenvalue 1
    from benchmarks import precond_spectra

    try:
        precond_spectra.main(["--task", "digits_autoencoder", "--candidates", "precond_same", "split_next", *common])
    finally:
        torch.set_num_threads(threads)
    spectra = json.loads((tmp_path / "precond_spectra.json").read_text())
    assert [r["lr"] for r in spectra["runs"]] == [tuned, tuned]
    shape_only = spectra["runs"][1]["points"][-1]["spectra"]
    assert shape_only and all(sum(v) / len(v) == pytest.approx(1.0, rel=1e-4) for v in shape_only.values())
    assert (tmp_path / "precond_spectra.png").stat().st_size > 1000
