"""APO-Precond's AdamW base (``base="adamw"``) as a rule object, :class:`AdamWRule`: P_φ applied to AdamW's
direction, torch's own ops where the factors are the identity, and the meta-gradients through it (the look-ahead's,
and the next batch's).

AdamW (``base="adamw"``). Per group (lr η, betas β₁ β₂, eps ε, weight decay ω), with torch.optim.AdamW's moments of
the raw gradient g (step t, starting at 1):

    m ← β₁·m + (1 − β₁)·g,   v ← β₂·v + (1 − β₂)·g²,   u = m̂ / (√v̂ + ε),   m̂ = m/(1 − β₁ᵗ),  v̂ = v/(1 − β₂ᵗ)
    θ ← θ·(1 − η·ω) − η · P_φ(u)                     # decoupled weight decay outside P, as torch.optim.AdamW

P is linear, so the step is computed as torch does: θ·(1 − ηω) + (−η/(1 − β₁ᵗ)) · P(m / denom) with
denom = √v / √(1 − β₂ᵗ) + ε; the moments, denom and step size come from the same ops in the same order as
torch.optim.AdamW's single-tensor step. Exactness:

* identity factors (meta_lr = 0, or before the first meta step): the step *is* torch's, ``θ.mul_(1 − ηω)`` then
  ``θ.addcdiv_(m, denom, value=−η/(1 − β₁ᵗ))``: bitwise equal to ``torch.optim.AdamW(foreach=False)``, which is its
  default on CPU (tests/test_precond_adamw.py, 50 steps, two groups with weight decay, float32 and bf16 without
  stochastic rounding); also bitwise equal to ``foreach=True`` on CPU (tested). Against ``fused=True`` (CPU: it differs
  from torch's own single-tensor step by up to 1.2e-7 relative in the same test) and the CUDA kernels of
  ``foreach``/``fused`` (torch's CUDA defaults), equality is only up to their rounding (untested on CUDA).
* learned factors: θ += −η/(1 − β₁ᵗ) · P(m / denom), the last product of a dense right side accumulated into θ by
  ``addmm_`` (:meth:`~hf_apo.factors.KroneckerFactors.add_preconditioned_`), so the quotient is rounded before it is
  scaled, where ``addcdiv`` scales first. Factors that are exactly I but taken through this path differ from torch's by
  that rounding only: measured at most 1.5e-7 relative (max |Δθ| / max |θ| per tensor, 50 float32 steps; the test
  allows 1e-6), the size of torch's own fused-vs-single-tensor difference.

The moments are AdamW's, in the parameter's dtype, in the state dict under torch's keys (``step``, a float32 scalar
tensor as torch keeps it, float64 under a float64 default dtype; ``exp_avg``, ``exp_avg_sq``), so a torch.optim.AdamW state loads (meta off: the run continues bitwise) and a
resume is bitwise. ``amsgrad`` and ``maximize`` are refused.

Meta-gradient (AdamW). u does not depend on φ, and θ′ = θ + Δ(φ) depends on φ only through P_φ(u) with
∂Δ/∂P(u) = −η, so with the cotangent ∇_{θ′}Q = v + λ_WSD · Δ:

    ∇_φ Q = VJP of φ ↦ P_φ(m / denom) with cotangent −η/(1 − β₁ᵗ) · (v + λ_WSD · Δ)     (the same VJP as for SGD).

The look-ahead computes this step's moments (t + 1) without writing them: the real step, after the meta step, writes
them. ``lookahead_steps`` follows SGD's momentum buffer and is refused above 1 for AdamW.
"""

from __future__ import annotations

from typing import Any

import torch

from .distributed import local_tensor
from .objective import ProximalObjective
from .precision import StochasticRounding, no_autocast

ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")


