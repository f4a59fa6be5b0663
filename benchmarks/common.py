"""What overhead.py and quality.py share: the optimizers under test, one plain training step, the record of the
machine a result came from, and the output helpers.

Every optimizer is driven by the same plain PyTorch loop (:func:`train_step`): forward, backward,
``observe(batch)`` for APO, ``step()``, ``zero_grad()``. No Trainer, no gradient clipping, no AMP scaler, so
the differences measured are the optimizers' own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from hf_apo import APOLR, APOPrecond, ProximalObjective
from hf_apo.meta import MetaLearnedOptimizer
from hf_apo.defaults import LR_META_STEP, META_INTERVAL, PAPER_OBJECTIVE, settings
from hf_apo.batches import default_forward, get_output

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT_DIR = REPO_ROOT / "benchmarks" / "results"


def apo_lr_defaults() -> dict[str, Any]:
    """hf_apo's APO-LR defaults (``hf_apo.defaults``) as MethodSpec fields: what ``--apo lr`` runs."""
    s = settings("lr")
    return {name: s[name] for name in ("loss_batch", "lambda_fsd", "horizon", "meta_interval", "meta_lr",
                                       "meta_optimizer", "adaptive_interval", "max_meta_step")}


@dataclass(frozen=True)
class MethodSpec:
    """One optimizer configuration under test; ``kind`` picks the builder, the rest are its hyperparameters.

    kinds: ``adamw``, ``sgd`` (``momentum`` as given), ``apo_lr`` (APO-LR over AdamW), ``apo_precond``
    (APO-Precond over SGD with ``momentum``), the learning-rate-free peers from their own packages (``prodigy``,
    ``sf_adamw`` schedule-free AdamW, ``mechanic`` Mechanic over AdamW, ``dog`` DoG, ``dadapt_adam``
    D-Adaptation Adam; :func:`build_peer`), and heavyball's second-order optimizers, run eagerly (no
    torch.compile): ``soap`` (SOAP), ``psgd_kron`` (PSGD-Kron) and ``shampoo`` (KL-Shampoo, heavyball's Shampoo).
    The APO fields' own defaults are the paper's setting (``hf_apo.defaults.PAPER_OBJECTIVE``, K 10); hf_apo's APO-LR
    default is ``MethodSpec(name, "apo_lr", **apo_lr_defaults())``.
    ``schedule``: ``constant``, ``linear`` (the Trainer's default: linear decay to 0, no warm-up) or
    ``warmup_cosine`` (linear warmup over ``warmup_fraction`` of the steps, then cosine decay to 0), applied to the
    base learning rate by a LambdaLR.
    ``meta_optimizer``, ``adaptive_interval``: APO-LR's meta step (``hf_apo.APOLR``).
    """

    name: str
    kind: str
    lr: float = 1e-3
    momentum: float = 0.0
    schedule: str = "constant"
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    meta_interval: int = META_INTERVAL
    meta_lr: float | None = None  # None: the optimizer's own default (hf_apo.defaults.META_LR)
    meta_batch_fraction: float = 0.25
    lambda_fsd: float = PAPER_OBJECTIVE["lambda_fsd"]
    lambda_wsd: float = PAPER_OBJECTIVE["lambda_wsd"]
    loss_batch: str = PAPER_OBJECTIVE["loss_batch"]
    horizon: float = PAPER_OBJECTIVE["horizon"]
    max_factor_dim: int = 1024
    lookahead_steps: int = 1
    spectral_meta_step: bool = True
    stochastic_rounding: bool = True
    meta_optimizer: str = LR_META_STEP["meta_optimizer"]
    adaptive_interval: bool = LR_META_STEP["adaptive_interval"]
    max_meta_step: float = LR_META_STEP["max_meta_step"]
    precond_base: str = "sgd"  # APO-Precond's base: "sgd" (with ``momentum``) or "adamw"
    precond_size: str = "factors"  # --apo_precond_size: "shape" shape-only factors, "lr" and APO-LR learns the size

    @property
    def is_apo(self) -> bool:
        return self.kind in ("apo_lr", "apo_precond")

    def with_(self, **changes) -> MethodSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def heavyball_eager():
    """heavyball with torch.compile switched off (it compiles by default; the peers here all run eagerly)."""
    import heavyball
    import heavyball.utils

    heavyball.utils.compile_mode = None
    return heavyball


