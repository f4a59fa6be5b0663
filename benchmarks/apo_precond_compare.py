"""APO-Precond against its SGD-momentum base and the second-order peers, at long budgets (issue 11).

The questions: does the learned Kronecker preconditioner beat the SGD(-momentum) it preconditions, how close does it
come to SOAP, PSGD-Kron and Shampoo at equal steps and at equal wall-clock, and which meta step ships as default?

Tasks and budgets (those of ``apo_lr_defaults.py``, so AdamW's grid there is reused, not re-run):

=====================  ======  =====  =====================================================================
task                   steps   seeds  what
=====================  ======  =====  =====================================================================
digits_classification  6,000   3      MLP 64-128-10 on sklearn digits, cross-entropy
digits_autoencoder     8,000   3      MLP 64-32-8-32-64, ½‖x − x̂‖²
teacher_student        6,000   3      regression on a random teacher MLP, 50,000 examples
translation            1,500   2      the example's number-words Marian model from scratch
finetune               600     4      the pretrained Marian model fine-tuned through ``APOSeq2SeqTrainer``
                                      (``finetune.py``; the Trainer's linear decay), ``--optim sgd --optim_args
                                      momentum=0.9``: SGD-m and the candidates only, reported beside the rule
=====================  ======  =====  =====================================================================

Methods, per task:

* ``sgdm``: SGD with momentum 0.9 on the grid ``SGDM_GRID``; the best (lowest mean final validation loss) is the base;
* APO-Precond over that best SGD-m, three candidates (:data:`CANDIDATES`): the meta step normalized by the spectral
  norm (``spectral``, meta_lr 0.01), with a 10-step momentum look-ahead (``spectral_look10``, meta_lr 0.03), and
  per-entry Adam at meta_lr 0.003 (``entry``, hf_apo's default before this benchmark; at meta_lr 0.01 it diverged
  on 2 of 3 translation seeds). The two spectral meta_lrs are the best of 0.01/0.03/0.1 for each look-ahead on
  translation at 250 steps, 3 seeds (final validation loss, SGD-m at lr 0.1: 0.0432; spectral 0.0444 / 0.0477 /
  0.0486; spectral_look10 0.0578 / 0.0418 / 0.0747; entry at 0.003: 0.0308, 2 seeds);
* ``adamw``: the best constant AdamW LR of ``apo_lr_runs/<task>.jsonl`` (same budgets and seeds);
* ``soap``, ``psgd_kron``, ``shampoo`` (heavyball, eager) at that best AdamW LR: transferred, not tuned (a stated
  limitation); on translation PSGD-Kron and Shampoo run seed 0 only (about 15 minutes of one core per run there);
* precision: ``sgdm`` (best), the APO-Precond default (``PRECISION_CANDIDATES``: the first round's ``spectral`` and
  the rule's winner), ``adamw`` (best) and ``soap`` again with bf16 weights and under bf16 autocast, seed 0, on the
  three small tasks;
* rounding, bf16 weights: each of ``PRECISION_CANDIDATES`` with its update rounded stochastically (its own name,
  ``--apo_stochastic_rounding``) and to the nearest (``<name>_nearest``), seeds ``ROUNDING_SEEDS``, each paired with
  its float32 run. Rule, written before these ran: stochastic rounding stays on by default if, for the rule's winner,
  its mean change against float32 is lower than rounding to the nearest's on at least 2 of the 3 small tasks.
  (The first round's bf16-weights runs rounded to the nearest; they are on file as ``spectral_nearest``.)

The rule for APO-Precond's default, written before the sweep ran: in each task the candidates are ranked by
their mean final validation loss (a diverged seed counts as infinitely bad); the candidate with the best mean rank
over the four tasks becomes the default. Mean ranks within 0.25 of each other are a tie, resolved for the one-step
look-ahead, then for the spectral meta step, then for λ_FSD 10.

Second round (added after the first three candidates had run, and before these ran; the rule is unchanged and
ranks all seven): λ_FSD was 10 throughout the first round. The first round's diagnosis was momentum myopia in both
directions: the one-step look-ahead grew P on teacher_student (+46.5% against SGD-m), the 10-step one shrank it on
the digits tasks (+12%, +5%). Theorem 1 puts P ∝ 1/λ_FSD, so λ_FSD is the knob: 30 and 100 for the one-step
look-ahead (about what the momentum's ~10× longer reach asks for), 1 and 3 for the 10-step one (meta_lrs as in
round one).

Targets (issue 11), as the report states them: the default beats its SGD-m base on 4/4 tasks; it is within 10% of
SOAP's final loss at equal wall-clock (each method's loss at the shorter of the two runs' training time) on ≥ 2/4;
bf16 autocast within 1% of float32 on every task; bf16 weights no worse than AdamW's own change; never diverges.

Each run is appended to ``<output_dir>/apo_precond_runs/<task>.jsonl`` when it ends and skipped when it is already
there, so a killed sweep resumes. Usage::

    python benchmarks/apo_precond_compare.py run --tasks digits_classification teacher_student
    python benchmarks/apo_precond_compare.py report
    python benchmarks/apo_precond_compare.py run --quick --output_dir /tmp/precond --tasks digits_classification
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import MethodSpec, environment, markdown_table, save_figure, study_main, write_json
from benchmarks.sweep import (
    ADAMW_GRID, LONG_BUDGETS, Sweep, load_runs as sweep_runs, lr_key, mean_final,
)

TASK_NAMES = ("digits_classification", "digits_autoencoder", "teacher_student", "translation", "finetune")
RULE_TASKS = TASK_NAMES[:4]
SMALL = TASK_NAMES[:3]
SEEDS = {task: (0, 1, 2) for task in SMALL} | {"translation": (0, 1), "finetune": (0, 1, 2, 3)}  # fine-tune: 4 since round two
# 0.3 was added to every grid whose best was its largest LR (all but teacher_student) after the first two rounds,
# so that the base is a tuned SGD-m, not the edge of a grid
SGDM_GRID = {task: (1e-2, 3e-2, 1e-1, 3e-1) for task in ("digits_classification", "digits_autoencoder")} | {
    "teacher_student": (1e-2, 3e-2, 1e-1), "translation": (3e-2, 1e-1, 3e-1), "finetune": (3e-2, 1e-1, 3e-1, 1.0)}
CANDIDATES: dict[str, dict] = {
    "spectral": dict(meta_lr=0.01, spectral_meta_step=True, lookahead_steps=1),
    "spectral_look10": dict(meta_lr=0.03, spectral_meta_step=True, lookahead_steps=10),
    "entry": dict(meta_lr=3e-3, spectral_meta_step=False, lookahead_steps=1),
    # added in a second round (see the docstring): λ_FSD against momentum myopia, from both look-aheads
    "spectral_fsd30": dict(meta_lr=0.01, spectral_meta_step=True, lookahead_steps=1, lambda_fsd=30.0),
    "spectral_fsd100": dict(meta_lr=0.01, spectral_meta_step=True, lookahead_steps=1, lambda_fsd=100.0),
    "spectral_look10_fsd1": dict(meta_lr=0.03, spectral_meta_step=True, lookahead_steps=10, lambda_fsd=1.0),
    "spectral_look10_fsd3": dict(meta_lr=0.03, spectral_meta_step=True, lookahead_steps=10, lambda_fsd=3.0),
}
PEERS = ("soap", "psgd_kron", "shampoo")
# On translation PSGD-Kron and Shampoo run one seed: each takes about 15 minutes of one core there.
PEER_SEEDS = {("translation", "psgd_kron"): (0,), ("translation", "shampoo"): (0,)}
# the candidates whose bf16 runs are made: the first round's default, and the default the rule picks now
PRECISION_CANDIDATES = ("spectral",)
PRECISION_METHODS = ("sgdm", *PRECISION_CANDIDATES, "adamw", "soap")
PRECISIONS = ("bf16_weights", "bf16_autocast")
ROUNDING_SEEDS = (0, 1, 2)
TIE = 0.25


STORE = "apo_precond_runs"
CHECKPOINTS = {"finetune": "torch-2.13"}  # the checkpoint the fine-tune's runs read here fine-tuned


def load_runs(output_dir: Path, task: str) -> list[dict]:
    return sweep_runs(output_dir, task, CHECKPOINTS.get(task), STORE)


def finetune_flags(spec: MethodSpec) -> dict:
    """A method of this study as the fine-tune's Trainer flags: SGD-m under the Trainer's linear decay, with or
    without APO-Precond over it."""
    flags = {"optim": "sgd", "optim_args": f"momentum={spec.momentum}", "apo": "none"}
    if spec.kind == "apo_precond":
        flags |= {"apo": "precond", "apo_meta_lr": spec.meta_lr, "apo_lookahead_steps": spec.lookahead_steps,
                  "apo_spectral_meta_step": spec.spectral_meta_step, "apo_lambda_fsd": spec.lambda_fsd}
    return flags


def run_spec(sweep: Sweep, method: str, spec: MethodSpec, precision: str = "fp32", seeds=None) -> list[dict]:
    if sweep.task == "finetune":
        return sweep.run(method, spec.lr, apo_args=finetune_flags(spec), seeds=seeds)
    return sweep.run(method, spec.lr, spec=spec, precision=precision, seeds=seeds)


def best_adamw_lr(output_dir: Path, task: str, quick: bool) -> float:
    """The best constant AdamW LR of the APO-LR benchmark's grid at the same budget (its runs, not re-run)."""
    if quick:
        return 1e-3
    steps = LONG_BUDGETS[task][0]
    by: dict[float, list[dict]] = {}
    for r in sweep_runs(output_dir, task):
        if r["method"] == "adamw" and r["steps"] == steps and r["seed"] in SEEDS[task]:
            by.setdefault(lr_key(r["lr"]), []).append(r)
    missing = [lr for lr in ADAMW_GRID[task] if len(by.get(lr, [])) < len(SEEDS[task])]
    if missing:
        raise SystemExit(f"{task}: AdamW runs at {missing} are missing; run apo_lr_defaults.py run --grid_only first.")
    return min(ADAMW_GRID[task], key=lambda lr: mean_final(by[lr]))


