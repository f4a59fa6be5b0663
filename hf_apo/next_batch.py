"""APO-LR's next-batch estimator (``loss_batch="next"``): D, the discounted sum of the steps taken, as an object with
its own state. The meta-gradient it enters: :func:`hf_apo.lr_meta_gradient.displacement_meta_gradient`.

    D = Σ_{s ≤ t} γ^(t−s) Δ_s,   γ = 1 − 1/horizon,

kept without a copy of θ: D ← γ·D − θ before a step, D += θ′ after it. D is in at least float32 (it sums many small
steps: not in bf16), one copy of the parameters (this rank's shards when they are sharded).
"""

from __future__ import annotations

from typing import Any

import torch

from .lr_meta_gradient import MetaGradient


class Displacement:
    """D, the discounted sum of the steps taken (None until the first tracked step, and after :meth:`clear`)."""

    def __init__(self):
        self.tensors: list[torch.Tensor] | None = None

    def before_step(self, params: list[torch.Tensor], gamma: float) -> None:
        """D ← γ·D − θ (then :meth:`after_step`: D ← γ·D + Δ)."""
        if self.tensors is None:
            self.tensors = float_zeros_like(params)
        if gamma != 1.0:
            torch._foreach_mul_(self.tensors, gamma)
        torch._foreach_sub_(self.tensors, [p.detach() for p in params])

    def after_step(self, params: list[torch.Tensor]) -> None:
        """D += θ′."""
        torch._foreach_add_(self.tensors, [p.detach() for p in params])

    def clear(self) -> None:
        """Drop D (a one-step horizon rebuilds it at the next look-ahead: no persistent copy of the parameters)."""
        self.tensors = None

    def state_dict(self) -> list[torch.Tensor] | None:
        return None if self.tensors is None else [d.clone() for d in self.tensors]

    def load_state_dict(self, state: list[torch.Tensor] | None, params: list[torch.Tensor]) -> None:
        self.tensors = None if state is None else [d.to(device=p.device) for d, p in zip(state, params)]

    def nbytes(self) -> int:
        return sum(d.numel() * d.element_size() for d in self.tensors or ())


def tracks_displacement(objective, meta_lr: float, meta_step_due: bool) -> bool:
    """Whether this step adds to D: with a horizon of one step only a look-ahead step does (D = Δ)."""
    return (objective is not None and objective.loss_batch == "next" and meta_lr > 0
            and (meta_step_due or objective.horizon > 1))


def float_zeros_like(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zeros shaped like ``params`` in at least float32."""
    return [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]


def pending_state(pending, displacement: Displacement) -> dict[str, Any] | None:
    """The ``pending`` entry of APO-LR's state dict: the look-ahead's part of the meta-gradient awaiting the next
    gradient (a :class:`~hf_apo.lr.MetaGradient` or None) and D."""
    if pending is None and displacement.tensors is None:
        return None
    return {
        "meta_grad": None if pending is None else pending.meta_grad.clone(),
        "objective": None if pending is None else pending.objective.clone(),
        "displacement": displacement.state_dict(),
    }


def load_pending_state(state: dict[str, Any] | None, displacement: Displacement, params: list[torch.Tensor]):
    """:func:`pending_state`'s inverse: D loaded onto the parameters' devices, and the pending meta-gradient (a
    :class:`~hf_apo.lr_meta_gradient.MetaGradient`, or None)."""
    state = state or {}
    displacement.load_state_dict(state.get("displacement"), params)
    if state.get("meta_grad") is None:
        return None
    device = params[0].device if params else torch.device("cpu")
    return MetaGradient(state["meta_grad"].to(device), state["objective"].to(device))
