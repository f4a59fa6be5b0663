"""APO-Precond's SGD base (``base="sgd"``) as a rule object, :class:`SGDRule`: the update with P_φ applied to the
gradient before the momentum, the look-ahead, and what the meta-gradient's VJP acts on.

SGD (``base="sgd"``, the default). The update of parameter θ with gradient g, per group (lr η, momentum μ,
dampening τ, weight decay ω):

    d = P_φ(g) + ω · θ                               # weight decay outside P: P never rescales the decay
    b = μ · b + (1 − τ) · d   (b = d on the first step)
    Δ = −η · (d + μ · b)  with Nesterov,  −η · b  otherwise  (−η · d without momentum)

With P = I this is ``torch.optim.SGD`` exactly (tested bit for bit). P_φ is :class:`~hf_apo.factors.KroneckerFactors`.

Meta-gradient (no Hessian). θ′ = θ + Δ(φ) depends on φ only through P_φ(g), with ∂Δ/∂P = −η·c where c = 1
without momentum, 1 − τ with a momentum buffer (1 + μ(1 − τ) with Nesterov), and 1 (1 + μ) on the first step.
So with u = ∇_{θ′}Q = v + λ_WSD · Δ,

    ∇_φ Q = VJP of φ ↦ P_φ(g) with cotangent −η · c · u,

written by hand (:meth:`~hf_apo.factors.KroneckerFactors.vjp`: two matmuls per dense side, no autograd graph).

Momentum. With momentum μ the fresh P(g) keeps acting through the buffer for about 1/(1 − μ) steps, which a
one-step look-ahead does not see. ``lookahead_steps = n`` looks ahead n steps of the same update rule with no new
gradient (and no weight decay): the buffer b′ after this step decays as μᵏ·b′, so

    θ′ = θ + Δ − η · m · b′,   m = Σ_{k=1}^{n−1} μᵏ  (μᵏ⁺¹ with Nesterov),

in closed form, and c grows by m times b′'s coefficient on P(g). n = 1 is the paper's one-step look-ahead; the
proximity terms then measure the displacement the momentum will carry.
"""

from __future__ import annotations

from typing import Any

import torch

from .distributed import local_tensor
from .precision import StochasticRounding, no_autocast

SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")