def candidate_spec(name: str, lr: float) -> MethodSpec:
    return MethodSpec(name, "apo_precond", lr=lr, momentum=0.9, **(dict(lambda_fsd=10.0) | CANDIDATES[name]))


def run_command(args) -> None:
    torch.set_num_threads(args.threads)
    for task in args.tasks:
        sweep = Sweep(task, args.output_dir, args.quick, STORE, SEEDS[task])
        grid = SGDM_GRID[task][-1:] if args.quick else SGDM_GRID[task]
        sgdm = {lr: run_spec(sweep, "sgdm", MethodSpec("sgdm", "sgd", lr=lr, momentum=0.9)) for lr in grid}
        base_lr = min(grid, key=lambda lr: mean_final(sgdm[lr]))
        for name in args.candidates or CANDIDATES:
            run_spec(sweep, name, candidate_spec(name, base_lr))
        if task == "finetune":
            continue
        adamw_lr = best_adamw_lr(args.output_dir, task, args.quick)
        if args.quick:
            run_spec(sweep, "adamw", MethodSpec("adamw", "adamw", lr=adamw_lr))
        for peer in PEERS:
            run_spec(sweep, peer, MethodSpec(peer, peer, lr=adamw_lr), seeds=None if args.quick else PEER_SEEDS.get((task, peer)))
        if task in SMALL and not args.no_precision:
            specs = {"sgdm": MethodSpec("sgdm", "sgd", lr=base_lr, momentum=0.9),
                     **{name: candidate_spec(name, base_lr) for name in PRECISION_CANDIDATES},
                     "adamw": MethodSpec("adamw", "adamw", lr=adamw_lr), "soap": MethodSpec("soap", "soap", lr=adamw_lr)}
            for precision in PRECISIONS:
                for method in PRECISION_METHODS:  # AdamW's float32 runs come from apo_lr_runs
                    run_spec(sweep, method, specs[method], precision, seeds=(0,))
            seeds = None if args.quick else ROUNDING_SEEDS
            for name in PRECISION_CANDIDATES:
                run_spec(sweep, name, specs[name], "bf16_weights", seeds=seeds)
                nearest = specs[name].with_(name=f"{name}_nearest", stochastic_rounding=False)
                run_spec(sweep, nearest.name, nearest, "bf16_weights", seeds=seeds)


