"""Pure functions over run rows: the numbers a study's rule and targets are made of. No I/O, no training."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable


def run_score(row: dict, kind: str = "final") -> float:
    """A run's score: its final validation loss, or (``best``) the best along the run; a diverged run is inf."""
    return math.inf if not math.isfinite(row["final"]) else min(row["losses"]) if kind == "best" else row["final"]


def cell_value(rows: list[dict], kind: str = "final") -> float:
    """The mean score over seeds; a diverged seed makes it infinitely bad."""
    scores = [run_score(r, kind) for r in rows]
    return statistics.fmean(scores) if scores and all(math.isfinite(s) for s in scores) else math.inf


def failed(rows: list[dict], threshold: float, kind: str = "final") -> int:
    """How many seeds ended above ``threshold`` (a stall, a wreck or a run far too slow; see
    :func:`failure_threshold`) or diverged: counted apart, since one such seed decides a mean and a percentage would
    hide what happened."""
    return sum(not run_score(r, kind) <= threshold for r in rows)


def failure_threshold(tuned: float, start: float, share: float) -> float:
    """A run fails above tuned + ``share`` × (start − tuned): it gave back that share of what the tuned baseline
    gained from step 0. Saturation-aware where a ratio is not: on a task tuned AdamW solves to 0.001 from 5, 2× tuned
    is two near-perfect models, and on one it takes from 9 to 5.5, 2× tuned is worse than step 0."""
    return tuned + share * (start - tuned)


def left_of_start(rows: list[dict], kind: str = "final", floor: float = 0.0) -> float:
    """How far from saturation a cell is: its value over its mean validation loss at step 0, both above the task's
    ``floor`` where known (1: nothing learned; near 0: saturated, where relative differences compare two near-perfect
    models)."""
    start = statistics.fmean(r["losses"][0] for r in rows) - floor
    return (cell_value(rows, kind) - floor) / start if rows and start > 0 else math.nan


def relative(value: float, reference: float) -> float:
    return value / reference - 1 if math.isfinite(value) and reference and math.isfinite(reference) else math.inf


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
    if not ordered:
        return []
    tied = [n for n in ordered if scores[n] <= scores[ordered[0]] + tie]
    tied.sort(key=lambda n: (*tie_break(n), scores[n]))
    return tied + [n for n in ordered if n not in tied]


def meta_passes(method: dict) -> float:
    """Forward/backward passes an APO method adds per optimizer step: a same-batch loss term 1, a KL term ½ per meta
    step, every ``meta_interval`` steps (the cheaper candidate wins a tie)."""
    per_meta_step = (1.0 if method.get("loss_batch") == "same" else 0.0) + (0.5 if method.get("lambda_fsd") else 0.0)
    return per_meta_step / method.get("meta_interval", 1)


def tie_key(name: str, method: dict, preferences: list) -> tuple:
    """The tie-break of a study's rule: ``"meta_passes"`` (fewer first) or a preference ``{field: value}`` (``name``:
    the method's name), those that match first, in the order listed."""
    key = []
    for preference in preferences:
        if preference == "meta_passes":
            key.append(meta_passes(method))
        else:
            (field, value), = preference.items()
            key.append((name if field == "name" else method.get(field)) != value)
    return tuple(key)


def lr_ratio(row: dict, fraction: float) -> float | None:
    """The learned LR multiplier at ``fraction`` of the run against where it ends, as a factor ≥ 1 (None: no trace)."""
    if not (trace := row.get("lr_multiplier")):
        return None
    early, end = trace[min(len(trace) - 1, int(fraction * len(trace)))], trace[-1]
    return max(early / end, end / early)


def loss_at_time(row: dict, seconds: float) -> float:
    """The validation loss at the last evaluation before ``seconds`` of training (a Trainer run without training
    times: its wall time × step / steps)."""
    times = row.get("train_time") or [row["wall_s"] * s / row["steps"] for s in row["eval_steps"]]
    reached = [loss for t, loss in zip(times, row["losses"]) if t <= seconds + 1e-9]
    return reached[-1] if reached else row["losses"][0]


def equal_time_ratio(mine: list[dict], other: list[dict]) -> float:
    """Mean over the seeds both ran of (my loss / the other's) at the shorter of the two runs' training times."""
    theirs = {r["seed"]: r for r in other}
    ratios = []
    for a in sorted(mine, key=lambda r: r["seed"]):
        if a["seed"] in theirs:
            b = theirs[a["seed"]]
            end = min((a.get("train_time") or [a["wall_s"]])[-1], (b.get("train_time") or [b["wall_s"]])[-1])
            ratios.append(loss_at_time(a, end) / loss_at_time(b, end))
    return statistics.fmean(ratios) - 1 if ratios else math.nan


def precision_change(rows: list[dict], reference: list[dict], kind: str = "final") -> float:
    """Mean over the seeds both ran of the relative change of the score against the reference rows (float32)."""
    base = {r["seed"]: run_score(r, kind) for r in reference}
    changes = [relative(run_score(r, kind), base[r["seed"]]) for r in rows if r["seed"] in base]
    return statistics.fmean(changes) if changes else math.nan


def within_on(per_task: dict[str, list[float]], bound: float, strict: bool = False) -> list[str]:
    """The tasks on which every value (relative change, one a cell) is ≤ ``bound`` (< with ``strict``)."""
    return [t for t, values in per_task.items() if values and all(v < bound if strict else v <= bound for v in values)]
