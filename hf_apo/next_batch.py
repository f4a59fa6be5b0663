"""APO-LR's next-batch estimator (``loss_batch="next"``): D, the discounted sum of the steps taken, and the
meta-gradient finished one step late with the gradient the training loop computed there. See :mod:`hf_apo.lr`."""

from __future__ import annotations

from typing import Any

import torch

from .distributed import local_tensor


class NextBatchTerms:
    """The part of :class:`~hf_apo.lr.APOLR` that keeps D and the pending look-ahead terms (a mixin: it reads the
    optimizer's groups, objective and meta step)."""

    def _tracks_displacement(self, meta_step_due: bool) -> bool:
        """Whether this step adds to D: with a horizon of one step only a look-ahead step does (D = Δ)."""
        return (
            self.objective is not None
            and self.objective.loss_batch == "next"
            and self.meta_lr > 0
            and (meta_step_due or self.objective.horizon > 1)
        )

    def _displacement_before_step(self) -> None:
        """D ← γ·D − θ (then + θ′ after the step: D ← γ·D + Δ, without a copy of θ)."""
        if self._displacement is None:
            self._displacement = _float_zeros_like(self._local_params())
        gamma = self.objective.discount
        if gamma != 1.0:
            torch._foreach_mul_(self._displacement, gamma)
        torch._foreach_sub_(self._displacement, [p.detach() for p in self._local_params()])

    def _displacement_after_step(self) -> None:
        torch._foreach_add_(self._displacement, [p.detach() for p in self._local_params()])

    def _finish_delayed_meta_step(self) -> None:
        """loss_batch "next": add ⟨D, ∇L_{B_t+1}(θ_t+1)⟩ per group, read from ``.grad``, and update φ.

        D = Σ_s γ^(t−s) Δ_s is the discounted sum of the steps taken (Δ_t alone for a one-step horizon), so this is
        ∂/∂φ of Σ_k γ^k L_{B_t+k+1}(θ_t+k+1) with each step's effect on the later iterates taken as persistent.
        The step already taken is not rescaled: the gradient in ``.grad`` was computed at it, and the step that
        follows uses the updated φ. Under the Trainer, ``.grad`` is the reduced, unscaled and clipped gradient.
        """
        (meta_grad, objective), self._pending = self._pending, None
        # D lists every parameter, group after group (the order of all_params)
        displacements = _split(self._displacement, [len(group["params"]) for group in self.param_groups])
        dots_per_group = torch.zeros_like(meta_grad)
        for index, (group, group_displacement) in enumerate(zip(self.param_groups, displacements)):
            dots = [
                _dot(d, local_tensor(p.grad)) for p, d in zip(group["params"], group_displacement) if p.grad is not None
            ]
            if dots:
                dots_per_group[index] = torch.stack(dots).sum()
        self.layout.sum_over_shards(dots_per_group)  # sharded: this rank's shards of D and g
        meta_grad = meta_grad + dots_per_group
        if self.objective.horizon == 1:
            self._displacement = None  # rebuilt at the next look-ahead: no persistent copy of the parameters
        self._apply_meta_gradient(meta_grad, objective)

    def _local_params(self) -> list[torch.Tensor]:
        """The parameters, or when sharded this rank's shards of them (views, so D follows the steps)."""
        return [local_tensor(p) for p in self.all_params()]

    def _pending_state(self) -> dict[str, Any] | None:
        """loss_batch "next": the look-ahead's part of the meta-gradient and D (one copy of the parameters)."""
        if self._pending is None and self._displacement is None:
            return None
        return {
            "meta_grad": None if self._pending is None else self._pending[0].clone(),
            "objective": None if self._pending is None else self._pending[1].clone(),
            "displacement": None if self._displacement is None else [d.clone() for d in self._displacement],
        }

    def _load_pending_state(self, state: dict[str, Any] | None) -> None:
        self._pending = self._displacement = None
        if state is None:
            return
        params = self.all_params()
        if state["displacement"] is not None:
            self._displacement = [d.to(device=p.device) for d, p in zip(state["displacement"], params)]
        if state["meta_grad"] is not None:
            device = params[0].device if params else torch.device("cpu")
            self._pending = (state["meta_grad"].to(device), state["objective"].to(device))


def _float_zeros_like(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zeros shaped like ``params`` in at least float32 (D sums many small steps: not in bf16)."""
    return [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32)) for p in params]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ in at least float32 (bf16/fp16 products are summed in float32)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    if a.dtype == dtype and b.dtype == dtype:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a.to(dtype) * b.to(dtype)).sum()


def _split(items: list, sizes: list[int]) -> list[list]:
    """``items`` cut into consecutive chunks of the given sizes."""
    chunks, start = [], 0
    for size in sizes:
        chunks.append(items[start:start + size])
        start += size
    return chunks