# ---------------------------------------------------------------------------------------------------------------
# the report (The report of ``apo_precond_compare.py``: the rule applied, the targets as measured, tables and a plot)
# ---------------------------------------------------------------------------------------------------------------
QUICK_STEPS = 30


def _group(rows: list[dict]) -> dict[tuple[str, float, str], list[dict]]:
    by: dict[tuple[str, float, str], list[dict]] = {}
    for r in rows:
        by.setdefault((r["method"], lr_key(r["lr"]), r["precision"]), []).append(r)
    return by


def _mean_curve(rows: list[dict], field: str) -> list[float] | None:
    """The seed-mean of a per-evaluation field (inf where a seed diverged before that evaluation)."""
    if any(r.get(field) is None for r in rows):
        return None
    length = max(len(r[field]) for r in rows)
    curve = []
    for index in range(length):
        values = [r[field][index] if index < len(r[field]) else math.inf for r in rows]
        curve.append(statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.inf)
    return curve


def _at_time(rows: list[dict], seconds: float) -> float:
    """The seed-mean validation loss at ``seconds`` of training time, linearly interpolated between evaluations."""
    losses, times = _mean_curve(rows, "losses"), _mean_curve(rows, "train_time")
    if losses is None or times is None:
        return math.nan
    for (t0, l0), (t1, l1) in zip(zip(times, losses), zip(times[1:], losses[1:])):
        if t0 <= seconds <= t1:
            return l0 if t1 == t0 else l0 + (l1 - l0) * (seconds - t0) / (t1 - t0)
    return losses[-1] if seconds >= times[-1] else losses[0]


