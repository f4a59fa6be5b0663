"""A study's report from its runs: ``report.md`` (tables, the rule's outcome, the targets), ``report.json`` (the same
numbers) and its figures: ``curves`` (validation loss by step and, with ``time``, by training time), ``cells`` (value
over the reference against the initial LR), ``lr_traces`` (loss and learned LR from each initial LR), ``spectra``.
Deterministic: the same runs give the same bytes."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from benchmarks import score
from benchmarks.runner import Study
from benchmarks.tasks import TASKS


def fmt(value, percent: bool = False) -> str:
    if value is None or value != value:  # None or NaN
        return "—"
    return "diverged" if value == math.inf else f"{100 * value:+.1f}%" if percent else f"{value:.4g}"


def pct(value) -> str:
    return fmt(value, percent=True)


def table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def metric_mean(rows: list[dict], name: str) -> str:
    """A final metric's mean over the seeds that recorded it (rows older than the metric lack it: said)."""
    values = [r["metrics"][name] for r in rows if name in r.get("metrics", {})]
    partial = f" ({len(values)} of {len(rows)} seeds)" if len(values) < len(rows) else ""
    return f"{statistics.fmean(values):.1f}{partial}" if values else "—"


def _json(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json(v) for v in value]
    return value


class Report:
    """The numbers of one study, computed once from its rows."""

    def __init__(self, study: Study):
        self.study, self.config = study, study.config
        self.cells_grid = self.config["cells"]["grid"]
        self.factors = self.config["cells"].get("factors", [1.0])
        self.rule = study.rule()
        stages = self.rule["stages"]
        self.winner = self.rule.get("winner")
        self.finalists = stages[0].get("finalists") if stages and stages[0]["done"] else None
        self.failed_share = float(self.config.get("failed_share", 0.1))
        self.thresholds: dict[str, float | None] = {}  # task → score.failure_threshold, once per task

    def names_on(self, task: str) -> list[str]:
        """The methods shown on a task: the candidates (on a later stage's, the finalists first), then the others."""
        candidates, stages = self.study.candidates(), self.config.get("rule", {}).get("stages", [{}])
        if task not in stages[0].get("tasks", self.study.tasks):
            candidates = list(dict.fromkeys((self.finalists or []) + candidates))
        others = [n for n in self.config["methods"] if n not in candidates]
        return [n for n in candidates + others if self.study.runs_on(task, n)]

    def reference(self, task: str, factor: float, name=None) -> float | None:
        """The value a method is compared to: a grid's best, a method's cell value, or the best of several."""
        refs = name or self.config.get("reference", self.cells_grid)
        values = []
        for ref in refs if isinstance(refs, list) else [refs]:
            if ref in self.config.get("grids", {}):  # a grid: its best, whatever the cell
                best = self.study.grid_best(task, ref)
                values.append(best[1] if best else None)
            else:
                cell = self.study.cell(task, ref, factor)
                values.append(cell["value"] if cell else None)
        return None if None in values or not values else min(values)

    def cells(self, task: str) -> dict[float, dict[str, dict]]:
        """factor → method → cell (value, lr, rows) for the methods shown on a task."""
        return {f: {n: c for n in self.names_on(task) if (c := self.study.cell(task, n, f))} for f in self.factors}

    def failed(self, task: str, factor: float, cell: dict) -> int | None:
        """The cell's seeds that ended far above the tuned value: above it + ``failed_share`` (default 0.1) of what
        the cell grid's best gained from step 0 (score.failure_threshold)."""
        if task not in self.thresholds:
            best = self.study.grid_values(task, self.cells_grid)
            self.thresholds[task] = best and score.failure_threshold(
                min(best.values()), self.saturation(task, self.cells_grid, best)[0], self.failed_share)
        threshold = self.thresholds[task]
        return None if threshold is None else score.failed(cell["rows"], threshold, self.study.score_kind(task))

    def saturation(self, task: str, grid: str, values: dict[float, float]) -> tuple[float, float]:
        """The grid's best cell: its mean validation loss at step 0 and its value over it (see score.left_of_start)."""
        rows = self.study.rows(task, grid, min(values, key=values.get))
        return statistics.fmean(r["losses"][0] for r in rows), score.left_of_start(
            rows, self.study.score_kind(task), TASKS[task].floor or 0.0)

    def target_methods(self) -> list[str]:
        names = [self.winner if n == "winner" else n for n in self.config.get("target_methods", ["winner"])]
        return list(dict.fromkeys(n for n in names if n))

    # targets ---------------------------------------------------------------------------------------------------
    def target(self, spec: dict, method: str) -> dict:
        kind, tasks = spec["kind"], spec.get("tasks", self.study.tasks)
        per_task: dict[str, list[float]] = {}
        for task in tasks:
            values = [self.target_value(spec, method, task, factor)
                      for factor in (spec.get("cells", self.factors) if kind in ("relative", "lr_ratio") else [1.0])]
            if values and None not in values:
                per_task[task] = values
        if kind == "diverged":
            diverged = [t for t, v in per_task.items() if any(v)]
            return {"met": not diverged, "detail": ", ".join(diverged) or "none"}
        if not per_task:
            return {"met": None, "detail": "not run"}
        if kind == "lr_ratio":
            return {"met": all(v <= spec["max"] for vs in per_task.values() for v in vs),
                    "detail": ", ".join(f"{t} {max(vs):.2f}×" for t, vs in per_task.items())}
        if "versus" in spec:  # values: (change, the other method's change)
            passing = [t for t, ((change, other),) in per_task.items() if
                       (change <= max(other, spec["max"]) if "max" in spec else change < other)]
        else:
            bounded = {t: [abs(v) for v in vs] for t, vs in per_task.items()} if kind == "precision" else per_task
            passing = score.within_on(bounded, spec.get("max", 0.0), spec.get("strict", False))
        at_least = spec.get("at_least", len(per_task))
        met = len(passing) >= at_least and set(spec.get("must_include", [])) <= set(passing)
        detail = ", ".join(f"{t} {pct(vs[0][0])} ({spec['versus']} {pct(vs[0][1])})" if "versus" in spec else
                           f"{t} {pct(max(vs))}" for t, vs in per_task.items())
        return {"met": met, "passing": f"{len(passing)}/{len(per_task)}", "detail": detail}

    def target_value(self, spec: dict, method: str, task: str, factor: float):
        kind = spec["kind"]
        if kind == "precision":
            change = self.precision_change(task, method, spec["mode"])
            if "versus" not in spec:
                return change
            other = self.precision_change(task, spec["versus"], spec["mode"])
            return None if change is None or other is None else (change, other)
        cell = self.study.cell(task, method, factor)
        if cell is None:
            return None
        if kind == "diverged":
            return any(r["diverged"] for r in cell["rows"])
        if kind == "lr_ratio":
            ratios = [x for r in cell["rows"] if (x := score.lr_ratio(r, spec["fraction"])) is not None]
            return max(ratios) if ratios else None
        if kind == "equal_time":
            other = self.study.cell(task, spec["reference"], factor)
            return None if other is None else score.equal_time_ratio(cell["rows"], other["rows"])
        reference = self.reference(task, factor, spec.get("reference"))
        return None if reference is None else score.relative(cell["value"], reference)

    def precision_change(self, task: str, name: str, mode: str) -> float | None:
        fp32 = self.study.cell(task, self.study.entry(name).get("fp32_of", name), 1.0)
        if fp32 is None:
            return None
        group = next(g for g in self.config["precision"] if name in g["methods"] and mode in g["modes"])
        rows = self.study.rows(task, name, fp32["lr"], mode, group.get("seeds"))
        change = score.precision_change(rows, fp32["rows"], self.study.score_kind(task))
        return None if not rows or math.isnan(change) else change

    # the report ----------------------------------------------------------------------------------------------------
    def summary(self) -> dict:
        grids = {t: {g: self.study.grid_values(t, g) for g in self.config.get("grids", {})} for t in self.study.tasks}
        cells = [{"task": t, "lr": self.study.cell_lrs(t)[i] if self.study.cell_lrs(t) else None, "factor": f,
                  **{n: c["value"] for n, c in entry.items()}}
                 for t in self.study.tasks for i, (f, entry) in enumerate(self.cells(t).items()) if entry]
        targets = [{"target": spec["text"], "method": m, **self.target(spec, m)}
                   for spec in self.config.get("targets", []) for m in spec.get("methods", self.target_methods())]
        runs = dict.fromkeys((t, n, mode) for g in self.config.get("precision", []) for t in g["tasks"]
                             for n in g["methods"] for mode in g["modes"] if t in self.study.tasks)
        precision = [{"task": t, "method": n, "mode": mode, "change": self.precision_change(t, n, mode)}
                     for t, n, mode in sorted(runs, key=lambda r: self.study.tasks.index(r[0]))]
        saturation = {t: {g: dict(zip(("step_0", "left"), self.saturation(t, g, v))) for g, v in gs.items() if v}
                      for t, gs in grids.items()}
        failures = [{"task": t, "factor": f, "method": n, "failed": k, "seeds": len(c["rows"])}
                    for t in self.study.tasks for f, entry in self.cells(t).items() for n, c in entry.items()
                    if (k := self.failed(t, f, c))]
        ranks = {}
        if "rank_all" in self.config:
            names = self.config["rank_all"]
            for label, tasks, chosen in (("stage 1's tasks", self.config["rule"]["stages"][0]["tasks"], names),
                                         ("every task (the finalists)", self.study.tasks,
                                          [n for n in names if n in (self.finalists or []) or n not in
                                           self.study.candidates()])):
                table_ = self.study.table(tasks, chosen)
                ranks[label] = {"cells": len(table_), "mean_ranks": score.mean_ranks(table_, chosen)}
        return {"rule": self.rule, "winner": self.winner, "grids": grids, "saturation": saturation, "cells": cells,
                "failed_share": self.failed_share, "failures": failures, "mean_ranks": ranks,
                "precision": precision, "targets": targets,
                "runs": sum(1 for s in self.study.read for _ in s.rows)}

    def markdown(self, summary: dict, figures: list[str]) -> str:
        c = self.config
        lines = [f"# {c['title']}", "", c["question"].strip(), "",
                 f"Generated by `python -m benchmarks report {self.study.name}` from `runs/`"
                 + (f" and the runs of {', '.join(c['reads'])}" if c.get("reads") else "")
                 + "; the rule and the targets are in `study.toml`, written before the runs (what changed while it "
                   "ran: `NOTES.md`). A value is the mean over seeds of the final validation loss"
                 + (" (" + ", ".join(f"{t}: the best along the run" for t, k in c.get("score", {}).items()
                                     if k == "best") + ")" if "best" in c.get("score", {}).values() else "")
                 + "; a diverged seed makes it infinitely bad.", "", "## Grids", ""]
        rows = []
        for task in self.study.tasks:
            steps, _, seeds = self.study.budget(task)
            for grid, values in summary["grids"][task].items():
                if values:
                    best, saturation = min(values, key=values.get), summary["saturation"][task][grid]
                    floor = TASKS[task].floor
                    rows.append([task, steps, len(seeds), grid, f"{best:g}", fmt(values[best]),
                                 f"{fmt(saturation['step_0'])} ({100 * saturation['left']:.2g}%"
                                 + (f" above the floor {floor:g})" if floor else ")"),
                                 " · ".join(f"{lr:g}: {fmt(v)}" for lr, v in values.items())])
        lines += table(["task", "steps", "seeds", "grid", "best LR", "its value", "step 0 (best value / it)",
                        "LR: value"], rows) + [""]
        lines += ["How far from saturation: the best value as a share of the loss at step 0 (both above the task's "
                  "floor, the loss no model can beat, where its data say it). Near 0% a task is solved almost "
                  "perfectly and relative differences compare two near-perfect models.", ""]
        lines += self.runs_in_progress(summary)
        lines += ["## The rule", ""]
        for number, stage in enumerate(self.rule["stages"], start=1):
            ranks = sorted(stage["mean_ranks"].items(), key=lambda kv: kv[1])
            lines += [f"Stage {number} ({', '.join(stage['tasks'])}; {stage['cells']} of {stage['of']} cells): "
                      + (", ".join(f"{n} {r:.2f}" for n, r in ranks) or "not run") + "."
                      + (" Scenarios failing the rule's checks (ordered first, fewer first): " + ", ".join(
                          f"{n} {len(t)}" + (f" ({', '.join(t)})" if t else "") for n, t in stage["failing"].items())
                         + "." if stage.get("failing") else "")
                      + (f" Order by the rule: {', '.join(stage['order'])}." if stage["done"] else " Not finished.")
                      + (f" Finalists: {', '.join(stage['finalists'])}." if stage.get("finalists") else ""), ""]
        lines += [f"**Winner by the rule: `{self.winner}`**" if self.winner else "**Winner: not decided yet**", ""]
        for label, entry in summary["mean_ranks"].items():
            lines += [f"All methods ranked over {label} ({entry['cells']} cells):", "",
                      *table(["method", "mean rank"], [[m, f"{r:.2f}"] for m, r in sorted(
                          entry["mean_ranks"].items(), key=lambda kv: kv[1])]), ""]
        lines += ["## Per task", ""]
        compare = c.get("compare_to")
        for task in self.study.tasks:
            cells = self.cells(task)
            if not any(cells.values()):
                continue
            lrs = self.study.cell_lrs(task)
            lines += [f"### {task}", ""]
            names = list(dict.fromkeys(n for entry in cells.values() for n in entry))
            if len(self.factors) > 1:
                header = ["method"] + [f"from {f:g}× ({lr:g})" for f, lr in zip(self.factors, lrs)]
                body = [[n] + [f"{fmt(e[n]['value'])} ({pct(score.relative(e[n]['value'], self.reference(task, f)))})"
                               + self.failed_note(task, f, e[n]) if n in e else "—" for f, e in cells.items()]
                        for n in names]
            else:
                entry, ref = cells[1.0], self.reference(task, 1.0)
                other = entry.get(compare) if compare else None
                scored = sorted({k for e in entry.values() for r in e["rows"] for k in r.get("metrics", {})})
                header = ["method", "LR", "value", "± std", "vs reference", "seeds failed"] + (
                    [f"vs {compare}", f"vs {compare}, equal time"] if compare else []) + scored
                body = []
                for n in names:
                    finals = [r["final"] for r in entry[n]["rows"]]
                    spread = statistics.stdev(finals) if len(finals) > 1 and all(map(math.isfinite, finals)) else 0.0
                    row = [n, f"{entry[n]['lr']:g}", fmt(entry[n]["value"]), f"{spread:.2g}",
                           pct(score.relative(entry[n]["value"], ref)) if ref else "—",
                           "—" if ref is None else f"{self.failed(task, 1.0, entry[n])}/{len(finals)}"]
                    if compare:
                        row += [pct(score.relative(entry[n]["value"], other["value"])) if other else "—",
                                pct(score.equal_time_ratio(entry[n]["rows"], other["rows"])) if other else "—"]
                    row += [metric_mean(entry[n]["rows"], k) for k in scored]
                    body.append(row)
            reference = c.get("reference", self.cells_grid)
            lines += [(f"Reference: {' or '.join(reference) if isinstance(reference, list) else reference} "
                       "(its best LR)." if len(self.factors) == 1 else
                       f"Percentages against {reference}'s best ({fmt(self.reference(task, 1.0))}).")
                      + f" A seed that gave back more than {100 * self.failed_share:g}% of what tuned "
                        f"{self.cells_grid} gained from step 0 (a stall, a wreck or far too slow) is counted apart"
                      + (" (\"seeds failed\")" if len(self.factors) == 1 else " (\"k/n failed\")") + ".", "",
                      *table(header, body), ""]
        if summary["precision"]:
            lines += ["## Precision", "", "Change of the value against float32, mean over the seeds run (paired):", "",
                      *table(["task", "method", "mode", "change"], [[p["task"], p["method"], p["mode"],
                                                                    pct(p["change"])] for p in summary["precision"]]),
                      ""]
        if summary["targets"]:
            lines += ["## Targets", "", *table(["target", "method", "met", "detail"], [
                [t["target"], t["method"], {True: "yes", False: "**no**", None: "—"}[t["met"]],
                 (f"{t['passing']}: " if "passing" in t else "") + t["detail"]] for t in summary["targets"]]), ""]
        lines += [f"![{f}]({f})" for f in figures]
        return "\n".join(lines).rstrip() + "\n"

    def failed_note(self, task: str, factor: float, cell: dict) -> str:
        return f", {k}/{len(cell['rows'])} failed" if (k := self.failed(task, factor, cell)) else ""

    def runs_in_progress(self, summary: dict) -> list[str]:
        """While a task's grid is unfinished: every run on file, by the study's name of its method (nothing once
        every grid is complete, so a finished study's report does not change). Step 0 → final shows how far from
        saturation a run is."""
        unfinished = [t for t in self.study.tasks if any(v is None and self.study.runs_on(t, g)
                                                         for g, v in summary["grids"][t].items())]
        names = [*self.config.get("grids", {}), *self.config.get("methods", {})]
        body = []
        for task in unfinished:
            methods = {n: self.study.method(task, n) for n in names}
            for row in sorted(self.study.store.rows.values(), key=lambda r: (r["lr"], r["seed"])):
                name = next((n for n, m in methods.items() if m == row["method"] and row["task"] == task), None)
                if name is not None:
                    body.append([task, name, f"{row['lr']:g}", row["seed"], row["steps"],
                                 f"{fmt(row['losses'][0])} → {fmt(row['final'])}"])
        return ["## Runs on file (the study is not finished)", "", *table(
            ["task", "method", "LR", "seed", "steps", "validation loss, step 0 → final"], body), ""] if body else []

    # figures --------------------------------------------------------------------------------------------------------
    def plot(self, spec: dict, path: Path) -> bool:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if spec["kind"] == "spectra":
            return self._plot_spectra(path, plt)
        names = self.config[spec["methods"]] if isinstance(spec["methods"], str) else spec["methods"]
        names = [self.winner if n == "winner" else n for n in names if n != "winner" or self.winner]
        tasks = [t for t in self.study.tasks if any(self.cells(t).values())]
        if not tasks or not names:
            return False
        kind = spec["kind"]
        columns = 2 if kind == "lr_traces" or spec.get("time") else 1
        shape = (len(tasks), columns) if columns == 2 else (1, len(tasks))
        if kind == "cells" and "columns" in spec:  # the tasks' panels wrapped into rows of ``columns``
            columns, shape = 1, (math.ceil(len(tasks) / spec["columns"]), min(spec["columns"], len(tasks)))
        figure, axes = plt.subplots(*shape, figsize=(5.5 * shape[1], 3.6 * shape[0]), squeeze=False)
        colours = dict(zip(names, getattr(plt.cm, spec.get("palette", "tab20")).colors))
        for axis in axes.flat[len(tasks):]:
            axis.set_visible(False)
        for index, task in enumerate(tasks):
            row = axes[index] if columns == 2 else [axes.flat[index]]
            if kind == "cells":
                self._plot_cells(row[0], task, names, colours, spec)
            elif kind == "curves":
                self._plot_curves(row, task, names, colours)
            else:
                self._plot_lr_traces(row, task, names[0], spec)
            for axis in row:
                axis.set_title(task, fontsize=9)
        handles = {line.get_label(): line for axis in axes.flat for line in axis.get_lines()
                   if not line.get_label().startswith("_")}
        legend = axes.flat[shape[1] - 1 if "columns" in spec else columns - 1]
        legend.legend(list(handles.values()), list(handles), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        figure.tight_layout()
        figure.savefig(path, dpi=90, metadata={"Software": None})
        plt.close(figure)
        return True

    def _plot_spectra(self, path, plt) -> bool:
        """Per candidate, the sorted eigenvalues of the largest dense factors at each recorded point."""
        source = self.study.store.directory / "spectra.json"
        if not source.is_file():
            return False
        runs = json.loads(source.read_text())["runs"]
        last = runs[0]["points"][-1]["spectra"]
        names = sorted(last, key=lambda n: -len(last[n]))[:4]
        figure, axes = plt.subplots(len(runs), len(names), figsize=(3.2 * len(names), 2.6 * len(runs)), squeeze=False)
        for row, run in zip(axes, runs):
            for axis, name in zip(row, names):
                for point in run["points"]:
                    values = point["spectra"].get(name, [])
                    axis.semilogy(range(1, len(values) + 1), values, label=f"step {point['step']}")
                axis.axhline(1.0, color="grey", lw=0.5)
                axis.set_title(f"{run['candidate']}: {name}", fontsize=7)
        axes[0][-1].legend(fontsize=6)
        figure.tight_layout()
        figure.savefig(path, dpi=90, metadata={"Software": None})
        plt.close(figure)
        return True

    def _plot_cells(self, axis, task, names, colours, spec):
        cells = self.cells(task)
        for name in names:
            points = [(lr / self.study.cell_lrs(task)[self.factors.index(1.0)], e[name]["value"] / ref)
                      for (f, e), lr in zip(cells.items(), self.study.cell_lrs(task))
                      if name in e and (ref := self.reference(task, f, spec.get("reference")))]
            if points:
                apo = self.study.method(task, name)["kind"].startswith("apo")
                axis.plot([x for x, _ in points], [min(y, 1e3) for _, y in points], "-o" if apo else "--x",
                          label=spec.get("labels", {}).get(name, name), color=colours[name],
                          linewidth=2 if apo else 1)
        axis.axhline(1.0, color="black", linewidth=0.8)
        axis.set(xscale="log", yscale="log", xlabel="initial LR / best LR", ylabel="value / reference")

    def _plot_curves(self, row, task, names, colours):
        entry = self.cells(task)[1.0]
        for name in names:
            if not (cell := entry.get(name) or self.study.cell(task, name, 1.0)):
                continue
            rows = cell["rows"]
            length = min(len(r["losses"]) for r in rows)
            curve = [statistics.fmean(r["losses"][i] for r in rows) for i in range(length)]
            row[0].plot(rows[0]["eval_steps"][:length], curve, label=name, color=colours[name], linewidth=1.2)
            if len(row) > 1 and all(r.get("train_time") for r in rows):
                times = [statistics.fmean(r["train_time"][i] for r in rows) for i in range(length)]
                row[1].plot(times, curve, label=name, color=colours[name], linewidth=1.2)
        row[0].set(yscale="log", xlabel="step", ylabel="validation loss (seed mean)")
        if len(row) > 1:
            row[1].set(yscale="log", xlabel="training seconds (1 CPU thread)")

    def _plot_lr_traces(self, row, task, name, spec):
        best = self.study.grid_best(task, spec["reference"])
        rows = self.study.rows(task, spec["reference"], best[0])
        row[0].plot(rows[0]["eval_steps"], [statistics.fmean(v) for v in zip(*(r["losses"] for r in rows))], "k--",
                    label=f"{spec['reference']} (best LR)")
        row[1].axhline(best[0], color="k", ls="--", lw=1)
        for factor, entry in self.cells(task).items():
            if name in entry:
                rows, lr = entry[name]["rows"], entry[name]["lr"]
                row[0].plot(rows[0]["eval_steps"], [statistics.fmean(v) for v in zip(*(r["losses"] for r in rows))],
                            label=f"{name} from {factor:g}×")
                trace = rows[0]["lr_multiplier"]
                every = rows[0].get("lr_multiplier_every", rows[0]["steps"] / max(1, len(trace)))
                row[1].plot([every * (i + 1) for i in range(len(trace))], [lr * m for m in trace],
                            label=f"{name} from {factor:g}×")
        row[0].set(yscale="log", xlabel="step", ylabel="validation loss")
        row[1].set(yscale="log", xlabel="step", ylabel="learned LR, seed 0")


def write(study: Study, output: Path | None = None) -> Path:
    """Write the study's report.md, report.json and figures into ``output`` (default: the study's folder)."""
    output = Path(output or study.dir)
    output.mkdir(parents=True, exist_ok=True)
    report = Report(study)
    summary = report.summary()
    figures = []
    kinds = [spec["kind"] for spec in study.config.get("plots", []) if "name" not in spec]
    for number, spec in enumerate(study.config.get("plots", []), start=1):
        name = (f"{spec['name']}.png" if "name" in spec else f"{spec['kind']}.png" if kinds.count(spec["kind"]) == 1
                else f"{spec['kind']}_{number}.png")
        if report.plot(spec, output / name):
            figures.append(name)
    (output / "report.json").write_text(json.dumps(_json(summary), indent=1, ensure_ascii=False) + "\n")
    (output / "report.md").write_text(report.markdown(summary, figures))
    return output / "report.md"
