"""APO-LR: meta-learn the learning rate of SGD, SGD with momentum / Nesterov, RMSprop, Adam or AdamW.

The update is the wrapped torch optimizer's own, with group["lr"] scaled by a learned multiplier:

    Δ = −η · d,   η = group["lr"] · exp(φ_group),

where d is the base optimizer's direction (for AdamW m̂/(√v̂ + ε) plus decoupled weight decay). φ is one float32
log-multiplier per parameter group, so the Trainer's ``learning_rate`` is the initial LR and a scheduler still
scales it. φ is clamped to ``log_lr_range`` (a numerical guard; the λ's of the objective are what regularise).

Meta-gradient (no Hessian). ∂Δ/∂φ_group = Δ_group, so with v = ∇_{θ′}Q

    ∂Q/∂φ_group = ⟨Δ_group, v_group⟩ + λ_WSD · ‖Δ_group‖²,

and a negative value raises the learning rate. φ takes an Adam step on it (meta learning rate ``meta_lr``).

Exact and cheap meta step. Δ is linear in η for every supported base and the base's state (moments, momentum
buffers) does not depend on η, so the look-ahead *is* the real step with the current φ:

    1. keep θ (one extra copy of the parameters, on meta steps only) and the target f(B′; θ);
    2. take the base step with the current φ: the parameters are now θ′ = θ + Δ;
    3. v at θ′, meta-gradient, φ ← φ_new;
    4. θ′ += Δ · (exp(φ_new − φ) − 1) per group, which is the step the base would have taken with φ_new.

That is ``loss_batch="same"`` (the paper's objective, L_B(θ′) on the batch that gave the gradient). With
``loss_batch="next"`` the loss term is scored on the following training batches instead, from the gradients the
training loop computes there anyway:

    ∂Q/∂φ_group = ⟨D_group, ∇L_{B_t+1}(θ_t+1)_group⟩ (+ the proximity terms at θ′, if any λ > 0),
    D = Σ_{s ≤ t} γ^(t−s) Δ_s,   γ = 1 − 1/horizon,

applied at the next ``step()`` (one step late; the step already taken is not rescaled). horizon = 1 is the greedy
one-step objective (D = Δ_t, hypergradient descent); a longer horizon weighs the losses of about that many future
steps, each step's effect on the later iterates taken as persistent, which removes most of the greedy objective's
bias towards too small a learning rate in long runs. With λ_FSD = λ_WSD = 0 a meta step is dot products: no forward,
no backward, no observed batch.

The meta step on φ (``meta_optimizer`` Adam or Rprop), its cadence (``adaptive_interval``) and the warm-up rule:
:mod:`hf_apo.phi_step`.

With meta-learning off (``meta_lr = 0``) ``step()`` is the wrapped optimizer's step, bit for bit, and its
foreach/fused kernels are used.

Memory: a ``"same"`` meta step needs one extra copy of the parameters (θ, turned into Δ in place). v = ∇_{θ′}Q is
written into the ``.grad`` buffers, whose g the base step has already consumed: after a meta step's ``step()``,
``.grad`` holds the elementwise products Δ ⊙ v rather than g (zero them as usual before the next backward).
``"next"`` keeps D (float32, one copy of the parameters) from the look-ahead to the next step, and for a horizon
above 1 for the whole run; D = γ·D − θ before the step and D += θ′ after it, so it needs no copy of θ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .linear_lr import wrapped_optimizer
from .defaults import LR_META_STEP, META_INTERVAL, META_LR, settings as apo_settings
from .distributed import local_tensor
from .meta import MetaLearnedOptimizer
from .next_batch import NextBatchTerms, _split
from .objective import ProximalObjective
from .phi_step import META_OPTIMIZERS, RPROP_MIN_STEP, Cadence, PhiMetaStep, build_meta_optimizer

class APOLR(PhiMetaStep, NextBatchTerms, MetaLearnedOptimizer):
    """Learning-rate APO around a torch optimizer.

    Args:
        params_or_optimizer: parameters / parameter groups (the base optimizer is then built from ``base`` and
            ``base_kwargs``) or an already built optimizer whose step is linear in the LR and whose state does not
            depend on it (:data:`hf_apo.linear_lr.REGISTRY`: torch's SGD, RMSprop, Adam, AdamW, NAdam, Adamax,
            Adagrad, transformers' Adafactor with a fixed LR, bitsandbytes' and torchao's low-bit AdamW / Lion).
        objective: the proximal meta-objective; required when ``meta_lr > 0``.
        base: ``"sgd"``, ``"rmsprop"``, ``"adam"`` or ``"adamw"`` (ignored when an optimizer is passed).
        meta_interval: a meta step every this many optimizer steps (K).
        meta_lr: Adam learning rate on φ; φ moves about ``meta_lr`` per meta step, so a c× change of the LR
            takes ln(c) / meta_lr meta steps. 0 turns meta-learning off.
        meta_batch_fraction: the meta batch B′ is this fraction of the previously observed batch.
        log_lr_range: clamp of φ = log(multiplier).
        meta_betas: Adam betas of the meta-optimizer (``meta_optimizer="adam"``).
        meta_optimizer: ``"adam"`` or ``"rprop"`` (sign-agreement step sizes on φ; ``meta_lr`` is the first step).
        max_meta_step: ``"rprop"``: the largest step of φ in one meta step (1.0: a factor e on the LR).
        adaptive_interval: meta steps every step while φ keeps moving one way, every ``meta_interval`` after a flip.
        **base_kwargs: forwarded to the base optimizer (``lr``, ``weight_decay``, ``momentum``, ...).

    Usage::

        objective = ProximalObjective.for_apo(model, "lr")  # the next batch, horizon 10,000, λ 0
        optimizer = APOLR(model.parameters(), objective, base="adamw", lr=1e-4)
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
        base: str = "adamw",
        meta_interval: int = META_INTERVAL,
        meta_lr: float = META_LR["lr"],
        meta_batch_fraction: float = 0.25,
        log_lr_range: tuple[float, float] = (-10.0, 10.0),
        meta_betas: tuple[float, float] = (0.9, 0.999),
        meta_optimizer: str = LR_META_STEP["meta_optimizer"],
        adaptive_interval: bool = LR_META_STEP["adaptive_interval"],
        max_meta_step: float = LR_META_STEP["max_meta_step"],
        **base_kwargs: Any,
    ):
        base_optimizer = wrapped_optimizer(params_or_optimizer, base, base_kwargs)
        low, high = _check_meta_step_args(meta_optimizer, max_meta_step, log_lr_range)
        self.base_optimizer = base_optimizer
        # The groups are the base optimizer's own dicts: schedulers and the Trainer write group["lr"] there.
        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self.state = base_optimizer.state
        self._init_meta(objective, meta_interval, meta_lr, meta_batch_fraction, meta_betas)
        self.log_lr_range = (low, high)
        self.log_lr = torch.zeros(len(self.param_groups), dtype=torch.float32)
        self.meta_optimizer_kind = meta_optimizer
        self.max_meta_step = float(max_meta_step)
        self.meta_optimizer = build_meta_optimizer(meta_optimizer, self.log_lr, self.meta_lr, self.meta_betas,
                                                   self.max_meta_step)
        self.adaptive_interval = bool(adaptive_interval)
        self._multipliers = [1.0] * len(self.param_groups)
        self._cadence = Cadence()
        # loss_batch "next": the look-ahead's part of ∂Q/∂φ per group and its value, awaiting the next gradient
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._displacement: list[torch.Tensor] | None = None  # loss_batch "next": D, the discounted sum of steps
        self._previous_scheduled_lrs: list[float] | None = None  # group["lr"] at the previous step(): warm-up?
        self._warming_up = False  # the scheduled LR rose at this step: the meta step only lowers φ
        self._initialized = True

    @classmethod
    def default_over(cls, optimizer, model, meta_lr: float | None = None, log_lr_range=(-10.0, 10.0), **objective):
        """``--apo lr``'s default (hf_apo.defaults: next batch, horizon 10,000, λ 0) around ``optimizer``, e.g. a
        shape-only APO-Precond whose size it learns (``--apo_precond_size lr``); ``objective``: ProximalObjective's."""
        s = apo_settings("lr", "next")
        return cls(optimizer, ProximalObjective.for_apo(model, "lr", "next", **objective),
                   meta_interval=s["meta_interval"], log_lr_range=log_lr_range,
                   meta_lr=s["meta_lr"] if meta_lr is None else meta_lr, meta_optimizer=s["meta_optimizer"],
                   adaptive_interval=s["adaptive_interval"], max_meta_step=s["max_meta_step"])

    @property
    def lr_multipliers(self) -> list[float]:
        """exp(φ) per parameter group: the factor applied to each group's scheduled learning rate."""
        return list(self._multipliers)

    def _base_step(self, multipliers: list[float]) -> None:
        scheduled = [group["lr"] for group in self.param_groups]
        for group, multiplier in zip(self.param_groups, multipliers):
            if multiplier != 1.0:
                group["lr"] = group["lr"] * multiplier  # a new tensor where the LR is one (torchao): restored below
        try:
            self.base_optimizer.step()
        finally:
            for group, lr in zip(self.param_groups, scheduled):
                group["lr"] = lr

    @property
    def inner(self) -> MetaLearnedOptimizer | None:
        """The wrapped optimizer when it meta-learns too (APO-Precond with ``shape_only``: this learns its size)."""
        return self.base_optimizer if isinstance(self.base_optimizer, MetaLearnedOptimizer) else None

    def observe(self, batch) -> None:
        super().observe(batch)
        if self.inner is not None:
            self.inner.observe(batch)

    def _meta_step_scheduled(self) -> bool:
        if not self.adaptive_interval:
            return super()._meta_step_scheduled()
        return self._pending is None and self.step_count >= self._cadence.next_meta_step

    def _update(self) -> None:
        self._warming_up = self._scheduled_lr_rises()
        if self._pending is not None:
            self._finish_delayed_meta_step()  # loss_batch "next": .grad now holds ∇L_{B_t+1}(θ_t+1)
        meta_step_due = self._meta_step_due()  # after the delayed meta step, whose sign may make it due now
        if meta_step_due:
            self._cadence.lookahead_step = self.step_count
        track = self._tracks_displacement(meta_step_due)
        if track:
            self._displacement_before_step()
        if not meta_step_due:
            self._base_step(self._multipliers)
        elif self.objective.loss_batch == "same":
            self._meta_step()  # takes the base step itself, as the look-ahead
        else:
            # finished at the next step, with its gradient; Δ is not kept (D holds what the loss term needs)
            lookahead = self._lookahead(score_loss=False)
            self._pending = (lookahead.meta_grad, lookahead.objective)
        if track:
            self._displacement_after_step()

    def _meta_step(self) -> None:
        """loss_batch "same": Q on B at θ′, φ ← φ_new, then the step already taken is rescaled to φ_new."""
        lookahead = self._lookahead(score_loss=True)
        changes = self._apply_meta_gradient(lookahead.meta_grad, lookahead.objective)
        if changes is None:
            return
        # Rescale the step already taken to the one the new φ gives: θ′ += Δ · (exp(φ_new − φ) − 1).
        groups = zip(_split(lookahead.params, lookahead.sizes), _split(lookahead.deltas, lookahead.sizes), changes)
        for group, group_deltas, change in groups:
            correction = math.expm1(change)
            if group and correction != 0.0:
                torch._foreach_add_(group, group_deltas, alpha=correction)

    def _lookahead(self, score_loss: bool) -> _Lookahead:
        """The base step with the current φ as the look-ahead θ′ = θ + Δ, and the part of ∂Q/∂φ known at θ′.

        ``score_loss``: the loss on B at θ′ is part of it (``loss_batch="same"``); for ``"next"`` it comes from the
        next step's gradient. The function-space term on B′ (λ_FSD > 0) and the weight-space term are always here;
        without them (``"next"``, both λ 0) this is the base step alone.
        """
        groups = [self._params_with_grad(group) for group in self.param_groups]
        sizes = [len(group) for group in groups]
        sharded_params = [p for group in groups for p in group]
        layout = self.layout
        params = [local_tensor(p) for p in sharded_params]  # sharded: this rank's shards (views)
        dtype = torch.promote_types(self.log_lr.dtype, params[0].dtype) if params else torch.float32
        device = params[0].device if params else torch.device("cpu")
        zero = torch.zeros((), dtype=dtype, device=device)
        wsd = self.objective.lambda_wsd
        if not (score_loss or self.objective.uses_meta_batch or wsd):
            self._base_step(self._multipliers)
            return _Lookahead(params, sizes, [], zero.expand(len(sizes)).clone(), zero)
        batch = meta_batch = target = None
        if self.objective.needs_batches:
            batch, meta_batch = self._meta_batches()
            batch = batch if score_loss else None
            target = self.objective.target(meta_batch)
        deltas = [p.detach().clone() for p in params]  # θ; the only extra copy of the parameters

        self._base_step(self._multipliers)  # θ′ = θ + Δ(φ)
        torch._foreach_sub_(deltas, [p.detach() for p in params])
        torch._foreach_neg_(deltas)  # Δ = θ′ − θ, in place of the copy of θ

        per_param, objective, proximity = self._terms_at_lookahead(sharded_params, deltas, (batch, meta_batch, target),
                                                                   zero)
        meta_grad = torch.stack([torch.stack(chunk).sum() if chunk else zero for chunk in _split(per_param, sizes)])
        # sharded: this rank's parts of ⟨Δ, v⟩ and ‖Δ‖² made whole (v is already the mean over the ranks)
        packed = layout.sum_over_shards(torch.cat([meta_grad, proximity.reshape(1)]))
        meta_grad, proximity = packed[:-1], packed[-1]
        if wsd and params:
            objective = objective + proximity
        return _Lookahead(params, sizes, deltas, meta_grad, objective)

    def _terms_at_lookahead(self, sharded_params, deltas, batches, zero):
        """At θ′: ⟨Δ, v⟩ + λ_WSD‖Δ‖² per parameter (v of the terms evaluated there), their value, and this rank's
        (λ_WSD/2)·‖Δ‖² (zero without a weight-space term)."""
        per_param, objective, proximity, wsd = [zero] * len(deltas), zero, zero, self.objective.lambda_wsd
        batch, meta_batch, target = batches
        if batch is not None or self.objective.uses_meta_batch:
            # g has been used by the base step: v goes into the .grad buffers (no further copy of the parameters).
            result = self.objective.lookahead_gradient(sharded_params, batch, meta_batch, target, into_grad=True)
            grads = [None if v is None else local_tensor(v) for v in result.lookahead_grads]
            # ⟨Δ, v⟩ per parameter, multiplied in place in the .grad buffers and summed in at least float32.
            reached = [i for i, v in enumerate(grads) if v is not None]
            torch._foreach_mul_([grads[i] for i in reached], [deltas[i] for i in reached])
            per_param = [zero if v is None else v.sum(dtype=zero.dtype) for v in grads]
            objective = result.objective.to(zero.dtype)
        if wsd and deltas:
            squared = [n.square() for n in torch._foreach_norm(deltas, 2, dtype=zero.dtype)]
            per_param = [dot + wsd * sq for dot, sq in zip(per_param, squared)]
            proximity = 0.5 * wsd * torch.stack(squared).sum()
        return per_param, objective, proximity

    # -- state ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus an ``apo`` entry (φ, meta-Adam state, counters, last batch, and for
        ``loss_batch="next"`` the look-ahead's terms awaiting the next gradient and D, one copy of the parameters)."""
        state = self.base_optimizer.state_dict()
        if self.inner is not None:
            state["apo_inner"] = state.pop("apo")  # the wrapped APO optimizer's own section
        state["apo"] = {
            **self._meta_state(),
            "log_lr": self.log_lr.clone(),
            "meta_optimizer": self.meta_optimizer.state_dict(),
            "meta_optimizer_kind": self.meta_optimizer_kind,
            "pending": self._pending_state(),
            "previous_scheduled_lrs": self._previous_scheduled_lrs,
            "cadence": self._cadence.state_dict(),
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
        saved_kind = apo.get("meta_optimizer_kind", "adam")
        if saved_kind != self.meta_optimizer_kind:
            raise ValueError(
                f"This checkpoint's APO-LR meta-optimizer is {saved_kind!r}, this run's is "
                f"{self.meta_optimizer_kind!r}: resume with --apo_meta_optimizer {saved_kind} (APOLR(meta_optimizer="
                f"{saved_kind!r})), or start a new run to change it."
            )
        self._load_meta_state(apo)
        # φ lives on the CPU in float32 whatever device the checkpoint was mapped to.
        self.log_lr.copy_(apo["log_lr"].to(device="cpu", dtype=torch.float32))
        self.meta_optimizer.load_state_dict(apo["meta_optimizer"])
        self._multipliers = [math.exp(x) for x in self.log_lr.tolist()]
        self._load_pending_state(apo.get("pending"))
        self._previous_scheduled_lrs = apo.get("previous_scheduled_lrs")
        self._cadence = Cadence.from_state_dict(apo.get("cadence"))

    def metrics(self) -> dict[str, float]:
        metrics = super().metrics()
        if self.inner is not None:  # the factors' meta-objective and traces, under their own names
            metrics = {**{k.replace("apo/", "apo/precond_", 1): v for k, v in self.inner.metrics().items()}, **metrics}
        multipliers = self._multipliers
        metrics["apo/lr_multiplier"] = math.exp(sum(math.log(m) for m in multipliers) / len(multipliers))
        if len(multipliers) > 1:
            for index, multiplier in enumerate(multipliers):
                metrics[f"apo/lr_multiplier_group{index}"] = multiplier
        metrics["apo/learning_rate"] = float(self.param_groups[0]["lr"]) * multipliers[0]
        return metrics


def _check_meta_step_args(meta_optimizer: str, max_meta_step: float, log_lr_range) -> tuple[float, float]:
    if meta_optimizer not in META_OPTIMIZERS:
        raise ValueError(f"meta_optimizer must be one of {', '.join(META_OPTIMIZERS)}, got {meta_optimizer!r}.")
    if not max_meta_step >= RPROP_MIN_STEP:
        raise ValueError(f"max_meta_step must be >= {RPROP_MIN_STEP}, got {max_meta_step!r}.")
    low, high = (float(x) for x in log_lr_range)
    if not low <= 0 <= high:
        raise ValueError(f"log_lr_range must satisfy low <= 0 <= high, got {log_lr_range!r}.")
    return low, high


@dataclass
class _Lookahead:
    """A look-ahead step θ′ = θ + Δ(φ) and the part of ∂Q/∂φ evaluated at it (per parameter group)."""

    params: list[torch.Tensor]  # the parameters the step updated, group after group
    sizes: list[int]  # how many of them belong to each group
    deltas: list[torch.Tensor]  # Δ per parameter (empty when no term evaluated at θ′ needs it)
    meta_grad: torch.Tensor  # ⟨Δ, v⟩ + λ_WSD‖Δ‖² per group, v the look-ahead gradient of the terms evaluated
    objective: torch.Tensor  # the value of those terms