def _total_time(rows: list[dict]) -> float:
    times = _mean_curve(rows, "train_time")
    return times[-1] if times else math.nan


def _pct(value: float) -> str:
    return "—" if not math.isfinite(value) else f"{100 * value:+.1f}%"


def _fmt(value: float) -> str:
    return "diverged" if value == math.inf else ("—" if not math.isfinite(value) else f"{value:.4g}")


def summarize_task(output_dir: Path, task: str, quick: bool) -> dict | None:
    steps = QUICK_STEPS if quick else LONG_BUDGETS[task][0]
    seeds = 1 if quick else len(SEEDS[task])
    by = _group([r for r in load_runs(output_dir, task) if r["steps"] == steps])
    grid = SGDM_GRID[task][-1:] if quick else SGDM_GRID[task]
    sgdm = {lr: by.get(("sgdm", lr, "fp32"), []) for lr in grid}
    if any(len(rows) < seeds for rows in sgdm.values()):
        return None
    base_lr = min(grid, key=lambda lr: mean_final(sgdm[lr]))
    methods: dict[str, dict] = {}

    def add(name: str, rows: list[dict], lr: float) -> None:
        if len(rows) >= (seeds if quick else len(PEER_SEEDS.get((task, name), SEEDS[task]))):
            finals = [r["final"] for r in rows]
            methods[name] = {"lr": lr, "final_mean": mean_final(rows), "finals": finals,
                             "std": statistics.stdev(finals) if len(finals) > 1 and all(map(math.isfinite, finals)) else 0.0,
                             "diverged_seeds": sum(r["diverged"] for r in rows), "train_s": _total_time(rows),
                             "rows": rows}

    for lr, rows in sgdm.items():
        add(f"sgdm_{lr:.0e}", rows, lr)
    for name in CANDIDATES:
        add(name, by.get((name, base_lr, "fp32"), []), base_lr)
    adamw_lr = None
    if task != "finetune":
        adamw_lr = best_adamw_lr(output_dir, task, quick)
        if quick:
            add("adamw", by.get(("adamw", adamw_lr, "fp32"), []), adamw_lr)
        else:
            adamw_rows = [r for r in sweep_runs(output_dir, task)
                          if r["method"] == "adamw" and r["steps"] == steps and r["seed"] in SEEDS[task]
                          and lr_key(r["lr"]) == adamw_lr]
            add("adamw", adamw_rows, adamw_lr)
        for peer in PEERS:
            add(peer, by.get((peer, adamw_lr, "fp32"), []), adamw_lr)
    base = methods[f"sgdm_{base_lr:.0e}"]
    for name, m in methods.items():
        m["vs_sgdm"] = m["final_mean"] / base["final_mean"] - 1 if math.isfinite(m["final_mean"]) else math.inf
    if "soap" in methods:
        soap = methods["soap"]
        for name, m in methods.items():
            if name == "soap" or not math.isfinite(m["train_s"]):
                continue
            seconds = min(m["train_s"], soap["train_s"])
            m["equal_time_s"] = seconds
            # paired by seed: the seeds both ran
            both = {r["seed"] for r in m["rows"]} & {r["seed"] for r in soap["rows"]}
            mine, peer = [r for r in m["rows"] if r["seed"] in both], [r for r in soap["rows"] if r["seed"] in both]
            m["equal_time_loss"] = _at_time(mine, seconds)
            m["equal_time_soap_loss"] = _at_time(peer, seconds)
            m["vs_soap_equal_time"] = m["equal_time_loss"] / m["equal_time_soap_loss"] - 1
            m["vs_soap_equal_steps"] = m["final_mean"] / soap["final_mean"] - 1
    precision = {}
    if task in SMALL:
        specs = {"sgdm": (f"sgdm_{base_lr:.0e}", base_lr), **{n: (n, base_lr) for n in PRECISION_CANDIDATES},
                 "adamw": ("adamw", adamw_lr), "soap": ("soap", adamw_lr)}
        for method in PRECISION_METHODS:
            name, lr = specs[method]
            fp32 = [r for r in methods.get(name, {}).get("rows", []) if r["seed"] == 0]
            entry = {"fp32": fp32[0]["final"] if fp32 else math.nan}
            for p in PRECISIONS:
                rows = [r for r in by.get((method, lr_key(lr), p), []) if r["seed"] == 0]
                entry[p] = rows[0]["final"] if rows else math.nan
                entry[f"{p}_change"] = entry[p] / entry["fp32"] - 1 if rows and fp32 else math.nan
            precision[method] = entry
    rounding = {}
    if task in SMALL:
        for name in PRECISION_CANDIDATES:
            fp32 = {r["seed"]: r["final"] for r in by.get((name, lr_key(base_lr), "fp32"), [])}
            entry = {}
            for mode, method in (("stochastic", name), ("nearest", f"{name}_nearest")):
                rows = [r for r in by.get((method, lr_key(base_lr), "bf16_weights"), []) if r["seed"] in fp32]
                changes = [r["final"] / fp32[r["seed"]] - 1 for r in rows]
                entry[mode] = statistics.fmean(changes) if changes else math.nan
                entry[f"{mode}_seeds"] = len(changes)
            rounding[name] = entry
    for m in methods.values():
        m.pop("rows")
    return {"task": task, "steps": steps, "seeds": seeds, "sgdm_best_lr": base_lr, "adamw_lr": adamw_lr,
            "methods": methods, "precision": precision, "rounding": rounding}


