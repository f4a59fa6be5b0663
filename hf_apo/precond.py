"""APO-Precond: meta-learn a per-layer Kronecker preconditioner over SGD (with the momentum the user asked for) or
over AdamW (``base="adamw"``, the Trainer's default optimizer). The bases' update rules and the meta-gradient
through each: :mod:`hf_apo.precond_sgd` and :mod:`hf_apo.precond_adamw`; bf16 parameters: :mod:`hf_apo.precision`.
P_φ is :class:`~hf_apo.factors.KroneckerFactors`.

Sharded parameters: each rank keeps the factors of its shard, a diagonal row side over its own rows
(:mod:`hf_apo.distributed`); against the unsharded preconditioner this drops the dense L of the weights whose row
side would be dense (rows ≤ columns and ≤ ``max_factor_dim``); with ``diagonal_row_params`` naming every matrix, the
unsharded optimizer has the same factors, which is how the tests compare the two. Over AdamW the moments, like SGD's
momentum buffers, are this rank's shards: sharded equals DDP and one process to 2e-7 and resumes bitwise (the
precond_adamw variant of the 2-process tests).

The look-ahead writes θ′ into the parameters in place and restores θ from a copy afterwards (one extra copy of the
parameters, on meta steps only); the momentum buffers and Adam moments are not touched by it. The profiler regions
``apo/meta_step`` and ``apo/base_step`` mark the meta step and the base rule's step.
"""

from __future__ import annotations

from typing import Any

import torch

from torch.profiler import record_function

from .defaults import META_INTERVAL, META_LR
from .distributed import local_tensor
from .factors import FactorAdam, KroneckerFactors
from .meta import MetaLearnedOptimizer, default_objective
from .objective import ProximalObjective
from .precision import StochasticRounding, no_autocast
from .precond_adamw import AdamWRule, adamw_defaults, adamw_groups, check_objective
from .precond_sgd import SGDRule, sgd_defaults, sgd_groups

BASES = ("sgd", "adamw")


