"""benchmarks' run store and runner: keys from the full method, the checkpoint a Trainer task's rows are read by,
resuming, a typo in a method failing, the rule's mean ranks and tie-break."""

from __future__ import annotations

import itertools
import json
import math
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import runner  # noqa: E402
from benchmarks.optimizers import resolve  # noqa: E402
from benchmarks.runner import Store, Study, run_key  # noqa: E402
from benchmarks.score import (failed, failure_threshold, left_of_start, mean_ranks,  # noqa: E402
                              ordered_by_rule, tie_key)

ADAMW = resolve({"kind": "adamw"})


def write_study(root: Path, name: str, text: str) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "study.toml").write_text(text)


def test_keys_round_the_lr_and_default_to_float32():
    assert run_key("t", ADAMW, 1e-3 * 3, 0, 30) == run_key("t", ADAMW, 0.003, 0, 30, "fp32")
    assert run_key("t", ADAMW, 0.0030000000000000005, 1, 30) == run_key("t", ADAMW, 0.003, 1, 30)
    assert run_key("t", ADAMW, 0.003, 0, 30, "bf16_weights") != run_key("t", ADAMW, 0.003, 0, 30)
    # the whole method is in the key: another hyperparameter is another run, the same one written as an int is not
    assert run_key("t", {**ADAMW, "weight_decay": 0.1}, 0.003, 0, 30) != run_key("t", ADAMW, 0.003, 0, 30)
    assert run_key("t", {**ADAMW, "weight_decay": 0}, 0.003, 0, 30) == run_key("t", ADAMW, 0.003, 0, 30)
    # a hyperparameter a builder gained later, at the value that reproduces the stored runs, leaves their keys alone
    apo = resolve({"kind": "apo_lr"})
    assert apo["trust_region"] == "none"
    older = {k: v for k, v in apo.items() if k != "trust_region"}
    assert run_key("t", apo, 0.003, 0, 30) == run_key("t", older, 0.003, 0, 30)
    assert run_key("t", {**apo, "trust_region": "kl"}, 0.003, 0, 30) != run_key("t", older, 0.003, 0, 30)
    assert apo["trust_region_opening"] == 100  # hf_apo's default: the runs before it was a hyperparameter
    assert run_key("t", {**apo, "trust_region_opening": 0}, 0.003, 0, 30) != run_key("t", apo, 0.003, 0, 30)
    older = {k: v for k, v in apo.items() if k not in ("trust_region", "trust_region_opening")}
    assert run_key("t", apo, 0.003, 0, 30) == run_key("t", older, 0.003, 0, 30)


def test_a_method_typo_fails_and_defaults_are_filled():
    with pytest.raises(TypeError, match="lamda_fsd"):
        resolve({"kind": "apo_lr", "lamda_fsd": 1.0})
    with pytest.raises(ValueError, match="unknown optimizer kind"):
        resolve({"kind": "adamww"})
    full = resolve({"kind": "apo_lr", "loss_batch": "same"})
    from hf_apo.defaults import settings

    defaults = settings("lr", "same")  # hf_apo's defaults, not a private copy, but the bound: a method names its own
    assert all(full[k] == v for k, v in defaults.items() if not k.startswith("trust_region"))
    assert defaults["trust_region"] == 1.0 and full["trust_region"] == "none"
    assert resolve({"kind": "sgd"}, default_schedule="linear")["schedule"] == "linear"


STUDY = """
title = "t"
question = "q"
tasks = ["teacher_student", "finetune"]
checkpoints = { finetune = "abc" }
[grids.adamw]
method = { kind = "adamw" }
lrs = [1e-3]
[cells]
grid = "adamw"
[methods]
"""


