"""One runner and one run store for every study.

A row carries its task, full method dict, LR, seed, steps, precision and pretrained checkpoint, and is keyed by a hash
of them (:func:`run_key`): a run on file is found whatever a study calls its method, and a changed default is a new
run. Rows go to ``studies/<name>/runs/<task>.jsonl`` as each run ends (a killed study resumes). Seeds are set before
any random state is drawn, so a run is reproducible from its row; rows that are not say ``"reproducible": false``.
:class:`Study` reads a study.toml and answers "the rows of method M at LR η on task T", training what is missing
when it runs the study, reading only when it reports."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

import torch

from benchmarks import optimizers, score
from benchmarks.tasks import QUICK_BUDGET, TASKS, Task, TaskData
from hf_apo.batches import default_forward, get_output

STUDIES = Path(__file__).resolve().parent / "studies"
BF16 = torch.bfloat16


# the store ------------------------------------------------------------------------------------------------------------
def lr_key(lr: float) -> float:
    """An LR as a key: 6 significant digits, so one read back from a file matches the same LR computed again."""
    return float(f"{lr:.6g}")


def _canonical(value):
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return lr_key(value)
    if isinstance(value, dict):
        return {k: _canonical(v) for k, v in sorted(value.items())}
    return [_canonical(v) for v in value]


def run_key(task: str, method: dict, lr: float, seed: int, steps: int, precision: str = "fp32",
            checkpoint: str | None = None) -> str:
    method = {k: v for k, v in method.items() if optimizers.ADDED_LATER.get(k, ()) != v}
    payload = json.dumps(_canonical([task, method, lr, seed, steps, precision, checkpoint]))
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class Store:
    """The rows of a study's ``runs/`` folder, by key; a line cut by a kill is skipped (that run is done again)."""

    def __init__(self, directory: Path):
        self.directory, self.rows = Path(directory), {}
        for path in sorted(self.directory.glob("*.jsonl")):
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.rows[row["key"]] = row

    def append(self, row: dict) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with (self.directory / f"{row['task']}.jsonl").open("a") as out:
            out.write(json.dumps(row, allow_nan=True) + "\n")
        self.rows[row["key"]] = row


@functools.lru_cache(maxsize=1)
def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=STUDIES.parent, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "git_commit": commit}