def apply_rule(tasks: dict[str, dict]) -> dict:
    """Mean rank of the candidates over the rule's tasks; ties (≤ TIE) go to the one-step look-ahead, then spectral,
    then λ_FSD 10."""
    ranks = {name: [] for name in CANDIDATES}
    for task in RULE_TASKS:
        summary = tasks.get(task)
        if summary is None or any(name not in summary["methods"] for name in CANDIDATES):
            continue
        ordered = sorted(CANDIDATES, key=lambda n: summary["methods"][n]["final_mean"])
        for position, name in enumerate(ordered, start=1):
            ranks[name].append(position)
    scores = {n: statistics.fmean(r) for n, r in ranks.items() if r}
    if not scores:
        return {"scores": {}, "order": [], "winner": None, "cells": 0}
    best = min(scores.values())
    tied = sorted((n for n in scores if scores[n] <= best + TIE),
                  key=lambda n: (CANDIDATES[n]["lookahead_steps"] != 1, not CANDIDATES[n]["spectral_meta_step"],
                                 CANDIDATES[n].get("lambda_fsd", 10.0) != 10.0, scores[n]))
    order = tied + sorted((n for n in scores if n not in tied), key=lambda n: scores[n])
    return {"scores": scores, "order": order, "winner": order[0], "cells": len(next(iter(ranks.values())))}


