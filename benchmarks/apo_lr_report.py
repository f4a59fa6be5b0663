"""Tables, targets and plots from the runs of ``apo_lr_defaults.py`` (``python benchmarks/apo_lr_defaults.py report``).

Reads ``<output_dir>/apo_lr_runs/<task>.jsonl`` and writes ``apo_lr_defaults.json``, ``apo_lr_defaults.md`` and
``apo_lr_<task>.png`` (validation loss and learned learning rate of the chosen setting from each initial LR).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from benchmarks.apo_lr_defaults import (
    ADAMW_GRID,
    CANDIDATES,
    FINALISTS_FROM_STAGE_1,
    INIT_FACTORS,
    LARGE_TASKS,
    LONG_BUDGETS,
    PAPER,
    SMALL_TASKS,
    cells,
    grid_best,
    initial_lrs,
    mean_final,
    mean_ranks,
    ordered_by_rule,
    passes_per_step,
    runs_by_method_and_lr,
)
from benchmarks.common import markdown_table, write_json

TASKS = (*SMALL_TASKS, *LARGE_TASKS)


def relative(value: float, reference: float) -> float:
    return (value - reference) / reference if math.isfinite(value) else math.inf


def lr_at(row: dict, fraction: float) -> float | None:
    """The learned LR (initial LR × multiplier) at ``fraction`` of the run, from the recorded trace."""
    trace = row.get("lr_multiplier") or []
    if not trace:
        return None
    return row["lr"] * trace[min(len(trace) - 1, int(fraction * len(trace)))]


def summarize_task(output_dir: Path, task: str, names: list[str], quick: bool) -> dict | None:
    by = runs_by_method_and_lr(output_dir, task, quick)
    best = grid_best(task, by)
    if best is None:
        return None
    grid = ADAMW_GRID[task]
    adamw = {lr: mean_final(by[("adamw", lr)]) for lr in grid}
    out = {"best_fixed_lr": best, "best_fixed_loss": adamw[best], "adamw_grid": adamw,
           "adamw_train_final": {lr: statistics.fmean(r["train_final"] for r in by[("adamw", lr)]) for lr in grid},
           "candidates": {}}
    for name in names:
        per_init = {}
        for factor, lr in zip(INIT_FACTORS, initial_lrs(best)):
            rows = by.get((name, lr))
            if not rows:
                continue
            final = mean_final(rows)
            spread = len(rows) > 1 and math.isfinite(final)
            per_init[factor] = {
                "lr": lr, "final_mean": final, "seeds": len(rows),
                "final_std": statistics.stdev([r["final"] for r in rows]) if spread else 0.0,
                "train_final_mean": statistics.fmean(r["train_final"] for r in rows),
                "relative_to_best_fixed": relative(final, adamw[best]),
                # at the same initial LR, AdamW at that LR where the grid has it (the "never hurts" comparison)
                "relative_to_adamw_same_lr": relative(final, adamw[lr]) if lr in adamw else None,
                "lr_at_15pct": [lr_at(r, 0.15) for r in rows], "lr_at_end": [lr_at(r, 1.0) for r in rows],
            }
        out["candidates"][name] = per_init
    return out


def targets(summary: dict, name: str) -> dict:
    """Issue 10's targets for one candidate, each with its numbers."""
    per_task = {t: s["candidates"].get(name, {}) for t, s in summary.items()}
    within5, at_or_below = {}, {}
    for task, inits in per_task.items():
        if len(inits) < len(INIT_FACTORS):
            continue
        rel = [inits[f]["relative_to_best_fixed"] for f in INIT_FACTORS]
        within5[task] = all(r <= 0.05 for r in rel)
        at_or_below[task] = all(r <= 0.0 for r in rel)
    never_hurts = {task: inits[1.0]["relative_to_best_fixed"] for task, inits in per_task.items() if 1.0 in inits}
    adapt = {}
    for task, inits in per_task.items():
        for factor in (0.1, 3.0):
            if factor in inits:
                pairs = zip(inits[factor]["lr_at_15pct"], inits[factor]["lr_at_end"])
                ratios = [max(a / b, b / a) for a, b in pairs if a and b]
                if ratios:
                    adapt[f"{task}@{factor:g}x"] = max(ratios)
    return {
        "within_5pct_of_best_fixed_from_every_init": within5,
        "within_5pct_holds": sum(within5.values()) >= 3,
        "le_best_fixed_from_every_init": at_or_below,
        "le_best_fixed_holds": sum(at_or_below.values()) >= 2,
        "at_best_lr_relative_to_adamw": never_hurts,
        "never_more_than_3pct_worse_at_best_lr": all(v <= 0.03 for v in never_hurts.values()) if never_hurts else None,
        "lr_at_15pct_vs_end_worst_ratio": adapt,
        "adapts_within_2x_by_15pct": all(v <= 2.0 for v in adapt.values()) if adapt else None,
    }


