"""What APO buys: final validation loss, steps and wall-clock to tuned AdamW's loss, and bf16 robustness.

Four tasks that run offline on 2 CPU cores:

* ``diabetes``: regression on sklearn's ``load_diabetes`` (MLP 10-64-64-1, Gaussian NLL ½(y − f)², standardized
  target), APO's function-space term the squared-error divergence;
* ``digits_autoencoder``: an MLP autoencoder 64-32-8-32-64 on sklearn's ``load_digits`` (pixels in [0, 1],
  ½‖x − x̂‖² per image), squared-error divergence;
* ``digits_classification``: MLP 64-128-10 on ``load_digits``, cross-entropy, KL divergence;
* ``translation``: the translation example's offline task (English → German number words, its tokenizer and its
  model config from ``examples/translation/offline_default.py``, built from scratch), token cross-entropy, KL.

Every optimizer gets the same step budget, the same batches and the same initialization for a given seed
(paired comparisons), and the same plain loop (``common.train_step``). Per task:

1. AdamW on a 5-point constant-LR grid; AdamW with 5% linear warmup + cosine decay to 0 on the grid as well
   (``translation``: at the best constant LR and the next grid point up, to save time) — the best of all these
   is *tuned AdamW*, whose final loss is the target for "steps to reach";
2. APO-LR over AdamW, no schedule, from initial LRs 1e-5, 1e-4, 1e-3, 1e-2;
3. SGD with momentum 0.9 on a 3-point grid and plain SGD on that grid × 10 (the same effective steps η/(1 − μ));
   APO-Precond over each at that base's best LR;
4. peers: Prodigy (lr 1), schedule-free AdamW (evaluated in its eval() mode) and heavyball SOAP (eager), the two
   latter at the best constant AdamW LR (transferred, not tuned: a stated limitation);
5. bf16: the selected methods again with the model's weights in bfloat16 (``--bf16_mode weights``, the default) or
   under CPU autocast (``--bf16_mode autocast``); validation loss is always computed in float32;
6. on ``digits_classification`` and ``diabetes`` a sweep of APO-LR's lambda_fsd × meta_lr (from LR 1e-4 and 1e-3),
   meta interval × meta batch fraction, lambda_wsd without lambda_fsd, and APO-Precond's meta_lr: the evidence for
   the recommended defaults.

Each finished run is appended to ``<output_dir>/quality_runs/<task>.jsonl``; a rerun reads those back instead of
training them again, so a killed run resumes (delete the folder, or pass ``--fresh``, after changing an optimizer;
it is a local cache, not committed: quality.json is the record).

Usage::

    python benchmarks/quality.py                       # full run (about 40 minutes of one CPU core)
    python benchmarks/quality.py --quick --output_dir /tmp/quality
    python benchmarks/quality.py --tasks digits_classification --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    DEFAULT_OUTPUT_DIR,
    MethodSpec,
    append_run,
    apo_lr_defaults,
    environment,
    finish_environment,
    markdown_table,
    progress,
    read_runs,
    save_figure,
    write_json,
)
from benchmarks.tasks import TASKS, Task, TaskData, run_once

APO_LR_INITS = (1e-5, 1e-4, 1e-3, 1e-2)


# ---------------------------------------------------------------------------------------------------------------
# aggregation
# ---------------------------------------------------------------------------------------------------------------
def aggregate(runs: list[dict], eval_steps: list[int]) -> dict:
    """Mean and std of the final loss over seeds, and the mean curve (a diverged seed makes the mean inf)."""
    finals = [r["final"] for r in runs]
    finite = all(math.isfinite(f) for f in finals)
    mean = statistics.fmean(finals) if finite else math.inf
    std = statistics.stdev(finals) if finite and len(finals) > 1 else (0.0 if finite else math.inf)
    curve, time_curve = [], []
    for index, _ in enumerate(eval_steps):
        values = [r["losses"][index] if index < len(r["losses"]) and not r["diverged"] else math.inf for r in runs]
        curve.append(statistics.fmean(values) if all(math.isfinite(v) for v in values) else math.inf)
        spent = [r["train_time"][index] for r in runs if index < len(r["train_time"])]
        time_curve.append(statistics.fmean(spent) if spent else math.nan)
    return {"final_mean": mean, "final_std": std, "finals": finals, "diverged_seeds": sum(r["diverged"] for r in runs),
            "curve_steps": eval_steps, "mean_curve": curve, "mean_train_time_curve": time_curve,
            "train_time_s": statistics.fmean(r["total_train_time"] for r in runs)}


def steps_to_reach(entry: dict, target: float) -> tuple[int | None, float | None]:
    """First evaluation step at which the seed-mean validation loss is ≤ target, and the mean train time to it."""
    for step, loss, spent in zip(entry["curve_steps"], entry["mean_curve"], entry["mean_train_time_curve"]):
        if math.isfinite(loss) and loss <= target:
            return step, spent
    return None, None


class TaskRunner:
    """Runs the methods of one task over the seeds, caching results by (method name, precision).

    With ``runs_file``, each finished run is appended to it as one JSON line and a run already there (same spec,
    seed, precision and budget) is read back instead of trained, so a killed benchmark resumes where it stopped.
    """

    def __init__(self, task: Task, data: TaskData, seeds: list[int], bar, runs_file: Path | None = None):
        self.task, self.data, self.seeds, self.bar = task, data, seeds, bar
        self.specs: dict[str, MethodSpec] = {}
        self.results: dict[tuple[str, str], dict] = {}
        self.eval_steps = list(dict.fromkeys([0, *range(task.eval_every, task.steps + 1, task.eval_every), task.steps]))
        self.runs_file = runs_file
        self.done: dict[str, dict] = {}
        self.trained = self.read_back = 0  # runs trained now / taken from runs_file
        for row in read_runs(runs_file) if runs_file is not None else []:
            spec, *rest = json.loads(row["key"])
            self.done[_key(spec, *rest)] = row["result"]

    def _run_key(self, spec: MethodSpec, seed: int, precision: str) -> str:
        return _key(spec.to_dict(), seed, precision, self.task.steps, self.task.eval_every, self.task.batch_size)

    def _run_once(self, spec: MethodSpec, seed: int, precision: str) -> dict:
        key = self._run_key(spec, seed, precision)
        if key in self.done:
            self.read_back += 1
        else:
            self.trained += 1
            self.done[key] = run_once(self.task, self.data, spec, seed, precision)
            if self.runs_file is not None:
                append_run(self.runs_file, {"key": key, "result": self.done[key]})
        return self.done[key]

    def run(self, spec: MethodSpec, precision: str = "fp32") -> dict:
        key = (spec.name, precision)
        if key not in self.results:
            self.specs[spec.name] = spec
            runs = []
            for seed in self.seeds:
                if self.bar is not None:
                    self.bar.set_postfix_str(f"{self.task.name} {spec.name} {precision} seed {seed}")
                runs.append(self._run_once(spec, seed, precision))
                if self.bar is not None:
                    self.bar.update()
            entry = aggregate(runs, self.eval_steps)
            entry["spec"] = spec.to_dict()
            entry["precision"] = precision
            entry["lr_traces"] = [r["lr_trace"][:: max(1, self.task.steps // 200)] for r in runs] if runs[0]["lr_trace"] else None
            entry["lr_trace_every"] = max(1, self.task.steps // 200)
            self.results[key] = entry
        return self.results[key]

    def best(self, names: list[str], precision: str = "fp32") -> str:
        return min(names, key=lambda n: self.results[(n, precision)]["final_mean"])


_SPEC_DEFAULTS = {f.name: f.default for f in dataclasses.fields(MethodSpec)}


def _key(spec: dict, *run) -> str:
    """A run's key: the spec's fields that differ from MethodSpec's defaults, and the run's seed, precision and budget.

    Leaving the defaults out keeps the runs on file valid when MethodSpec gains a field whose default is the old
    behaviour.
    """
    changed = {k: v for k, v in spec.items() if k not in _SPEC_DEFAULTS or v != _SPEC_DEFAULTS[k]}
    return json.dumps([changed, *run], sort_keys=True)


def lr_name(prefix: str, lr: float) -> str:
    return f"{prefix}_{lr:.0e}"


def run_task(task: Task, args, bar) -> dict:
    torch.set_num_threads(args.threads)
    data = task.load(args.quick)
    runs_file = None if args.fresh else args.output_dir / "quality_runs" / f"{task.name}.jsonl"
    runner = TaskRunner(task, data, args.seeds, bar, runs_file)
    methods = set(args.methods) if args.methods else None

    def wanted(group: str) -> bool:
        return methods is None or group in methods

    # 1. AdamW, constant LR grid, then warmup + cosine decay
    const = [runner.run(MethodSpec(lr_name("adamw", lr), "adamw", lr=lr)).get("spec")["name"] for lr in task.adamw_lrs]
    best_const = runner.best(const)
    best_const_lr = runner.specs[best_const].lr
    grid = list(task.adamw_lrs)
    if task.decay_search == "grid":
        decay_lrs = grid
    else:
        position = grid.index(best_const_lr)
        decay_lrs = grid[position:position + 2]
    decay = [runner.run(MethodSpec(lr_name("adamw_decay", lr), "adamw", lr=lr, schedule="warmup_cosine"))["spec"]["name"]
             for lr in decay_lrs]
    best_decay = runner.best(decay)
    selected = {"adamw_best_constant": best_const, "adamw_tuned_decay": best_decay}

    # 2. APO-LR from several initial LRs, no schedule
    if wanted("apo_lr"):
        for lr in args.apo_lr_inits:
            name = f"apo_lr_{lr:.0e}"
            runner.run(MethodSpec(name, "apo_lr", lr=lr, **apo_lr_defaults()))
            selected[name] = name

    # 3. SGD(momentum 0.9) grid, APO-Precond over it and over plain SGD
    if wanted("apo_precond"):
        sgdm = [runner.run(MethodSpec(lr_name("sgdm", lr), "sgd", lr=lr, momentum=0.9))["spec"]["name"] for lr in task.sgd_lrs]
        best_sgdm = runner.best(sgdm)
        sgd_lr = runner.specs[best_sgdm].lr
        runner.run(MethodSpec("apo_precond_sgdm", "apo_precond", lr=sgd_lr, momentum=0.9))
        # plain SGD on the same grid scaled by 1/(1 − μ) = 10 (the same effective steps), APO-Precond at its best
        plain = [runner.run(MethodSpec(lr_name("sgd", 10 * lr), "sgd", lr=10 * lr))["spec"]["name"] for lr in task.sgd_lrs]
        best_plain = runner.best(plain)
        runner.run(MethodSpec("apo_precond_sgd", "apo_precond", lr=runner.specs[best_plain].lr))
        selected.update(sgdm_best=best_sgdm, sgd_plain=best_plain, apo_precond_sgdm="apo_precond_sgdm",
                        apo_precond_sgd="apo_precond_sgd")

    # 4. peers
    if wanted("peers"):
        runner.run(MethodSpec("prodigy", "prodigy", lr=1.0))
        runner.run(MethodSpec("sf_adamw", "sf_adamw", lr=best_const_lr))
        runner.run(MethodSpec("soap", "soap", lr=best_const_lr))
        selected.update(prodigy="prodigy", sf_adamw="sf_adamw", soap="soap")

    # 5. bf16
    bf16 = {}
    if args.bf16_mode != "none":
        precision = f"bf16_{args.bf16_mode}"
        chosen = task.bf16_methods or tuple(selected)
        if args.quick:
            chosen = [c for c in chosen if c.startswith("apo_")][:2] or list(selected)[:1]
        for label in chosen:
            if label not in selected:
                continue
            name = selected[label]
            entry = runner.run(runner.specs[name], precision)
            base = runner.results[(name, "fp32")]
            change = (entry["final_mean"] - base["final_mean"]) / base["final_mean"] if math.isfinite(entry["final_mean"]) else math.inf
            bf16[label] = {"method": name, "fp32_final_mean": base["final_mean"], "bf16_final_mean": entry["final_mean"],
                           "bf16_final_std": entry["final_std"], "relative_change": change,
                           "bf16_diverged_seeds": entry["diverged_seeds"]}

    # 6. sweep for the defaults
    sweep = run_sweep(runner, args) if (task.sweep and wanted("sweep") and not args.no_sweep) else None

    # targets and steps-to-reach
    target = min(runner.results[(n, "fp32")]["final_mean"] for n in const + decay)
    tuned_name = min(const + decay, key=lambda n: runner.results[(n, "fp32")]["final_mean"])
    tuned_steps, _ = steps_to_reach(runner.results[(tuned_name, "fp32")], target)
    methods_out = {}
    for (name, precision), entry in runner.results.items():
        steps, seconds = steps_to_reach(entry, target)
        entry["steps_to_tuned_adamw_loss"] = steps
        entry["seconds_to_tuned_adamw_loss"] = seconds
        entry["steps_ratio_to_tuned_adamw"] = (steps / tuned_steps) if steps and tuned_steps else None
        methods_out[name if precision == "fp32" else f"{name}@{precision}"] = entry
    return {
        "description": task.description, "divergence": task.divergence, "steps": task.steps,
        "batch_size": task.batch_size, "eval_every": task.eval_every, "seeds": args.seeds, "threads": args.threads,
        "target_loss": target, "tuned_adamw": tuned_name, "tuned_adamw_steps_to_target": tuned_steps,
        "best_constant_lr": best_const_lr, "selected": selected, "methods": methods_out, "bf16": bf16,
        "bf16_mode": args.bf16_mode, "sweep": sweep,
        "train_examples": data.size, "model_info": data.info,
        "runs_trained": runner.trained, "runs_read_back": runner.read_back,
    }


SWEEP_LAMBDA_FSD = (1.0, 10.0, 30.0)
SWEEP_META_LR = (0.03, 0.1, 0.3)
SWEEP_PRECOND_META_LR = (3e-3, 1e-2, 3e-2)


def run_sweep(runner: TaskRunner, args) -> dict:
    """APO-LR: lambda_fsd × meta_lr from two initial LRs; K × meta batch fraction; lambda_wsd alone. APO-Precond:
    meta_lr. Each entry: mean final loss over the seeds."""
    out = {"apo_lr_lambda_meta_lr": {}, "apo_lr_interval_fraction": {}, "apo_lr_wsd": {}, "apo_precond_meta_lr": {}}
    lambdas = SWEEP_LAMBDA_FSD if not args.quick else (10.0,)
    meta_lrs = SWEEP_META_LR if not args.quick else (0.1,)
    inits = (1e-4, 1e-3) if not args.quick else (1e-4,)
    for init in inits:
        for lam in lambdas:
            for meta_lr in meta_lrs:
                name = f"sweep_apo_lr_{init:.0e}_fsd{lam:g}_mlr{meta_lr:g}"
                entry = runner.run(MethodSpec(name, "apo_lr", lr=init, lambda_fsd=lam, meta_lr=meta_lr))
                out["apo_lr_lambda_meta_lr"][name] = _sweep_entry(entry, init=init, lambda_fsd=lam, meta_lr=meta_lr)
    if args.quick:
        return out
    for init in inits:
        for interval in (10, 16):
            for fraction in (0.25, 1.0):
                name = f"sweep_apo_lr_{init:.0e}_K{interval}_frac{fraction:g}"
                entry = runner.run(MethodSpec(name, "apo_lr", lr=init, meta_interval=interval, meta_batch_fraction=fraction))
                out["apo_lr_interval_fraction"][name] = _sweep_entry(entry, init=init, meta_interval=interval,
                                                                     meta_batch_fraction=fraction)
        for wsd in (0.1, 1.0, 10.0):
            name = f"sweep_apo_lr_{init:.0e}_fsd0_wsd{wsd:g}"
            entry = runner.run(MethodSpec(name, "apo_lr", lr=init, lambda_fsd=0.0, lambda_wsd=wsd))
            out["apo_lr_wsd"][name] = _sweep_entry(entry, init=init, lambda_fsd=0.0, lambda_wsd=wsd)
    if "apo_precond_sgdm" in runner.specs:
        base = runner.specs["apo_precond_sgdm"]
        for meta_lr in SWEEP_PRECOND_META_LR:
            name = f"sweep_apo_precond_sgdm_mlr{meta_lr:g}"
            entry = runner.run(base.with_(name=name, meta_lr=meta_lr))
            out["apo_precond_meta_lr"][name] = _sweep_entry(entry, meta_lr=meta_lr)
    return out


def _sweep_entry(entry: dict, **settings) -> dict:
    return {**settings, "final_mean": entry["final_mean"], "final_std": entry["final_std"],
            "diverged_seeds": entry["diverged_seeds"]}


# ---------------------------------------------------------------------------------------------------------------
# claims, defaults, report
# ---------------------------------------------------------------------------------------------------------------
def claims(tasks: dict) -> dict:
    """Each claim per task, with the numbers, judged as measured."""
    out: dict = {"apo_lr_beats_best_fixed_lr": {}, "apo_lr_within_2pct_of_tuned_decay": {},
                 "apo_precond_competitive_with_second_order_and_0.7x_steps": {}, "bf16_changes_apo_by_lt_1pct": {}}
    for name, task in tasks.items():
        methods = task["methods"]
        best_fixed = methods[task["selected"]["adamw_best_constant"]]["final_mean"]
        decay = methods[task["selected"]["adamw_tuned_decay"]]["final_mean"]
        apo = {k: methods[k] for k in task["selected"] if k.startswith("apo_lr_")}
        if apo:
            rel_fixed = {k: (v["final_mean"] - best_fixed) / best_fixed for k, v in apo.items()}
            rel_decay = {k: (v["final_mean"] - decay) / decay for k, v in apo.items()}
            out["apo_lr_beats_best_fixed_lr"][name] = {
                "best_fixed": best_fixed, "apo_lr": {k: v["final_mean"] for k, v in apo.items()},
                "relative_to_best_fixed": rel_fixed, "holds_for": [k for k, r in rel_fixed.items() if r < 0],
                "holds": all(r < 0 for r in rel_fixed.values()),
            }
            out["apo_lr_within_2pct_of_tuned_decay"][name] = {
                "tuned_decay": decay, "relative_to_tuned_decay": rel_decay,
                "holds_for": [k for k, r in rel_decay.items() if r <= 0.02],
                "holds": all(r <= 0.02 for r in rel_decay.values()),
            }
        if "apo_precond_sgdm" in methods and "soap" in methods:
            peer = methods["soap"]["final_mean"]
            entry = {"soap": peer, "tuned_adamw_steps": task["tuned_adamw_steps_to_target"]}
            verdicts = []
            for key in ("apo_precond_sgdm", "apo_precond_sgd"):
                m = methods[key]
                ratio = m["steps_ratio_to_tuned_adamw"]
                competitive = m["final_mean"] <= 1.02 * peer
                fast = ratio is not None and ratio <= 0.7
                entry[key] = {"final_mean": m["final_mean"], "relative_to_soap": (m["final_mean"] - peer) / peer,
                              "competitive_within_2pct": competitive, "steps_to_target": m["steps_to_tuned_adamw_loss"],
                              "steps_ratio": ratio, "le_0.7x_steps": fast}
                verdicts.append(competitive and fast)
            entry["soap_steps_ratio"] = methods["soap"]["steps_ratio_to_tuned_adamw"]
            entry["holds"] = any(verdicts)
            out["apo_precond_competitive_with_second_order_and_0.7x_steps"][name] = entry
        apo_bf16 = {k: v for k, v in task["bf16"].items() if k.startswith("apo_")}
        if apo_bf16:
            out["bf16_changes_apo_by_lt_1pct"][name] = {
                "relative_change": {k: v["relative_change"] for k, v in apo_bf16.items()},
                "others_relative_change": {k: v["relative_change"] for k, v in task["bf16"].items() if not k.startswith("apo_")},
                "holds": all(abs(v["relative_change"]) < 0.01 for v in apo_bf16.values()),
            }
    for claim, per_task in out.items():
        per_task_holds = [v["holds"] for v in per_task.values()]
        out[claim] = {"per_task": per_task, "holds_on": f"{sum(per_task_holds)}/{len(per_task_holds)} tasks"}
    return out


def recommend_defaults(tasks: dict, overhead: dict | None) -> dict:
    """Defaults from the sweeps: the setting with the best mean rank over tasks and initial LRs."""
    rec: dict = {"evidence": {}}

    def ranked(group: str, keys: tuple[str, ...]) -> list[tuple[tuple, float]]:
        # relative loss to tuned AdamW, averaged over (task, init); lower is better
        scores: dict[tuple, list[float]] = {}
        for task in tasks.values():
            sweep = task.get("sweep") or {}
            for entry in sweep.get(group, {}).values():
                setting = tuple(entry.get(k) for k in keys)
                value = (entry["final_mean"] - task["target_loss"]) / task["target_loss"]
                scores.setdefault(setting, []).append(value if math.isfinite(value) else 10.0)
        table = sorted(((s, statistics.fmean(v)) for s, v in scores.items()), key=lambda kv: kv[1])
        return table

    lam = ranked("apo_lr_lambda_meta_lr", ("lambda_fsd", "meta_lr"))
    if lam:
        (best_lambda, best_meta_lr), best_score = lam[0]
        # within one point of the best is a tie; a tie keeps hf_apo's current default (lambda_fsd 10, meta_lr 0.1)
        if any(s == (10.0, 0.1) and v <= best_score + 0.01 for s, v in lam):
            best_lambda, best_meta_lr = 10.0, 0.1
        rec["apo_lr_lambda_fsd"], rec["apo_lr_meta_lr"] = best_lambda, best_meta_lr
        rec["evidence"]["apo_lr_lambda_fsd_meta_lr"] = [
            {"lambda_fsd": s[0], "meta_lr": s[1], "mean_relative_loss_vs_tuned_adamw": v} for s, v in lam]
    interval = ranked("apo_lr_interval_fraction", ("meta_interval", "meta_batch_fraction"))
    if interval:
        rec["evidence"]["apo_lr_meta_interval_fraction_quality"] = [
            {"meta_interval": s[0], "meta_batch_fraction": s[1], "mean_relative_loss_vs_tuned_adamw": v} for s, v in interval]
    wsd = ranked("apo_lr_wsd", ("lambda_wsd",))
    if wsd:
        rec["evidence"]["apo_lr_lambda_wsd_alone"] = [
            {"lambda_wsd": s[0], "mean_relative_loss_vs_tuned_adamw": v} for s, v in wsd]
    precond = ranked("apo_precond_meta_lr", ("meta_lr",))
    if precond:
        rec["apo_precond_meta_lr"] = precond[0][0][0]
        if any(s == (0.01,) and v <= precond[0][1] + 0.01 for s, v in precond):
            rec["apo_precond_meta_lr"] = 0.01
        rec["evidence"]["apo_precond_meta_lr"] = [{"meta_lr": s[0], "mean_relative_loss_vs_tuned_adamw": v} for s, v in precond]
    if overhead:
        tiny = overhead.get("sizes", {}).get(overhead.get("headline_size", "tiny"), {})
        methods = tiny.get("methods", {})
        rec["evidence"]["cost_from_overhead_json"] = {
            k: methods[k]["step_ratio"] for k in ("apo_lr", "apo_lr_frac1", "apo_lr_k16", "apo_lr_k16_frac1", "apo_lr_no_fsd")
            if k in methods}
        caps = {size: entry.get("factor_memory_over_params") for size, entry in overhead.get("sizes", {}).items()}
        rec["evidence"]["factor_memory_over_params_by_cap"] = caps
        # the largest cap whose factor memory (factors + cache + 2 Adam moments = 4 per entry) stays within 4.5× the
        # parameter memory, i.e. about one factor entry per parameter, on every measured size
        fitting = [int(cap[4:]) for cap in next(iter(caps.values()), {})
                   if all(c and c.get(cap, math.inf) <= 4.5 for c in caps.values())]
        if fitting:
            rec["max_factor_dim_by_memory_rule"] = max(fitting)
    # cheapest (K, meta batch fraction) within one point of the best quality
    if interval and overhead:
        cost_key = {(10, 0.25): "apo_lr", (10, 1.0): "apo_lr_frac1", (16, 0.25): "apo_lr_k16", (16, 1.0): "apo_lr_k16_frac1"}
        cost = rec["evidence"].get("cost_from_overhead_json", {})
        best_quality = interval[0][1]
        candidates = [(cost.get(cost_key.get(s), math.inf), s, v) for s, v in interval if v <= best_quality + 0.01]
        if candidates:
            _, (k, fraction), _ = min(candidates)
            rec["apo_lr_meta_interval"], rec["meta_batch_fraction"] = k, fraction
    if wsd and lam:
        # lambda_fsd is the portable knob (nats per token); lambda_wsd's scale depends on the parameter count, so the
        # weight-space term replaces it only if it wins by more than two points
        lam_score = dict(lam).get((rec["apo_lr_lambda_fsd"], rec["apo_lr_meta_lr"]), lam[0][1])
        (best_wsd,), wsd_score = wsd[0]
        rec["alternative_weight_space_only"] = {"lambda_fsd": 0.0, "lambda_wsd": best_wsd,
                                                "mean_relative_loss_vs_tuned_adamw": wsd_score,
                                                "chosen_setting_mean_relative_loss": lam_score}
        if wsd_score < lam_score - 0.02:
            rec["apo_lr_lambda_fsd"], rec["lambda_wsd"] = 0.0, best_wsd
        else:
            rec["lambda_wsd"] = 0.0
    return rec


def _read_back_line(results: dict) -> list[str]:
    read_back = sum(t.get("runs_read_back", 0) for t in results["tasks"].values())
    if not read_back:
        return []
    trained = sum(t.get("runs_trained", 0) for t in results["tasks"].values())
    return [f"This run trained {trained} runs and read {read_back} back from `quality_runs/`, trained by an earlier "
            "(killed or superseded) run of the same command; the wall clock above is this run's only."]


def markdown(results: dict) -> str:
    env = results["environment"]
    lines = ["# APO quality", "",
             f"Device: {env['device']}, torch {env['torch']}; wall clock {env['wall_clock_s']} s; load average at start "
             f"{env['load_average_at_start']}, at end {env['load_average_at_end']}.",
             f"Command: `{env['command']}`", *_read_back_line(results), "",
             f"Seeds {results['settings']['seeds']}; mean ± std over seeds of the final validation loss. 'steps to "
             "target': first evaluation at which the seed-mean validation loss reaches tuned AdamW's final loss "
             "(the best AdamW run, constant or warmup+cosine); '×' is that over tuned AdamW's own steps to it. "
             "SF-AdamW and SOAP use the best constant AdamW LR (not tuned for themselves); Prodigy lr 1.", ""]
    for name, task in results["tasks"].items():
        lines += [f"## {name}", "", f"{task['description']}; {task['steps']} steps, batch {task['batch_size']}, "
                  f"{task['train_examples']} training examples. Target (tuned AdamW = `{task['tuned_adamw']}`): "
                  f"{task['target_loss']:.4g}.", ""]
        rows = []
        for method, m in task["methods"].items():
            if method.startswith("sweep_") or "@" in method:
                continue
            rows.append([method, f"{m['final_mean']:.4g} ± {m['final_std']:.2g}" if math.isfinite(m["final_mean"]) else
                         f"diverged ({m['diverged_seeds']} seeds)", m["steps_to_tuned_adamw_loss"],
                         m["steps_ratio_to_tuned_adamw"], m["seconds_to_tuned_adamw_loss"], m["train_time_s"]])
        lines.append(markdown_table(["method", "final val loss", "steps to target", "× tuned AdamW steps",
                                     "seconds to target", "train s / run"], rows))
        if task["bf16"]:
            lines += ["", f"bf16 ({task['bf16_mode']}) against float32:", ""]
            rows = [[label, v["method"], v["fp32_final_mean"], v["bf16_final_mean"],
                     f"{100 * v['relative_change']:+.2f}%" if math.isfinite(v["relative_change"]) else "diverged"]
                    for label, v in task["bf16"].items()]
            lines.append(markdown_table(["method", "run", "float32", "bf16", "change"], rows))
        lines.append("")
    lines += ["## Claims, as measured", ""]
    c = results["claims"]
    lines += _claim_lines(c)
    lines += ["", "## Recommended defaults", ""]
    lines += _defaults_lines(results["defaults"], results["tasks"])
    lines.append("")
    return "\n".join(lines)


def _pct(x) -> str:
    return f"{100 * x:+.1f}%" if x is not None and math.isfinite(x) else "—"


def _claim_lines(c: dict) -> list[str]:
    lines = []
    claim = c["apo_lr_beats_best_fixed_lr"]
    lines.append(f"**APO-LR beats the best fixed LR**: holds on {claim['holds_on']}.")
    for task, v in claim["per_task"].items():
        lines.append(f"- {task}: best fixed {v['best_fixed']:.4g}; APO-LR vs it: " + ", ".join(
            f"{k[7:]} {_pct(r)}" for k, r in v["relative_to_best_fixed"].items()))
    claim = c["apo_lr_within_2pct_of_tuned_decay"]
    lines.append(f"\n**APO-LR is within 2% of tuned decay**: holds (for every initial LR) on {claim['holds_on']}.")
    for task, v in claim["per_task"].items():
        lines.append(f"- {task}: tuned decay {v['tuned_decay']:.4g}; APO-LR vs it: " + ", ".join(
            f"{k[7:]} {_pct(r)}" for k, r in v["relative_to_tuned_decay"].items()))
    claim = c["apo_precond_competitive_with_second_order_and_0.7x_steps"]
    lines.append("\n**APO-Precond is competitive with the second-order peer (final loss ≤ SOAP + 2%) and reaches tuned "
                 f"AdamW's loss in ≤ 0.7× the steps**: holds on {claim['holds_on']}.")
    for task, v in claim["per_task"].items():
        parts = []
        for key in ("apo_precond_sgdm", "apo_precond_sgd"):
            m = v[key]
            parts.append(f"{key} {_pct(m['relative_to_soap'])} vs SOAP, steps × {m['steps_ratio']:.2f}"
                         if m["steps_ratio"] is not None else f"{key} {_pct(m['relative_to_soap'])} vs SOAP, never reaches the target")
        soap_ratio = v["soap_steps_ratio"]
        parts.append(f"SOAP steps × {soap_ratio:.2f}" if soap_ratio is not None else "SOAP never reaches the target")
        lines.append(f"- {task}: " + "; ".join(parts))
    claim = c["bf16_changes_apo_by_lt_1pct"]
    lines.append(f"\n**bf16 changes APO's result by < 1%**: holds on {claim['holds_on']}.")
    for task, v in claim["per_task"].items():
        lines.append(f"- {task}: " + ", ".join(f"{k} {_pct(r)}" for k, r in v["relative_change"].items())
                     + "; others: " + ", ".join(f"{k} {_pct(r)}" for k, r in v["others_relative_change"].items()))
    return lines


def _defaults_lines(rec: dict, tasks: dict) -> list[str]:
    lines = []
    ev = rec["evidence"]
    if "apo_lr_lambda_fsd_meta_lr" in ev:
        lines.append(f"APO-LR: lambda_fsd = {rec['apo_lr_lambda_fsd']:g}, meta_lr = {rec['apo_lr_meta_lr']:g} ranked best "
                     "(mean over the sweep tasks and initial LRs 1e-4 and 1e-3 of the final loss relative to tuned AdamW):")
        lines.append("")
        lines.append(markdown_table(["lambda_fsd", "meta_lr", "mean loss vs tuned AdamW"], [
            [e["lambda_fsd"], e["meta_lr"], _pct(e["mean_relative_loss_vs_tuned_adamw"])] for e in ev["apo_lr_lambda_fsd_meta_lr"]]))
    if "apo_lr_meta_interval_fraction_quality" in ev:
        lines += ["", "Meta interval × meta batch fraction (APO-LR, quality; cost in overhead.md):", ""]
        lines.append(markdown_table(["K", "meta batch fraction", "mean loss vs tuned AdamW"], [
            [e["meta_interval"], e["meta_batch_fraction"], _pct(e["mean_relative_loss_vs_tuned_adamw"])]
            for e in ev["apo_lr_meta_interval_fraction_quality"]]))
    if "apo_lr_lambda_wsd_alone" in ev:
        lines += ["", "lambda_wsd alone (lambda_fsd = 0, no meta-batch passes):", ""]
        lines.append(markdown_table(["lambda_wsd", "mean loss vs tuned AdamW"], [
            [e["lambda_wsd"], _pct(e["mean_relative_loss_vs_tuned_adamw"])] for e in ev["apo_lr_lambda_wsd_alone"]]))
    if "apo_precond_meta_lr" in ev:
        lines += ["", "APO-Precond meta_lr:", ""]
        lines.append(markdown_table(["meta_lr", "mean loss vs tuned AdamW"], [
            [e["meta_lr"], _pct(e["mean_relative_loss_vs_tuned_adamw"])] for e in ev["apo_precond_meta_lr"]]))
    alternative = rec.get("alternative_weight_space_only")
    if alternative:
        lines += ["", f"Weight-space term alone (lambda_fsd 0, lambda_wsd {alternative['lambda_wsd']:g}, no meta-batch passes): "
                  f"{_pct(alternative['mean_relative_loss_vs_tuned_adamw'])} against {_pct(alternative['chosen_setting_mean_relative_loss'])} "
                  "for the chosen lambda_fsd setting (it replaces lambda_fsd only if better by more than two points, "
                  "since its scale depends on the parameter count)."]
    chosen = {k: rec[k] for k in ("apo_lr_lambda_fsd", "apo_lr_meta_lr", "lambda_wsd", "apo_lr_meta_interval",
                                   "meta_batch_fraction", "apo_precond_meta_lr", "max_factor_dim_by_memory_rule") if k in rec}
    if chosen:
        lines += ["", "Chosen by these rules (best mean rank; for K × fraction the cheapest setting within one point of the "
                  "best quality; a tie within one point keeps hf_apo's current default; the factor cap is the largest "
                  "whose factor memory ≤ 4.5× the parameter memory on "
                  "every size in overhead.json): " + ", ".join(f"{k} = {v:g}" for k, v in chosen.items()) + "."]
    if "factor_memory_over_params_by_cap" in ev:
        lines += ["", "APO-Precond factor memory / parameter memory by max_factor_dim (from overhead.json): " + "; ".join(
            f"{size}: " + ", ".join(f"{cap[4:]}→{v:.2f}" for cap, v in caps.items())
            for size, caps in ev["factor_memory_over_params_by_cap"].items() if caps)]
    if "cost_from_overhead_json" in ev:
        lines += ["", "Cost (step time × AdamW, from overhead.json): " + ", ".join(
            f"{k} {v:.3f}" for k, v in ev["cost_from_overhead_json"].items())]
    if rec.get("text"):
        lines += ["", rec["text"]]
    return lines


# ---------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------
PLOT_METHODS = ("adamw_best_constant", "adamw_tuned_decay", "apo_lr_1e-05", "apo_lr_1e-04", "apo_lr_1e-03",
                "apo_lr_1e-02", "sgdm_best", "apo_precond_sgdm", "sgd_plain", "apo_precond_sgd", "prodigy", "sf_adamw",
                "soap")


def plot(results: dict, output_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for name, task in results["tasks"].items():
        fig, ax = plt.subplots(figsize=(8, 5))
        colours = plt.get_cmap("tab20").colors
        for index, label in enumerate(PLOT_METHODS):
            method = task["selected"].get(label)
            if method is None:
                continue
            m = task["methods"][method]
            ys = [y if y is not None and math.isfinite(y) else float("nan") for y in m["mean_curve"]]
            style = "--" if "adamw" in label else ("-" if label.startswith("apo") else ":")
            ax.plot(m["curve_steps"], ys, style, color=colours[(2 * index) % 20 + (index >= 10)], lw=1.4,
                    label=f"{label} ({method})" if label != method else label)
        ax.axhline(task["target_loss"], color="gray", lw=0.8, label="tuned AdamW final")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss (seed mean)")
        ax.set_title(f"{name}: validation loss")
        ax.legend(fontsize=7, ncol=2)
        written.append(save_figure(fig, output_dir / f"quality_{name}_loss.png", dpi=110).name)

        fig, ax = plt.subplots(figsize=(8, 5))
        for label, method in task["selected"].items():
            if not label.startswith("apo_lr_"):
                continue
            m = task["methods"][method]
            if not m.get("lr_traces"):
                continue
            every = m["lr_trace_every"]
            traces = m["lr_traces"]
            length = min(len(t) for t in traces)
            mean_log = [statistics.fmean(math.log(t[i]) for t in traces) for i in range(length)]
            xs = [every * (i + 1) for i in range(length)]
            ax.plot(xs, [math.exp(v) for v in mean_log], label=f"APO-LR from {m['spec']['lr']:.0e}")
        best = task["best_constant_lr"]
        ax.axhline(best, color="gray", ls="--", lw=0.8, label=f"best constant AdamW LR {best:.0e}")
        decay = task["methods"][task["selected"]["adamw_tuned_decay"]]["spec"]
        steps = task["steps"]
        warm = max(1, int(decay["warmup_fraction"] * steps))
        xs = list(range(1, steps + 1))
        sched = [decay["lr"] * ((s) / warm if s <= warm else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - 1 - warm) / max(1, steps - warm))))) for s in xs]
        ax.plot(xs, [max(v, 1e-7) for v in sched], color="black", ls=":", lw=0.8, label="tuned AdamW warmup+cosine")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate (base × learned multiplier)")
        ax.set_title(f"{name}: APO-LR's learned learning rate (geometric mean over seeds)")
        ax.legend(fontsize=7)  # the best constant LR and the schedule are always drawn
        written.append(save_figure(fig, output_dir / f"quality_{name}_apo_lr_schedule.png", dpi=110).name)
    return written


# ---------------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------------
QUICK_OVERRIDES = {"steps": 40, "eval_every": 10}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run (tiny budgets, 1 seed, few methods)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None, choices=["apo_lr", "apo_precond", "peers", "sweep"],
                        help="method groups to run besides AdamW (default: all)")
    parser.add_argument("--apo_lr_inits", nargs="+", type=float, default=list(APO_LR_INITS))
    parser.add_argument("--bf16_mode", choices=["weights", "autocast", "none"], default="weights",
                        help="bf16 runs: the model's weights in bfloat16, CPU autocast, or none")
    parser.add_argument("--no_sweep", action="store_true", help="skip the defaults sweep")
    parser.add_argument("--steps_scale", type=float, default=1.0, help="multiply every task's step budget")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps a shared machine's noise "
                        "low; the step counts and losses do not depend on it)")
    parser.add_argument("--fresh", action="store_true", help="neither read nor write OUTPUT_DIR/quality_runs/ (by "
                        "default finished runs are kept there and a rerun skips them: delete it after changing the "
                        "optimizers)")
    parser.add_argument("--rerender", action="store_true", help="train nothing: recompute the claims, defaults, plots "
                        "and quality.md from OUTPUT_DIR/quality.json (and overhead.json beside it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds = args.seeds[:1]
        args.apo_lr_inits = [1e-3]
    return args


def task_for_run(name: str, args) -> Task:
    task = copy.copy(TASKS[name])
    if args.quick:
        task.steps, task.eval_every = QUICK_OVERRIDES["steps"], QUICK_OVERRIDES["eval_every"]
        task.adamw_lrs, task.sgd_lrs = task.adamw_lrs[2:4], task.sgd_lrs[1:2]
        task.decay_search = "neighbors"
        if name == "translation":
            task.steps, task.eval_every = 10, 5
    elif args.steps_scale != 1.0:
        task.steps = max(task.eval_every, int(round(task.steps * args.steps_scale / task.eval_every)) * task.eval_every)
    return task


def count_runs(task: Task, args) -> int:
    seeds = len(args.seeds)
    runs = len(task.adamw_lrs) + (len(task.adamw_lrs) if task.decay_search == "grid" else 2)
    runs += len(args.apo_lr_inits) + 2 * len(task.sgd_lrs) + 2 + 3
    runs += 0 if args.bf16_mode == "none" else (2 if args.quick else len(task.bf16_methods or range(13)))
    if task.sweep and not args.no_sweep:
        runs += 1 if args.quick else 2 * (9 + 4 + 3) + 3
    return runs * seeds


def load_overhead(output_dir: Path) -> dict | None:
    path = output_dir / "overhead.json"
    return json.loads(path.read_text()) if path.exists() else None


def write_report(results: dict, output_dir: Path) -> None:
    for task in results["tasks"].values():  # keep the learned-LR traces only where they are plotted
        plotted = {m for label, m in task["selected"].items() if label.startswith("apo_lr_")}
        for name, method in task["methods"].items():
            if name not in plotted:
                method["lr_traces"] = None
    results["claims"] = claims(results["tasks"])
    results["defaults"] = recommend_defaults(results["tasks"], load_overhead(output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    results["plots"] = plot(results, output_dir)
    write_json(output_dir / "quality.json", results)
    (output_dir / "quality.md").write_text(markdown(results))
    print(f"wrote {output_dir / 'quality.json'}, quality.md and {len(results['plots'])} plots", file=sys.stderr)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.rerender:
        results = json.loads((args.output_dir / "quality.json").read_text(), parse_constant=float)
        _restore_infinities(results)
        write_report(results, args.output_dir)
        return results
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    info = environment()
    info["contention_note"] = ("Wall-clock columns were measured on a shared 2-core machine where other processes may "
                               "have run; step counts and losses do not depend on that.")
    tasks = [task_for_run(name, args) for name in args.tasks]
    bar = progress(total=sum(count_runs(t, args) for t in tasks), desc="quality runs", unit="run")
    results: dict = {"environment": info, "settings": {"seeds": args.seeds, "bf16_mode": args.bf16_mode,
                                                      "apo_lr_inits": args.apo_lr_inits, "quick": args.quick}, "tasks": {}}
    for task in tasks:
        task_started = time.perf_counter()
        results["tasks"][task.name] = run_task(task, args, bar)
        results["tasks"][task.name]["wall_clock_s"] = round(time.perf_counter() - task_started, 1)
        print(f"[{task.name}] done in {results['tasks'][task.name]['wall_clock_s']} s", file=sys.stderr, flush=True)
    bar.close()
    results["environment"] = finish_environment(info, started)
    write_report(results, args.output_dir)
    return results


def _restore_infinities(results: dict) -> None:
    """quality.json stores inf/NaN as null; a diverged run's losses come back as inf for the report."""
    for task in results["tasks"].values():
        for method in task["methods"].values():
            for key in ("final_mean", "final_std"):
                if method.get(key) is None:
                    method[key] = math.inf
            method["finals"] = [math.inf if v is None else v for v in method.get("finals", [])]
            method["mean_curve"] = [math.inf if v is None else v for v in method["mean_curve"]]
        for entry in task.get("bf16", {}).values():
            for key in ("bf16_final_mean", "relative_change", "fp32_final_mean"):
                if entry.get(key) is None:
                    entry[key] = math.inf
        for group in (task.get("sweep") or {}).values():
            for entry in group.values():
                if entry.get("final_mean") is None:
                    entry["final_mean"] = math.inf


if __name__ == "__main__":
    main()