def rounding_rule(tasks: dict[str, dict], winner: str | None) -> dict:
    """Stochastic rounding stays on if, for the winner, its mean bf16-weights change is the lower on ≥ 2 of 3 tasks."""
    shown = winner if winner in PRECISION_CANDIDATES else PRECISION_CANDIDATES[0]
    cells = [(t, tasks[t]["rounding"].get(shown, {})) for t in SMALL if tasks.get(t)]
    cells = [(t, e) for t, e in cells if e.get("stochastic_seeds") and e.get("nearest_seeds")]
    wins = [t for t, e in cells if e["stochastic"] < e["nearest"]]
    return {"candidate": shown, "tasks": len(cells), "stochastic_wins": wins,
            "stochastic_rounding": len(cells) == len(SMALL) and len(wins) >= 2}


def _base(summary: dict) -> str:
    return f"sgdm_{summary['sgdm_best_lr']:.0e}"


def _vs_soap(summary: dict, name: str) -> float:
    return summary["methods"][name].get("vs_soap_equal_time", math.nan)


def targets(tasks: dict[str, dict], winner: str | None) -> list[dict]:
    rule_tasks = [tasks[t] for t in RULE_TASKS if tasks.get(t) and winner in tasks[t]["methods"]]
    out = []
    beats = [t["task"] for t in rule_tasks if t["methods"][winner]["vs_sgdm"] < 0]
    out.append({"target": "beats its SGD-m base (best of the grid) on 4/4 tasks", "value": f"{len(beats)}/{len(rule_tasks)}",
                "met": len(beats) == 4,
                "detail": ", ".join(f"{t['task']} {_pct(t['methods'][winner]['vs_sgdm'])}" for t in rule_tasks)})
    near = [t for t in rule_tasks if t["methods"][winner].get("vs_soap_equal_time", math.inf) <= 0.10]
    out.append({"target": "within 10% of SOAP at equal wall-clock on ≥ 2/4 tasks", "value": f"{len(near)}/{len(rule_tasks)}",
                "met": len(near) >= 2,
                "detail": ", ".join(f"{t['task']} {_pct(_vs_soap(t, winner))} (SGD-m base {_pct(_vs_soap(t, _base(t)))})"
                                    for t in rule_tasks)})
    shown = winner if winner in PRECISION_CANDIDATES else PRECISION_CANDIDATES[0]  # bf16 runs exist for these only
    small = [tasks[t] for t in SMALL if tasks.get(t) and tasks[t]["precision"].get(shown)]
    autocast = [(t["task"], t["precision"][shown]["bf16_autocast_change"]) for t in small]
    out.append({"target": f"bf16 autocast within 1% of float32 ({shown}), every task",
                "value": f"{sum(abs(c) <= 0.01 for _, c in autocast)}/{len(autocast)}",
                "met": bool(autocast) and all(abs(c) <= 0.01 for _, c in autocast),
                "detail": ", ".join(f"{n} {_pct(c)}" for n, c in autocast)})
    weights = [(t["task"], t["precision"][shown]["bf16_weights_change"], t["precision"]["adamw"]["bf16_weights_change"],
                t["precision"]["sgdm"]["bf16_weights_change"]) for t in small]
    no_worse = [c <= max(a, 0.01) for _, c, a, _ in weights]  # within 1% counts as no change
    out.append({"target": f"bf16 weights ({shown}): change no worse than AdamW's own change (or within 1%)",
                "value": f"{sum(no_worse)}/{len(weights)}", "met": bool(weights) and all(no_worse),
                "detail": ", ".join(f"{n} {_pct(c)} (AdamW {_pct(a)}, SGD-m base {_pct(b)})" for n, c, a, b in weights)})
    diverged = [(t["task"], m) for t in tasks.values() if t for m in CANDIDATES if t["methods"].get(m, {}).get("diverged_seeds")]
    out.append({"target": "APO-Precond never diverges (every candidate, seed and task)", "value": str(len(diverged)),
                "met": not diverged, "detail": ", ".join(f"{t}: {m}" for t, m in diverged) or "none"})
    return out


