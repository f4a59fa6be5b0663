"""The one sweep every study runs on: the tasks' budgets, the run store, its keys, the sweep and the rule's helpers.

A study (``apo_lr_defaults.py``, ``apo_lr_peers.py``, ``apo_precond_compare.py``, ``apo_precond_split.py``) says
which runs it wants; a :class:`Sweep` trains those not yet on file and appends each to
``<output_dir>/<store>/<task>.jsonl`` as it ends, so a killed study resumes where it stopped. A run is keyed by
(method, LR, seed, steps, precision): :func:`run_key`. The small tasks train in-process (``tasks.run_once``); the
Trainer tasks (``finetune``, ``lora``) go through ``APOSeq2SeqTrainer``/``APOTrainer`` from a cached pretrained
checkpoint, and their rows carry its hash, since runs on another checkpoint are not comparable.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from benchmarks.common import MethodSpec, append_run, build_optimizer, read_runs
from benchmarks.tasks import TASKS, run_once

SMALL_TASKS = ("digits_classification", "digits_autoencoder", "teacher_student")
TRAINER_TASKS = ("finetune", "lora")  # run through the Trainer (benchmarks/finetune.py, benchmarks/lora.py)
LONG_BUDGETS = {  # task: (steps, eval_every, seeds)
    "digits_classification": (6000, 300, (0, 1, 2)),
    "digits_autoencoder": (8000, 400, (0, 1, 2)),
    "teacher_student": (6000, 300, (0, 1, 2)),
    "translation": (1500, 150, (0, 1)),
    "finetune": (600, 50, (0, 1)),
    "lora": (300, 25, (0, 1)),
}
QUICK_BUDGET = (30, 10, (0,))  # --quick: checks that a study runs
ADAMW_GRID = {task: (1e-4, 3e-4, 1e-3, 3e-3, 1e-2) for task in (*SMALL_TASKS, "translation")}
ADAMW_GRID["finetune"] = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
APO_LR_STORE = "apo_lr_runs"

# The pretrained checkpoint a Trainer task's run fine-tuned: the hash of its settings (``pretrained_checkpoint`` in
# finetune.py and lora.py), in the rows written since they carry it. Older rows carry none: the finetune ones came from
# a checkpoint pretrained under torch 2.13 (initial eval loss 9.925; the torch 2.14.1 one's is 10.219), the lora ones
# from the checkpoint named here (the initial eval loss, 11.167707443237305, is the same to all digits).
LEGACY_CHECKPOINT = {"finetune": "torch-2.13",
                     "lora": "8df1028e9885ea942700275b3fb83d738e363e1f397d7c5016624fb877518c97"}


# ---------------------------------------------------------------------------------------------------------------
# the run store
# ---------------------------------------------------------------------------------------------------------------
def lr_key(lr: float) -> float:
    """A learning rate as a key: rounded to 6 significant digits, so that one read back from a runs file matches the
    same LR computed again."""
    return float(f"{lr:.6g}")


def run_key(method: str, lr: float, seed: int, steps: int, precision: str = "fp32") -> tuple:
    return method, lr_key(lr), seed, steps, precision


def key_of(row: dict) -> tuple:
    """A stored row's :func:`run_key` (rows written before runs had a precision trained in float32)."""
    return run_key(row["method"], row["lr"], row["seed"], row["steps"], row.get("precision", "fp32"))


def runs_file(output_dir: Path, task: str, store: str = APO_LR_STORE) -> Path:
    return output_dir / store / f"{task}.jsonl"


def checkpoint_of(row: dict) -> str | None:
    return row.get("pretrained_sha256") or LEGACY_CHECKPOINT.get(row["task"])


def load_runs(output_dir: Path, task: str, checkpoint: str | None = None, store: str = APO_LR_STORE) -> list[dict]:
    """A task's runs; of a Trainer task only those fine-tuned from ``checkpoint``, when one is given."""
    rows = read_runs(runs_file(output_dir, task, store))
    if checkpoint is None or task not in TRAINER_TASKS:
        return rows
    return [r for r in rows if checkpoint_of(r) == checkpoint]


def trainer_module(task: str, quick: bool):
    """finetune.py or lora.py, the directory of its pretrained checkpoint, and the settings that pretrain it."""
    if task == "finetune":
        from benchmarks import finetune as module
    else:
        from benchmarks import lora as module
    directory = module.CACHE_ROOT / (f"{task}_pretrained_quick" if quick else f"{task}_pretrained")
    return module, directory, dict(module.QUICK_PRETRAIN if quick else module.PRETRAIN)