def build_optimizer(
    spec: MethodSpec,
    model: torch.nn.Module,
    *,
    total_steps: int,
    divergence: str = "kl",
    forward: Callable | None = None,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer that ``spec`` describes over ``model``'s parameters, and its scheduler (or None)."""
    params = [p for p in model.parameters() if p.requires_grad]
    wd = spec.weight_decay
    if spec.kind in ("apo_lr", "apo_precond"):
        objective = ProximalObjective(
            model, lambda_fsd=spec.lambda_fsd, lambda_wsd=spec.lambda_wsd, divergence=divergence, forward=forward,
            loss_batch=spec.loss_batch, horizon=spec.horizon,
        )
        meta = dict(meta_interval=spec.meta_interval, meta_batch_fraction=spec.meta_batch_fraction)
        if spec.meta_lr is not None:
            meta["meta_lr"] = spec.meta_lr
        if spec.kind == "apo_lr":
            optimizer = APOLR(params, objective, base="adamw", lr=spec.lr, weight_decay=wd, **meta,
                              meta_optimizer=spec.meta_optimizer, adaptive_interval=spec.adaptive_interval,
                              max_meta_step=spec.max_meta_step)
        else:
            base = {"momentum": spec.momentum} if spec.precond_base == "sgd" else {"base": "adamw"}
            optimizer = APOPrecond(
                params, objective, lr=spec.lr, weight_decay=wd, **base,
                max_factor_dim=spec.max_factor_dim, lookahead_steps=spec.lookahead_steps,
                spectral_meta_step=spec.spectral_meta_step, stochastic_rounding=spec.stochastic_rounding,
                shape_only=spec.precond_size in ("shape", "lr"), **meta,
            )
            if spec.precond_size == "lr":
                optimizer = APOLR.default_over(optimizer, model, divergence=divergence, forward=forward)
    elif spec.kind == "adamw":
        optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=wd)
    elif spec.kind == "sgd":
        optimizer = torch.optim.SGD(params, lr=spec.lr, momentum=spec.momentum, weight_decay=wd)
    elif spec.kind in PEERS:
        optimizer = build_peer(spec.kind, params, spec.lr, wd, warmup_steps=int(spec.warmup_fraction * total_steps))
    elif spec.kind == "soap":
        optimizer = heavyball_eager().SOAP(params, lr=spec.lr, weight_decay=wd)
    elif spec.kind == "psgd_kron":
        optimizer = heavyball_eager().PSGDKron(params, lr=spec.lr, weight_decay=wd)
    elif spec.kind == "shampoo":
        optimizer = heavyball_eager().KLShampoo(params, lr=spec.lr, weight_decay=wd)
    else:
        raise ValueError(f"unknown optimizer kind {spec.kind!r}")

    scheduler = None
    if spec.schedule == "linear":
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))
    elif spec.schedule == "warmup_cosine":
        warmup = max(1, int(spec.warmup_fraction * total_steps))

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.5 * (1.0 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    elif spec.schedule != "constant":
        raise ValueError(f"unknown schedule {spec.schedule!r}")
    return optimizer, scheduler


PEERS = ("prodigy", "sf_adamw", "mechanic", "dog", "dadapt_adam")


def build_peer(kind: str, params, lr: float, weight_decay: float = 0.0, *, warmup_steps: int = 0):
    """A learning-rate-free peer from its own package, at its documented defaults.

    ``lr`` is the user's learning rate where the peer takes one (Schedule-Free AdamW; Mechanic's base AdamW) and the
    peer's multiplier otherwise (1.0 for Prodigy, DoG and D-Adaptation, whose own estimate sets the step).
    Schedule-Free AdamW gets ``warmup_steps`` (its docs ask for a warm-up) and is left in train mode; the others
    take no warm-up of their own (none is used with them here, so Prodigy's ``safeguard_warmup`` stays off).
    """
    if kind == "prodigy":
        from prodigyopt import Prodigy

        return Prodigy(params, lr=lr, weight_decay=weight_decay)
    if kind == "sf_adamw":
        import schedulefree

        optimizer = schedulefree.AdamWScheduleFree(params, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps)
        optimizer.train()
        return optimizer
    if kind == "mechanic":
        from mechanic_pytorch import mechanize

        return mechanize(torch.optim.AdamW)(params, lr=lr, weight_decay=weight_decay)
    if kind == "dog":
        from dog import DoG

        return DoG(params, lr=lr, weight_decay=weight_decay)
    if kind == "dadapt_adam":
        from dadaptation import DAdaptAdam

        return DAdaptAdam(params, lr=lr, weight_decay=weight_decay, decouple=True)
    raise ValueError(f"unknown peer {kind!r}; one of {PEERS}")


def train_step(model, optimizer, batch, forward: Callable = default_forward, scheduler=None) -> torch.Tensor:
    """One step of the plain loop every optimizer shares; returns the (detached) training loss."""
    loss = get_output(forward(model, batch), "loss")
    loss.backward()
    if isinstance(optimizer, MetaLearnedOptimizer):
        optimizer.observe(batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if scheduler is not None:
        scheduler.step()
    return loss.detach()


def last_step_was_meta(optimizer) -> bool:
    """True when the ``step()`` just taken ran a meta step (APO only)."""
    return (
        isinstance(optimizer, MetaLearnedOptimizer)
        and optimizer.meta_lr > 0
        and optimizer.step_count % optimizer.meta_interval == 0
    )


def set_eval_mode(optimizer, evaluating: bool) -> None:
    """Schedule-free optimizers evaluate at their averaged point: switch them to eval() and back to train()."""
    if hasattr(optimizer, "eval") and hasattr(optimizer, "train") and "ScheduleFree" in type(optimizer).__name__:
        optimizer.eval() if evaluating else optimizer.train()


def tensor_bytes(obj: Any, seen: set[int] | None = None, exclude: set[int] | None = None) -> int:
    """Bytes of the distinct tensor storages reachable in ``obj`` (dicts, lists, tuples, tensors)."""
    seen = set() if seen is None else seen
    exclude = exclude or set()
    if isinstance(obj, torch.Tensor):
        if obj.numel() == 0:
            return 0
        key = obj.untyped_storage().data_ptr()
        if key in seen or key in exclude:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v, seen, exclude) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen, exclude) for v in obj)
    return 0