def _plot(tasks: dict[str, dict], output_dir: Path, quick: bool) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = [t for t in TASK_NAMES if tasks.get(t)]
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.2 * len(names)), squeeze=False)
    for row, task in zip(axes, names):
        steps = QUICK_STEPS if quick else LONG_BUDGETS[task][0]
        by = _group([r for r in load_runs(output_dir, task) if r["steps"] == steps and r["precision"] == "fp32"])
        summary = tasks[task]
        shown = [f"sgdm_{summary['sgdm_best_lr']:.0e}", *CANDIDATES, *PEERS]
        for name in shown:
            if name not in summary["methods"]:
                continue
            method = "sgdm" if name.startswith("sgdm") else name
            rows = by.get((method, lr_key(summary["methods"][name]["lr"]), "fp32"), [])
            losses = _mean_curve(rows, "losses")
            if not rows or losses is None:
                continue
            finite = [(s, v) for s, v in zip(rows[0]["eval_steps"], losses) if math.isfinite(v)]
            row[0].plot([s for s, _ in finite], [v for _, v in finite], label=name)
            times = _mean_curve(rows, "train_time")
            if times is not None:
                pairs = [(t, v) for t, v in zip(times, losses) if math.isfinite(v)]
                row[1].plot([t for t, _ in pairs], [v for _, v in pairs], label=name)
        if not row[1].lines:  # no training-time curves (finetune: the Trainer's runs time evaluations too)
            row[1].axis("off")
        for ax, xlabel in zip(row, ("step", "training seconds (1 CPU thread)")):
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_title(task)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("validation loss (seed mean)")
        row[0].legend(fontsize=7)
    return save_figure(fig, output_dir / "apo_precond_compare.png", dpi=90).name