# ---------------------------------------------------------------------------------------------------------------
# the sweep
# ---------------------------------------------------------------------------------------------------------------
class Sweep:
    """One task's runs at its budget: skips those already in the task's file, appends each new one as it finishes.

    ``seeds`` replaces the budget's seeds (``--quick`` keeps one); of a Trainer task only the runs that fine-tuned
    this machine's pretrained checkpoint (:attr:`checkpoint`, built and cached on first use) count as done."""

    def __init__(self, task: str, output_dir: Path, quick: bool, store: str = APO_LR_STORE, seeds=None):
        self.task, self.output_dir, self.quick, self.store = task, output_dir, quick, store
        steps, eval_every, budget_seeds = QUICK_BUDGET if quick else LONG_BUDGETS[task]
        self.steps, self.eval_every = steps, eval_every
        self.seeds = budget_seeds if quick or seeds is None else tuple(seeds)
        self.checkpoint = None  # a Trainer task: the hash of the pretrained checkpoint its runs fine-tune
        if task in TRAINER_TASKS:
            module, directory, settings = trainer_module(task, quick)
            self.checkpoint = module.pretrained_checkpoint(directory, settings)["settings_sha256"]
        self.done = {key_of(r): r for r in load_runs(output_dir, task, self.checkpoint, store)}
        self._data = None

    def run(self, method: str, lr: float, spec: MethodSpec | None = None, apo_args: dict | None = None,
            precision: str = "fp32", seeds=None) -> list[dict]:
        """The method's rows at ``lr``, one a seed, trained where missing. A small task trains ``spec``; a Trainer
        task runs with the ``--apo_*``/``--optim`` flags ``apo_args``, and ``spec``, when given, replaces the
        Trainer's optimizer (a peer, SOAP) under its scheduler."""
        rows = []
        for seed in self.seeds if seeds is None or self.quick else seeds:
            key = run_key(method, lr, seed, self.steps, precision)
            if key not in self.done:
                started = time.perf_counter()
                result = self._train(spec, apo_args, lr, seed, precision)
                row = {"task": self.task, "method": method, "lr": lr, "seed": seed, "steps": self.steps,
                       "precision": precision, "wall_s": round(time.perf_counter() - started, 2), **result}
                if spec is not None:
                    row["spec"] = spec.to_dict()
                append_run(runs_file(self.output_dir, self.task, self.store), row)
                self.done[key] = row
                print(f"[{self.task}] {method} lr={lr:.2e} seed={seed} {precision}: final {row['final']:.5g} "
                      f"({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
            rows.append(self.done[key])
        return rows

    def _train(self, spec: MethodSpec | None, apo_args: dict | None, lr: float, seed: int, precision: str) -> dict:
        if self.task in TRAINER_TASKS:
            if precision != "fp32":
                raise ValueError(f"{self.task} runs in float32 only (asked for {precision})")
            return self._train_with_trainer(spec, apo_args, lr, seed)
        task = dataclasses.replace(TASKS[self.task], steps=self.steps, eval_every=self.eval_every)
        if self._data is None:
            self._data = task.load(self.quick)
        result = run_once(task, self._data, spec, seed, precision)
        every = max(1, len(result["multiplier_trace"]) // 100)
        return {"final": result["final"], "train_final": result["train_final"], "eval_steps": result["steps"],
                "losses": result["losses"], "diverged": result["diverged"],
                "lr_multiplier": result["multiplier_trace"][::every], "lr_multiplier_every": every,
                "train_time": [round(t, 3) for t in result["train_time"]]}

    def _train_with_trainer(self, spec: MethodSpec | None, trainer_args: dict, lr: float, seed: int) -> dict:
        """finetune / lora: one run through the Trainer (its default linear decay unless ``trainer_args`` say
        otherwise)."""
        module, directory, settings = trainer_module(self.task, self.quick)
        run = module.finetune_run if self.task == "finetune" else module.lora_run
        options = {"eval_steps": self.eval_every, "logging_steps": 10 if not self.quick else 5}
        if self.quick:
            options["eval_pairs"] = 100
        if spec is not None:  # the optimizer alone (a peer, SOAP): the Trainer's scheduler decays its LR
            options["optimizer_builder"] = lambda model: build_optimizer(
                spec.with_(schedule="constant"), model, total_steps=self.steps)[0]
        result = run(lr, seed, trainer_args, self.steps, pretrained_dir=directory, **options)
        every = max(1, len(result["lr_multiplier"]) // 100)
        return {"final": result["final_eval_loss"] if not result["diverged"] else math.inf,
                "train_final": (result["train_losses"] or [math.nan])[-1], "eval_steps": result["eval_steps"],
                "losses": result["eval_losses"], "lr_multiplier": result["lr_multiplier"][::every],
                "lr_multiplier_every": every * options["logging_steps"], "diverged": result["diverged"],
                "pretrained_sha256": self.checkpoint}


# ---------------------------------------------------------------------------------------------------------------
# the rule's helpers
# ---------------------------------------------------------------------------------------------------------------
def mean_final(rows: list[dict]) -> float:
    """The seed-mean final validation loss; a diverged seed makes it infinitely bad."""
    finals = [r["final"] for r in rows]
    return statistics.fmean(finals) if all(math.isfinite(f) for f in finals) else math.inf


def mean_ranks(table: dict, names=None) -> dict[str, float]:
    """Cell → method → value, as each method's mean rank over the cells (1: best). With ``names``, only those are
    ranked, and only in the cells where all of them ran."""
    ranks: dict[str, list[int]] = {n: [] for n in names or ()}
    for entry in table.values():
        if names is not None:
            if not all(n in entry for n in names):
                continue
            entry = {n: entry[n] for n in names}
        for position, method in enumerate(sorted(entry, key=lambda m: entry[m]), start=1):
            ranks.setdefault(method, []).append(position)
    return {m: statistics.fmean(r) for m, r in ranks.items() if r}


def ordered_by_rule(scores: dict[str, float], tie: float, tie_break: Callable[[str], tuple]) -> list[str]:
    """Names by score (a mean rank: lower is better); those within ``tie`` of the best come first, in the order of
    ``tie_break`` (then by score)."""
    ordered = sorted(scores, key=lambda n: scores[n])
    tied = [n for n in ordered if scores[n] <= scores[ordered[0]] + tie]
    tied.sort(key=lambda n: (*tie_break(n), scores[n]))
    return tied + [n for n in ordered if n not in tied]
