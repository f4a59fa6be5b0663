"""APO-Precond: meta-learn a per-layer Kronecker preconditioner over SGD (with the momentum the user asked for) or
over AdamW (``base="adamw"``, the Trainer's default optimizer).

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

Sharded parameters: each rank keeps the factors of its shard, a diagonal row side over its own rows
(:mod:`hf_apo.distributed`); against the unsharded preconditioner this drops the dense L of the weights whose row
side would be dense (rows ≤ columns and ≤ ``max_factor_dim``); with ``diagonal_row_params`` naming every matrix, the
unsharded optimizer has the same factors, which is how the tests compare the two. Over AdamW the moments, like SGD's
momentum buffers, are this rank's shards: sharded equals DDP and one process to 2e-7 and resumes bitwise (the
precond_adamw variant of the 2-process tests).

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
* learned factors: θ.add_(P(m / denom), alpha=−η/(1 − β₁ᵗ)), i.e. the quotient is rounded before it is scaled, where
  ``addcdiv`` scales first. Factors that are exactly I but taken through this path differ from torch.optim.AdamW by
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

The look-ahead writes θ′ into the parameters in place and restores θ from a copy afterwards (one extra copy of the
parameters, on meta steps only); the momentum buffers and Adam moments are not touched by it.

bf16 parameters. Rounding θ − η·d to the nearest bf16 drops every update smaller than half a bf16 ulp of its entry
(2⁻⁹ relative): on the translation benchmark at lr 0.1, 55–79% of the entries did not move in a step. With
``stochastic_rounding`` (the default) a bf16 parameter's update is added in float32 and rounded up or down at random
with the probabilities that make the rounding unbiased, so small updates accumulate in expectation, at no memory
cost. The draws come from the optimizer's own generator (seeded, saved in the state dict), so every data-parallel
rank rounds alike and a resumed run continues the same stream. With AdamW, the moments stay bf16 (as torch keeps
them), the quotient m / denom is formed in float32, and the decay and the update are applied in float32 to the
float32 copy of θ, then rounded once: θ ← SR(θ·(1 − ηω) − η/(1 − β₁ᵗ) · P(m / denom)) (a bf16 ``θ.mul_(1 − ηω)`` alone
would drop a decay of ηω below 2⁻⁹ altogether). Without stochastic rounding bf16 follows torch.optim.AdamW bitwise.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .factors import FactorAdam, KroneckerFactors
from .distributed import Layout, local_tensor
from .meta import MetaLearnedOptimizer
from .objective import ProximalObjective

_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")
_ADAMW_KEYS = ("lr", "betas", "eps", "weight_decay")
BASES = ("sgd", "adamw")


class APOPrecond(MetaLearnedOptimizer):
    """Preconditioner APO around SGD or AdamW.

    Args:
        params: parameters or parameter groups (tied weights appear once, as in ``named_parameters()``).
        objective: the proximal meta-objective; required when ``meta_lr > 0``.
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
            dense factor's spectrum, or a diagonal entry, moves per meta step. 0.01 won the rule of
            benchmarks/apo_precond_compare.py (benchmarks/results/apo_precond_compare.md).
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
        self,
        params,
        objective: ProximalObjective | None = None,
        *,
        base: str = "sgd",
        lr: float = 1e-2,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        betas: tuple[float, float] | None = None,
        eps: float | None = None,
        amsgrad: bool = False,
        meta_interval: int = 10,
        meta_lr: float = 0.01,
        meta_batch_fraction: float = 0.25,
        max_factor_dim: int = 1024,
        diagonal_row_params=(),
        meta_betas: tuple[float, float] = (0.9, 0.999),
        lookahead_steps: int = 1,
        spectral_meta_step: bool = True,
        stochastic_rounding: bool = True,
        shape_only: bool = False,
    ):
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
        if base == "sgd":
            if nesterov and (momentum <= 0 or dampening != 0):
                raise ValueError("nesterov needs momentum > 0 and dampening 0, as in torch.optim.SGD.")
            if betas is not None or eps is not None:
                raise ValueError("betas and eps are AdamW's hyperparameters: pass base='adamw' to use them.")
            defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                            nesterov=nesterov)
        else:
            if momentum != 0 or dampening != 0 or nesterov:
                raise ValueError("momentum, dampening and nesterov are SGD's hyperparameters; with base='adamw' the "
                                 "first moment's decay is betas[0].")
            if lookahead_steps != 1:
                raise ValueError(
                    f"lookahead_steps={lookahead_steps} follows SGD's momentum buffer; base='adamw' supports only the "
                    "one-step look-ahead (lookahead_steps=1)."
                )
            defaults = dict(lr=lr, betas=tuple((0.9, 0.999) if betas is None else betas),
                            eps=1e-8 if eps is None else eps, weight_decay=weight_decay)
        self.base = base
        super().__init__(params, defaults)
        for group in self.param_groups:
            _validate_group(group, base)
        _check_objective(objective, base)
        self._init_meta(objective, meta_interval, meta_lr, meta_batch_fraction, meta_betas)
        self.max_factor_dim = max_factor_dim
        self.lookahead_steps = lookahead_steps
        self.spectral_meta_step = spectral_meta_step
        self.stochastic_rounding = stochastic_rounding
        self.shape_only = bool(shape_only)
        self._last_step_lrs: list[float | None] = [None] * len(self.param_groups)  # η of each group's last step
        self._rounding_generators: dict[torch.device, torch.Generator] = {}
        vocabulary = {id(p) for p in diagonal_row_params}
        self._diagonal_rows = [id(p) in vocabulary for p in self.all_params()]
        self._build_factors()
        self._initialized = True

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

    @classmethod
    def from_sgd(cls, sgd: torch.optim.SGD, objective: ProximalObjective | None = None, **meta_kwargs: Any):
        """APO-Precond over the parameter groups and hyperparameters of an existing ``torch.optim.SGD``."""
        if not isinstance(sgd, torch.optim.SGD):
            raise ValueError(f"APO-Precond preconditions SGD; got {type(sgd).__name__}.")
        if any(group.get("maximize") for group in sgd.param_groups):
            raise ValueError("APO-Precond does not support maximize=True.")
        groups = [{"params": group["params"], **{k: group[k] for k in _SGD_KEYS}} for group in sgd.param_groups]
        return cls(groups, objective, **meta_kwargs)

    @classmethod
    def from_adamw(cls, adamw: torch.optim.AdamW, objective: ProximalObjective | None = None, **meta_kwargs: Any):
        """APO-Precond over the parameter groups and hyperparameters (lr, betas, eps, weight_decay, per group) of an
        existing ``torch.optim.AdamW``; ``meta_kwargs`` are the APO arguments (``meta_lr``, ``meta_interval``, ...).

        Refuses another optimizer class (``torch.optim.Adam`` included: its weight decay is not decoupled by default),
        ``amsgrad=True`` and ``maximize=True``. AdamW's state (moments), if it has taken steps, is not copied: load its
        ``state_dict()`` into the new optimizer for that. ``foreach`` / ``fused`` are not carried over: APO-Precond's
        step is torch's single-tensor one (see the module docstring).
        """
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
        groups = [
            {"params": group["params"], **{k: _scalar(group[k]) if k != "betas" else tuple(map(_scalar, group[k]))
                                           for k in _ADAMW_KEYS}}
            for group in adamw.param_groups
        ]
        return cls(groups, objective, base="adamw", **meta_kwargs)

    # -- the update rule ------------------------------------------------------------------------------------
    def _future_weight(self, group: dict[str, Any]) -> float:
        """m: the weight of the new buffer b′ in the look-ahead's steps after the first (see the module docstring)."""
        momentum = group["momentum"]
        first = momentum * momentum if group["nesterov"] else momentum
        return sum(first * momentum**k for k in range(self.lookahead_steps - 1)) if momentum else 0.0

    def _coefficient(self, group: dict[str, Any], has_buffer: bool) -> float:
        """c with ∂Δ/∂P(g) = −η · c for the look-ahead's displacement Δ (see the module docstring)."""
        momentum, dampening = group["momentum"], group["dampening"]
        if momentum == 0:
            return 1.0
        fresh = 1.0 if not has_buffer else 1.0 - dampening
        first = fresh * (1.0 + momentum) if group["nesterov"] else fresh
        return first + fresh * self._future_weight(group)

    def _direction(self, group, params, preconditioned, update_buffers: bool, lookahead: bool = False) -> list[torch.Tensor]:
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
            directions = torch._foreach_add(directions, buffers, alpha=momentum)
        else:
            directions = buffers
        future = self._future_weight(group) if lookahead else 0.0
        if future:
            directions = torch._foreach_add(directions, buffers, alpha=future)
        return directions

    def _update(self) -> None:
        self._follow_replaced_params()
        if self._meta_step_due():
            self.meta_update() if self.objective.loss_batch == "same" else self.next_batch_meta_update()
        if self.base == "adamw":
            self._adamw_update()
            return
        for group in self.param_groups:
            params = self._params_with_grad(group)
            if not params:
                continue
            with _no_autocast(params[0]):
                preconditioned = [self.factors[p].precondition(local_tensor(p.grad)) for p in params]
            directions = self._direction(group, params, preconditioned, update_buffers=True)
            targets = [local_tensor(p) for p in params]
            if self.stochastic_rounding and any(t.dtype == torch.bfloat16 for t in targets):
                for target, direction in zip(targets, directions):
                    if target.dtype == torch.bfloat16:
                        self._stochastic_add_(target, direction, -group["lr"])
                    else:
                        target.add_(direction, alpha=-group["lr"])
            else:
                torch._foreach_add_(targets, directions, alpha=-group["lr"])

    # -- the AdamW base -------------------------------------------------------------------------------------
    def _wide(self, param: torch.Tensor) -> bool:
        """Whether this parameter's AdamW step is formed in float32 and stochastically rounded (bf16 only)."""
        return self.stochastic_rounding and param.dtype == torch.bfloat16

    def _adam_moments(self, p: torch.Tensor, group: dict[str, Any], write: bool):
        """(m, denom, step_size) of this step for parameter ``p``, as torch.optim.AdamW computes them (same ops, same
        order): m and v updated with the raw gradient, denom = √v / √(1 − β₂ᵗ) + ε, step_size = η / (1 − β₁ᵗ).

        ``write``: update the state in place (the real step); otherwise compute this step's moments into new tensors
        and leave the state as it is (the look-ahead). For a stochastically rounded bf16 parameter, denom is float32.
        """
        state = self.state[p]
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
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = group["lr"] / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        if self._wide(p):
            exp_avg_sq = exp_avg_sq.float()
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(group["eps"])
        return exp_avg, denom, step_size

    def _adam_input(self, p: torch.Tensor, exp_avg: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
        """m / denom, the tensor P acts on (u = that / (1 − β₁ᵗ)); float32 for a stochastically rounded bf16 one."""
        return (exp_avg.float() if self._wide(p) else exp_avg) / denom

    def _adamw_update(self) -> None:
        """The real AdamW step with the current factors (see the module docstring for where it is bitwise torch's)."""
        for index, group in enumerate(self.param_groups):
            params = self._params_with_grad(group)
            if not params:
                continue
            self._last_step_lrs[index] = float(group["lr"])
            decay = 1 - group["lr"] * group["weight_decay"]
            for p in params:
                target = local_tensor(p)
                factors = self.factors[p]
                if not self._wide(p) and group["weight_decay"] != 0:
                    target.mul_(decay)
                exp_avg, denom, step_size = self._adam_moments(p, group, write=True)
                if self._wide(p):
                    with _no_autocast(p):
                        update = factors.precondition(self._adam_input(p, exp_avg, denom))
                    self._stochastic_add_(target, update, -step_size, decay=decay)
                elif factors.is_identity:
                    target.addcdiv_(exp_avg, denom, value=-step_size)  # torch.optim.AdamW's own op
                else:
                    with _no_autocast(p):
                        update = factors.precondition(self._adam_input(p, exp_avg, denom))
                    target.add_(update, alpha=-step_size)

    def _adamw_lookahead_(self, group: dict[str, Any], params: list[torch.Tensor]) -> list[float]:
        """θ ← θ′ = θ·(1 − ηω) − η/(1 − β₁ᵗ) · P_φ(m / denom) in place, with the current (not cached) factors and
        this step's moments, which are not written; returns the cotangent scales −η/(1 − β₁ᵗ) (∂Δ/∂P(m/denom))."""
        scales = []
        for p in params:
            target = local_tensor(p)
            exp_avg, denom, step_size = self._adam_moments(p, group, write=False)
            with _no_autocast(p):
                update = self.factors[p].precondition_full(self._adam_input(p, exp_avg, denom)).to(p.dtype)
            del exp_avg, denom
            if group["weight_decay"] != 0:
                target.mul_(1 - group["lr"] * group["weight_decay"])
            target.add_(update, alpha=-step_size)
            scales.append(-step_size)
        return scales

    def _rounding_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._rounding_generators:
            self._rounding_generators[device] = torch.Generator(device=device).manual_seed(0)
        return self._rounding_generators[device]

    def _stochastic_add_(self, target: torch.Tensor, update: torch.Tensor, alpha: float, decay: float = 1.0) -> None:
        """target ← decay · target + alpha · update for a bf16 ``target``, the float32 result rounded to bf16 without
        bias (``decay``: AdamW's decoupled weight decay 1 − ηω, applied in float32 before the rounding).

        A bf16 number is a float32 with its 16 low bits zero: adding a uniform random 16-bit integer to the float32
        sum's bits and clearing them rounds its magnitude up with probability (distance to the lower neighbour) /
        (spacing), the trick of heavyball and Zamirai et al. (2020). inf and NaN stay what they are.
        """
        exact = target.float()
        if decay != 1.0:
            exact.mul_(decay)
        exact.add_(update.float(), alpha=alpha)
        noise = torch.randint(0, 1 << 16, exact.shape, dtype=torch.int32, device=exact.device,
                              generator=self._rounding_generator(exact.device))
        target.copy_(exact.view(torch.int32).add_(noise).bitwise_and_(-65536).view(torch.float32))

    # -- the meta step --------------------------------------------------------------------------------------
    @torch.no_grad()
    def meta_update(self) -> bool:
        """One meta step on the observed batches: update φ, leave θ and the momentum buffers / Adam moments as they
        were.

        Returns False when the step was skipped because Q or its gradient was not finite.
        """
        batch, meta_batch = self._meta_batches()
        groups = [(group, self._params_with_grad(group)) for group in self.param_groups]
        params = [p for _, group_params in groups for p in group_params]
        if not params:
            return False
        layout = Layout.of(params)
        target = self.objective.target(meta_batch)

        # θ′ = θ + Δ(φ) in place, group by group; cotangent scale −η·c per parameter
        theta = [local_tensor(p).detach().clone() for p in params]
        scales = []
        for group, group_params in groups:
            if not group_params:
                continue
            if self.base == "adamw":
                scales.extend(self._adamw_lookahead_(group, group_params))
                continue
            for p in group_params:
                has_buffer = self.state[p].get("momentum_buffer") is not None
                scales.append(-group["lr"] * self._coefficient(group, has_buffer))
            with _no_autocast(group_params[0]):
                preconditioned = [
                    self.factors[p].precondition_full(local_tensor(p.grad)).to(p.dtype) for p in group_params
                ]
            directions = self._direction(group, group_params, preconditioned, update_buffers=False, lookahead=True)
            del preconditioned
            torch._foreach_add_([local_tensor(p) for p in group_params], directions, alpha=-group["lr"])
            del directions

        # v at θ′; g, which the VJP and the real step still need, stays in .grad
        result, lookahead_grads = layout.lookahead_gradients(self.objective, params, batch, meta_batch, target)
        wsd = self.objective.lambda_wsd
        objective = result.objective.to(torch.float64)
        proximity = torch.zeros((), dtype=torch.float64, device=objective.device)  # sharded: this rank's part
        meta_grads: list[torch.Tensor] = []
        param_group = [group for group, group_params in groups for _ in group_params]
        with _no_autocast(params[0]):
            for index, (p, v, scale) in enumerate(zip(params, lookahead_grads, scales)):
                factors = self.factors[p]
                local = local_tensor(p)
                u = torch.zeros(local.shape, dtype=factors.dtype, device=p.device) if v is None else v.to(factors.dtype)
                if wsd:
                    delta = (local.detach() - theta[index]).to(factors.dtype)
                    u = u + wsd * delta
                    proximity = proximity + 0.5 * wsd * delta.pow(2).sum().to(torch.float64)
                local.copy_(theta[index])  # back to θ: the real step is taken by step() with the updated φ
                theta[index] = None
                if self.base == "adamw":  # P acts on m / denom: recomputed (cheap, element-wise), not kept
                    exp_avg, denom, _ = self._adam_moments(p, param_group[index], write=False)
                    preconditioned_input = self._adam_input(p, exp_avg, denom)
                    del exp_avg, denom
                else:
                    preconditioned_input = local_tensor(p.grad)
                meta_grads.extend(factors.vjp(preconditioned_input, u.mul_(scale)))
                del preconditioned_input
        del theta, result, lookahead_grads
        return self._step_factors(params, meta_grads, objective, proximity, layout)

    @torch.no_grad()
    def next_batch_meta_update(self) -> bool:
        """``loss_batch="next"`` (AdamW base, λ 0): a meta step on the loss of this step's batch at the parameters the
        previous step gave, read from the gradient the training loop has just computed. No forward, no backward.

        θ_t+1 = θ_t·(1 − η_t·ω) − η_t/(1 − β₁ᵗ) · P_φ(m_t / denom_t), and the moments after step t are still in the
        state, so with g_t+1 = ∇L_{B_t+1}(θ_t+1) in ``.grad``

            ∂L_{B_t+1}(θ_t+1)/∂φ = VJP of φ ↦ P_φ(m_t / denom_t) with cotangent −η_t/(1 − β₁ᵗ) · g_t+1,

        the hypergradient of the factors (the same VJP as the look-ahead's; η_t is the LR the step used, a learned
        multiplier included). One step late: the factors that step t used are the current ones. The same-batch
        objective's pull towards a smaller step is absent, and with ``shape_only`` the size is not the factors' to
        learn anyway. Returns False when skipped (a non-finite gradient, or no step taken yet).
        """
        params, meta_grads = [], []
        for group, lr in zip(self.param_groups, self._last_step_lrs):
            for p in self._params_with_grad(group):
                state = self.state[p]
                if lr is None or not state:
                    continue
                exp_avg, denom, step_size = _adam_direction(state, group, lr, wide=self._wide(p))
                with _no_autocast(p):
                    cotangent = local_tensor(p.grad).to(self.factors[p].dtype).mul_(-step_size)
                    meta_grads.extend(self.factors[p].vjp(self._adam_input(p, exp_avg, denom), cotangent))
                params.append(p)
        if not params:
            return False
        zero = torch.zeros((), dtype=torch.float64, device=params[0].device)
        stepped = self._step_factors(params, meta_grads, zero, zero, Layout.of(params))
        self.last_meta_objective = float("nan")  # the loss is not evaluated: the Trainer logs it
        return stepped

    def _step_factors(self, params, meta_grads, objective, proximity, layout: Layout) -> bool:
        """Reduce the factors' meta-gradient (over shards, then ranks), guard it, take the meta step, and with
        ``shape_only`` renormalize the factors; False (factors unchanged) when Q or the gradient is not finite."""
        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in meta_grads])
        self.last_meta_gradient = meta_grads
        # sharded: the VJP's sums over the rows (dense right factors, scales) and ‖Δ‖² are this rank's part, made
        # whole; a diagonal row factor's entries belong to this rank's rows and stay as they are
        partial = torch.cat([torch.full((t.numel(),), summed, device=flat.device) for p in params
                             for t, summed in zip(self.factors[p].tensors, self.factors[p].summed_over_shards)])
        flat = torch.cat([flat, proximity.reshape(1).to(flat.device)])
        layout.sum_over_shards_where(flat, torch.cat([partial, partial.new_ones(1)]))
        flat, objective = flat[:-1], objective + flat[-1]
        if not self._reduce_and_check(flat, objective.to(flat.device), layout):
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
            self._normalize_factors(params, layout)
        else:
            for p in params:
                self.factors[p].refresh()
        return True

    def _normalize_factors(self, params, layout: Layout) -> None:
        """``shape_only``: every side to mean eigenvalue 1 (:meth:`~hf_apo.factors.KroneckerFactors.normalize_`);
        the norms of diagonal row sides over this rank's rows are summed over the shards first (one all-reduce)."""
        norms = [self.factors[p].squared_norms().to(torch.float64) for p in params]
        local = torch.cat([torch.tensor(self.factors[p].rows_are_local, device=n.device) for p, n in zip(params, norms)])
        flat = layout.sum_over_shards_where(torch.cat(norms), local)
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
            "rounding_generators": {str(d): g.get_state() for d, g in self._rounding_generators.items()},
            "last_step_lrs": list(self._last_step_lrs),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        apo = state_dict.pop("apo", None)
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            _validate_group(group, self.base)  # e.g. a torch.optim.AdamW state with amsgrad=True
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
        self._last_step_lrs = list(apo.get("last_step_lrs", [None] * len(self.param_groups)))
        for device, generator_state in apo.get("rounding_generators", {}).items():
            self._rounding_generator(torch.device(device)).set_state(generator_state)

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


