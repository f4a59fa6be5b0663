"""What APO-Precond learns: the spectra of its dense factors over training (issue 18).

One run per candidate of ``apo_precond_split.py`` on a small task, at that study's tuned AdamW-linear LR (read from
its runs) under the linear decay, seed 0. At a few points of the run every dense factor L = AAᵀ (and R) has its
eigenvalues recorded (``torch.linalg.eigvalsh``, float64), with the learned LR multiplier where there is one. The plot
shows, for the largest dense factors, the sorted spectrum at each recorded point: a learned *shape* spreads the
eigenvalues around a mean of 1; a learned *size* moves them all together (the factors that carry size and shape,
``precond_same``, against the shape-only ones). Writes ``precond_spectra.json`` and ``precond_spectra.png``.

Usage::

    python benchmarks/precond_spectra.py --task teacher_student
    python benchmarks/precond_spectra.py --quick --output_dir /tmp/spectra
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.sweep import LONG_BUDGETS
from benchmarks.apo_lr_peers import GRIDS, adamw_name, cell_value, runs_by
from benchmarks.apo_precond_split import CANDIDATES, spec_of
from benchmarks.common import DEFAULT_OUTPUT_DIR, environment, save_figure
from benchmarks.tasks import TASKS, run_once
from hf_apo import APOLR

FRACTIONS = (0.0, 0.02, 0.1, 0.3, 1.0)  # of the run, where the spectra are recorded
SHOWN = 4  # dense factors in the plot (the largest)


def tuned_lr(output_dir: Path, task: str, quick: bool) -> float:
    by = runs_by(output_dir, task, quick)
    name = adamw_name(task, "linear")
    finished = {lr: cell_value(task, by[(name, lr)]) for lr in GRIDS[task] if (name, lr) in by}
    if not finished:
        return 1e-3
    return min(finished, key=finished.get)


def spectra(optimizer) -> dict[str, list[float]]:
    """name → eigenvalues (descending) of every dense factor; the parameters are named by their shape and index."""
    precond = optimizer.inner if isinstance(optimizer, APOLR) else optimizer
    out = {}
    for index, (param, factors) in enumerate(precond.factors.items()):
        for side, tensor in zip(("L", "R"), factors.tensors):
            if tensor.dim() == 2:
                matrix = (tensor @ tensor.T).double()
                values = torch.linalg.eigvalsh(matrix).flip(0)
                out[f"p{index} {tuple(param.shape)} {side}"] = [round(float(v), 6) for v in values]
    return out


def record(task: str, candidate: str, lr: float, quick: bool) -> dict:
    budget = 30 if quick else LONG_BUDGETS[task][0]
    definition = dataclasses.replace(TASKS[task], steps=budget, eval_every=max(1, budget // 10))
    data = definition.load(quick)
    marks = sorted({max(1, round(f * budget)) for f in FRACTIONS})
    recorded: list[dict] = []

    def callback(step, optimizer):
        if step in marks:
            multiplier = optimizer.lr_multipliers[0] if isinstance(optimizer, APOLR) else 1.0
            recorded.append({"step": step, "lr_multiplier": multiplier, "spectra": spectra(optimizer)})

    result = run_once(definition, data, spec_of(candidate, lr), seed=0, callback=callback)
    return {"candidate": candidate, "lr": lr, "steps": budget, "final": result["final"], "points": recorded}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = runs[0]["points"][-1]["spectra"]
    names = sorted(last, key=lambda n: -len(last[n]))[:SHOWN]
    figure, axes = plt.subplots(len(runs), len(names), figsize=(3.2 * len(names), 2.6 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs):
        for axis, name in zip(row, names):
            for point in run["points"]:
                values = point["spectra"].get(name)
                if values:
                    axis.semilogy(range(1, len(values) + 1), values, label=f"step {point['step']}")
            axis.axhline(1.0, color="grey", lw=0.5)
            axis.set_title(f"{run['candidate']}: {name}", fontsize=7)
            axis.tick_params(labelsize=6)
        row[0].set_ylabel("eigenvalue", fontsize=7)
    axes[0][-1].legend(fontsize=6)
    save_figure(figure, path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="teacher_student", choices=("digits_classification", "digits_autoencoder",
                                                                      "teacher_student"))
    parser.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    lr = tuned_lr(args.output_dir, args.task, args.quick)
    runs = [record(args.task, c, lr, args.quick) for c in args.candidates]
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "precond_spectra.json").write_text(
        json.dumps({"task": args.task, "runs": runs, "environment": environment()}, indent=1) + "\n")
    plot(runs, args.output_dir / "precond_spectra.png")
    for run in runs:
        end = run["points"][-1]
        means = [sum(v) / len(v) for v in end["spectra"].values()]
        spread = [max(v) / max(min(v), 1e-12) for v in end["spectra"].values()]
        print(f"{run['candidate']}: final {run['final']:.4g}, multiplier {end['lr_multiplier']:.3g}, mean eigenvalue "
              f"{min(means):.3g}-{max(means):.3g}, condition {min(spread):.3g}-{max(spread):.3g}", file=sys.stderr)


if __name__ == "__main__":
    main()
