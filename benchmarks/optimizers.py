"""One builder per optimizer kind, and the schedules. A method is ``{"kind": ..., **hyperparameters}``:
:func:`resolve` checks every name against the kind's builder signature (a typo fails) and fills in the defaults,
hf_apo's own for APO (``hf_apo.defaults.settings``), so that a run's row carries the full method.

To add an optimizer, write one function here decorated with ``@builder``: its name is the kind, its keyword arguments
(after ``ctx`` and ``lr``) the hyperparameters, their defaults the method's defaults.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from importlib import import_module
from typing import Callable

import torch

from hf_apo import APOLR, APOPrecond, ProximalObjective
from hf_apo.defaults import settings

BUILDERS: dict[str, Callable] = {}
COMMON = {"schedule": None, "warmup_fraction": 0.05, "weight_decay": 0.0}  # every kind; schedule None: the task's
# Hyperparameters added after runs were stored, at the value that reproduces those runs: left out of a run's key, so
# a builder gaining one keeps the stored runs valid (at another value it is another run).
ADDED_LATER = {"trust_region": "none", "trust_region_opening": 100}
SCHEDULES = ("constant", "linear", "warmup_cosine", "warmup_linear")


@dataclass
class Context:
    """What a builder may need besides the hyperparameters."""

    model: torch.nn.Module
    params: list
    divergence: str = "kl"
    forward: Callable | None = None
    total_steps: int = 1
    warmup_fraction: float = 0.05


def builder(fn: Callable) -> Callable:
    BUILDERS[fn.__name__] = fn
    return fn


def hyperparameters(kind: str) -> dict:
    """The kind's hyperparameters and their defaults (None: hf_apo's default for the method's loss batch)."""
    if kind not in BUILDERS:
        raise ValueError(f"unknown optimizer kind {kind!r}; one of {sorted(BUILDERS)}")
    own = {n: p.default for n, p in inspect.signature(BUILDERS[kind]).parameters.items() if n not in ("ctx", "lr")}
    return {**COMMON, **own}


def resolve(method: dict, default_schedule: str = "constant") -> dict:
    """The full method: every hyperparameter of its kind, the defaults filled in; an unknown name raises."""
    defaults = hyperparameters(method["kind"])
    unknown = set(method) - {"kind"} - set(defaults)
    if unknown:
        raise TypeError(f"{method['kind']} takes no {sorted(unknown)}; its hyperparameters: {sorted(defaults)}")
    full = {"kind": method["kind"], **defaults, **{k: v for k, v in method.items() if k != "kind"}}
    full["schedule"] = full["schedule"] or default_schedule
    if full["schedule"] not in SCHEDULES:
        raise ValueError(f"unknown schedule {full['schedule']!r}; one of {SCHEDULES}")
    if full["kind"] in ("apo_lr", "apo_precond"):  # hf_apo's defaults for the mode and loss batch
        apo = settings("lr" if full["kind"] == "apo_lr" else "precond", full["loss_batch"])
        full.update({k: apo[k] for k, v in full.items() if v is None and k in apo})
    return full


def build(method: dict, lr: float, ctx: Context):
    """The optimizer a full method describes, and its scheduler (or None)."""
    kwargs = {k: v for k, v in method.items() if k not in ("kind", "schedule", "warmup_fraction")}
    ctx.warmup_fraction = method["warmup_fraction"]
    optimizer = BUILDERS[method["kind"]](ctx, lr, **kwargs)
    return optimizer, scheduler(optimizer, method["schedule"], method["warmup_fraction"], ctx.total_steps)