def _check_objective(objective: ProximalObjective | None, base: str) -> None:
    """The meta-objectives APO-Precond takes: the paper's same-batch one, or over AdamW the next-batch loss alone."""
    if objective is None or objective.loss_batch == "same":
        return
    if base != "adamw" or objective.lambda_fsd or objective.lambda_wsd or objective.horizon != 1:
        raise ValueError(
            "APO-Precond's next-batch meta-objective (loss_batch='next') is the next batch's loss alone over AdamW: "
            "it needs base='adamw', lambda_fsd = lambda_wsd = 0 and horizon 1 (the moments of the step it scores are "
            "still in AdamW's state; SGD's gradient is not). Use loss_batch='same' otherwise."
        )


def _adam_direction(state: dict[str, Any], group: dict[str, Any], lr: float, wide: bool):
    """(m, denom, step size) of the step the AdamW state was last updated by, taken with learning rate ``lr``."""
    beta1, beta2 = group["betas"]
    step = float(state["step"])
    exp_avg_sq = state["exp_avg_sq"].float() if wide else state["exp_avg_sq"]
    denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
    return state["exp_avg"], denom, lr / (1 - beta1**step)


def _validate_group(group: dict[str, Any], base: str) -> None:
    """Refuse a parameter group whose hyperparameters the base would ignore or cannot take."""
    if base == "sgd":
        return  # SGD's groups are checked by the constructor's arguments, as before AdamW was a base
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


def _scalar(value):
    """A float hyperparameter of a torch optimizer (it may hold a 0-dim tensor) as a Python float."""
    return value.item() if isinstance(value, torch.Tensor) else value


def _scalar_dtype() -> torch.dtype:
    """The dtype of torch.optim.AdamW's ``step`` tensor (``torch.optim.optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _no_autocast(reference: torch.Tensor):
    """The update rule's own math runs in full precision even when the caller is under autocast."""
    if reference.device.type in ("cpu", "cuda"):
        return torch.autocast(reference.device.type, enabled=False)
    return contextlib.nullcontext()
