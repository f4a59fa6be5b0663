"""benchmarks/sweep.py: the run store's keys, the checkpoint a Trainer task's rows are read by, resuming, the rule."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import sweep as sweep_module  # noqa: E402
from benchmarks.common import MethodSpec  # noqa: E402
from benchmarks.sweep import Sweep, key_of, load_runs, mean_ranks, ordered_by_rule, run_key, runs_file  # noqa: E402


def write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_keys_round_the_lr_and_default_to_float32():
    assert run_key("adamw", 1e-3 * 3, 0, 30) == run_key("adamw", 0.003, 0, 30, "fp32")
    assert key_of({"method": "adamw", "lr": 0.0030000000000000005, "seed": 1, "steps": 30}) == \
        ("adamw", 0.003, 1, 30, "fp32")
    assert key_of({"method": "a", "lr": 0.1, "seed": 0, "steps": 30, "precision": "bf16_weights"})[-1] == \
        "bf16_weights"


def test_a_trainer_task_reads_only_the_rows_of_its_checkpoint(tmp_path):
    rows = [{"task": "finetune", "method": "adamw", "lr": 1e-3, "seed": 0, "steps": 600},  # legacy: torch 2.13
            {"task": "finetune", "method": "adamw", "lr": 1e-3, "seed": 0, "steps": 600, "pretrained_sha256": "abc"}]
    write_rows(runs_file(tmp_path, "finetune"), rows)
    assert load_runs(tmp_path, "finetune", "abc") == rows[1:]
    assert load_runs(tmp_path, "finetune", "torch-2.13") == rows[:1]
    assert load_runs(tmp_path, "finetune") == rows
    write_rows(runs_file(tmp_path, "finetune", "other_store"), rows[:1])
    assert load_runs(tmp_path, "finetune", "abc", "other_store") == []


def test_a_sweep_trains_what_is_missing_and_resumes(tmp_path, monkeypatch):
    trained = []

    def fake_train(self, spec, apo_args, lr, seed, precision):
        trained.append((spec.name, lr, seed, precision))
        return {"final": lr * (seed + 1)}

    monkeypatch.setattr(Sweep, "_train", fake_train)
    spec = MethodSpec("adamw", "adamw", lr=1e-3)
    sweep = Sweep("teacher_student", tmp_path, quick=False, store="store", seeds=(0, 1))
    assert [r["final"] for r in sweep.run("adamw", 1e-3, spec=spec)] == [1e-3, 2e-3]
    sweep.run("adamw", 1e-3, spec=spec, precision="bf16_weights", seeds=(0,))
    assert len(trained) == 3 and trained[-1][-1] == "bf16_weights"
    rows = [json.loads(line) for line in runs_file(tmp_path, "teacher_student", "store").open()]
    assert [r["seed"] for r in rows] == [0, 1, 0] and rows[0]["spec"]["name"] == "adamw"
    assert rows[0]["steps"] == sweep_module.LONG_BUDGETS["teacher_student"][0]

    again = Sweep("teacher_student", tmp_path, quick=False, store="store", seeds=(0, 1, 2))
    assert [r["final"] for r in again.run("adamw", 1e-3, spec=spec)] == [1e-3, 2e-3, 3e-3]
    assert len(trained) == 4 and trained[-1] == ("adamw", 1e-3, 2, "fp32")  # only seed 2 was missing
    quick = Sweep("teacher_student", tmp_path, quick=True, store="store", seeds=(0, 1))
    assert quick.seeds == (0,) and quick.steps == sweep_module.QUICK_BUDGET[0]


def test_mean_ranks_and_the_tie_break():
    table = {"a": {"x": 1.0, "y": 2.0, "z": 3.0}, "b": {"x": 2.0, "y": 1.0, "z": 3.0}, "c": {"x": 1.0, "y": 2.0}}
    assert mean_ranks(table) == {"x": pytest.approx(4 / 3), "y": pytest.approx(5 / 3), "z": 3.0}
    # with names: only the cells where all of them ran, ranked among them
    assert mean_ranks(table, ["z", "y"]) == {"z": 2.0, "y": 1.0}
    scores = {"x": 1.5, "y": 1.6, "z": 3.0}
    assert ordered_by_rule(scores, 0.25, lambda n: (n != "y",)) == ["y", "x", "z"]
    assert ordered_by_rule(scores, 0.05, lambda n: (n != "y",)) == ["x", "y", "z"]