def scheduler(optimizer, schedule: str, warmup_fraction: float, total_steps: int):
    """``linear``: the Trainer's default, decay to 0, no warm-up; ``warmup_cosine`` / ``warmup_linear``: linear
    warm-up over ``warmup_fraction`` of the steps, then cosine / linear to 0 (the Trainer's ``--warmup_ratio``);
    ``constant``: none."""
    if schedule == "constant":
        return None
    if schedule == "linear":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / total_steps))
    warmup = max(1, int(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if schedule == "warmup_linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# the builders ---------------------------------------------------------------------------------------------------------
@builder
def adamw(ctx, lr, weight_decay=0.0):
    return torch.optim.AdamW(ctx.params, lr=lr, weight_decay=weight_decay)


@builder
def sgd(ctx, lr, weight_decay=0.0, momentum=0.0):
    return torch.optim.SGD(ctx.params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _objective(ctx, loss_batch, lambda_fsd, lambda_wsd, horizon):
    return ProximalObjective(ctx.model, lambda_fsd=lambda_fsd, lambda_wsd=lambda_wsd, divergence=ctx.divergence,
                             forward=ctx.forward, loss_batch=loss_batch, horizon=horizon)


@builder
def apo_lr(ctx, lr, weight_decay=0.0, loss_batch="next", lambda_fsd=None, lambda_wsd=0.0, horizon=None,
           meta_interval=None, meta_lr=None, meta_batch_fraction=0.25, meta_optimizer=None, adaptive_interval=None,
           max_meta_step=None, trust_region="none", trust_region_opening=100):
    """APO-LR over AdamW, without a bound unless the method names one (hf_apo's default: 1.0 nat/token, opening 0)."""
    return APOLR(ctx.params, _objective(ctx, loss_batch, lambda_fsd, lambda_wsd, horizon), base="adamw", lr=lr,
                 weight_decay=weight_decay, meta_interval=meta_interval, meta_lr=meta_lr,
                 meta_batch_fraction=meta_batch_fraction, meta_optimizer=meta_optimizer,
                 adaptive_interval=adaptive_interval, max_meta_step=max_meta_step, trust_region=trust_region,
                 trust_region_opening=trust_region_opening)


@builder
def apo_precond(ctx, lr, weight_decay=0.0, base="sgd", momentum=0.0, size="factors", loss_batch="same",
                lambda_fsd=None, lambda_wsd=0.0, horizon=None, meta_interval=None, meta_lr=None,
                meta_batch_fraction=0.25, max_factor_dim=1024, lookahead_steps=1, spectral_meta_step=True,
                stochastic_rounding=True, trust_region="none", trust_region_opening=100):
    """APO-Precond over SGD (with ``momentum``) or AdamW. ``size``: ``factors`` (the factors carry size and shape),
    ``shape`` (shape-only factors, the schedule's size) or ``lr`` (shape-only factors, APO-LR's default learns the
    size: ``--apo_precond_size lr``)."""
    base_kwargs = {"momentum": momentum} if base == "sgd" else {"base": "adamw"}
    optimizer = APOPrecond(ctx.params, _objective(ctx, loss_batch, lambda_fsd, lambda_wsd, horizon), lr=lr,
                           weight_decay=weight_decay, meta_interval=meta_interval, meta_lr=meta_lr,
                           meta_batch_fraction=meta_batch_fraction, max_factor_dim=max_factor_dim,
                           lookahead_steps=lookahead_steps, spectral_meta_step=spectral_meta_step,
                           stochastic_rounding=stochastic_rounding, shape_only=size in ("shape", "lr"), **base_kwargs)
    if size == "lr":
        optimizer = APOLR.default_over(optimizer, ctx.model, divergence=ctx.divergence, forward=ctx.forward,
                                       trust_region=trust_region, trust_region_opening=trust_region_opening)
    return optimizer


# the learning-rate-free peers from their own packages, at their documented defaults; ``lr`` is the user's LR where
# the peer takes one (Schedule-Free AdamW, Mechanic's AdamW) and the peer's multiplier otherwise (1.0 for Prodigy,
# DoG and D-Adaptation, whose own estimate sets the step)
@builder
def prodigy(ctx, lr, weight_decay=0.0):
    return import_module("prodigyopt").Prodigy(ctx.params, lr=lr, weight_decay=weight_decay)


@builder
def sf_adamw(ctx, lr, weight_decay=0.0):
    """Schedule-Free AdamW with a warm-up over ``warmup_fraction`` of the run (its docs ask for one), left in train
    mode (the runner switches it to eval() to evaluate)."""
    warmup = int(ctx.warmup_fraction * ctx.total_steps)
    optimizer = import_module("schedulefree").AdamWScheduleFree(ctx.params, lr=lr, weight_decay=weight_decay,
                                                                warmup_steps=warmup)
    optimizer.train()
    return optimizer


@builder
def mechanic(ctx, lr, weight_decay=0.0):
    return import_module("mechanic_pytorch").mechanize(torch.optim.AdamW)(ctx.params, lr=lr, weight_decay=weight_decay)


@builder
def dog(ctx, lr, weight_decay=0.0):
    return import_module("dog").DoG(ctx.params, lr=lr, weight_decay=weight_decay)


@builder
def dadapt_adam(ctx, lr, weight_decay=0.0):
    return import_module("dadaptation").DAdaptAdam(ctx.params, lr=lr, weight_decay=weight_decay, decouple=True)


def heavyball_eager():
    """heavyball with torch.compile switched off (it compiles by default; every optimizer here runs eagerly)."""
    import_module("heavyball.utils").compile_mode = None
    return import_module("heavyball")


@builder
def soap(ctx, lr, weight_decay=0.0):
    return heavyball_eager().SOAP(ctx.params, lr=lr, weight_decay=weight_decay)


@builder
def psgd_kron(ctx, lr, weight_decay=0.0):
    return heavyball_eager().PSGDKron(ctx.params, lr=lr, weight_decay=weight_decay)


@builder
def shampoo(ctx, lr, weight_decay=0.0):
    """heavyball's KL-Shampoo."""
    return heavyball_eager().KLShampoo(ctx.params, lr=lr, weight_decay=weight_decay)


# a method under the Hugging Face Trainer (the finetune and lora tasks) ------------------------------------------------
TRAINER_SCHEDULES = {"linear": {}, "constant": {"lr_scheduler_type": "constant"},
                     "warmup_cosine": {"lr_scheduler_type": "cosine"}, "warmup_linear": {}}
APO_FLAGS = ("loss_batch", "lambda_fsd", "lambda_wsd", "horizon", "meta_interval", "meta_lr", "meta_batch_fraction",
             "meta_optimizer", "adaptive_interval", "max_meta_step", "max_factor_dim", "lookahead_steps",
             "spectral_meta_step", "stochastic_rounding", "trust_region", "trust_region_opening")


def trainer_flags(method: dict, steps: int) -> tuple[dict, dict | None]:
    """A full method as the Trainer's arguments (``--optim``, ``--apo*``, the schedule), and, for an optimizer the
    Trainer cannot name (a peer from its own package, heavyball), the method to build in its place (the Trainer then
    puts its schedule on it)."""
    kind, schedule = method["kind"], method["schedule"]
    flags = {"apo": "none", "weight_decay": method["weight_decay"], **TRAINER_SCHEDULES[schedule]}
    if schedule.startswith("warmup_"):
        flags["warmup_steps"] = method["warmup_fraction"]  # a float < 1: a ratio
    if kind in ("sgd", "apo_precond") and method.get("base", "sgd") == "sgd":
        flags |= {"optim": "sgd", "optim_args": f"momentum={method['momentum']}"}
    if kind in ("apo_lr", "apo_precond"):
        bounded = method.get("trust_region", "none") != "none"  # an opening only with a bound
        flags |= {"apo": kind[4:], **{f"apo_{k}": method[k] for k in APO_FLAGS if k in method
                                      and (bounded or k != "trust_region_opening")}}
        if kind == "apo_precond":
            flags["apo_precond_size"] = method["size"]
        return flags, None
    if kind == "sf_adamw":  # the Trainer's own --optim schedule_free_adamw
        return flags | {"optim": "schedule_free_adamw", "lr_scheduler_type": "constant",
                        "warmup_steps": int(method["warmup_fraction"] * steps)}, None
    if kind in ("adamw", "sgd"):
        return flags, None
    return flags, {**method, "schedule": "constant"}
