"""APO-LR: meta-learn the learning rate of SGD, SGD with momentum / Nesterov, RMSprop, Adam or AdamW.

The update is the wrapped torch optimizer's own, with group["lr"] scaled by a learned multiplier:

    Δ = −η · d,   η = group["lr"] · exp(φ_group),

where d is the base optimizer's direction (for AdamW m̂/(√v̂ + ε) plus decoupled weight decay). φ is one float32
log-multiplier per parameter group, so the Trainer's ``learning_rate`` is the initial LR and a scheduler still
scales it; it is clamped to ``log_lr_range`` (a numerical guard; the λ's of the objective are what regularise).

Exact and cheap meta step. ∂Δ/∂φ_group = Δ_group, so ∂Q/∂φ_group = ⟨Δ_group, v_group⟩ + λ_WSD·‖Δ_group‖² with
v = ∇_{θ′}Q (no Hessian; the formulas: :mod:`hf_apo.lr_meta_gradient`). Δ is linear in η for every supported base
and the base's state does not depend on η, so the look-ahead *is* the real step with the current φ, rescaled after
φ moved. ``step()`` runs as named phases, each calling a pure function or an owned object:

    1. ``"next"``: the pending ∂Q/∂φ is finished with ⟨D, ∇L_{B_t+1}(θ_t+1)⟩ from ``.grad``, then phase 4;
    2. the base step with the current φ (:meth:`APOLR._base_step`); when a meta step is due it is the look-ahead
       θ′ = θ + Δ, with θ kept (one extra copy of the parameters, turned into Δ in place) and f(B′; θ) computed first;
       with a ``trust_region`` a measured step is judged by its KL on B′, and shrunk in place if too large;
    3. ∂Q/∂φ of the terms evaluated at θ′ (:meth:`APOLR._meta_gradient_at`);
    4. the meta step on φ (:meth:`APOLR.meta_step`: mean over ranks, guard, :class:`~hf_apo.phi_step.LogLR`, cadence);
    5. ``"same"``: θ′ += Δ · (exp(φ_new − φ) − 1) per group, the step the base would have taken with φ_new;
       ``"next"``: ∂Q/∂φ waits for the next gradient (``pending``), one step late, the step taken not rescaled.

φ, the cadence, the warm-up rule, D and the trust region are owned objects with their own state. Profiler regions:
``apo/base_step`` (the base optimizer's step), ``apo/meta_step`` and ``apo/trust_region`` (APO's own work).

``loss_batch="same"`` is the paper's objective (L_B(θ′) on the batch that gave the gradient). ``loss_batch="next"``
scores the loss on the following training batches, from the gradients the loop computes there anyway, through
D = Σ_{s ≤ t} γ^(t−s) Δ_s, γ = 1 − 1/horizon: horizon 1 is the greedy one-step objective (hypergradient descent); a
longer one weighs about that many future losses, which removes most of the greedy objective's bias towards too small
a learning rate in long runs. With λ_FSD = λ_WSD = 0 a meta step is dot products: no forward, no backward.

With meta-learning off (``meta_lr = 0``) ``step()`` is the wrapped optimizer's step, bit for bit, with its
foreach/fused kernels. Memory: v is written into the ``.grad`` buffers, whose g the base step has consumed: after a
meta step's ``step()``, ``.grad`` holds Δ ⊙ v rather than g (zero them as usual). ``"next"`` keeps D (float32, one
copy of the parameters) from the look-ahead to the next step, for a horizon above 1 for the whole run.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch.profiler import record_function

from .defaults import LR_META_STEP, META_INTERVAL, META_LR
from .distributed import local_tensor
from .linear_lr import wrapped_optimizer
from .lr_meta_gradient import (Lookahead, MetaGradient, displacement_meta_gradient, lookahead_meta_gradient,
                               rescale_step_, split)
from .meta import MetaLearnedOptimizer, default_objective
from .next_batch import Displacement, load_pending_state, pending_state, tracks_displacement
from .objective import ProximalObjective
from .phi_step import Cadence, LogLR, WarmupWatch
from .trust_region import TrustRegionRule, bounded_step, trust_region_of


class APOLR(MetaLearnedOptimizer):
    """Learning-rate APO around a torch optimizer.

    Args:
        params_or_optimizer: parameters / parameter groups (the base optimizer is then built from ``base`` and
            ``base_kwargs``) or an already built optimizer whose step is linear in the LR and whose state does not
            depend on it (:data:`hf_apo.linear_lr.REGISTRY`: torch's SGD, RMSprop, Adam, AdamW, NAdam, Adamax,
            Adagrad, transformers' Adafactor with a fixed LR, bitsandbytes' and torchao's low-bit AdamW / Lion).
        objective: the proximal meta-objective; required when ``meta_lr > 0`` unless ``model`` is given.
        model: instead of ``objective``: ``--apo lr``'s default objective for it (:meth:`ProximalObjective.for_apo`).
        base: ``"sgd"``, ``"rmsprop"``, ``"adam"`` or ``"adamw"`` (ignored when an optimizer is passed).
        meta_interval: a meta step every this many optimizer steps (K).
        meta_lr: Adam's LR on φ: a c× change of the LR takes about ln(c) / meta_lr meta steps. 0: meta-learning off.
        meta_batch_fraction: the meta batch B′ is this fraction of the previously observed batch.
        log_lr_range, meta_betas: the clamp of φ = log(multiplier); the Adam betas of ``meta_optimizer="adam"``.
        meta_optimizer: ``"adam"`` or ``"rprop"`` (sign-agreement step sizes on φ; ``meta_lr`` is the first step).
        max_meta_step: ``"rprop"``: the largest step of φ in one meta step (1.0: a factor e on the LR).
        adaptive_interval: meta steps every step while φ keeps moving one way, every ``meta_interval`` after a flip.
        trust_region: ``"none"``, ``"kl"``, ``"ratio"``, a KL bound (nats per token) or a ``TrustRegionRule``: the
            step taken is bounded by its own KL on B′ (:mod:`hf_apo.trust_region`); ``trust_region_opening``: the
            steps in which it may double φ (0: it only shrinks; a rule carries its own).
        **base_kwargs: forwarded to the base optimizer (``lr``, ``weight_decay``, ``momentum``, ...).

    The defaults of every argument are ``--apo lr``'s (hf_apo.defaults). Usage::

        optimizer = APOLR(model.parameters(), model=model, base="adamw", lr=1e-4)
        for batch in loader:
            model(**batch).loss.backward()
            optimizer.observe(batch)
            optimizer.step()
            optimizer.zero_grad()
    """

    def __init__(
        self,
        params_or_optimizer,
        objective: ProximalObjective | None = None,
        *,
        model: torch.nn.Module | None = None,
        base: str = "adamw",
        meta_interval: int = META_INTERVAL,
        meta_lr: float = META_LR["lr"],
        meta_batch_fraction: float = 0.25,
        log_lr_range: tuple[float, float] = (-10.0, 10.0),
        meta_betas: tuple[float, float] = (0.9, 0.999),
        meta_optimizer: str = LR_META_STEP["meta_optimizer"],
        adaptive_interval: bool = LR_META_STEP["adaptive_interval"],
        max_meta_step: float = LR_META_STEP["max_meta_step"],
        trust_region: TrustRegionRule | str | None = LR_META_STEP["trust_region"],
        trust_region_opening: int = LR_META_STEP["trust_region_opening"],
        **base_kwargs: Any,
    ):
        self.base_optimizer = wrapped_optimizer(params_or_optimizer, base, base_kwargs)
        # The groups are the base optimizer's own dicts: schedulers and the Trainer write group["lr"] there.
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        self.state = self.base_optimizer.state
        self._init_meta(default_objective(objective, model, "lr"), meta_interval, meta_lr, meta_batch_fraction,
                        meta_betas)
        self.phi = LogLR(len(self.param_groups), self.meta_lr, self.meta_betas, meta_optimizer, max_meta_step,
                         log_lr_range)
        self.adaptive_interval = bool(adaptive_interval)
        self.cadence = Cadence()
        self.warmup = WarmupWatch()
        self.displacement = Displacement()  # loss_batch "next": D, the discounted sum of steps
        self.pending: MetaGradient | None = None  # loss_batch "next": ∂Q/∂φ of the look-ahead, awaiting the gradient
        self.trust_region = trust_region_of(trust_region, meta_interval, trust_region_opening)
        self._warming_up = False  # the scheduled LR rose at this step: the meta step only lowers φ
        self._initialized = True

    @classmethod
    def default_over(cls, optimizer, model, meta_lr: float | None = None, log_lr_range=(-10.0, 10.0),
                     trust_region=LR_META_STEP["trust_region"],
                     trust_region_opening=LR_META_STEP["trust_region_opening"], **objective):
        """``--apo lr``'s default around ``optimizer`` (e.g. a shape-only APO-Precond whose size it learns);
        ``objective``: :meth:`ProximalObjective.for_apo`'s keyword arguments."""
        meta = {} if meta_lr is None else {"meta_lr": meta_lr}
        return cls(optimizer, ProximalObjective.for_apo(model, "lr", **objective), log_lr_range=log_lr_range,
                   trust_region=trust_region, trust_region_opening=trust_region_opening, **meta)

    # -- φ, as the one float32 tensor LogLR owns; these names read it ---------------------------------------
    log_lr = property(lambda self: self.phi.log_lr, doc="φ: the float32 log-multiplier per group.")
    meta_optimizer = property(lambda self: self.phi.meta_optimizer, doc="φ's meta-optimizer.")

    @property
    def lr_multipliers(self) -> list[float]:
        """exp(φ) per parameter group: the factor applied to each group's scheduled learning rate."""
        return self.phi.multipliers()

    @property
    def inner(self) -> MetaLearnedOptimizer | None:
        """The wrapped optimizer when it meta-learns too (APO-Precond with ``shape_only``: this learns its size)."""
        return self.base_optimizer if isinstance(self.base_optimizer, MetaLearnedOptimizer) else None

    def observe(self, batch) -> None:
        super().observe(batch)
        if self.inner is not None:
            self.inner.observe(batch)

    # -- the step, in phases ---------------------------------------------------------------------------------
    def _update(self) -> None:
        """The phases of the module docstring: a pending meta step, the base step (or the look-ahead, its terms,
        the meta step and the correction), D's bookkeeping around the step."""
        self._warming_up = self.warmup.rises(self.param_groups)
        if self.pending is not None:
            with record_function("apo/meta_step"):
                self.meta_step(*self._finish_pending())  # loss_batch "next": .grad holds ∇L_{B_t+1}(θ_t+1)
        meta_step_due = self._meta_step_due()  # after the pending meta step, whose sign may make it due now
        if meta_step_due:
            self.cadence.lookahead_step = self.step_count
        track = tracks_displacement(self.objective, self.meta_lr, meta_step_due)
        if track:
            with record_function("apo/meta_step"):
                self.displacement.before_step(self.local_params(), self.objective.discount)
        self._lookahead_meta_step() if meta_step_due else self._bounded_base_step()
        if track:
            with record_function("apo/meta_step"):
                self.displacement.after_step(self.local_params())

    def _lookahead_meta_step(self) -> None:
        """Base step taken as the look-ahead → ∂Q/∂φ at θ′ → (``"same"``) meta step → correction of the step taken;
        (``"next"``) ∂Q/∂φ waits for the next gradient."""
        same = self.objective.loss_batch == "same"
        step = self._take_lookahead(score_loss=same)
        with record_function("apo/meta_step"):
            gradient = self._meta_gradient_at(step)
            if not same:
                self.pending = gradient  # Δ is not kept: D holds what the loss term needs
                return
            changes = self.meta_step(gradient.meta_grad, gradient.objective)
            if changes is not None:
                rescale_step_(step.per_group(step.params), step.per_group(step.deltas), changes)

    def _base_step(self) -> None:
        """The wrapped optimizer's own step with group["lr"] · exp(φ) for the call; the scheduler's group["lr"] is
        restored after it."""
        multipliers = self.phi.multipliers()
        scheduled = [group["lr"] for group in self.param_groups]
        for group, multiplier in zip(self.param_groups, multipliers):
            if multiplier != 1.0:
                group["lr"] = group["lr"] * multiplier  # a new tensor where the LR is one (torchao): restored below
        try:  # a wrapped APO optimizer marks its own base and meta steps
            with record_function("apo/base_step") if self.inner is None else contextlib.nullcontext():
                self.base_optimizer.step()
        finally:
            for group, lr in zip(self.param_groups, scheduled):
                group["lr"] = lr

    def _bounded_base_step(self) -> None:
        """The base step; on a step the trust region measures, bounded by it, and φ lowered as far as it shrank."""
        if self.trust_region is None or not (self.meta_lr > 0 and self.trust_region.due(self.step_count)):
            return self._base_step()
        with record_function("apo/trust_region"):  # φ comes down as far as the step was shrunk
            self.phi.shift([math.log(bounded_step(self, self.trust_region, self._base_step).shrink)] * len(self.phi))

    def _take_lookahead(self, score_loss: bool) -> Lookahead:
        """The base step with the current φ, as the look-ahead θ′ = θ + Δ: Δ replaces a copy of θ taken before it
        (the only extra copy of the parameters), and the KL target f(B′; θ) is computed before it.

        ``score_loss``: the loss on B at θ′ is one of the terms (``"same"``); for ``"next"`` it comes from the next
        step's gradient. Without any term at θ′ (``"next"``, both λ 0) this is the base step alone.
        """
        groups = [self._params_with_grad(group) for group in self.param_groups]
        sharded_params = [p for group in groups for p in group]
        params = [local_tensor(p) for p in sharded_params]  # sharded: this rank's shards (views)
        dtype = torch.promote_types(self.phi.log_lr.dtype, params[0].dtype) if params else torch.float32
        device = params[0].device if params else torch.device("cpu")
        step = Lookahead(sharded_params, params, [len(g) for g in groups], torch.zeros((), dtype=dtype, device=device))
        if not (score_loss or self.objective.uses_meta_batch or self.objective.lambda_wsd):
            self._bounded_base_step()
            return step
        with record_function("apo/meta_step"):
            if self.objective.needs_batches:
                batch, meta_batch = self._meta_batches()
                step.batches = (batch if score_loss else None, meta_batch, self.objective.target(meta_batch))
            step.deltas = [p.detach().clone() for p in params]  # θ
        self._base_step()  # θ′ = θ + Δ(φ)
        with record_function("apo/meta_step"):
            torch._foreach_sub_(step.deltas, [p.detach() for p in params])
            torch._foreach_neg_(step.deltas)  # Δ = θ′ − θ, in place of the copy of θ
        step.evaluated = True
        return step

    def _meta_gradient_at(self, step: Lookahead) -> MetaGradient:
        """∂Q/∂φ per group of the terms evaluated at θ′ (v of the loss on B and the KL on B′ into ``.grad``, whose g
        the base step has consumed; λ_WSD·Δ in closed form), and their value; sharded, made whole over the shards."""
        zero, wsd = step.zero, self.objective.lambda_wsd
        if not step.evaluated:
            return MetaGradient(zero.expand(len(step.sizes)).clone(), zero)
        batch, meta_batch, target = step.batches
        grads, objective = None, zero
        if batch is not None or self.objective.uses_meta_batch:
            result = self.objective.lookahead_gradient(step.sharded_params, batch, meta_batch, target, into_grad=True)
            grads = [None if v is None else local_tensor(v) for v in result.lookahead_grads]
            objective = result.objective.to(zero.dtype)
        meta_grad, proximity = lookahead_meta_gradient(step.deltas, grads, step.sizes, wsd, zero)
        # sharded: this rank's parts of ⟨Δ, v⟩ and ‖Δ‖² made whole (v is already the mean over the ranks)
        packed = self.layout.sum_over_shards(torch.cat([meta_grad, proximity.reshape(1)]))
        meta_grad, proximity = packed[:-1], packed[-1]
        if wsd and step.params:
            objective = objective + proximity
        return MetaGradient(meta_grad, objective)

    def _finish_pending(self) -> tuple[torch.Tensor, torch.Tensor]:
        """loss_batch "next": the pending ∂Q/∂φ plus ⟨D, ∇L_{B_t+1}(θ_t+1)⟩ per group, g read from ``.grad`` (under the
        Trainer reduced, unscaled and clipped): ∂/∂φ of Σ_k γ^k L_{B_t+k+1}(θ_t+k+1), each step's effect on the later
        iterates taken as persistent. The step already taken is not rescaled: g was computed at it."""
        pending, self.pending = self.pending, None
        sizes = [len(group["params"]) for group in self.param_groups]  # D lists every parameter
        grads = [None if p.grad is None else local_tensor(p.grad) for p in self.all_params()]
        dots = displacement_meta_gradient(split(self.displacement.tensors, sizes), split(grads, sizes),
                                          like=pending.meta_grad)
        self.layout.sum_over_shards(dots)  # sharded: this rank's shards of D and g
        if self.objective.horizon == 1:
            self.displacement.clear()  # rebuilt at the next look-ahead: no persistent copy of the parameters
        return pending.meta_grad + dots, pending.objective

    def meta_step(self, meta_grad: torch.Tensor, objective: torch.Tensor) -> list[float] | None:
        """The meta step on φ from this rank's ∂Q/∂φ per group and Q: their mean over ranks and the guard, one step
        of φ's meta-optimizer and the clamp (during a warm-up, decreases only), then the cadence. Returns the change
        of φ per group, or None when skipped (Q or its gradient not finite on some rank)."""
        self.last_meta_gradient = meta_grad.detach().cpu()
        if not self._reduce_and_check(meta_grad, objective):
            self.cadence.schedule(moving=False, interval=self.meta_interval)
            return None
        changes, signs = self.phi.step(meta_grad, only_lower=self._warming_up)
        if self.trust_region is not None and not self._warming_up:  # growth in the opening, none at its edge
            changes = self.trust_region.limit_phi(self.phi, changes, meta_grad.tolist())
        self.cadence.record(signs, interval=self.meta_interval)
        return changes

    def _meta_step_scheduled(self) -> bool:
        if self.trust_region is not None and self.trust_region.looks_ahead(self.step_count) and not self._warming_up:
            return self.pending is None  # φ may grow at every step (not in a warm-up: there it may only fall)
        if not self.adaptive_interval:
            return super()._meta_step_scheduled()
        return self.pending is None and self.step_count >= self.cadence.next_meta_step

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus an ``apo`` entry (φ, its meta-optimizer's state, counters, the last
        batch, the cadence and warm-up state, and for ``loss_batch="next"`` the pending ∂Q/∂φ and D)."""
        state = self.base_optimizer.state_dict()
        if self.inner is not None:
            state["apo_inner"] = state.pop("apo")  # the wrapped APO optimizer's own section
        state["apo"] = {
            **self._meta_state(),
            **self.phi.state_dict(),
            "pending": pending_state(self.pending, self.displacement),
            "previous_scheduled_lrs": self.warmup.previous_lrs,
            "cadence": self.cadence.state_dict(),
            "trust_region": None if self.trust_region is None else self.trust_region.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        apo = state_dict.pop("apo", None)
        if "apo_inner" in state_dict:
            state_dict["apo"] = state_dict.pop("apo_inner")
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        if apo is None:
            return
        self.phi.load_state_dict(apo)  # first: it refuses another meta-optimizer before anything is loaded
        self._load_meta_state(apo)
        self.pending = load_pending_state(apo.get("pending"), self.displacement, self.all_params())
        self.warmup.previous_lrs = apo.get("previous_scheduled_lrs")
        self.cadence = Cadence.from_state_dict(apo.get("cadence"))
        if self.trust_region is not None and apo.get("trust_region") is not None:
            self.trust_region.load_state_dict(apo["trust_region"])

    def _meta_tensors(self) -> list:
        pending = [] if self.pending is None else [self.pending.meta_grad, self.pending.objective]
        inner = [] if self.inner is None else self.inner._meta_tensors()
        return [*super()._meta_tensors(), self.phi.log_lr, self.phi.meta_optimizer.state, self.displacement.tensors,
                pending, inner]

    def metrics(self) -> dict[str, float]:
        metrics = super().metrics()
        if self.inner is not None:  # the factors' meta-objective and traces, under their own names
            metrics = {**{k.replace("apo/", "apo/precond_", 1): v for k, v in self.inner.metrics().items()}, **metrics}
        multipliers = self.phi.multipliers()
        metrics["apo/lr_multiplier"] = math.exp(sum(math.log(m) for m in multipliers) / len(multipliers))
        if len(multipliers) > 1:
            metrics.update({f"apo/lr_multiplier_group{index}": m for index, m in enumerate(multipliers)})
        metrics["apo/learning_rate"] = float(self.param_groups[0]["lr"]) * multipliers[0]
        if self.trust_region is not None:
            metrics.update(self.trust_region.metrics())
        return metrics