class APOPrecond(MetaLearnedOptimizer):
    """Preconditioner APO around SGD or AdamW.

    Args:
        params: parameters or parameter groups (tied weights appear once, as in ``named_parameters()``).
        objective: the proximal meta-objective; required when ``meta_lr > 0`` unless ``model`` is given.
        model: instead of ``objective``: ``--apo precond``'s default objective for this model
            (:meth:`ProximalObjective.for_apo`: the paper's, hf_apo.defaults).
        base: ``"sgd"`` (the default: P(g) through SGD's momentum) or ``"adamw"`` (P applied to AdamW's m̂/(√v̂+ε),
            decoupled weight decay outside P); see the module docstring. :meth:`from_sgd` and :meth:`from_adamw`
            take the hyperparameters of an existing torch optimizer.
        lr, weight_decay: the learning rate and weight decay of either base. The defaults (1e-2, 0) are the same for
            both bases, not torch.optim.AdamW's (1e-3, 1e-2): pass AdamW's explicitly, or use :meth:`from_adamw`.
        momentum, dampening, nesterov: as in ``torch.optim.SGD`` (``base="sgd"`` only).
        betas, eps: as in ``torch.optim.AdamW`` (``base="adamw"`` only; default (0.9, 0.999) and 1e-8).
        amsgrad: not supported (True is refused); accepted so that the error says so.
        meta_interval: a meta step every this many optimizer steps.
        meta_lr: learning rate of the meta-optimizer on the factors (0 turns meta-learning off): about how far a
            dense factor's spectrum, or a diagonal entry, moves per meta step (docs/method.md: why 0.01).
        meta_batch_fraction: the meta batch B′ is this fraction of the previously observed batch.
        max_factor_dim: a side longer than this (or than the weight's other side) gets a diagonal factor.
        diagonal_row_params: parameters whose rows index a vocabulary (input embeddings, LM heads): their row side
            is diagonal whatever its length. The Trainer glue passes the model's input and output embeddings.
        meta_betas: Adam betas of the meta-optimizer.
        spectral_meta_step: a dense factor's meta step is normalized by its gradient's spectral norm, so it moves
            the factor's spectrum by about ``meta_lr`` whatever its size (:class:`~hf_apo.factors.FactorAdam`);
            False gives per-entry Adam.
        lookahead_steps: how many steps of the momentum the look-ahead follows (see the module docstring); 1 is
            the paper's one-step look-ahead. Without momentum it changes nothing. SGD only: ``base="adamw"`` refuses
            values above 1.
        stochastic_rounding: round the update of bf16 parameters stochastically (see the module docstring); no
            effect on float32 or float64 parameters.
        shape_only: after every meta step, rescale each factor side to mean eigenvalue 1 (a 1-D scale to 1): the
            factors learn the preconditioner's shape and leave its size to the learning rate. Wrap the optimizer in
            :class:`~hf_apo.APOLR` to learn that size (one multiplier per group), as ``--apo_precond_size lr`` does.
    """

    def __init__(
        self, params, objective: ProximalObjective | None = None, *, model=None, base: str = "sgd", lr: float = 1e-2,
        momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False,
        betas: tuple[float, float] | None = None, eps: float | None = None, amsgrad: bool = False,
        meta_interval: int = META_INTERVAL, meta_lr: float = META_LR["precond"], meta_batch_fraction: float = 0.25,
        max_factor_dim: int = 1024, diagonal_row_params=(), meta_betas: tuple[float, float] = (0.9, 0.999),
        lookahead_steps: int = 1, spectral_meta_step: bool = True, stochastic_rounding: bool = True,
        shape_only: bool = False,
    ):
        _check_args(base, lr, momentum, weight_decay, max_factor_dim, lookahead_steps, amsgrad)
        if base == "sgd":
            defaults = sgd_defaults(lr, momentum, dampening, weight_decay, nesterov, betas, eps)
        else:
            defaults = adamw_defaults(lr, betas, eps, weight_decay, momentum, dampening, nesterov, lookahead_steps)
        super().__init__(params, defaults)
        self.rounding = StochasticRounding(stochastic_rounding)
        groups = len(self.param_groups)
        self.rule = SGDRule(lookahead_steps, self.rounding, groups) if base == "sgd" else AdamWRule(self.rounding, groups)
        for group in self.param_groups:
            self.rule.validate_group(group)
        objective = default_objective(objective, model, "precond")
        check_objective(objective, base)
        self._init_meta(objective, meta_interval, meta_lr, meta_batch_fraction, meta_betas)
        self.max_factor_dim = max_factor_dim
        self.lookahead_steps = lookahead_steps
        self.spectral_meta_step = spectral_meta_step
        self.shape_only = bool(shape_only)
        vocabulary = {id(p) for p in diagonal_row_params}
        self._diagonal_rows = [id(p) in vocabulary for p in self.all_params()]
        self._build_factors()
        self._initialized = True

    @classmethod
    def from_sgd(cls, sgd: torch.optim.SGD, objective: ProximalObjective | None = None, **meta_kwargs: Any):
        """APO-Precond over the parameter groups and hyperparameters of an existing ``torch.optim.SGD``."""
        return cls(sgd_groups(sgd), objective, **meta_kwargs)

    @classmethod
    def from_adamw(cls, adamw: torch.optim.AdamW, objective: ProximalObjective | None = None, **meta_kwargs: Any):
        """APO-Precond over the parameter groups and hyperparameters (lr, betas, eps, weight_decay, per group) of an
        existing ``torch.optim.AdamW``; ``meta_kwargs`` are the APO arguments (``meta_lr``, ``meta_interval``, ...).

        Refuses another optimizer class (``torch.optim.Adam`` included: its weight decay is not decoupled by default),
        ``amsgrad=True`` and ``maximize=True``. AdamW's state (moments), if it has taken steps, is not copied: load its
        ``state_dict()`` into the new optimizer for that. ``foreach`` / ``fused`` are not carried over: APO-Precond's
        step is torch's single-tensor one (:mod:`hf_apo.precond_adamw`).
        """
        return cls(adamw_groups(adamw, meta_kwargs), objective, base="adamw", **meta_kwargs)

    base = property(lambda self: self.rule.name, doc='``"sgd"`` or ``"adamw"``: the rule\'s name.')
    _rounding_generators = property(lambda self: self.rounding.generators)  # read by benchmarks/checks/cuda_check.py

    def _build_factors(self) -> None:
        """Identity factors for the parameters in ``param_groups`` (in order) and a fresh meta-optimizer."""
        params = self.all_params()
        self.factors = {
            p: KroneckerFactors(p, self.max_factor_dim, diagonal) for p, diagonal in zip(params, self._diagonal_rows)
        }
        self.meta_optimizer = FactorAdam(
            [t for f in self.factors.values() for t in f.tensors], lr=self.meta_lr or 1.0, betas=self.meta_betas,
            spectral=self.spectral_meta_step,
        )

    def _follow_replaced_params(self) -> None:
        """Rebuild the factors if the parameters were replaced after construction.

        Accelerate's ``prepare`` of a sharded model (the Trainer builds the optimizer first) swaps each parameter in
        ``param_groups`` for its shard; the factors must then be those of the shards. That is only sound
        while the factors are still the identity, i.e. before the first meta step.
        """
        params = self.all_params()
        if len(params) == len(self.factors) and all(p in self.factors for p in params):
            return
        if self.meta_steps or any(not f.is_identity for f in self.factors.values()):
            raise RuntimeError(
                "APO-Precond: the optimizer's parameters were replaced after meta steps had shaped the factors; "
                "build the optimizer after wrapping or sharding the model."
            )
        self._build_factors()

    def _update(self) -> None:
        """The meta step when due (it leaves θ and the base's state as they were), then the base rule's step."""
        self._follow_replaced_params()
        if self._meta_step_due():
            with record_function("apo/meta_step"):
                self.meta_step()
        with record_function("apo/base_step"):
            for index, group in enumerate(self.param_groups):
                params = self._params_with_grad(group)
                if params:
                    self.rule.step_(index, group, params, self.state, self.factors)

    # -- the meta step --------------------------------------------------------------------------------------
    def _lookahead_(self, groups) -> list[float]:
        """θ ← θ′ = θ + Δ(φ) in place, group by group, with the current factors; the cotangent scale of each
        parameter (∂Δ/∂P_φ(input): −η·c for SGD, −η/(1 − β₁ᵗ) for AdamW)."""
        scales = []
        for group, group_params in groups:
            if group_params:
                scales.extend(self.rule.lookahead_(group, group_params, self.state, self.factors))
        return scales

    def _factor_vjps(self, params, param_group, lookahead_grads, scales, theta):
        """The factors' meta-gradients, VJPs of P_φ(input) with cotangent scale · (v + λ_WSD·Δ), and this rank's
        (λ_WSD/2)·‖Δ‖²; each parameter is put back to θ on the way (the real step is taken by step())."""
        wsd = self.objective.lambda_wsd
        proximity = torch.zeros((), dtype=torch.float64, device=params[0].device)
        meta_grads: list[torch.Tensor] = []
        with no_autocast(params[0]):
            for index, (p, v, scale) in enumerate(zip(params, lookahead_grads, scales)):
                factors, local = self.factors[p], local_tensor(p)
                u = torch.zeros(local.shape, dtype=factors.dtype, device=p.device) if v is None else v.to(factors.dtype)
                if wsd:
                    delta = (local.detach() - theta[index]).to(factors.dtype)
                    u = u + wsd * delta
                    proximity = proximity + 0.5 * wsd * delta.pow(2).sum().to(torch.float64)
                local.copy_(theta[index])
                theta[index] = None
                meta_grads.extend(factors.vjp(self.rule.preconditioned_input(p, param_group[index], self.state),
                                               u.mul_(scale), owned=True))
        return meta_grads, proximity

    @torch.no_grad()
    def meta_step(self) -> bool:
        """One meta step on the factors φ, leaving θ and the momentum buffers / Adam moments as they were: with the
        same-batch objective from a look-ahead on the observed batches, with the next-batch one (AdamW) from the
        gradient in ``.grad`` (:meth:`~hf_apo.precond_adamw.AdamWRule.next_batch_meta_gradients`; the loss is not
        evaluated, the Trainer logs it). Returns False when skipped (Q or its gradient not finite, or nothing to
        score yet)."""
        if self.objective.loss_batch == "same":
            return self._lookahead_meta_step()
        params, meta_grads = self.rule.next_batch_meta_gradients(self.param_groups, self.state, self.factors)
        if not params:
            return False
        zero = torch.zeros((), dtype=torch.float64, device=params[0].device)
        stepped = self._step_factors(params, meta_grads, zero, zero)
        self.last_meta_objective = float("nan")
        return stepped

    def _lookahead_meta_step(self) -> bool:
        """The same-batch meta step: θ′ = θ + Δ(φ) in place, v at θ′, the factors' VJPs, θ restored, the step."""
        batch, meta_batch = self._meta_batches()
        groups = [(group, self._params_with_grad(group)) for group in self.param_groups]
        params = [p for _, group_params in groups for p in group_params]
        if not params:
            return False
        target = self.objective.target(meta_batch)

        theta = [local_tensor(p).detach().clone() for p in params]  # the one extra copy of the parameters
        scales = self._lookahead_(groups)  # θ′ = θ + Δ(φ) in place; ∂Δ/∂P = scale per parameter
        # v at θ′; g, which the VJP and the real step still need, stays in .grad
        result, lookahead_grads = self.layout.lookahead_gradients(self.objective, params, batch, meta_batch, target)
        param_group = [group for group, group_params in groups for _ in group_params]
        meta_grads, proximity = self._factor_vjps(params, param_group, lookahead_grads, scales, theta)
        objective = result.objective.to(torch.float64)
        del theta, result, lookahead_grads
        return self._step_factors(params, meta_grads, objective, proximity)

    def _step_factors(self, params, meta_grads, objective, proximity) -> bool:
        """Reduce the factors' meta-gradient (over shards, then ranks), guard it, take the meta step, and with
        ``shape_only`` renormalize the factors; False (factors unchanged) when Q or the gradient is not finite."""
        self.last_meta_gradient = meta_grads
        flat = torch.cat([*(g.reshape(-1) for g in meta_grads), proximity.reshape(1).to(meta_grads[0].device)], dim=0)
        if self.layout.sharded:
            # the VJP's sums over the rows (dense right factors, scales) and ‖Δ‖² are this rank's part, made whole; a
            # diagonal row factor's entries belong to this rank's rows and stay as they are
            partial = torch.cat([torch.full((t.numel(),), summed, device=flat.device) for p in params
                                 for t, summed in zip(self.factors[p].tensors, self.factors[p].summed_over_shards)])
            self.layout.sum_over_shards_where(flat, torch.cat([partial, partial.new_ones(1)]))
        flat, objective = flat[:-1], objective + flat[-1]
        if not self._reduce_and_check(flat, objective.to(flat.device)):
            return False

        offset = 0
        for p in params:
            for t in self.factors[p].tensors:
                t.grad = flat[offset:offset + t.numel()].view_as(t).to(t.dtype)
                offset += t.numel()
        self.meta_optimizer.step()
        for p in params:
            for t in self.factors[p].tensors:
                t.grad = None
        if self.shape_only:
            self._normalize_factors(params)
        else:
            for p in params:
                self.factors[p].refresh()
        return True

    def _normalize_factors(self, params) -> None:
        """``shape_only``: every side to mean eigenvalue 1 (:meth:`~hf_apo.factors.KroneckerFactors.normalize_`);
        the norms of diagonal row sides over this rank's rows are summed over the shards first (one all-reduce)."""
        norms = [self.factors[p].squared_norms().to(torch.float64) for p in params]
        local = torch.cat([torch.tensor(self.factors[p].rows_are_local, device=n.device) for p, n in zip(params, norms)])
        flat = self.layout.sum_over_shards_where(torch.cat(norms), local)
        for p, squared in zip(params, flat.split([len(n) for n in norms])):
            self.factors[p].normalize_(squared)

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base's state dict (SGD's momentum buffers, or AdamW's ``step``, ``exp_avg``, ``exp_avg_sq`` in
        torch.optim.AdamW's layout) plus an ``apo`` entry with the factors, in their own dtype.

        The factors sit outside the per-parameter state so that ``load_state_dict`` cannot cast them to a bf16
        parameter's dtype.
        """
        state = super().state_dict()
        state["apo"] = {
            **self._meta_state(),
            "factors": [[t.detach().clone() for t in f.tensors] for f in self.factors.values()],
            "factor_is_identity": [f.is_identity for f in self.factors.values()],
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "rounding_generators": self.rounding.state_dict(),
            "last_step_lrs": list(self.rule.last_step_lrs),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        apo = state_dict.pop("apo", None)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self.rule.validate_group(group)  # e.g. a torch.optim.AdamW state with amsgrad=True
        if apo is None:
            return
        self._follow_replaced_params()  # a resumed Trainer run loads after Accelerate's prepare (sharded)
        self._load_meta_state(apo)
        for factors, saved, is_identity in zip(self.factors.values(), apo["factors"], apo["factor_is_identity"]):
            for tensor, value in zip(factors.tensors, saved):
                tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
            if not is_identity:
                factors.refresh()
        self.meta_optimizer.load_state_dict(apo["meta_optimizer"])
        self.rule.last_step_lrs = list(apo.get("last_step_lrs", [None] * len(self.param_groups)))
        self.rounding.load_state_dict(apo.get("rounding_generators", {}))

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

    def _meta_tensors(self) -> list:
        factors = [[f.tensors, f._cache] for f in self.factors.values()]
        return [*super()._meta_tensors(), factors, self.meta_optimizer.state]

    def factor_numel(self) -> int:
        """Number of meta-parameters (factor entries); the meta-optimizer keeps two more per entry."""
        return sum(f.numel() for f in self.factors.values())


def _check_args(base, lr, momentum, weight_decay, max_factor_dim, lookahead_steps, amsgrad) -> None:
    if base not in BASES:
        raise ValueError(f"APO-Precond's base must be one of {', '.join(map(repr, BASES))}, got {base!r}.")
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}.")
    if momentum < 0 or weight_decay < 0:
        raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum} and {weight_decay}.")
    if not isinstance(max_factor_dim, int) or max_factor_dim < 1:
        raise ValueError(f"max_factor_dim must be an integer >= 1, got {max_factor_dim!r}.")
    if not isinstance(lookahead_steps, int) or lookahead_steps < 1:
        raise ValueError(f"lookahead_steps must be an integer >= 1, got {lookahead_steps!r}.")
    if amsgrad:
        raise ValueError("APO-Precond does not support amsgrad=True (its AdamW base is torch.optim.AdamW without "
                         "amsgrad).")