def apply_rule(output_dir: Path, quick: bool) -> dict:
    names = list(CANDIDATES)
    stage1_table = cells(output_dir, SMALL_TASKS, names, quick)
    stage1 = mean_ranks(stage1_table, names) if stage1_table else {}
    result = {"stage1_cells": len(stage1_table), "stage1_mean_rank": stage1}
    if not stage1:
        return result
    order = ordered_by_rule(stage1)
    finalists = order[:FINALISTS_FROM_STAGE_1] + ([PAPER] if PAPER not in order[:FINALISTS_FROM_STAGE_1] else [])
    result["stage1_order"], result["finalists"] = order, finalists
    final_table = cells(output_dir, TASKS, finalists, quick)
    result["stage2_cells"] = len(final_table)
    result["stage2_cells_by_task"] = {t: sum(1 for (task, _) in final_table if task == t) for t in TASKS}
    if final_table:
        final = mean_ranks(final_table, finalists)
        result["final_mean_rank"] = final
        result["final_order"] = ordered_by_rule(final)
        result["winner"] = result["final_order"][0]
    return result


def fmt(x, digits=4) -> str:
    if x is None:
        return "–"
    if isinstance(x, float) and not math.isfinite(x):
        return "diverged"
    return f"{x:.{digits}g}"


def pct(x) -> str:
    return "–" if x is None else ("diverged" if not math.isfinite(x) else f"{100 * x:+.1f}%")


def markdown(report: dict) -> str:
    rule, summary = report["rule"], report["tasks"]
    lines = ["# APO-LR defaults at long budgets", "",
             "Produced by `benchmarks/apo_lr_defaults.py` (the rule is in its docstring, written before the sweep); "
             "every number is a mean over seeds of the final validation loss. Relative numbers are against the best "
             "fixed AdamW learning rate of the grid at the same budget. The three `next_h*` candidates (a horizon) were "
             "added while stage 1 ran, after the one-step next-batch objective decayed the learned LR on "
             "digits_autoencoder; the rule was not changed (see `CANDIDATES`).", ""]
    rows = [[t, LONG_BUDGETS[t][0], len(LONG_BUDGETS[t][2]), fmt(s["best_fixed_lr"]), fmt(s["best_fixed_loss"]),
             " · ".join(f"{lr:g}: {fmt(v, 3)}" for lr, v in s["adamw_grid"].items())] for t, s in summary.items()]
    lines += ["## AdamW at constant learning rates", "",
              markdown_table(["task", "steps", "seeds", "best fixed LR", "its val loss", "grid (LR: val loss)"], rows), ""]
    if rule.get("stage1_mean_rank"):
        stage1 = rule["stage1_mean_rank"]
        rows = []
        for name in rule["stage1_order"]:
            rel = [summary[t]["candidates"][name][f]["relative_to_best_fixed"] for t in SMALL_TASKS if t in summary
                   for f in INIT_FACTORS if f in summary[t]["candidates"].get(name, {})]
            rows.append([name, f"{stage1[name]:.2f}", f"{passes_per_step(name):.2f}",
                         pct(statistics.median(rel)) if rel else "–", pct(max(rel)) if rel else "–"])
        lines += [f"## Stage 1: small tasks ({rule['stage1_cells']} cells of task × initial LR)", "",
                  markdown_table(["candidate", "mean rank", "extra passes / step", "median vs best fixed",
                                  "worst vs best fixed"], rows), "",
                  f"Finalists: {', '.join(rule['finalists'])}.", ""]
    if rule.get("final_mean_rank"):
        final = rule["final_mean_rank"]
        lines += [f"## Stage 2: all tasks ({rule['stage2_cells']} cells: "
                  + ", ".join(f"{t} {n}" for t, n in rule["stage2_cells_by_task"].items()) + ")", "",
                  markdown_table(["finalist", "mean rank"], [[n, f"{final[n]:.2f}"] for n in rule["final_order"]]), "",
                  f"**Winner by the rule: `{rule['winner']}`** ({CANDIDATES[rule['winner']]}).", ""]
    for name in report["target_candidates"]:
        lines += [f"## `{name}` per task and initial LR", ""]
        rows = []
        for task, s in summary.items():
            inits = s["candidates"].get(name, {})
            rows.append([task] + [f"{fmt(inits[f]['final_mean'])} ({pct(inits[f]['relative_to_best_fixed'])})"
                                  if f in inits else "–" for f in INIT_FACTORS])
        lines += [markdown_table(["task"] + [f"from {f:g}× best" for f in INIT_FACTORS], rows), ""]
        t = report["targets"][name]
        lines += [
            f"- within 5% of the best fixed LR from every initial LR on ≥ 3 tasks: "
            f"**{'met' if t['within_5pct_holds'] else 'not met'}** ({sum(t['within_5pct_of_best_fixed_from_every_init'].values())}"
            f"/{len(t['within_5pct_of_best_fixed_from_every_init'])} tasks: "
            + ", ".join(k for k, v in t["within_5pct_of_best_fixed_from_every_init"].items() if v) + ")",
            f"- ≤ the best fixed LR from every initial LR on ≥ 2 tasks: **{'met' if t['le_best_fixed_holds'] else 'not met'}** "
            f"({', '.join(k for k, v in t['le_best_fixed_from_every_init'].items() if v) or 'none'})",
            f"- at the best LR never more than 3% worse than AdamW: "
            f"**{'met' if t['never_more_than_3pct_worse_at_best_lr'] else 'not met'}** ("
            + ", ".join(f"{k} {pct(v)}" for k, v in t["at_best_lr_relative_to_adamw"].items()) + ")",
            f"- from 0.1× and 3× the best LR, the learned LR within 2× of where it ends by 15% of the run: "
            f"**{'met' if t['adapts_within_2x_by_15pct'] else 'not met'}** (worst ratio per run: "
            + ", ".join(f"{k} {v:.2f}" for k, v in t["lr_at_15pct_vs_end_worst_ratio"].items()) + ")", ""]
    return "\n".join(lines) + "\n"


