"""The base optimizers APO-LR can wrap, and why each qualifies.

APO-LR scales ``group["lr"]`` by a learned multiplier and needs two properties of the wrapped optimizer:

1. from a given state, its step is linear in ``group["lr"]`` (so the step taken with multiplier exp(φ) is exp(φ)
   times the step with the scheduled LR, and a step can be rescaled after φ changed);
2. its state (moments, buffers) is built from the gradients alone, never from the LR, so the multiplier of one
   step does not leak into the next ones.

:data:`REGISTRY` names every optimizer class known to have both, keyed by ``<top-level package>.<class name>``, with
the reason and, where an option breaks a property, a check of the parameter group. A test per entry scales the LR
by c from the same state and compares the steps (tests/test_linear_lr.py; CUDA-only packages are skipped there with
the reason). Not linear, and refused: Schedule-Free (its averaging weights depend on the LR), Prodigy / D-Adaptation
/ DoG / Mechanic (their own step-size estimate is state), Rprop (the LR is only the first step size), ASGD, L-BFGS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearInLR:
    why: str
    breaks: Callable[[dict], str | None] = lambda group: None  # what in a group breaks the properties, or None


def _adafactor(group: dict) -> str | None:
    if group.get("relative_step"):
        return "relative_step=True computes its own LR from the step count and ignores group['lr']"
    if group.get("beta1") is not None:
        return "beta1 averages updates that already include the LR, so its state would depend on the LR"
    return None


def _bnb(group: dict) -> str | None:
    if group.get("max_unorm", 0.0):
        return "max_unorm > 0 clips the update relative to the parameter norm, which is not linear in the LR"
    return None


_ADAM_WHY = "Δ = −lr·m̂/(√v̂ + ε) (− lr·wd·θ when decoupled); m, v are averages of gradients"
REGISTRY: dict[str, LinearInLR] = {
    "torch.SGD": LinearInLR("Δ = −lr·(buffer or g + wd·θ); the momentum buffer sums gradients"),
    "torch.RMSprop": LinearInLR("Δ = −lr·(g or its momentum)/(√avg(g²) + ε); the averages are of gradients"),
    "torch.Adam": LinearInLR(_ADAM_WHY),
    "torch.AdamW": LinearInLR(_ADAM_WHY),
    "torch.NAdam": LinearInLR("Δ = −lr·(Nesterov mix of g and m̂)/(√v̂ + ε); μ products depend on the step only"),
    "torch.Adamax": LinearInLR("Δ = −lr/(1 − β₁ᵗ)·m/u with u a running max of |g|"),
    "torch.Adagrad": LinearInLR("Δ = −lr/(1 + (t − 1)·lr_decay)·g/(√Σg² + ε)"),
    "transformers.Adafactor": LinearInLR(
        "with relative_step=False and no beta1 (the Trainer's --optim adafactor): Δ = −lr·(RMS(θ) if "
        "scale_parameter)·clip(g/√v̂) − lr·wd·θ; the factored second moment is of gradients", _adafactor),
    **{f"bitsandbytes.{name}": LinearInLR(
        "the CUDA kernel scales the update by lr; the (8-bit) states are quantized averages of gradients", _bnb)
       for name in ("AdamW", "AdamW8bit", "AdamW32bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit",
                    "Adam", "Adam8bit", "Adam32bit", "PagedAdam", "PagedAdam8bit", "PagedAdam32bit")},
    **{f"bitsandbytes.{name}": LinearInLR(
        "Δ = −lr·sign(β₁·m + (1 − β₁)·g) − lr·wd·θ; m is an average of gradients", _bnb)
       for name in ("Lion", "Lion8bit", "Lion32bit", "PagedLion", "PagedLion8bit", "PagedLion32bit")},
    **{f"bitsandbytes.{name}": LinearInLR("Δ = −lr·g/(√avg(g²) + ε); the (8-bit) average is of gradients", _bnb)
       for name in ("RMSprop", "RMSprop8bit", "RMSprop32bit")},
    "hf_apo.APOPrecond": LinearInLR(
        "Δ = −lr·P_φ(SGD's or AdamW's direction) − lr·wd·θ; the moments are of gradients, and the factors φ change "
        "only at meta steps (their meta-gradient scales with the LR, their Adam step does not)"),
    **{f"torchao.{name}": LinearInLR(
        "Δ = −lr·m̂/(√v̂ + ε) − lr·wd·θ with m, v averages of gradients stored in 8 or 4 bits (dequantized)")
       for name in ("AdamW8bit", "AdamW4bit", "Adam8bit", "Adam4bit")},
}


def registry_key(optimizer: torch.optim.Optimizer) -> str:
    """``<top-level package>.<class name>`` of the optimizer's exact class (a subclass may change the step)."""
    cls = type(optimizer)
    return f"{cls.__module__.split('.')[0]}.{cls.__name__}"


def check_linear_in_lr(optimizer: torch.optim.Optimizer) -> LinearInLR:
    """The registry entry of ``optimizer``; ValueError naming the supported optimizers when there is none, or naming
    the option that breaks linearity."""
    entry = REGISTRY.get(registry_key(optimizer))
    if entry is None:
        raise ValueError(
            f"APO-LR wraps an optimizer whose step is linear in the learning rate and whose state does not depend on "
            f"it; {registry_key(optimizer)} is not known to be one (schedule-free, Prodigy, D-Adaptation, DoG, "
            f"Mechanic and Rprop are not). Supported: {', '.join(sorted(REGISTRY))}."
        )
    for group in optimizer.param_groups:
        reason = entry.breaks(group)
        if reason is not None:
            raise ValueError(f"APO-LR cannot wrap this {registry_key(optimizer)}: {reason}.")
    return entry


BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def wrapped_optimizer(params_or_optimizer, base: str, base_kwargs: dict) -> torch.optim.Optimizer:
    """The optimizer APO-LR wraps: the one given, or one built from ``base``; ValueError unless its step is linear in
    the LR (:mod:`hf_apo.linear_lr`, naming what is supported)."""
    if isinstance(params_or_optimizer, torch.optim.Optimizer):
        if base_kwargs:
            raise ValueError(f"base optimizer keyword arguments {sorted(base_kwargs)} given with a built optimizer.")
        optimizer = params_or_optimizer
    else:
        if base not in BASE_OPTIMIZERS:
            raise ValueError(f"base must be one of {sorted(BASE_OPTIMIZERS)}, got {base!r}.")
        optimizer = BASE_OPTIMIZERS[base](params_or_optimizer, **base_kwargs)
    check_linear_in_lr(optimizer)
    return optimizer