def test_a_trainer_task_reads_only_the_rows_of_its_checkpoint(tmp_path):
    write_study(tmp_path, "s", STUDY)
    method = resolve({"kind": "adamw"}, "linear")
    rows = [{"key": run_key("finetune", method, 1e-3, seed, 600, "fp32", checkpoint), "task": "finetune",
             "method": method, "lr": 1e-3, "seed": seed, "steps": 600, "final": 1.0 + seed}
            for seed, checkpoint in ((0, "torch-2.13"), (1, "abc"))]
    runs = tmp_path / "s" / "runs"
    runs.mkdir()
    (runs / "finetune.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    study = Study("s", root=tmp_path)
    assert study.rows("finetune", "adamw", 1e-3, seeds=(0, 1)) == rows[1:]
    assert len(Store(runs).rows) == 2


def test_a_study_trains_what_is_missing_and_resumes(tmp_path, monkeypatch):
    """A killed study loses no finished run: each is on file as it ends and a rerun reads it back untrained."""
    trained = []

    def fake_train(task, data, method, lr, seed, steps, eval_every, precision="fp32", callback=None):
        trained.append((method["kind"], lr, seed, precision))
        return {"final": lr * (seed + 1), "losses": [1.0, lr], "eval_steps": [0, steps], "diverged": False}

    monkeypatch.setattr(runner, "train_in_process", fake_train)
    monkeypatch.setattr(runner.TASKS["teacher_student"], "load", lambda quick: None)
    write_study(tmp_path, "s", STUDY.replace('["teacher_student", "finetune"]', '["teacher_student"]')
                + "\n[seeds]\nteacher_student = [0, 1]\n")
    study = Study("s", root=tmp_path, training=True)
    assert [r["final"] for r in study.rows("teacher_student", "adamw", 1e-3)] == [1e-3, 2e-3]
    study.rows("teacher_student", "adamw", 1e-3, "bf16_weights", seeds=(0,))
    assert len(trained) == 3 and trained[-1][-1] == "bf16_weights"
    path = tmp_path / "s" / "runs" / "teacher_student.jsonl"
    rows = [json.loads(line) for line in path.open()]
    assert [r["seed"] for r in rows] == [0, 1, 0] and rows[0]["method"] == ADAMW
    assert rows[0]["steps"] == runner.TASKS["teacher_student"].budgets["long"][0]
    with path.open("a") as out:
        out.write('{"key": "cut by a ki')  # a line a kill cut short is ignored

    staged = Study("s", root=tmp_path, training=True, seeds=[3])  # a seed-staged run trains its seed only
    assert [r["seed"] for r in staged.rows("teacher_student", "adamw", 1e-3, seeds=(0, 1, 2, 3))] == [0, 1, 3]
    assert len(trained) == 4 and trained[-1] == ("adamw", 1e-3, 3, "fp32")
    again = Study("s", root=tmp_path, training=True)
    assert [r["final"] for r in again.rows("teacher_student", "adamw", 1e-3, seeds=(0, 1, 2))] == [1e-3, 2e-3, 3e-3]
    assert len(trained) == 5 and trained[-1] == ("adamw", 1e-3, 2, "fp32")  # only seed 2 was missing
    quick = Study("s", root=tmp_path, quick=True, runs=tmp_path / "quick")
    assert quick.budget("teacher_student")[2] == (0,) and quick.budget("teacher_student")[0] == runner.QUICK_BUDGET[0]


def test_a_study_trains_its_candidates_first_and_only_the_cells_asked_for(tmp_path, monkeypatch):
    trained = []

    def fake_train(task, data, method, lr, seed, steps, eval_every, precision="fp32", callback=None):
        trained.append((method["kind"], lr, seed))
        return {"final": lr, "losses": [1.0, lr], "eval_steps": [0, steps], "diverged": False}

    monkeypatch.setattr(runner, "train_in_process", fake_train)
    monkeypatch.setattr(runner.TASKS["teacher_student"], "load", lambda quick: None)
    write_study(tmp_path, "s", STUDY.replace('["teacher_student", "finetune"]', '["teacher_student"]').replace(
        '[cells]\ngrid = "adamw"', '[cells]\ngrid = "adamw"\nfactors = [1.0, 3.0]').replace(
        "[methods]", '[seeds]\nteacher_student = [0]\n[methods]\npeer = { kind = "sgd" }\n'
                     'candidate = { kind = "apo_lr" }\n[rule]\ncandidates = ["candidate"]\nstages = [{}]'))
    Study("s", root=tmp_path, training=True, factors=[3.0]).run()
    assert trained == [("adamw", 1e-3, 0), ("apo_lr", 3e-3, 0), ("sgd", 3e-3, 0)]  # the grid, then the 3× cell only
    Study("s", root=tmp_path, training=True, methods=["peer"]).run()  # only the methods asked for
    assert trained[3:] == [("sgd", 1e-3, 0)]
    Study("s", root=tmp_path, training=True).run()
    assert trained[4:] == [("apo_lr", 1e-3, 0)]


def test_a_candidate_named_by_methods_trains_on_a_stage_the_rule_has_not_reached(tmp_path, monkeypatch):
    trained = []

    def fake_train(task, data, method, lr, seed, steps, eval_every, precision="fp32", callback=None):
        trained.append((method["kind"], lr))
        return {"final": lr, "losses": [1.0, lr], "eval_steps": [0, steps], "diverged": False}

    monkeypatch.setattr(runner, "train_in_process", fake_train)
    monkeypatch.setattr(runner.TASKS["teacher_student"], "load", lambda quick: None)
    write_study(tmp_path, "s", STUDY.replace('["teacher_student", "finetune"]', '["teacher_student"]').replace(
        "[methods]", '[seeds]\nteacher_student = [0]\n[methods]\ncandidate = { kind = "apo_lr" }\n[rule]\n'
                     'candidates = ["candidate"]\nstages = [{ tasks = ["digits_classification"], finalists = 1 }, {}]'))
    Study("s", root=tmp_path, training=True).run()
    assert trained == [("adamw", 1e-3)]  # teacher_student is stage 2's: it waits for stage 1's finalists
    Study("s", root=tmp_path, training=True, methods=["candidate"]).run()
    assert trained == [("adamw", 1e-3), ("apo_lr", 1e-3)]


def test_a_candidate_that_fails_the_rules_checks_on_more_tasks_loses_whatever_its_rank(tmp_path, monkeypatch):
    finals = {("apo_lr", 3e-3): 5.0, ("sgd", 3e-3): 1.2, ("apo_lr", 1e-3): 0.5, ("sgd", 1e-3): 0.9}

    def fake_train(task, data, method, lr, seed, steps, eval_every, precision="fp32", callback=None):
        final = finals.get((method["kind"], lr), 1.0)
        return {"final": final, "losses": [9.0, final], "eval_steps": [0, steps], "diverged": False}

    monkeypatch.setattr(runner, "train_in_process", fake_train)
    monkeypatch.setattr(runner.TASKS["teacher_student"], "load", lambda quick: None)
    rule = '[rule]\ncandidates = ["fast", "safe"]\nstages = [{}]\nfailures = [{ factor = 3.0, above = 1.25 }]'
    write_study(tmp_path, "s", STUDY.replace('["teacher_student", "finetune"]', '["teacher_student"]').replace(
        '[cells]\ngrid = "adamw"', '[cells]\ngrid = "adamw"\nfactors = [1.0, 3.0]').replace(
        "[methods]", '[seeds]\nteacher_student = [0]\n[methods]\nfast = { kind = "apo_lr" }\n'
                     'safe = { kind = "sgd" }\n' + rule))
    study = Study("s", root=tmp_path, training=True)
    study.run()
    stage = study.rule()["stages"][0]
    # mean ranks tie (fast first at 1x, safe first at 3x) and the rank order alone puts "fast" first; but its 3x run
    # wrecked (5.0 against 1.25 x the grid's best, 1.0), while "safe" ended 1.2 there: within the check
    assert stage["failing"] == {"fast": ["teacher_student"], "safe": []}
    assert stage["order"][0] == "safe" and study.rule()["winner"] == "safe"


def test_mean_ranks_and_the_tie_break():
    table = {"a": {"x": 1.0, "y": 2.0, "z": 3.0}, "b": {"x": 2.0, "y": 1.0, "z": 3.0}, "c": {"x": 1.0, "y": 2.0}}
    assert mean_ranks(table) == {"x": pytest.approx(4 / 3), "y": pytest.approx(5 / 3), "z": 3.0}
    # with names: only the cells where all of them ran, ranked among them
    assert mean_ranks(table, ["z", "y"]) == {"z": 2.0, "y": 1.0}
    scores = {"x": 1.5, "y": 1.6, "z": 3.0}
    assert ordered_by_rule(scores, 0.25, lambda n: (n != "y",)) == ["y", "x", "z"]
    assert ordered_by_rule(scores, 0.05, lambda n: (n != "y",)) == ["x", "y", "z"]
    # a study's tie-break: fewer meta passes per step first, then a named preference
    same = {"loss_batch": "same", "lambda_fsd": 10.0, "meta_interval": 10}
    assert tie_key("a", same, ["meta_passes", {"name": "a"}]) == (0.15, False)
    cheaper = {**same, "loss_batch": "next", "lambda_fsd": 0.0}
    assert tie_key("b", cheaper, ["meta_passes", {"name": "a"}]) == (0.0, True)


def test_a_task_smaller_than_one_batch_is_refused_not_looped_over():
    assert [len(b) for b in itertools.islice(runner.epoch_batches(10, 4, 0), 3)] == [4, 4, 4]
    with pytest.raises(ValueError, match="smaller than one batch of 32"):
        next(runner.epoch_batches(24, 32, 0))


def test_failed_seeds_are_counted_apart_and_saturation_is_the_share_of_step_0_left():
    rows = [{"final": f, "losses": [8.0, 1.2, f]} for f in (1.0, 1.9, 2.5, math.inf)]
    threshold = failure_threshold(1.0, 11.0, 0.1)  # tuned 1 from 11 at step 0: a tenth of that gain given back
    assert threshold == pytest.approx(2.0)
    assert failed(rows, threshold) == 2  # above it, or diverged; 1.9 is not
    assert failed(rows, threshold, "best") == 1  # the best along the run: 2.5's run reached 1.2; inf diverged
    assert failed(rows[:2], threshold) == 0
    # saturated: tuned 0.001 from 5; 0.003 is two near-perfect models, not a failure; a plateau at 0.8 is
    assert failed([{"final": 0.003, "losses": [5.0]}, {"final": 0.8, "losses": [5.0]}],
                  failure_threshold(0.001, 5.0, 0.1)) == 1
    assert left_of_start(rows[:2]) == pytest.approx(1.45 / 8.0)
    assert left_of_start([{"final": 0.002, "losses": [4.0, 0.002]}]) == pytest.approx(5e-4)  # saturated
    # above a floor: teacher-student's noise (½·0.1²) is what no model beats
    assert left_of_start([{"final": 0.026, "losses": [0.5435, 0.026]}], floor=0.005) == pytest.approx(0.021 / 0.5385)
    assert runner.TASKS["teacher_student"].floor == pytest.approx(0.005)


def test_a_final_metric_is_averaged_over_the_seeds_that_recorded_it():
    from benchmarks.report import metric_mean

    rows = [{"metrics": {"bleu": 20.0}}, {"metrics": {"bleu": 25.0}}, {}]
    assert metric_mean(rows, "bleu") == "22.5 (2 of 3 seeds)"
    assert metric_mean(rows[:2], "bleu") == "22.5" and metric_mean(rows, "chrf") == "—"