# one run --------------------------------------------------------------------------------------------------------------
def train_step(model, optimizer, batch, forward, scheduler=None) -> torch.Tensor:
    """The plain loop every optimizer shares: forward, backward, ``observe(batch)`` for APO, step, zero_grad (then the
    schedule). No clipping, no scaler, so the differences are the optimizers' own."""
    loss = get_output(forward(model, batch), "loss")
    loss.backward()
    if hasattr(optimizer, "observe"):
        optimizer.observe(batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


def autocast_forward(model, batch):
    with torch.autocast("cpu", dtype=BF16):
        return default_forward(model, batch)


def set_eval_mode(optimizer, evaluating: bool) -> None:
    """Schedule-free optimizers evaluate at their averaged point: eval() and back to train()."""
    if "ScheduleFree" in type(optimizer).__name__:
        optimizer.eval() if evaluating else optimizer.train()


@torch.no_grad()
def evaluate(model, optimizer, batches: list[dict], precision: str) -> float:
    """Mean loss per example (per target token for sequences) over ``batches``, computed in float32."""
    set_eval_mode(optimizer, True)
    eval_model = copy.deepcopy(model).float() if precision == "bf16_weights" else model
    was_training = eval_model.training
    eval_model.eval()
    total = count = 0.0
    for batch in batches:
        loss = float(get_output(default_forward(eval_model, batch), "loss"))
        labels = batch["labels"]
        weight = int((labels != -100).sum()) if labels.dtype == torch.long and labels.dim() > 1 else len(labels)
        total, count = total + loss * weight, count + weight
    eval_model.train(was_training)
    set_eval_mode(optimizer, False)
    return total / count


def epoch_batches(size: int, batch_size: int, seed: int):
    """Indices of a seeded permutation in batches, reshuffled every epoch: the same sequence for every optimizer."""
    if size < batch_size:  # no full batch in an epoch: it would loop for ever
        raise ValueError(f"a task of {size} training examples is smaller than one batch of {batch_size}")
    generator = torch.Generator().manual_seed(10_000 + seed)
    while True:
        order = torch.randperm(size, generator=generator)
        yield from (order[start:start + batch_size] for start in range(0, size - batch_size + 1, batch_size))


def train_in_process(task: Task, data: TaskData, method: dict, lr: float, seed: int, steps: int, eval_every: int,
                     precision: str = "fp32", callback=None) -> dict:
    """Train one model with one optimizer; the validation curve, its timing and APO-LR's learned multiplier.
    ``callback(step, optimizer)`` runs after every step, outside the timed part."""
    model, dtype, forward = data.build_model(seed), torch.float32, default_forward
    if precision == "bf16_weights":
        model, dtype = model.to(BF16), BF16
    elif precision == "bf16_autocast":
        forward = autocast_forward
    model.train()
    ctx = optimizers.Context(model, [p for p in model.parameters() if p.requires_grad], task.divergence, forward, steps)
    optimizer, scheduler = optimizers.build(method, lr, ctx)
    sampler = epoch_batches(data.size, task.batch_size, seed)
    eval_steps, losses, times, multipliers = [0], [evaluate(model, optimizer, data.val_batches, precision)], [0.0], []
    spent, diverged = 0.0, False
    for step in range(1, steps + 1):
        batch = data.batch(next(sampler), dtype)
        start = time.perf_counter()
        loss = train_step(model, optimizer, batch, forward, scheduler)
        spent += time.perf_counter() - start
        if callback is not None:
            callback(step, optimizer)
        if hasattr(optimizer, "lr_multipliers"):
            multipliers.append(optimizer.lr_multipliers[0])
        diverged = not math.isfinite(float(loss))
        if not diverged and (step % eval_every == 0 or step == steps):
            eval_steps.append(step)
            losses.append(evaluate(model, optimizer, data.val_batches, precision))
            times.append(round(spent, 3))
            diverged = not math.isfinite(losses[-1])
        if diverged:
            break
    every = max(1, len(multipliers) // 100)
    train_final = math.inf if diverged else evaluate(model, optimizer, data.train_eval_batches(), precision)
    metrics = {}
    if data.final_metrics is not None and not diverged:
        set_eval_mode(optimizer, True)  # Schedule-Free evaluates at its averaged point, as for the losses
        metrics = data.final_metrics(model)
        set_eval_mode(optimizer, False)
    return {"final": losses[-1] if not diverged else math.inf, "train_final": train_final,
            "eval_steps": eval_steps, "losses": losses, "diverged": diverged, "lr_multiplier": multipliers[::every],
            "lr_multiplier_every": every, "train_time": times, **({"metrics": metrics} if metrics else {})}


def train_with_trainer(task: Task, method: dict, lr: float, seed: int, steps: int, eval_every: int,
                       quick: bool) -> dict:
    flags, replacement = optimizers.trainer_flags(method, steps)
    build = None
    if replacement is not None:  # a peer or heavyball optimizer in place of --optim's, under the Trainer's schedule
        def build(model):
            params = [p for p in model.parameters() if p.requires_grad]
            return optimizers.build(replacement, lr, optimizers.Context(model, params, task.divergence, None, steps))[0]
    result = task.trainer.run(flags, lr, seed, steps, eval_every, quick, build)
    every = max(1, len(result["lr_multiplier"]) // 100)
    return {**result, "lr_multiplier": result["lr_multiplier"][::every],
            "lr_multiplier_every": every * result["lr_multiplier_every"]}


# a study --------------------------------------------------------------------------------------------------------------
def study_names() -> list[str]:
    return sorted(p.parent.name for p in STUDIES.glob("*/study.toml"))


def load_config(name: str, root: Path = STUDIES) -> dict:
    return tomllib.loads((Path(root) / name / "study.toml").read_text())


def _round3(x: float) -> float:  # an LR from a grid's best × a factor: 3 significant digits
    return float(f"{x:.3g}")


class Study:
    """A study.toml, its store and the stores it reads. With ``training``, a missing run is trained and stored."""

    def __init__(self, name: str, quick: bool = False, runs: Path | None = None, training: bool = False,
                 dry: bool = False, tasks=None, seeds=None, factors=None, methods=None, root: Path = STUDIES):
        self.name, self.dir, self.quick, self.training, self.dry = name, Path(root) / name, quick, training or dry, dry
        self.train_seeds = None if seeds is None else set(seeds)  # train only these (a seed-staged run); read all
        self.train_factors = None if factors is None else set(factors)  # run() trains only these cells
        self.train_methods = methods  # and only these methods in them (candidates too, on a stage not yet reached)
        self.missing: list[tuple] = []  # dry: the runs a training would add
        self.config = load_config(name, root)
        self.store = Store(runs or self.dir / "runs")
        others = [] if quick else self.config.get("reads", [])
        self.read = [self.store] + [Store(Path(root) / s / "runs") for s in others]
        # a subset of the tasks (a quick check): the rule's stages are read on those only
        self.tasks = [t for t in self.config["tasks"] if tasks is None or t in tasks]
        self._data: dict[str, TaskData] = {}
        self._checkpoints: dict[str, str] = {}

    # what the study.toml says --------------------------------------------------------------------------------
    def entry(self, name: str) -> dict:
        """A method's or grid's declaration: the method dict and where it runs."""
        if name in self.config.get("grids", {}):
            return self.config["grids"][name]
        return {"method": self.config["methods"][name], **self.config.get("options", {}).get(name, {})}

    def method(self, task: str, name: str) -> dict:
        return optimizers.resolve(self.entry(name)["method"], TASKS[task].default_schedule)

    def budget(self, task: str, name: str | None = None) -> tuple[int, int, tuple[int, ...]]:
        budget = self.config.get("budget", "long")  # a name, or {default = name, <task> = name}
        budget = budget.get(task, budget["default"]) if isinstance(budget, dict) else budget
        steps, every, seeds = TASKS[task].budget(budget, self.quick)
        if not self.quick:
            seeds = self.config.get("seeds", {}).get(task, seeds)
            seeds = self.entry(name).get("seeds", {}).get(task, seeds) if name else seeds
        return steps, every, tuple(seeds)

    def runs_on(self, task: str, name: str) -> bool:
        return task in self.entry(name).get("tasks", self.tasks)

    def checkpoint(self, task: str) -> str | None:
        if TASKS[task].trainer is None:
            return None
        if not self.training or self.dry:
            return "quick" if self.quick else self.config["checkpoints"][task]
        if task not in self._checkpoints:
            found = TASKS[task].trainer.checkpoint(self.quick)
            wanted = self.config.get("checkpoints", {}).get(task)
            if not self.quick and wanted != found:
                raise SystemExit(f"{task}: this study's runs fine-tune the checkpoint {wanted}, this machine's is "
                                 f"{found} (another torch or transformers version?): its runs would not be comparable")
            self._checkpoints[task] = "quick" if self.quick else found
        return self._checkpoints[task]

    # rows ------------------------------------------------------------------------------------------------------
    def rows(self, task: str, name: str, lr: float, precision: str = "fp32", seeds=None) -> list[dict]:
        """The method's rows at ``lr``, one a seed, trained where missing when training (else those on file)."""
        steps, eval_every, budget_seeds = self.budget(task, name)
        method, out = self.method(task, name), []
        for seed in budget_seeds if seeds is None or self.quick else seeds:
            key = run_key(task, method, lr, seed, steps, precision, self.checkpoint(task))
            row = next((s.rows[key] for s in self.read if key in s.rows), None)
            if row is None and self.training and (self.train_seeds is None or seed in self.train_seeds):
                row = self._train(task, key, method, lr, seed, steps, eval_every, precision)
            if row is not None:
                out.append(row)
        return out

    def _train(self, task, key, method, lr, seed, steps, eval_every, precision) -> dict | None:
        if self.dry:
            self.missing.append((task, method["kind"], lr, seed, precision))
            return None
        started = time.perf_counter()
        definition = TASKS[task]
        if definition.trainer is not None:
            if precision != "fp32":
                raise ValueError(f"{task} runs in float32 only")
            result = train_with_trainer(definition, method, lr, seed, steps, eval_every, self.quick)
        else:
            if task not in self._data:
                self._data[task] = definition.load(self.quick)
            result = train_in_process(definition, self._data[task], method, lr, seed, steps, eval_every, precision)
        row = {"key": key, "task": task, "method": method, "lr": lr, "seed": seed, "steps": steps,
               "precision": precision, "checkpoint": self.checkpoint(task),
               "wall_s": round(time.perf_counter() - started, 2), **result, "environment": environment()}
        self.store.append(row)
        print(f"[{self.name}] {task} {method['kind']} lr={lr:.3g} seed={seed} {precision}: final {row['final']:.5g} "
              f"({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        return row

    def complete(self, task: str, name: str, rows: list[dict]) -> bool:
        return len(rows) >= len(self.budget(task, name)[2]) and len(rows) > 0

    def score_kind(self, task: str) -> str:
        """``final`` (the final validation loss) or ``best`` (the best along the run), from ``[score]``."""
        return self.config.get("score", {}).get(task, self.config.get("score", {}).get("default", "final"))

    def value(self, task: str, rows: list[dict]) -> float:
        return score.cell_value(rows, self.score_kind(task))

    # grids, cells and where a method runs ----------------------------------------------------------------------
    def grid_lrs(self, task: str, grid: str) -> list[float]:
        spec = self.config["grids"][grid]
        lrs = spec.get("lrs_by_task", {}).get(task, spec.get("lrs"))
        if isinstance(lrs, str):  # "neighbors:<grid>" (its best LR and the LRs beside it) or "up:<grid>" (and above)
            how, other = lrs.split(":")
            best, grid_lrs = self.grid_best(task, other), self.grid_lrs(task, other)
            if best is None:
                return []
            i = grid_lrs.index(best[0])
            return grid_lrs[max(0, i - 1) if how == "neighbors" else i:i + 2]
        return [float(lr) for lr in lrs]

    def grid_values(self, task: str, grid: str) -> dict[float, float] | None:
        """LR → cell value over the grid; None until every LR of it has every seed."""
        if not self.runs_on(task, grid):
            return None
        values = {}
        for lr in self.grid_lrs(task, grid):
            rows = self.rows(task, grid, lr)
            if not self.complete(task, grid, rows):
                return None
            values[lr] = self.value(task, rows)
        return values or None

    def grid_best(self, task: str, grid: str) -> tuple[float, float] | None:
        values = self.grid_values(task, grid)
        return None if values is None else min(values.items(), key=lambda kv: kv[1])

    def cell_lrs(self, task: str) -> list[float]:
        """The cells' LRs: the cell grid's best × the cell factors (3 significant digits)."""
        cells = self.config["cells"]
        best = self.grid_best(task, cells["grid"])
        return [] if best is None else [_round3(best[0] * f) for f in cells.get("factors", [1.0])]

    def method_lrs(self, task: str, name: str, factor: float) -> list[float]:
        """Where a method runs in the cell of ``factor``: a fixed LR, or its grid's best × its factors."""
        entry = self.entry(name)
        if "lr" in entry:
            return [float(entry["lr"])]
        best = self.grid_best(task, entry.get("grid", self.config["cells"]["grid"]))
        return [] if best is None else [_round3(best[0] * f) for f in entry.get("factors", [factor])]

    def cell(self, task: str, name: str, factor: float) -> dict | None:
        """A method's value in a cell (the best over its LRs when it has several): value, LR, rows."""
        if name in self.config.get("grids", {}) and name != self.config["cells"]["grid"] and "factors" not in \
                self.entry(name):
            best = self.grid_best(task, name)
            return None if best is None else {"value": best[1], "lr": best[0], "rows": self.rows(task, name, best[0])}
        if not self.runs_on(task, name):
            return None
        found = []
        for lr in self.method_lrs(task, name, factor):
            rows = self.rows(task, name, lr)
            if not self.complete(task, name, rows):
                return None
            found.append({"value": self.value(task, rows), "lr": lr, "rows": rows})
        return min(found, key=lambda c: c["value"]) if found else None

    def table(self, tasks, names) -> dict[tuple[str, float], dict[str, float]]:
        """(task, cell LR) → method → value, for the cells every named method has finished."""
        out = {}
        for task in tasks:
            for factor, lr in zip(self.config["cells"].get("factors", [1.0]), self.cell_lrs(task)):
                entry = {n: c["value"] for n in names if self.runs_on(task, n) and (c := self.cell(task, n, factor))}
                if entry and len(entry) == sum(self.runs_on(task, n) for n in names):
                    out[(task, lr)] = entry
        return out

    # the rule ----------------------------------------------------------------------------------------------------
    def candidates(self) -> list[str]:
        return list(self.config.get("rule", {}).get("candidates", self.config["methods"] if "rule" in self.config
                                                                      else []))

    def rule(self) -> dict:
        """Stage by stage: mean ranks over the stage's cells, the order by the rule, the finalists; the winner once the
        last stage has every cell."""
        rule, names, out = self.config.get("rule", {"stages": []}), self.candidates(), {"stages": []}
        for stage in rule["stages"]:
            tasks = [t for t in stage.get("tasks", self.tasks) if t in self.tasks]
            table = self.table(tasks, names)
            expected = sum(len(self.config["cells"].get("factors", [1.0])) for t in tasks
                           if any(self.runs_on(t, n) for n in names))
            ranks = score.mean_ranks(table, names)
            order = score.ordered_by_rule(ranks, rule.get("tie", 0.25), lambda n: score.tie_key(
                n, self.method((tasks or self.tasks)[0], n), rule.get("tie_break", [])))
            failing = {n: self.failing_tasks(n, tasks, rule["failures"]) for n in order} if "failures" in rule else {}
            order.sort(key=lambda n: len(failing.get(n, [])))  # stable: the rank order among equal counts
            done = len(table) == expected and bool(ranks)
            out["stages"].append({"tasks": tasks, "cells": len(table), "of": expected, "mean_ranks": ranks,
                                  "order": order, "done": done, **({"failing": failing} if failing else {})})
            if not done:
                return out
            if "finalists" in stage:
                keep = [n for n in rule.get("keep", []) if n not in order[:stage["finalists"]]]
                names = order[:stage["finalists"]] + keep
                out["stages"][-1]["finalists"] = names
        if out["stages"]:
            out["winner"] = out["stages"][-1]["order"][0]
        return out

    def failing_tasks(self, name: str, tasks, checks: list[dict]) -> list[str]:
        """The tasks where a seed of ``name`` fails one of the rule's ``failures`` checks: in the cell of
        ``factor``, a score above ``above`` × the cell grid's best (a wreck from 3× the best LR, a stall at it)."""
        def fails(task: str, best) -> bool:
            return any(score.failed((self.cell(task, name, check["factor"]) or {"rows": []})["rows"],
                                    check["above"] * best[1], self.score_kind(task)) for check in checks)

        return [t for t in tasks if (best := self.grid_best(t, self.config["cells"]["grid"])) and fails(t, best)]

    def ranked_on(self, task: str) -> list[str]:
        """The candidates a task runs: all in the first stage's tasks, the finalists elsewhere (when known)."""
        stages = self.config.get("rule", {}).get("stages")
        if not stages or task in stages[0].get("tasks", self.tasks):
            return self.candidates()
        result = self.rule()["stages"]
        return result[0].get("finalists", []) if result[0]["done"] else []

    # running -----------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Train every run the study needs that is not on file: the grids, then each method in each cell (the rule's
        candidates first; the finalists only on the later stages' tasks), then the precision runs. ``seeds`` and
        ``factors`` given to the study: only those seeds' runs, only those cells."""
        assert self.training
        candidates = set(self.candidates())
        for task in self.tasks:
            for grid in self.config.get("grids", {}):
                if self.runs_on(task, grid):
                    for lr in self.grid_lrs(task, grid):
                        self.rows(task, grid, lr)
            names = self.ranked_on(task) + [n for n in self.config["methods"] if n not in candidates]
            if self.train_methods is not None:  # named: whatever the rule's stage
                names = [n for n in self.config["methods"] if n in self.train_methods]
            for factor in self.config["cells"].get("factors", [1.0]):
                if self.train_factors is not None and factor not in self.train_factors:
                    continue
                for name in names:
                    if self.runs_on(task, name):
                        for lr in self.method_lrs(task, name, factor):
                            self.rows(task, name, lr)
            for group in self.config.get("precision", []):
                if task in group["tasks"]:
                    for name in group["methods"]:
                        cell = self.cell(task, self.entry(name).get("fp32_of", name), 1.0)
                        for mode in group["modes"]:
                            if cell is not None:
                                self.rows(task, name, cell["lr"], mode, group.get("seeds"))


def record_spectra(study: Study, task: str, fractions=(0.0, 0.02, 0.1, 0.3, 1.0)) -> Path:
    """What APO-Precond learns: the eigenvalues of every dense factor L = AAᵀ (and R) at a few points of one run
    (seed 0) of each candidate at its cell LR, with the learned LR multiplier where there is one; into
    ``runs/spectra.json`` (a shape spreads the eigenvalues around 1, a size moves them together)."""
    steps, eval_every, _ = study.budget(task)
    marks, out = sorted({max(1, round(f * steps)) for f in fractions}), []
    data = TASKS[task].load(study.quick)
    for name in study.candidates():
        points, lr = [], study.cell(task, study.config["cells"]["grid"], 1.0)["lr"]

        def callback(step, optimizer):
            precond = getattr(optimizer, "inner", optimizer)
            if step in marks:
                eigenvalues = {f"p{i} {tuple(p.shape)} {side}": torch.linalg.eigvalsh((t @ t.T).double()).flip(0)
                               for i, (p, f) in enumerate(precond.factors.items())
                               for side, t in zip("LR", f.tensors) if t.dim() == 2}
                points.append({"step": step, "lr_multiplier": getattr(optimizer, "lr_multipliers", [1.0])[0],
                               "spectra": {k: [round(float(v), 6) for v in e] for k, e in eigenvalues.items()}})

        method = study.method(task, name)
        result = train_in_process(TASKS[task], data, method, lr, 0, steps, eval_every, callback=callback)
        out.append({"candidate": name, "lr": lr, "steps": steps, "final": result["final"], "points": points})
    path = study.store.directory / "spectra.json"
    path.write_text(json.dumps({"task": task, "runs": out, "environment": environment()}, indent=1) + "\n")
    return path