def write_report(output_dir: Path, quick: bool, env: dict) -> dict:
    tasks = {task: summarize_task(output_dir, task, quick) for task in TASK_NAMES}
    rule = apply_rule(tasks)
    report = {"environment": env, "rule": rule, "targets": targets(tasks, rule["winner"]),
              "rounding_rule": rounding_rule(tasks, rule["winner"]), "tasks": tasks}
    write_json(output_dir / "apo_precond_compare.json", report)
    plot = _plot(tasks, output_dir, quick)
    lines = ["# APO-Precond against SGD-m and the second-order peers", "",
             "Produced by `python benchmarks/apo_precond_compare.py report` from the runs in `apo_precond_runs/` "
             "(the question, budgets, candidates and the rule are in that script's docstring, written before the sweep).",
             f"Device: {env.get('device', 'cpu')}, torch {env.get('torch', '?')}; every run on one CPU thread, two runs "
             "at a time on 2 cores (wall-clock is per run and shares the machine with one other run).", ""]
    lines += ["## The rule", "", "Mean rank of the candidates over the tasks (1 = best final validation loss):", ""]
    lines += [markdown_table(["candidate", "settings", "mean rank"],
                            [[n, json.dumps(CANDIDATES[n]), f"{rule['scores'][n]:.2f}"] for n in rule["order"]])]
    lines += ["", f"**Default: `{rule['winner']}`** (over {rule['cells']} tasks).", ""]
    rounding = report["rounding_rule"]
    lines += ["## bf16 weights: stochastic rounding or rounding to the nearest", "",
              f"Mean change of the final validation loss against float32 (paired by seed, seeds "
              f"{', '.join(map(str, ROUNDING_SEEDS))}) with the model's weights in bf16:", ""]
    lines += [markdown_table(["task", "candidate", "stochastic rounding", "to the nearest", "seeds"],
                             [[task, name, _pct(e["stochastic"]), _pct(e["nearest"]),
                               f"{e['stochastic_seeds']} / {e['nearest_seeds']}"]
                              for task in SMALL if tasks.get(task) for name, e in tasks[task]["rounding"].items()])]
    lines += ["", f"Rule (stochastic rounding stays on if it is the lower for `{rounding['candidate']}` on ≥ 2 of 3 "
              f"tasks): lower on {len(rounding['stochastic_wins'])}/{rounding['tasks']} "
              f"({', '.join(rounding['stochastic_wins']) or 'none'}): **stochastic rounding "
              f"{'on' if rounding['stochastic_rounding'] else 'off'}**.", ""]
    lines += ["## Targets (issue 11), as measured", ""]
    lines += [markdown_table(["target", "value", "met", "detail"],
                            [[t["target"], t["value"], "yes" if t["met"] else "**no**", t["detail"]] for t in report["targets"]])]
    for task in TASK_NAMES:
        summary = tasks.get(task)
        if summary is None:
            continue
        lines += ["", f"## {task}", "",
                  f"{summary['steps']} steps, {summary['seeds']} seeds. SGD-m base: lr {summary['sgdm_best_lr']:g} (best of "
                  f"{', '.join(f'{x:g}' for x in SGDM_GRID[task])}); APO-Precond candidates over it"
                  + (f"; AdamW and the peers at AdamW's best constant LR {summary['adamw_lr']:g}." if summary["adamw_lr"] else "."),
                  ""]
        rows = []
        for name, m in summary["methods"].items():
            rows.append([name, f"{m['lr']:g}", f"{_fmt(m['final_mean'])} ± {m['std']:.2g}", _pct(m["vs_sgdm"]),
                         _pct(m.get("vs_soap_equal_steps", math.nan)), _pct(m.get("vs_soap_equal_time", math.nan)),
                         _fmt(m["train_s"])])
        lines += [markdown_table(["method", "lr", "final val loss", "vs SGD-m base", "vs SOAP, equal steps",
                                 "vs SOAP, equal wall-clock", "train s"], rows)]
        if summary["precision"]:
            lines += ["", "bf16, seed 0 (final validation loss and change against float32):", ""]
            lines += [markdown_table(
                ["method", "float32", "bf16 weights", "change", "bf16 autocast", "change"],
                [[m, _fmt(e["fp32"]), _fmt(e["bf16_weights"]), _pct(e["bf16_weights_change"]), _fmt(e["bf16_autocast"]),
                  _pct(e["bf16_autocast_change"])] for m, e in summary["precision"].items()])]
    lines += ["", "'vs SOAP, equal wall-clock': each method's seed-mean validation loss at the shorter of the two mean "
              "training times, interpolated between evaluations, against SOAP's at the same time. heavyball runs eagerly "
              "(no torch.compile) on the CPU here, which favours APO-Precond and SGD-m in wall-clock.",
              "The peers use AdamW's best LR, not their own tuned LR: a limitation that favours APO-Precond's SGD-m grid."]
    if plot:
        lines += ["", f"![validation loss by step and by training time]({plot})"]
    (output_dir / "apo_precond_compare.md").write_text("\n".join(lines) + "\n")
    return report


def run_arguments(run) -> None:
    run.add_argument("--tasks", nargs="+", choices=TASK_NAMES, required=True)
    run.add_argument("--no_precision", action="store_true", help="skip the bf16 runs")
    run.add_argument("--candidates", nargs="+", choices=list(CANDIDATES), default=None,
                     help="run only these APO-Precond candidates (default: all; e.g. to split a task over two processes)")


def main(argv=None) -> None:
    study_main(__doc__, run_arguments, run_command, lambda args: write_report(args.output_dir, args.quick, environment()), argv)


if __name__ == "__main__":
    main()