def optimizer_state_bytes(optimizer, model: torch.nn.Module) -> int:
    """Bytes an optimizer keeps between steps beyond the parameters and their gradients.

    Its ``state`` (moments, momentum buffers, peers' preconditioners) plus, for APO, the meta-parameters, their
    Adam state, APO-LR's displacement D (``loss_batch="next"``), the cached L = AAᵀ / R = BBᵀ and the two batches
    kept for the meta step.
    """
    exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    total = tensor_bytes(list(optimizer.state.values()), seen, exclude)
    if isinstance(optimizer, APOLR):
        total += tensor_bytes([optimizer.log_lr, list(optimizer.meta_optimizer.state.values()),
                               optimizer._displacement], seen, exclude)
    precond = optimizer.inner if isinstance(optimizer, APOLR) else optimizer  # APO-LR may learn APO-Precond's size
    if isinstance(precond, APOPrecond):
        for factors in precond.factors.values():
            total += tensor_bytes([factors.tensors, factors._cache], seen, exclude)
        total += tensor_bytes(list(precond.meta_optimizer.state.values()), seen, exclude)
    if isinstance(optimizer, MetaLearnedOptimizer):
        total += tensor_bytes([optimizer._current_batch, optimizer._previous_batch], seen, exclude)
    return total


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def environment(argv: list[str] | None = None) -> dict[str, Any]:
    """Where and how a result was produced: device, versions, threads, load, commit and the exact command."""
    argv = sys.argv if argv is None else argv
    import transformers

    info: dict[str, Any] = {
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *argv]),
        "cwd": os.getcwd(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({_cpu_name()})",
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    # the peers' distributions (their modules mostly carry no __version__)
    for package, distribution in (("heavyball", "heavyball"), ("prodigyopt", "prodigyopt"),
                                  ("schedulefree", "schedulefree"), ("mechanic_pytorch", "mechanic-pytorch"),
                                  ("dog", "dog-optimizer"), ("dadaptation", "dadaptation"),
                                  ("sklearn", "scikit-learn")):
        try:
            info[package] = version(distribution)
        except PackageNotFoundError:
            info[package] = None
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "hf_apo"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        info["hf_apo_uncommitted_changes"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def finish_environment(info: dict[str, Any], started: float) -> dict[str, Any]:
    info["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["wall_clock_s"] = round(time.perf_counter() - started, 1)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def read_runs(path: Path) -> list[dict]:
    """The rows of a JSON-lines file of finished runs ([] when there is none); a line cut by a kill is skipped, so
    that run is done again."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_run(path: Path, row: dict) -> None:
    """Append one finished run to a JSON-lines file as it ends, so a killed benchmark resumes after it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as out:
        out.write(json.dumps(row) + "\n")


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False) + "\n")


def _jsonable(value: Any) -> Any:
    """NaN/inf become None so the file is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value


def save_figure(figure, path: Path, dpi: int) -> Path:
    """Lay a matplotlib figure out, write it to ``path`` and free it."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            if not math.isfinite(value):
                return "—"
            return f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def progress(iterable=None, **kwargs):
    """tqdm when it is installed and stderr is a terminal or asked for; a plain iterator otherwise."""
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return iterable if iterable is not None else _NoBar()
    kwargs.setdefault("mininterval", 2.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


class _NoBar:  # pragma: no cover
    def update(self, n=1):
        pass

    def set_postfix_str(self, s):
        pass

    def close(self):
        pass


def study_main(doc: str, run_arguments: Callable[[argparse.ArgumentParser], None], run: Callable, report: Callable,
               argv=None) -> None:
    """The command line every study shares: ``run`` (or resume) some of its runs (the study adds its arguments with
    ``run_arguments``), ``report`` the rule's outcome from the runs on file; both take --output_dir, --quick and
    --threads."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run (or resume) some of the study's runs")
    run_arguments(run_parser)
    report_parser = sub.add_parser("report", help="apply the rule to the finished runs; write the tables and plots")
    for p in (run_parser, report_parser):
        p.add_argument("--output_dir", type=Path, default=DEFAULT_OUTPUT_DIR)
        p.add_argument("--quick", action="store_true", help="30 steps, 1 seed: checks that the script runs")
        p.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    (run if args.command == "run" else report)(args)