class AdamWRule:
    """The AdamW base of :class:`~hf_apo.precond.APOPrecond`, chosen once at construction; its methods take the
    optimizer's per-parameter ``state`` (torch.optim.AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``) and ``factors``."""

    name = "adamw"

    def __init__(self, rounding: StochasticRounding, groups: int):
        self.rounding = rounding
        self.last_step_lrs: list[float | None] = [None] * groups  # η of each group's last step (a multiplier included)

    @staticmethod
    def validate_group(group: dict[str, Any]) -> None:
        """Refuse a parameter group whose hyperparameters AdamW would ignore or cannot take."""
        if "betas" not in group or "eps" not in group:
            raise ValueError("APO-Precond with base='adamw' got a parameter group without betas and eps (a state saved "
                             "with base='sgd'?).")
        foreign = sorted(k for k in ("momentum", "dampening", "nesterov", "amsgrad", "maximize") if group.get(k))
        if foreign:
            raise ValueError(f"APO-Precond with base='adamw' does not take {', '.join(foreign)} in a parameter group.")
        betas = group["betas"]
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}.")
        if not group["eps"] >= 0 or not group["lr"] >= 0 or not group["weight_decay"] >= 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {group['lr']}, {group['eps']} and "
                             f"{group['weight_decay']}.")

    def moments(self, p: torch.Tensor, group: dict[str, Any], state, write: bool):
        """(m, denom, step_size) of this step for parameter ``p``, as torch.optim.AdamW computes them (same ops, same
        order): m and v updated with the raw gradient, denom = √v / √(1 − β₂ᵗ) + ε, step_size = η / (1 − β₁ᵗ).

        ``write``: update the state in place (the real step); otherwise compute this step's moments into new tensors
        and leave the state as it is (the look-ahead). For a stochastically rounded bf16 parameter, denom is float32.
        """
        state = state[p]
        grad = local_tensor(p.grad)
        beta1, beta2 = group["betas"]
        if state:
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            step = float(state["step"])
        else:
            local = local_tensor(p)
            exp_avg = torch.zeros_like(local, memory_format=torch.preserve_format)
            exp_avg_sq = torch.zeros_like(local, memory_format=torch.preserve_format)
            step = 0.0
            if write:
                state["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
        if write:
            state["step"] += 1
            step = float(state["step"])
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        else:
            step += 1
            exp_avg = exp_avg.lerp(grad, 1 - beta1)
            exp_avg_sq = exp_avg_sq.mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        wide = self.rounding.applies(p)
        denom, step_size = _denom_and_step_size(exp_avg_sq, step, group, group["lr"], wide, owned=not write)
        return exp_avg, denom, step_size

    def adam_input(self, p: torch.Tensor, exp_avg: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
        """m / denom, the tensor P acts on (u = that / (1 − β₁ᵗ)); float32 for a stochastically rounded bf16 one.
        Written into ``denom`` (the same values as ``m / denom``: one parameter-size temporary fewer)."""
        return torch.div(exp_avg.float() if self.rounding.applies(p) else exp_avg, denom, out=denom)

    def step_(self, index: int, group, params, state, factors) -> None:
        """The real AdamW step of one group with the current factors (see the module docstring for where it is
        bitwise torch's); records the LR it used for the next-batch meta step."""
        self.last_step_lrs[index] = float(group["lr"])
        decay = 1 - group["lr"] * group["weight_decay"]
        for p in params:
            target, wide = local_tensor(p), self.rounding.applies(p)
            if not wide and group["weight_decay"] != 0:
                target.mul_(decay)
            exp_avg, denom, step_size = self.moments(p, group, state, write=True)
            if wide:
                with no_autocast(p):
                    update = factors[p].precondition(self.adam_input(p, exp_avg, denom), owned=True)
                self.rounding.add_(target, update, -step_size, decay=decay)
            elif factors[p].is_identity:
                target.addcdiv_(exp_avg, denom, value=-step_size)  # torch.optim.AdamW's own op
            else:
                with no_autocast(p):
                    factors[p].add_preconditioned_(target, self.adam_input(p, exp_avg, denom), -step_size, owned=True)

    def lookahead_(self, group, params, state, factors) -> list[float]:
        """θ ← θ′ = θ·(1 − ηω) − η/(1 − β₁ᵗ) · P_φ(m / denom) in place, with the current (not cached) factors and
        this step's moments, which are not written; returns the cotangent scales −η/(1 − β₁ᵗ) (∂Δ/∂P(m/denom))."""
        scales = []
        for p in params:
            target = local_tensor(p)
            exp_avg, denom, step_size = self.moments(p, group, state, write=False)
            if group["weight_decay"] != 0:
                target.mul_(1 - group["lr"] * group["weight_decay"])
            with no_autocast(p):
                factors[p].add_preconditioned_(target, self.adam_input(p, exp_avg, denom), -step_size, cached=False,
                                               owned=True)
            del exp_avg, denom
            scales.append(-step_size)
        return scales

    def preconditioned_input(self, p, group, state) -> torch.Tensor:
        """What P acts on: m / denom (recomputed: cheap, element-wise, not kept)."""
        exp_avg, denom, _ = self.moments(p, group, state, write=False)
        return self.adam_input(p, exp_avg, denom)

    def next_batch_meta_gradients(self, param_groups, state, factors):
        """``loss_batch="next"`` (λ 0): the factors' gradients of the loss of this step's batch at the parameters the
        previous step gave, from the gradient the training loop has just computed. No forward, no backward.

        θ_t+1 = θ_t·(1 − η_t·ω) − η_t/(1 − β₁ᵗ) · P_φ(m_t / denom_t), and the moments after step t are still in the
        state, so with g_t+1 = ∇L_{B_t+1}(θ_t+1) in ``.grad``

            ∂L_{B_t+1}(θ_t+1)/∂φ = VJP of φ ↦ P_φ(m_t / denom_t) with cotangent −η_t/(1 − β₁ᵗ) · g_t+1,

        the hypergradient of the factors (the same VJP as the look-ahead's; η_t is the LR the step used, a learned
        multiplier included). One step late: the factors that step t used are the current ones. Returns the
        parameters reached (none before a first step) and their factors' gradients, in that order.
        """
        params, meta_grads = [], []
        for group, lr in zip(param_groups, self.last_step_lrs):
            for p in (p for p in group["params"] if p.grad is not None):
                if lr is None or not state[p]:
                    continue
                # the step the state was last updated by, with the LR it was taken with
                exp_avg, exp_avg_sq, step = state[p]["exp_avg"], state[p]["exp_avg_sq"], float(state[p]["step"])
                denom, step_size = _denom_and_step_size(exp_avg_sq, step, group, lr, self.rounding.applies(p))
                with no_autocast(p):
                    # a new tensor: the real step still needs .grad (an in-place mul_ would scale it)
                    cotangent = local_tensor(p.grad).to(factors[p].dtype).mul(-step_size)
                    meta_grads.extend(factors[p].vjp(self.adam_input(p, exp_avg, denom), cotangent, owned=True))
                params.append(p)
        return params, meta_grads


def adamw_groups(adamw: torch.optim.AdamW, meta_kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """The parameter groups and hyperparameters (lr, betas, eps, weight_decay, per group) of an existing
    ``torch.optim.AdamW``; ValueError on another class (``torch.optim.Adam`` included: its weight decay is not
    decoupled by default), ``amsgrad=True``, ``maximize=True`` or a ``base`` other than ``"adamw"`` in
    ``meta_kwargs`` (removed from it)."""
    if not isinstance(adamw, torch.optim.AdamW):
        raise ValueError(
            f"APOPrecond.from_adamw needs a torch.optim.AdamW; got {type(adamw).__name__}. Use from_sgd for "
            "torch.optim.SGD."
        )
    if meta_kwargs.get("base", "adamw") != "adamw":
        raise ValueError(f"APOPrecond.from_adamw builds base='adamw', got base={meta_kwargs['base']!r}.")
    meta_kwargs.pop("base", None)
    if any(group.get("amsgrad") for group in adamw.param_groups):
        raise ValueError("APO-Precond does not support AdamW's amsgrad=True; build the AdamW with amsgrad=False.")
    if any(group.get("maximize") for group in adamw.param_groups):
        raise ValueError("APO-Precond does not support maximize=True.")
    return [
        {"params": group["params"], **{k: _scalar(group[k]) if k != "betas" else tuple(map(_scalar, group[k]))
                                       for k in ADAMW_KEYS}}
        for group in adamw.param_groups
    ]


def check_objective(objective: ProximalObjective | None, base: str) -> None:
    """The meta-objectives APO-Precond takes: the paper's same-batch one, or over AdamW the next-batch loss alone."""
    if objective is None or objective.loss_batch == "same":
        return
    if base != "adamw" or objective.lambda_fsd or objective.lambda_wsd or objective.horizon != 1:
        raise ValueError(
            "APO-Precond's next-batch meta-objective (loss_batch='next') is the next batch's loss alone over AdamW: "
            "it needs base='adamw', lambda_fsd = lambda_wsd = 0 and horizon 1 (the moments of the step it scores are "
            "still in AdamW's state; SGD's gradient is not). Use loss_batch='same' otherwise."
        )


def _denom_and_step_size(exp_avg_sq: torch.Tensor, step: float, group: dict[str, Any], lr: float, wide: bool,
                         owned: bool = False):
    """denom = √v / √(1 − β₂ᵗ) + ε and the step size η / (1 − β₁ᵗ), with torch.optim.AdamW's ops in its order (v in
    float32 for a stochastically rounded bf16 parameter, ``wide``). The division and ε run in place in the new √v,
    and with ``owned`` (v is a temporary) so does the square root: the same values, fewer parameter-size
    temporaries."""
    beta1, beta2 = group["betas"]
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    source = exp_avg_sq.float() if wide else exp_avg_sq
    root = source.sqrt_() if owned or source is not exp_avg_sq else source.sqrt()
    denom = root.div_(bias_correction2_sqrt).add_(group["eps"])
    return denom, lr / bias_correction1


def _scalar(value):
    """A float hyperparameter of a torch optimizer (it may hold a 0-dim tensor) as a Python float."""
    return value.item() if isinstance(value, torch.Tensor) else value


def _scalar_dtype() -> torch.dtype:
    """The dtype of torch.optim.AdamW's ``step`` tensor (``torch.optim.optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def adamw_defaults(lr, betas, eps, weight_decay, momentum, dampening, nesterov, lookahead_steps) -> dict[str, Any]:
    """The parameter groups' defaults of the AdamW base; ValueError on SGD's hyperparameters."""
    if momentum != 0 or dampening != 0 or nesterov:
        raise ValueError("momentum, dampening and nesterov are SGD's hyperparameters; with base='adamw' the "
                         "first moment's decay is betas[0].")
    if lookahead_steps != 1:
        raise ValueError(
            f"lookahead_steps={lookahead_steps} follows SGD's momentum buffer; base='adamw' supports only the "
            "one-step look-ahead (lookahead_steps=1)."
        )
    return dict(lr=lr, betas=tuple((0.9, 0.999) if betas is None else betas), eps=1e-8 if eps is None else eps,
                weight_decay=weight_decay)