class SGDRule:
    """The SGD base of :class:`~hf_apo.precond.APOPrecond`, chosen once at construction; its methods take the
    optimizer's per-parameter ``state`` (the momentum buffers) and ``factors`` (P_φ per parameter)."""

    name = "sgd"

    def __init__(self, lookahead_steps: int, rounding: StochasticRounding, groups: int):
        self.lookahead_steps = lookahead_steps
        self.rounding = rounding
        self.last_step_lrs: list[float | None] = [None] * groups  # the next-batch meta step is AdamW's: not recorded

    @staticmethod
    def validate_group(group: dict[str, Any]) -> None:
        """SGD's groups are checked by the constructor's arguments."""

    def future_weight(self, group: dict[str, Any]) -> float:
        """m: the weight of the new buffer b′ in the look-ahead's steps after the first (see the module docstring)."""
        momentum = group["momentum"]
        first = momentum * momentum if group["nesterov"] else momentum
        return sum(first * momentum**k for k in range(self.lookahead_steps - 1)) if momentum else 0.0

    def coefficient(self, group: dict[str, Any], has_buffer: bool) -> float:
        """c with ∂Δ/∂P(g) = −η · c for the look-ahead's displacement Δ (see the module docstring)."""
        momentum, dampening = group["momentum"], group["dampening"]
        if momentum == 0:
            return 1.0
        fresh = 1.0 if not has_buffer else 1.0 - dampening
        first = fresh * (1.0 + momentum) if group["nesterov"] else fresh
        return first + fresh * self.future_weight(group)

    def direction(self, group, params, preconditioned, state, update_buffers: bool,
                  lookahead: bool = False) -> list[torch.Tensor]:
        """The step direction −Δ/η from P(g), as torch.optim.SGD computes it from g (same ops, same order).

        ``lookahead``: the look-ahead's direction, which adds m · b′ for the momentum's later steps.
        """
        momentum, dampening = group["momentum"], group["dampening"]
        directions = list(preconditioned)
        if group["weight_decay"] != 0:
            directions = torch._foreach_add(directions, [local_tensor(p) for p in params], alpha=group["weight_decay"])
        if momentum == 0:
            return directions
        buffers = []
        for p, d in zip(params, directions):
            buffer = state[p].get("momentum_buffer")
            if buffer is None:
                buffer = torch.clone(d).detach()
                if update_buffers:
                    state[p]["momentum_buffer"] = buffer
            elif update_buffers:
                buffer.mul_(momentum).add_(d, alpha=1 - dampening)
            else:
                buffer = buffer.mul(momentum).add_(d, alpha=1 - dampening)
            buffers.append(buffer)
        directions = torch._foreach_add(directions, buffers, alpha=momentum) if group["nesterov"] else buffers
        future = self.future_weight(group) if lookahead else 0.0
        if future:
            directions = torch._foreach_add(directions, buffers, alpha=future)
        return directions

    def step_(self, index: int, group, params, state, factors) -> None:
        """The real step of one group: θ ← θ − η · direction(P(g)), P with the cached factors; a bf16 parameter's
        update rounded stochastically (:class:`~hf_apo.precision.StochasticRounding`)."""
        with no_autocast(params[0]):
            preconditioned = [factors[p].precondition(local_tensor(p.grad)) for p in params]
        directions = self.direction(group, params, preconditioned, state, update_buffers=True)
        targets = [local_tensor(p) for p in params]
        if self.rounding.enabled and any(t.dtype == torch.bfloat16 for t in targets):
            for target, direction in zip(targets, directions):
                if target.dtype == torch.bfloat16:
                    self.rounding.add_(target, direction, -group["lr"])
                else:
                    target.add_(direction, alpha=-group["lr"])
        else:
            torch._foreach_add_(targets, directions, alpha=-group["lr"])

    def lookahead_(self, group, params, state, factors) -> list[float]:
        """θ ← θ′ in place for one group (the momentum's later steps included, buffers not written); the cotangent
        scales −η·c (see the module docstring)."""
        scales = [-group["lr"] * self.coefficient(group, state[p].get("momentum_buffer") is not None) for p in params]
        with no_autocast(params[0]):
            preconditioned = [factors[p].precondition_full(local_tensor(p.grad)).to(p.dtype) for p in params]
        directions = self.direction(group, params, preconditioned, state, update_buffers=False, lookahead=True)
        del preconditioned
        torch._foreach_add_([local_tensor(p) for p in params], directions, alpha=-group["lr"])
        return scales

    @staticmethod
    def preconditioned_input(p, group, state) -> torch.Tensor:
        """What P acts on: the gradient."""
        return local_tensor(p.grad)

    def next_batch_meta_gradients(self, param_groups, state, factors):
        raise ValueError("APO-Precond's next-batch meta step needs base='adamw' (SGD's gradient is not in its state).")


def sgd_groups(sgd: torch.optim.SGD) -> list[dict[str, Any]]:
    """The parameter groups and hyperparameters of an existing ``torch.optim.SGD``; ValueError on another class or
    on ``maximize=True``."""
    if not isinstance(sgd, torch.optim.SGD):
        raise ValueError(f"APO-Precond preconditions SGD; got {type(sgd).__name__}.")
    if any(group.get("maximize") for group in sgd.param_groups):
        raise ValueError("APO-Precond does not support maximize=True.")
    return [{"params": group["params"], **{k: group[k] for k in SGD_KEYS}} for group in sgd.param_groups]


def sgd_defaults(lr, momentum, dampening, weight_decay, nesterov, betas, eps) -> dict[str, Any]:
    """The parameter groups' defaults of the SGD base; ValueError on what SGD would not take."""
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov needs momentum > 0 and dampening 0, as in torch.optim.SGD.")
    if betas is not None or eps is not None:
        raise ValueError("betas and eps are AdamW's hyperparameters: pass base='adamw' to use them.")
    return dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
