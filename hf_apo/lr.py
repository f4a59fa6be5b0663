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

The meta step on φ (``meta_optimizer``). ``"adam"``: Adam at ``meta_lr``, so φ moves about ``meta_lr`` per meta step
whatever the meta-gradient's size, and a c× correction of the LR takes ln(c)/meta_lr meta steps. ``"rprop"``:
sign-agreement step sizes (``torch.optim.Rprop``, iRprop−): φ moves by a step s against the meta-gradient's sign;
s starts at ``meta_lr``, grows ×1.2 while the sign holds and halves (without a move) when it flips, within
[1e-3, ``max_meta_step``]. A 100× correction then takes about 13 agreeing meta steps instead of 46, and near the right LR the
flips shrink s, so φ settles instead of drifting.

Cadence (``adaptive_interval``). Off: a meta step every ``meta_interval`` (K) steps. On: the first meta step is at
step 1, and the next one follows at once (the next step) while φ keeps moving one way (some group's meta-gradient
has the sign it had at the previous meta step), K steps later after a flip. With the next-batch objective and λ 0
a meta step is dot products, so moving fast costs nothing.

Warm-up. While the scheduled learning rate rises, the meta step only lowers φ: a meta-gradient measured during a
warm-up says "larger" (the scheduled LR is below where it is going) and would undo the warm-up, but a too-large LR
must still come down before the warm-up ends.

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

from .linear_lr import check_linear_in_lr
from .distributed import Layout, local_tensor
from .meta import MetaLearnedOptimizer
from .objective import ProximalObjective

META_OPTIMIZERS = ("adam", "rprop")
RPROP_ETAS = (0.5, 1.2)  # φ's step halves when the meta-gradient flips sign and grows ×1.2 while it keeps it
RPROP_MIN_STEP = 1e-3  # φ's Rprop step never falls below 0.1% (never frozen); its bound above is max_meta_step

BASE_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


class APOLR(MetaLearnedOptimizer):
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

        objective = ProximalObjective(model, lambda_fsd=10.0)
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
        meta_interval: int = 10,
        meta_lr: float = 0.1,
        meta_batch_fraction: float = 0.25,
        log_lr_range: tuple[float, float] = (-10.0, 10.0),
        meta_betas: tuple[float, float] = (0.9, 0.999),
        meta_optimizer: str = "adam",
        adaptive_interval: bool = False,
        max_meta_step: float = 1.0,
        **base_kwargs: Any,
    ):
        if isinstance(params_or_optimizer, torch.optim.Optimizer):
            if base_kwargs:
                raise ValueError(f"base optimizer keyword arguments {sorted(base_kwargs)} given with a built optimizer.")
            base_optimizer = params_or_optimizer
        else:
            if base not in BASE_OPTIMIZERS:
                raise ValueError(f"base must be one of {sorted(BASE_OPTIMIZERS)}, got {base!r}.")
            base_optimizer = BASE_OPTIMIZERS[base](params_or_optimizer, **base_kwargs)
        check_linear_in_lr(base_optimizer)  # ValueError naming what is supported (hf_apo/linear_lr.py)
        if meta_optimizer not in META_OPTIMIZERS:
            raise ValueError(f"meta_optimizer must be one of {', '.join(META_OPTIMIZERS)}, got {meta_optimizer!r}.")
        if not max_meta_step >= RPROP_MIN_STEP:
            raise ValueError(f"max_meta_step must be >= {RPROP_MIN_STEP}, got {max_meta_step!r}.")
        low, high = (float(x) for x in log_lr_range)
        if not low <= 0 <= high:
            raise ValueError(f"log_lr_range must satisfy low <= 0 <= high, got {log_lr_range!r}.")
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
        self._cadence = _Cadence()
        # loss_batch "next": the look-ahead's part of ∂Q/∂φ per group and its value, awaiting the next gradient
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self._displacement: list[torch.Tensor] | None = None  # loss_batch "next": D, the discounted sum of steps
        self._previous_scheduled_lrs: list[float] | None = None  # group["lr"] at the previous step(): warm-up?
        self._warming_up = False  # the scheduled LR rose at this step: the meta step only lowers φ
        self._initialized = True

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

    def _scheduled_lr_rises(self) -> bool:
        """Whether the scheduler raised group["lr"] since the previous step (a warm-up); remembers this step's LRs.

        A warm-up is the user's statement that the first steps must be small; a meta-gradient measured during it
        says "larger" at every meta step and would undo it. Measured on the translation example (warm-up 50 steps,
        lr 2e-3): with increases allowed, the multiplier reached 1.9 by step 75 and the model stalled on a plateau
        (eval loss 0.78 against 0.003). Decreases stay allowed: a too-large LR must come down during the warm-up.
        """
        scheduled = [float(group["lr"]) for group in self.param_groups]  # a copy: torchao's LR is a tensor, filled
        if self._previous_scheduled_lrs is None:
            # torch schedulers keep group["initial_lr"]: a schedule that starts below it starts with a warm-up
            rises = any(now < float(group.get("initial_lr", now)) for now, group in zip(scheduled, self.param_groups))
        else:
            rises = any(now > before for now, before in zip(scheduled, self._previous_scheduled_lrs))
        self._previous_scheduled_lrs = scheduled
        return rises

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
        layout = Layout.of(sharded_params)
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

        per_param = [zero] * len(params)
        objective = zero
        if batch is not None or self.objective.uses_meta_batch:
            # g has been used by the base step: v goes into the .grad buffers (no further copy of the parameters).
            result = self.objective.lookahead_gradient(sharded_params, batch, meta_batch, target, into_grad=True)
            grads = [None if v is None else local_tensor(v) for v in result.lookahead_grads]
            # ⟨Δ, v⟩ per parameter, multiplied in place in the .grad buffers and summed in at least float32.
            reached = [i for i, v in enumerate(grads) if v is not None]
            torch._foreach_mul_([grads[i] for i in reached], [deltas[i] for i in reached])
            per_param = [zero if v is None else v.sum(dtype=dtype) for v in grads]
            objective = result.objective.to(dtype)
        proximity = zero
        if wsd and params:
            squared = [n.square() for n in torch._foreach_norm(deltas, 2, dtype=dtype)]
            per_param = [dot + wsd * sq for dot, sq in zip(per_param, squared)]
            proximity = 0.5 * wsd * torch.stack(squared).sum()
        meta_grad = torch.stack([torch.stack(chunk).sum() if chunk else zero for chunk in _split(per_param, sizes)])
        # sharded: this rank's parts of ⟨Δ, v⟩ and ‖Δ‖² made whole (v is already the mean over the ranks)
        packed = layout.sum_over_shards(torch.cat([meta_grad, proximity.reshape(1)]))
        meta_grad, proximity = packed[:-1], packed[-1]
        if wsd and params:
            objective = objective + proximity
        return _Lookahead(params, sizes, deltas, meta_grad, objective)

    # -- loss_batch "next": the displacement and the delayed meta-gradient ------------------------------------
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
        Layout.of(self.all_params()).sum_over_shards(dots_per_group)  # sharded: this rank's shards of D and g
        meta_grad = meta_grad + dots_per_group
        if self.objective.horizon == 1:
            self._displacement = None  # rebuilt at the next look-ahead: no persistent copy of the parameters
        self._apply_meta_gradient(meta_grad, objective)

    def _apply_meta_gradient(self, meta_grad: torch.Tensor, objective: torch.Tensor) -> list[float] | None:
        """Reduce over ranks, guard, a meta step on φ and the clamp; the change of φ per group (None: skipped).

        During a warm-up only the parts of the meta-gradient that lower φ (positive ones) are applied, and φ does not
        rise. Then the cadence: the next look-ahead follows at once while φ keeps moving one way."""
        self.last_meta_gradient = meta_grad.detach().cpu()
        if not self._reduce_and_check(meta_grad, objective, Layout.of(self.all_params())):
            self._cadence.schedule(moving=False, interval=self.meta_interval)
            return None
        grad = meta_grad.to(device="cpu", dtype=self.log_lr.dtype)
        if self._warming_up:
            grad = grad.clamp(min=0.0)  # a negative meta-gradient raises the LR: held while the schedule warms up
        previous = self.log_lr.clone()
        self.log_lr.grad = grad
        self.meta_optimizer.step()
        self.log_lr.grad = None
        if self._warming_up:
            torch.minimum(self.log_lr, previous, out=self.log_lr)
        self.log_lr.clamp_(*self.log_lr_range)
        self._multipliers = [math.exp(x) for x in self.log_lr.tolist()]
        self._cadence.record(torch.sign(grad).tolist(), interval=self.meta_interval)
        return (self.log_lr - previous).tolist()

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
        self._cadence = _Cadence.from_state_dict(apo.get("cadence"))

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


