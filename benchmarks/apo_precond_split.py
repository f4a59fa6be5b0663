"""APO-Precond over AdamW with the step's size and shape learned apart, against tuned AdamW with the Trainer's
schedules and SOAP (issue 18).

The question: over the AdamW a Trainer user runs, at the LR they tuned, does a learned Kronecker preconditioner beat
AdamW with its schedule? Theorem 1 of the paper says the same-batch objective sets P's size through λ_FSD and its
shape through the curvature, and the measurements (benchmarks/results/apo_precond_compare.md, issue 18) say the learned
P mostly shrinks the step: a decay the schedule already gives. So the candidates learn the shape in the factors
(``APOPrecond(shape_only=True)``: every side renormalized to mean eigenvalue 1 after each meta step) and the size,
if at all, as APO-LR learns a learning rate (``--apo_precond_size lr``: APO-LR's default, next batch, horizon 10,000,
one multiplier per group over the factors).

Scenarios, budgets and seeds: those of ``apo_lr_peers.py`` (the three small long-budget tasks, translation, the
pretrained Marian fine-tune and the LoRA fine-tune of a small Llama; 3 seeds on the small tasks, 2 on the others).
Runs go to ``<output_dir>/apo_lr_runs/<task>.jsonl``, shared with ``apo_lr_peers.py``: its AdamW runs are this
study's baselines and are read back, not run again.

Methods, every one under the Trainer's default linear decay to 0 (no warm-up) unless said, no weight decay:

* **tuned AdamW with a schedule**: AdamW-linear on the 5-point grid (``apo_lr_peers.GRIDS``; its best LR is the
  *tuned LR*) and AdamW with 5% warm-up + cosine (the grid on the small tasks, the tuned LR and its two neighbours on
  the others). The baseline of a scenario is the better of the two at its best LR.
* **SOAP** (heavyball, eager, its defaults) at its own tuned LR: the best of tuned LR × {1/3, 1, 3}.
* **Candidates** (:data:`CANDIDATES`), over AdamW at the tuned LR:

  - ``precond_same``: ``--apo precond`` over ``adamw_torch`` as it ships (the factors carry size and shape; the
    paper's same-batch objective, λ_FSD 10, meta_lr 0.01, K 10);
  - ``split_same``: shape-only factors from the same-batch objective (λ_FSD 10), the size learned by APO-LR;
  - ``split_next``: shape-only factors from the next batch's gradient (``--apo_loss_batch next``: the factors'
    hypergradient, a VJP, no look-ahead), the size learned by APO-LR;
  - ``shape_next``: shape-only factors from the next gradient, the size the schedule's (what the shape alone does).

Score of a run: its final validation loss, except on digits_classification (over-fitting: train loss ~1e-4), where
it is the best validation loss along the run (every 300 steps). A diverged seed is infinitely bad; a scenario's
value for a method is the mean over its seeds.

The rule, written before the runs:

* **Stage 1**: the four candidates on the three small tasks; ranked in each scenario, ordered by mean rank.
* **Stage 2**: the best two of stage 1 and ``precond_same`` (the shipping setting) on translation, finetune and lora.
  The winner is the best mean rank among these finalists over all six scenarios.
* Mean ranks within 0.25 of each other are a tie, resolved for fewer forward/backward passes per step (the
  next-batch factors need none), then for ``precond_same``. The winner's settings become ``--apo precond``'s
  defaults over AdamW (``--apo_precond_size``, ``--apo_loss_batch``, λ_FSD).
* The report states the issue's targets for every candidate, met or not with the numbers: beats tuned AdamW with a
  schedule on ≥ 4 of 6 scenarios, the fine-tune among them, and is never more than 2% worse; within 10% of SOAP's
  loss at equal steps on ≥ 3 of 6; ahead of SOAP at equal wall-clock on the fine-tune (each method's loss at the last
  evaluation before the shorter run's training time; on the Trainer scenarios a run's time at an evaluation is taken
  as its wall time × step / steps). The cost targets (≤ 1.15× AdamW's step at 4k tokens, peak ≤ 1.5×) are measured
  by ``overhead.py``; bf16 autocast against float32 (the winner, seed 0, the small tasks) by ``--phase precision``,
  added after the rule's runs.

Usage::

    python benchmarks/apo_precond_split.py run --tasks teacher_student --phase baselines
    python benchmarks/apo_precond_split.py run --tasks teacher_student --phase candidates --stage 1
    python benchmarks/apo_precond_split.py run --tasks translation --phase candidates --stage 2
    python benchmarks/apo_precond_split.py run --tasks teacher_student --phase precision   # bf16 autocast vs fp32
    python benchmarks/apo_precond_split.py report
    python benchmarks/apo_precond_split.py run --quick --output_dir /tmp/split --tasks digits_autoencoder --phase all
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.apo_lr_defaults import meta_passes
from benchmarks.apo_lr_peers import (
    GRIDS, SCENARIOS, SMALL, adamw_name, best_linear_lr, cell_value, cosine_lrs, run_adamw,
    phased_main, run_score, runs_by, seeds_of, tuned_baseline,
)
from benchmarks.common import MethodSpec, environment, save_figure
from benchmarks.sweep import (
    LONG_BUDGETS, QUICK_BUDGET, TRAINER_TASKS, Sweep, load_runs, mean_ranks, ordered_by_rule as rule_order,
)

# APO-Precond over AdamW: meta_lr 0.01 and K 10 (the shipping values); the factors' objective and the size's learner
_FACTORS = dict(meta_lr=0.01, meta_interval=10, lambda_wsd=0.0, horizon=1.0)
CANDIDATES: dict[str, dict] = {name: {**_FACTORS, **settings} for name, settings in {
    "precond_same": dict(precond_size="factors", loss_batch="same", lambda_fsd=10.0),  # as it ships
    "split_same": dict(precond_size="lr", loss_batch="same", lambda_fsd=10.0),
    "split_next": dict(precond_size="lr", loss_batch="next", lambda_fsd=0.0),
    "shape_next": dict(precond_size="shape", loss_batch="next", lambda_fsd=0.0),
}.items()}
SHIPPING = "precond_same"
FINALISTS_FROM_STAGE_1 = 2
TIE = 0.25
SOAP_FACTORS = (1 / 3, 1.0, 3.0)


def precond_name(candidate: str) -> str:
    return f"precond_{candidate}" if not candidate.startswith("precond_") else candidate


def spec_of(candidate: str, lr: float) -> MethodSpec:
    """A candidate over AdamW under the linear decay."""
    return MethodSpec(precond_name(candidate), "apo_precond", lr=lr, schedule="linear", precond_base="adamw",
                      **CANDIDATES[candidate])


def trainer_args(candidate: str) -> dict:
    s = CANDIDATES[candidate]
    return {"apo": "precond", "apo_precond_size": s["precond_size"], "apo_loss_batch": s["loss_batch"],
            "apo_lambda_fsd": s["lambda_fsd"], "apo_meta_lr": s["meta_lr"], "apo_meta_interval": s["meta_interval"]}


def run_candidate(sweep: Sweep, candidate: str, lr: float) -> list[dict]:
    name = precond_name(candidate)
    if sweep.task in TRAINER_TASKS:
        return sweep.run(name, lr, apo_args=trainer_args(candidate))
    return sweep.run(name, lr, spec=spec_of(candidate, lr))


def soap_lrs(tuned: float) -> list[float]:
    return [float(f"{tuned * factor:.3g}") for factor in SOAP_FACTORS]


def run_soap(sweep: Sweep, lr: float) -> list[dict]:
    spec = MethodSpec("soap_linear", "soap", lr=lr, schedule="linear")
    return sweep.run("soap_linear", lr, spec=spec, apo_args={"apo": "none"})


def run_baselines(sweep: Sweep) -> None:
    best = best_linear_lr(sweep)
    for lr in cosine_lrs(sweep.task, best):
        run_adamw(sweep, "warmup_cosine", lr)
    for lr in soap_lrs(best):
        run_soap(sweep, lr)


PRECISION_STORE = "apo_precond_split_precision"
PRECISION_CANDIDATE = "split_same"  # the rule's winner


def run_precision(sweep: Sweep, output_dir: Path) -> None:
    """``--phase precision``: the winner at the tuned LR, seed 0, in float32 and under bf16 autocast, side by side in
    one process (a store of its own: the rule's runs are float32)."""
    if sweep.task not in SMALL:
        raise SystemExit(f"--phase precision runs on the small tasks ({', '.join(SMALL)}), not {sweep.task}.")
    best = best_linear_lr(sweep)
    pair = Sweep(sweep.task, output_dir, sweep.quick, store=PRECISION_STORE, seeds=(0,))
    spec = spec_of(PRECISION_CANDIDATE, best)
    for precision in ("fp32", "bf16_autocast"):
        pair.run(spec.name, best, spec=spec, precision=precision)


def precision_changes(output_dir: Path, quick: bool) -> dict[str, float]:
    """Task → the winner's relative change of the final validation loss under bf16 autocast (seed 0)."""
    out = {}
    for task in SMALL:
        rows = {r["precision"]: r for r in load_runs(output_dir, task, store=PRECISION_STORE)
                if r["steps"] == (QUICK_BUDGET if quick else LONG_BUDGETS[task])[0]}
        if {"fp32", "bf16_autocast"} <= rows.keys():
            out[task] = run_score(task, rows["bf16_autocast"]) / run_score(task, rows["fp32"]) - 1
    return out


def run_candidates(sweep: Sweep, names: list[str]) -> None:
    best = best_linear_lr(sweep)
    for name in names:
        run_candidate(sweep, name, best)


# ---------------------------------------------------------------------------------------------------------------
# the rule
# ---------------------------------------------------------------------------------------------------------------
def scenario_values(output_dir: Path, task: str, quick: bool) -> dict | None:
    """method → (value, rows) for the scenario at its tuned LR; None until the linear grid has run."""
    by = runs_by(output_dir, task, quick)
    tuned = tuned_baseline(task, by, quick)
    if tuned is None:
        return None
    best, _ = tuned
    enough = seeds_of(task, quick)
    out = {}

    def best_of(name, lrs):
        finished = [(cell_value(task, by[(name, lr)]), lr) for lr in lrs if len(by.get((name, lr), [])) >= enough]
        if len(finished) == len(lrs):
            value, lr = min(finished)
            out[name] = {"value": value, "lr": lr, "rows": by[(name, lr)]}

    best_of(adamw_name(task, "linear"), GRIDS[task])
    best_of(adamw_name(task, "warmup_cosine"), list(cosine_lrs(task, best)))
    best_of("soap_linear", soap_lrs(best))
    for candidate in CANDIDATES:
        best_of(precond_name(candidate), [best])
    return out


def baseline_value(task: str, values: dict) -> float | None:
    """The better of AdamW-linear and AdamW warm-up + cosine at their best LRs: tuned AdamW with a schedule."""
    names = [adamw_name(task, s) for s in ("linear", "warmup_cosine")]
    if not all(n in values for n in names):
        return None
    return min(values[n]["value"] for n in names)


def ordered_by_rule(scores: dict[str, float]) -> list[str]:
    return rule_order(scores, TIE, lambda n: (meta_passes(CANDIDATES[n]), n != SHIPPING))


def candidate_table(values_by_task: dict) -> dict[str, dict[str, float]]:
    return {task: {c: v[precond_name(c)]["value"] for c in CANDIDATES if precond_name(c) in v}
            for task, v in values_by_task.items() if v}


def finalists(output_dir: Path, quick: bool) -> list[str]:
    table = candidate_table({t: scenario_values(output_dir, t, quick) for t in SMALL})
    scores = mean_ranks(table, list(CANDIDATES))
    if sum(len(e) == len(CANDIDATES) for e in table.values()) < len(SMALL):
        raise SystemExit("stage 1 has not finished on the small tasks: run --phase candidates --stage 1 first.")
    chosen = ordered_by_rule(scores)[:FINALISTS_FROM_STAGE_1]
    return chosen + ([SHIPPING] if SHIPPING not in chosen else [])


def loss_at_time(row: dict, seconds: float) -> float:
    """The validation loss at the last evaluation before ``seconds`` of training (see the module docstring)."""
    times = row.get("train_time") or [row["wall_s"] * s / row["steps"] for s in row["eval_steps"]]
    reached = [loss for t, loss in zip(times, row["losses"]) if t <= seconds + 1e-9]
    return reached[-1] if reached else row["losses"][0]


def equal_time_ratio(task: str, mine: list[dict], soap: list[dict]) -> float:
    """Mean over seeds of (my loss / SOAP's) at the shorter of the two runs' training times."""
    ratios = []
    for a, b in zip(sorted(mine, key=lambda r: r["seed"]), sorted(soap, key=lambda r: r["seed"])):
        end = min((a.get("train_time") or [a["wall_s"]])[-1], (b.get("train_time") or [b["wall_s"]])[-1])
        ratios.append(loss_at_time(a, end) / loss_at_time(b, end))
    return sum(ratios) / len(ratios) if ratios else math.nan


def targets(candidate: str, values_by_task: dict) -> dict:
    name = precond_name(candidate)
    versus_adamw, versus_soap, finetune_time = {}, {}, None
    for task, values in values_by_task.items():
        if not values or name not in values:
            continue
        base = baseline_value(task, values)
        if base is not None:
            versus_adamw[task] = values[name]["value"] / base - 1
        if "soap_linear" in values:
            versus_soap[task] = values[name]["value"] / values["soap_linear"]["value"] - 1
            if task == "finetune":
                finetune_time = equal_time_ratio(task, values[name]["rows"], values["soap_linear"]["rows"]) - 1
    beats = [t for t, d in versus_adamw.items() if d < 0]
    return {
        "versus_adamw": versus_adamw, "versus_soap": versus_soap, "finetune_versus_soap_equal_time": finetune_time,
        "beats_adamw_4_of_6": len(versus_adamw) == len(SCENARIOS) and len(beats) >= 4 and "finetune" in beats,
        "never_2pct_worse": len(versus_adamw) == len(SCENARIOS) and all(d <= 0.02 for d in versus_adamw.values()),
        "within_10pct_of_soap_3_of_6": sum(d <= 0.10 for d in versus_soap.values()) >= 3,
        "ahead_of_soap_equal_time_finetune": finetune_time is not None and finetune_time < 0,
    }


def summarize(output_dir: Path, quick: bool) -> dict:
    values_by_task = {t: scenario_values(output_dir, t, quick) for t in SCENARIOS}
    table = candidate_table(values_by_task)
    stage1 = mean_ranks({t: table[t] for t in SMALL if t in table}, list(CANDIDATES))
    stage1_done = sum(len(table.get(t, {})) == len(CANDIDATES) for t in SMALL) == len(SMALL)
    chosen = ordered_by_rule(stage1)[:FINALISTS_FROM_STAGE_1] if stage1_done else []
    chosen += [SHIPPING] if chosen and SHIPPING not in chosen else []
    stage2 = mean_ranks(table, chosen) if chosen else {}
    stage2_done = bool(chosen) and all(all(c in table.get(t, {}) for c in chosen) for t in SCENARIOS)
    return {
        "scenarios": {t: {m: {"value": v["value"], "lr": v["lr"], "seeds": [r["final"] for r in v["rows"]]}
                          for m, v in (values or {}).items()} for t, values in values_by_task.items()},
        "baseline": {t: baseline_value(t, v) for t, v in values_by_task.items() if v},
        "stage1": stage1, "finalists": chosen, "stage2": stage2,
        "winner": ordered_by_rule(stage2)[0] if stage2_done else None,
        "targets": {c: targets(c, values_by_task) for c in CANDIDATES},
        "bf16_autocast_change": precision_changes(output_dir, quick),
    }


def pct(value) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{100 * value:+.1f}%"


def markdown(summary: dict) -> str:
    lines = ["# APO-Precond over AdamW: size and shape apart (issue 18)", "",
             "Generated by `python benchmarks/apo_precond_split.py report` (the rule is in the script's docstring). "
             "Values: mean final validation loss over the seeds (digits_classification: best along the run); the "
             "percentages are against tuned AdamW with a schedule (the better of linear decay and warm-up + cosine at "
             "their best LRs).", "",
             "| scenario | AdamW linear | AdamW cosine | SOAP | " + " | ".join(CANDIDATES) + " |",
             "|---|---|---|---|" + "---|" * len(CANDIDATES)]
    for task in SCENARIOS:
        values, base = summary["scenarios"].get(task, {}), summary["baseline"].get(task)

        def cell(method):
            v = values.get(method)
            if v is None:
                return "—"
            text = f"{v['value']:.4g} (lr {v['lr']:.2g})"
            return text + (f" {pct(v['value'] / base - 1)}" if base and method.startswith("precond_") else "")

        row = [cell(adamw_name(task, "linear")), cell(adamw_name(task, "warmup_cosine")), cell("soap_linear")]
        lines.append(f"| {task} | " + " | ".join(row + [cell(precond_name(c)) for c in CANDIDATES]) + " |")
    lines += ["", "## The rule", "",
              "Stage 1 (small tasks): " + (", ".join(f"{n} {r:.2f}" for n, r in sorted(
                  summary["stage1"].items(), key=lambda x: x[1])) or "not run") + ".",
              f"Finalists: {', '.join(summary['finalists']) or '—'}. Stage 2 (all six): " + (", ".join(
                  f"{n} {r:.2f}" for n, r in sorted(summary["stage2"].items(), key=lambda x: x[1])) or "—") + ".",
              "", f"**Winner by the rule: {summary['winner'] or 'not decided yet'}**", "", "## Targets", "",
              "| candidate | vs tuned AdamW per scenario | beats it on ≥ 4/6 with finetune | never > 2% worse | "
              "within 10% of SOAP on ≥ 3/6 | ahead of SOAP at equal time (finetune) |", "|---|---|---|---|---|---|"]
    bf16 = summary.get("bf16_autocast_change") or {}
    tail = ["", f"## bf16 autocast ({PRECISION_CANDIDATE}, seed 0, `--phase precision`)", "",
            (", ".join(f"{task} {pct(d)}" for task, d in bf16.items()) + " against float32: within 1% "
             + ("**met**" if all(abs(d) <= 0.01 for d in bf16.values()) else "**not met**")
             + (f" on {len(bf16)} of {len(SMALL)} tasks" if len(bf16) < len(SMALL) else "") + ".") if bf16 else "not run."]
    for c, t in summary["targets"].items():
        per = ", ".join(f"{task} {pct(d)}" for task, d in t["versus_adamw"].items()) or "—"
        yes = {True: "met", False: "not met"}
        lines.append(f"| {c} | {per} | {yes[t['beats_adamw_4_of_6']]} | {yes[t['never_2pct_worse']]} | "
                     f"{yes[t['within_10pct_of_soap_3_of_6']]} | {yes[t['ahead_of_soap_equal_time_finetune']]} "
                     f"({pct(t['finetune_versus_soap_equal_time'])}) |")
    return "\n".join(lines + tail) + "\n"


def plot(output_dir: Path, quick: bool) -> Path | None:
    """Per scenario: the seed-mean validation loss along the run of the baselines, SOAP and the candidates, each at
    the LR the table reports."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values_by_task = {t: v for t in SCENARIOS if (v := scenario_values(output_dir, t, quick))}
    if not values_by_task:
        return None
    figure, axes = plt.subplots(1, len(values_by_task), figsize=(4.2 * len(values_by_task), 3.6), squeeze=False)
    for axis, (task, values) in zip(axes[0], values_by_task.items()):
        for method, v in values.items():
            length = min(len(r["losses"]) for r in v["rows"])
            curve = [statistics.fmean(r["losses"][i] for r in v["rows"]) for i in range(length)]
            style = "-" if method.startswith("precond_") else "--"
            axis.plot(v["rows"][0]["eval_steps"][:length], curve, style, label=method, linewidth=1.2)
        axis.set(yscale="log", title=task, xlabel="step")
    axes[0][0].set_ylabel("validation loss (seed mean)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(figure, output_dir / "apo_precond_split.png", dpi=90)


def write_report(output_dir: Path, quick: bool) -> dict:
    summary = summarize(output_dir, quick)
    plot(output_dir, quick)
    stem = output_dir / "apo_precond_split"
    stem.with_suffix(".md").write_text(markdown(summary))
    stem.with_suffix(".json").write_text(json.dumps({**summary, "environment": environment()}, indent=1,
                                                    default=str) + "\n")
    print(markdown(summary))
    return summary


def main(argv=None) -> None:
    phased_main(__doc__, CANDIDATES, run_baselines, run_candidates, finalists, write_report, argv,
                extra_phases={"precision": run_precision})


if __name__ == "__main__":
    main()
