"""The report of ``apo_precond_compare.py``: the rule applied, the targets as measured, tables and a plot.

Writes ``apo_precond_compare.json``, ``apo_precond_compare.md`` and ``apo_precond_compare.png`` into the output
directory from the runs in ``apo_precond_runs/`` (and AdamW's runs in ``apo_lr_runs/``).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from benchmarks.apo_lr_defaults import LONG_BUDGETS, load_runs as load_apo_lr_runs, mean_final
from benchmarks.apo_precond_compare import (
    CANDIDATES, PEER_SEEDS, PEERS, PRECISION_CANDIDATES, PRECISION_METHODS, PRECISIONS, ROUNDING_SEEDS, RULE_TASKS, SEEDS, SGDM_GRID, SMALL, TASK_NAMES, TIE,
    best_adamw_lr, load_runs, lr_key,
)
from benchmarks.common import markdown_table, write_json

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
            adamw_rows = [r for r in load_apo_lr_runs(output_dir, task)
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
    fig.tight_layout()
    path = output_dir / "apo_precond_compare.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path.name


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