@dataclass
class _Lookahead:
    """A look-ahead step θ′ = θ + Δ(φ) and the part of ∂Q/∂φ evaluated at it (per parameter group)."""

    params: list[torch.Tensor]  # the parameters the step updated, group after group
    sizes: list[int]  # how many of them belong to each group
    deltas: list[torch.Tensor]  # Δ per parameter (empty when no term evaluated at θ′ needs it)
    meta_grad: torch.Tensor  # ⟨Δ, v⟩ + λ_WSD‖Δ‖² per group, v the look-ahead gradient of the terms evaluated
    objective: torch.Tensor  # the value of those terms


def build_meta_optimizer(kind: str, log_lr: torch.Tensor, meta_lr: float, betas, max_step: float = 1.0):
    """The optimizer of φ: Adam (steps of about ``meta_lr``) or Rprop (first step ``meta_lr``, sign-agreement sizes
    within [1e-3, ``max_step``])."""
    lr = meta_lr or 1.0  # meta_lr 0: never stepped
    if kind == "adam":
        return torch.optim.Adam([log_lr], lr=lr, betas=betas)
    return torch.optim.Rprop([log_lr], lr=min(lr, max_step), etas=RPROP_ETAS, step_sizes=(RPROP_MIN_STEP, max_step))


def keeps_moving(signs: list[float], previous_signs: list[float] | None) -> bool:
    """Whether φ keeps moving one way: some group's meta-gradient has the (non-zero) sign it had the previous time.
    The first meta step counts as moving."""
    if previous_signs is None:
        return True
    return any(s != 0 and s == p for s, p in zip(signs, previous_signs))


@dataclass
class _Cadence:
    """``adaptive_interval``: when the next look-ahead is due, from the signs of the meta-gradients."""

    next_meta_step: int = 1  # the first look-ahead at step 1
    lookahead_step: int = 0  # the step of the latest look-ahead (with loss_batch "next", applied one step later)
    previous_signs: list[float] | None = None

    def schedule(self, moving: bool, interval: int) -> None:
        self.next_meta_step = self.lookahead_step + (1 if moving else interval)

    def record(self, signs: list[float], interval: int) -> None:
        self.schedule(keeps_moving(signs, self.previous_signs), interval)
        self.previous_signs = signs

    def state_dict(self) -> dict[str, Any]:
        return {"next_meta_step": self.next_meta_step, "lookahead_step": self.lookahead_step,
                "previous_signs": self.previous_signs}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any] | None) -> _Cadence:
        return cls(**state) if state else cls()


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
