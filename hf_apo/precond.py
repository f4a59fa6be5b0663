"""APO-Precond: meta-learn a per-layer Kronecker preconditioner over SGD (with the momentum the user asked for).

The update of parameter θ with gradient g, per group (lr η, momentum μ, dampening τ, weight decay ω):

    d = P_φ(g) + ω · θ                               # weight decay outside P: P never rescales the decay
    b = μ · b + (1 − τ) · d   (b = d on the first step)
    Δ = −η · (d + μ · b)  with Nesterov,  −η · b  otherwise  (−η · d without momentum)

With P = I this is ``torch.optim.SGD`` exactly (tested bit for bit). P_φ is :class:`~hf_apo.factors.KroneckerFactors`.

Meta-gradient (no Hessian). θ′ = θ + Δ(φ) depends on φ only through P_φ(g), with ∂Δ/∂P = −η·c where c = 1
without momentum, 1 − τ with a momentum buffer (1 + μ(1 − τ) with Nesterov), and 1 (1 + μ) on the first step.
So with u = ∇_{θ′}Q = v + λ_WSD · Δ,

    ∇_φ Q = VJP of φ ↦ P_φ(g) with cotangent −η · c · u,

one ``torch.autograd.grad`` through the small graph of L·G·R only. The look-ahead sees only the fresh P(g)
although P(g) keeps acting through the momentum buffer for about 1/(1 − μ) steps: a known bias of the one-step
objective (see the benchmarks).

The look-ahead writes θ′ into the parameters in place and restores θ from a copy afterwards (one extra copy of the
parameters, on meta steps only); the momentum buffers are not touched by it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .factors import KroneckerFactors
from .meta import MetaLearnedOptimizer
from .objective import ProximalObjective

_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")


class APOPrecond(MetaLearnedOptimizer):
    """Preconditioner APO around SGD.

    Args:
        params: parameters or parameter groups (tied weights appear once, as in ``named_parameters()``).
        objective: the proximal meta-objective; required when ``meta_lr > 0``.
        lr, momentum, dampening, weight_decay, nesterov: as in ``torch.optim.SGD``.
        meta_interval: a meta step every this many optimizer steps.
        meta_lr: Adam learning rate on the factors (0 turns meta-learning off). 3e-3 ranked best in the benchmark
            sweep (benchmarks/results/quality.md); 3e-2 was chaotic.
        meta_batch_fraction: the meta batch B′ is this fraction of the previously observed batch.
        max_factor_dim: a side longer than this (or than the weight's other side) gets a diagonal factor.
        diagonal_row_params: parameters whose rows index a vocabulary (input embeddings, LM heads): their row side
            is diagonal whatever its length. The Trainer glue passes the model's input and output embeddings.
        meta_betas: Adam betas of the meta-optimizer.
    """

    def __init__(
        self,
        params,
        objective: ProximalObjective | None = None,
        *,
        lr: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        meta_interval: int = 10,
        meta_lr: float = 3e-3,
        meta_batch_fraction: float = 0.25,
        max_factor_dim: int = 1024,
        diagonal_row_params=(),
        meta_betas: tuple[float, float] = (0.9, 0.999),
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}.")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum} and {weight_decay}.")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0, as in torch.optim.SGD.")
        if not isinstance(max_factor_dim, int) or max_factor_dim < 1:
            raise ValueError(f"max_factor_dim must be an integer >= 1, got {max_factor_dim!r}.")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults)
        if objective is not None and objective.loss_batch != "same":
            raise ValueError(
                "APO-Precond scores the loss term on the same batch (loss_batch='same'); loss_batch='next' is "
                "supported by APO-LR only."
            )
        self._init_meta(objective, meta_interval, meta_lr, meta_batch_fraction, meta_betas)
        self.max_factor_dim = max_factor_dim
        params_in_order = [p for group in self.param_groups for p in group["params"]]
        vocabulary = {id(p) for p in diagonal_row_params}
        self.factors = {p: KroneckerFactors(p, max_factor_dim, id(p) in vocabulary) for p in params_in_order}
        self.meta_optimizer = torch.optim.Adam(
            [t for f in self.factors.values() for t in f.tensors], lr=self.meta_lr or 1.0, betas=self.meta_betas
        )
        self._initialized = True

    @classmethod
    def from_sgd(cls, sgd: torch.optim.SGD, objective: ProximalObjective | None = None, **meta_kwargs: Any):
        """APO-Precond over the parameter groups and hyperparameters of an existing ``torch.optim.SGD``."""
        if not isinstance(sgd, torch.optim.SGD):
            raise ValueError(f"APO-Precond preconditions SGD; got {type(sgd).__name__}.")
        if any(group.get("maximize") for group in sgd.param_groups):
            raise ValueError("APO-Precond does not support maximize=True.")
        groups = [{"params": group["params"], **{k: group[k] for k in _SGD_KEYS}} for group in sgd.param_groups]
        return cls(groups, objective, **meta_kwargs)

    # -- the update rule ------------------------------------------------------------------------------------
    @staticmethod
    def _coefficient(group: dict[str, Any], has_buffer: bool) -> float:
        """c with ∂Δ/∂P(g) = −η · c (see the module docstring)."""
        momentum, dampening = group["momentum"], group["dampening"]
        if momentum == 0:
            return 1.0
        fresh = 1.0 if not has_buffer else 1.0 - dampening
        return fresh * (1.0 + momentum) if group["nesterov"] else fresh

    def _direction(self, group, params, preconditioned, update_buffers: bool) -> list[torch.Tensor]:
        """The step direction −Δ/η from P(g), as torch.optim.SGD computes it from g (same ops, same order)."""
        momentum, dampening = group["momentum"], group["dampening"]
        directions = list(preconditioned)
        if group["weight_decay"] != 0:
            directions = torch._foreach_add(directions, params, alpha=group["weight_decay"])
        if momentum == 0:
            return directions
        buffers = []
        for p, d in zip(params, directions):
            buffer = self.state[p].get("momentum_buffer")
            if buffer is None:
                buffer = torch.clone(d).detach()
                if update_buffers:
                    self.state[p]["momentum_buffer"] = buffer
            elif update_buffers:
                buffer.mul_(momentum).add_(d, alpha=1 - dampening)
            else:
                buffer = buffer.mul(momentum).add_(d, alpha=1 - dampening)
            buffers.append(buffer)
        if group["nesterov"]:
            return torch._foreach_add(directions, buffers, alpha=momentum)
        return buffers

    def _update(self, meta_step_due: bool) -> None:
        if meta_step_due:
            self.meta_update()
        for group in self.param_groups:
            params = self._params_with_grad(group)
            if not params:
                continue
            with _no_autocast(params[0]):
                preconditioned = [self.factors[p].precondition(p.grad) for p in params]
            directions = self._direction(group, params, preconditioned, update_buffers=True)
            torch._foreach_add_(params, directions, alpha=-group["lr"])

    # -- the meta step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def meta_update(self) -> bool:
        """One meta step on the observed batches: update φ, leave θ and the momentum buffers as they were.

        Returns False when the step was skipped because Q or its gradient was not finite.
        """
        batch, meta_batch = self._meta_batches()
        groups = [(group, self._params_with_grad(group)) for group in self.param_groups]
        params = [p for _, group_params in groups for p in group_params]
        if not params:
            return False
        target = self.objective.target(meta_batch)
        factor_tensors = [t for p in params for t in self.factors[p].tensors]
        for t in factor_tensors:
            t.requires_grad_(True)
        try:
            return self._meta_update(groups, params, factor_tensors, batch, meta_batch, target)
        finally:
            for t in factor_tensors:
                t.requires_grad_(False)

    def _meta_update(self, groups, params, factor_tensors, batch, meta_batch, target) -> bool:
        theta = [p.detach().clone() for p in params]
        with torch.enable_grad(), _no_autocast(params[0]):
            preconditioned = [self.factors[p].precondition_differentiable(p.grad) for p in params]

        # θ′ = θ + Δ(φ), in place; cotangent scale −η·c per parameter
        scales, index = [], 0
        for group, group_params in groups:
            count = len(group_params)
            if count:
                group_preconditioned = [pg.detach().to(p.dtype) for pg, p in zip(preconditioned[index:index + count], group_params)]
                directions = self._direction(group, group_params, group_preconditioned, update_buffers=False)
                torch._foreach_add_(group_params, directions, alpha=-group["lr"])
                for p in group_params:
                    has_buffer = self.state[p].get("momentum_buffer") is not None
                    scales.append(-group["lr"] * self._coefficient(group, has_buffer))
            index += count

        result = self.objective.lookahead_gradient(params, batch, meta_batch, target)
        wsd = self.objective.lambda_wsd
        objective = result.objective.to(torch.float64)
        cotangents = []
        for p, theta_p, v, scale, pg in zip(params, theta, result.lookahead_grads, scales, preconditioned):
            u = torch.zeros_like(pg) if v is None else v.to(pg.dtype)
            if wsd:
                delta = (p.detach() - theta_p).to(pg.dtype)
                u = u + wsd * delta
                objective = objective + 0.5 * wsd * delta.pow(2).sum().to(torch.float64)
            cotangents.append(u * scale)
        for p, theta_p in zip(params, theta):
            p.copy_(theta_p)  # back to θ: the real step is taken by step() with the updated φ
        del theta

        with torch.enable_grad(), _no_autocast(params[0]):
            meta_grads = torch.autograd.grad(preconditioned, factor_tensors, grad_outputs=cotangents, allow_unused=True)
        meta_grads = [torch.zeros_like(t) if g is None else g for g, t in zip(meta_grads, factor_tensors)]
        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in meta_grads])
        self.last_meta_gradient = meta_grads
        if not self._reduce_and_check(flat, objective.to(flat.device)):
            return False

        offset = 0
        for t in factor_tensors:
            t.grad = flat[offset:offset + t.numel()].view_as(t).to(t.dtype)
            offset += t.numel()
        self.meta_optimizer.step()
        for t in factor_tensors:
            t.grad = None
        for p in params:
            self.factors[p].refresh()
        return True

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """SGD's state dict (momentum buffers) plus an ``apo`` entry with the factors, in their own dtype.

        The factors sit outside the per-parameter state so that ``load_state_dict`` cannot cast them to a bf16
        parameter's dtype.
        """
        state = super().state_dict()
        state["apo"] = {
            **self._meta_state(),
            "factors": [[t.detach().clone() for t in f.tensors] for f in self.factors.values()],
            "factor_is_identity": [f.is_identity for f in self.factors.values()],
            "meta_optimizer": self.meta_optimizer.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        apo = state_dict.pop("apo", None)
        super().load_state_dict(state_dict)
        if apo is None:
            return
        self._load_meta_state(apo)
        for factors, saved, is_identity in zip(self.factors.values(), apo["factors"], apo["factor_is_identity"]):
            for tensor, value in zip(factors.tensors, saved):
                tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
            if not is_identity:
                factors.refresh()
        self.meta_optimizer.load_state_dict(apo["meta_optimizer"])

    def metrics(self) -> dict[str, float]:
        metrics = super().metrics()
        left, right, scale = [], [], []
        for factors in self.factors.values():
            traces = factors.traces()
            if len(traces) == 2:
                left.append(traces[0])
                right.append(traces[1])
            else:
                scale.append(traces[0])
        if left:
            metrics["apo/left_trace_mean"] = sum(left) / len(left)
            metrics["apo/right_trace_mean"] = sum(right) / len(right)
        if scale:
            metrics["apo/scale_mean"] = sum(scale) / len(scale)
        return metrics

    def factor_numel(self) -> int:
        """Number of meta-parameters (factor entries); the meta-optimizer keeps two more per entry."""
        return sum(f.numel() for f in self.factors.values())


def _no_autocast(reference: torch.Tensor):
    """The update rule's own math runs in full precision even when the caller is under autocast."""
    if reference.device.type in ("cpu", "cuda"):
        return torch.autocast(reference.device.type, enabled=False)
    return contextlib.nullcontext()
