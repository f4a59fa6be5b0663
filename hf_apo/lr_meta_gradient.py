"""APO-LR's meta-gradient formulas as pure functions of tensors (:mod:`hf_apo.lr` calls them; tests can too).

With Δ = −η·d and η = group["lr"]·exp(φ_group), ∂Δ/∂φ_group = Δ_group, so with v = ∇_{θ′}Q of the terms evaluated at
the look-ahead θ′ = θ + Δ

    ∂Q/∂φ_group = ⟨Δ_group, v_group⟩ + λ_WSD · ‖Δ_group‖²                     (:func:`lookahead_meta_gradient`),

and with the loss term scored on the next batch (``loss_batch="next"``), D = Σ_{s ≤ t} γ^(t−s) Δ_s and
g = ∇L_{B_t+1}(θ_t+1) read from ``.grad`` one step later,

    ∂Q/∂φ_group += ⟨D_group, g_group⟩                                          (:func:`displacement_meta_gradient`).

Δ is linear in η for every supported base, so after φ → φ_new the step already taken becomes the one φ_new gives by

    θ′ += Δ · (exp(φ_new − φ) − 1)   per group                                  (:func:`rescale_step_`).

A negative ∂Q/∂φ raises the learning rate. Products of bf16/fp16 tensors are summed in at least float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class MetaGradient:
    """∂Q/∂φ per parameter group (this rank's part until :meth:`~hf_apo.lr.APOLR.meta_step` averages it) and Q's value."""

    meta_grad: torch.Tensor
    objective: torch.Tensor


@dataclass
class Lookahead:
    """The base step just taken as the look-ahead θ′ = θ + Δ(φ), and what the terms at θ′ need."""

    sharded_params: list[torch.Tensor]  # the parameters the step updated, group after group (as the optimizer holds them)
    params: list[torch.Tensor]  # their local tensors (views)
    sizes: list[int]  # how many of them belong to each group
    zero: torch.Tensor  # a zero of the dtype (at least float32) and device of the meta-gradient's sums
    deltas: list[torch.Tensor] = field(default_factory=list)  # Δ = θ′ − θ per parameter
    batches: tuple = (None, None, None)  # (B when the loss is scored on it, B′, the KL target f(B′; θ))
    evaluated: bool = False  # whether any term is evaluated at θ′ (not for "next" with both λ 0)

    def per_group(self, tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        return split(tensors, self.sizes)


def lookahead_meta_gradient(deltas: list[torch.Tensor], lookahead_grads: list[torch.Tensor | None] | None,
                            sizes: list[int], lambda_wsd: float, zero: torch.Tensor):
    """(∂Q/∂φ per group, (λ_WSD/2)·‖Δ‖²) from Δ per parameter, group after group (``sizes`` parameters each).

    ``lookahead_grads``: v per parameter (None where it did not reach one), or None when no term is evaluated at θ′
    (only the weight-space term, whose gradient λ_WSD·Δ is known in closed form). The v tensors are multiplied by Δ in
    place: they are the ``.grad`` buffers, whose g the base step has consumed, so no copy of the parameters is made.
    ``zero``: a zero scalar of the dtype (at least float32) and device the sums are taken in.
    """
    per_param, proximity = [zero] * len(deltas), zero
    if lookahead_grads is not None:
        reached = [i for i, v in enumerate(lookahead_grads) if v is not None]
        torch._foreach_mul_([lookahead_grads[i] for i in reached], [deltas[i] for i in reached])
        per_param = [zero if v is None else v.sum(dtype=zero.dtype) for v in lookahead_grads]
    if lambda_wsd and deltas:
        squared = [n.square() for n in torch._foreach_norm(deltas, 2, dtype=zero.dtype)]
        per_param = [dot + lambda_wsd * sq for dot, sq in zip(per_param, squared)]
        proximity = 0.5 * lambda_wsd * torch.stack(squared).sum()
    meta_grad = torch.stack([torch.stack(chunk).sum() if chunk else zero for chunk in split(per_param, sizes)])
    return meta_grad, proximity


def displacement_meta_gradient(displacements: list[list[torch.Tensor]], grads: list[list[torch.Tensor | None]],
                               like: torch.Tensor) -> torch.Tensor:
    """⟨D, g⟩ per group (``displacements`` and ``grads`` per group, parameter by parameter; a parameter without a
    gradient is skipped), as a tensor of ``like``'s shape, dtype and device."""
    dots_per_group = torch.zeros_like(like)
    for index, (group_displacement, group_grads) in enumerate(zip(displacements, grads)):
        dots = [dot(d, g) for d, g in zip(group_displacement, group_grads) if g is not None]
        if dots:
            dots_per_group[index] = torch.stack(dots).sum()
    return dots_per_group


def rescale_step_(params: list[list[torch.Tensor]], deltas: list[list[torch.Tensor]], changes: list[float]) -> None:
    """θ′ += Δ · (exp(φ_new − φ) − 1) in place, per group (``changes``: φ_new − φ per group)."""
    for group, group_deltas, change in zip(params, deltas, changes):
        correction = math.expm1(change)
        if group and correction != 0.0:
            torch._foreach_add_(group, group_deltas, alpha=correction)


def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ in at least float32 (bf16/fp16 products are summed in float32)."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    if a.dtype == dtype and b.dtype == dtype:
        return torch.dot(a.reshape(-1), b.reshape(-1))
    return (a.to(dtype) * b.to(dtype)).sum()


def split(items: list, sizes: list[int]) -> list[list]:
    """``items`` cut into consecutive chunks of the given sizes."""
    chunks, start = [], 0
    for size in sizes:
        chunks.append(items[start:start + size])
        start += size
    return chunks