def plot(output_dir: Path, summary: dict, name: str, quick: bool) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for task, s in summary.items():
        by = runs_by_method_and_lr(output_dir, task, quick)
        fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(11, 4))
        best = s["best_fixed_lr"]
        rows = by[("adamw", best)]
        ax_loss.plot(rows[0]["eval_steps"], [statistics.fmean(v) for v in zip(*(r["losses"] for r in rows))], "k--",
                     label=f"AdamW {best:g} (best fixed)")
        for factor, lr in zip(INIT_FACTORS, initial_lrs(best)):
            rows = by.get((name, lr))
            if not rows:
                continue
            ax_loss.plot(rows[0]["eval_steps"], [statistics.fmean(v) for v in zip(*(r["losses"] for r in rows))],
                         label=f"{name} from {factor:g}×")
            trace = rows[0]["lr_multiplier"]
            every = rows[0].get("lr_multiplier_every", LONG_BUDGETS[task][0] / max(1, len(trace)))
            ax_lr.plot([every * (i + 1) for i in range(len(trace))], [lr * m for m in trace], label=f"from {factor:g}×")
        ax_lr.axhline(best, color="k", ls="--", lw=1, label="best fixed LR")
        ax_loss.set(yscale="log", xlabel="step", ylabel="validation loss", title=task)
        ax_lr.set(yscale="log", xlabel="step", ylabel="learned LR, seed 0",
                  title="initial LR × multiplier" + (" (× the Trainer's linear decay)" if task == "finetune" else ""))
        ax_loss.legend(fontsize=7)
        ax_lr.legend(fontsize=7)
        fig.tight_layout()
        path = output_dir / f"apo_lr_{task}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path.name)
    return written


def write_report(output_dir: Path, quick: bool, environment: dict) -> dict:
    rule = apply_rule(output_dir, quick)
    names = list(CANDIDATES)
    summary = {t: s for t in TASKS if (s := summarize_task(output_dir, t, names, quick)) is not None}
    chosen = [n for n in (rule.get("winner"), PAPER) if n]
    if not rule.get("winner") and rule.get("stage1_order"):
        chosen = [rule["stage1_order"][0], PAPER]
    chosen = list(dict.fromkeys(chosen))
    report = {"rule": rule, "tasks": summary, "target_candidates": chosen,
              "targets": {n: targets(summary, n) for n in chosen}, "environment": environment}
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "apo_lr_defaults.json", report)
    (output_dir / "apo_lr_defaults.md").write_text(markdown(report))
    if chosen and summary:
        report["plots"] = plot(output_dir, summary, chosen[0], quick)
    return report
