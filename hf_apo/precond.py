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

written by hand (:meth:`~hf_apo.factors.KroneckerFactors.vjp`: two matmuls per dense side, no autograd graph).

Momentum. With momentum μ the fresh P(g) keeps acting through the buffer for about 1/(1 − μ) steps, which a
one-step look-ahead does not see. ``lookahead_steps = n`` looks ahead n steps of the same update rule with no new
gradient (and no weight decay): the buffer b′ after this step decays as μᵏ·b′, so

    θ′ = θ + Δ − η · m · b′,   m = Σ_{k=1}^{n−1} μᵏ  (μᵏ⁺¹ with Nesterov),

in closed form, and c grows by m times b′'s coefficient on P(g). n = 1 is the paper's one-step look-ahead; the
proximity terms then measure the displacement the momentum will carry.

FSDP2 (``fully_shard``, parameters sharded on dim 0): each rank keeps the factors of its shard. A shard holds
whole rows, so the input side R stays dense where it would be; the row side L is diagonal over this rank's rows
(a dense L would couple rows held by other ranks). Against the unsharded preconditioner this drops the dense L of
the weights whose row side would be dense (rows ≤ columns and ≤ ``max_factor_dim``); with ``diagonal_row_params``
naming every matrix, the unsharded optimizer has the same factors, which is how the tests compare the two. v arrives
reduce-scattered (the mean over ranks); the VJP's sums over rows (R's gradient, a scale's) and ‖Δ‖² are summed over
the ranks; L's entries stay with their rows.

The look-ahead writes θ′ into the parameters in place and restores θ from a copy afterwards (one extra copy of the
parameters, on meta steps only); the momentum buffers are not touched by it.

bf16 parameters. Rounding θ − η·d to the nearest bf16 drops every update smaller than half a bf16 ulp of its entry
(2⁻⁹ relative): on the translation benchmark at lr 0.1, 55–79% of the entries did not move in a step. With
``stochastic_rounding`` (the default) a bf16 parameter's update is added in float32 and rounded up or down at random
with the probabilities that make the rounding unbiased, so small updates accumulate in expectation, at no memory
cost. The draws come from the optimizer's own generator (seeded, saved in the state dict), so every data-parallel
rank rounds alike and a resumed run continues the same stream.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .factors import FactorAdam, KroneckerFactors
from .meta import MetaLearnedOptimizer, all_reduce_sum, shard_group
from .objective import ProximalObjective, local_tensor

_SGD_KEYS = ("lr", "momentum", "dampening", "weight_decay", "nesterov")


class APOPrecond(MetaLearnedOptimizer):
    """Preconditioner APO around SGD.

    Args:
        params: parameters or parameter groups (tied weights appear once, as in ``named_parameters()``).
        objective: the proximal meta-objective; required when ``meta_lr > 0``.
        lr, momentum, dampening, weight_decay, nesterov: as in ``torch.optim.SGD``.
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
            the paper's one-step look-ahead. Without momentum it changes nothing.
        stochastic_rounding: round the update of bf16 parameters stochastically (see the module docstring); no
            effect on float32 or float64 parameters.
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
        meta_lr: float = 0.01,
        meta_batch_fraction: float = 0.25,
        max_factor_dim: int = 1024,
        diagonal_row_params=(),
        meta_betas: tuple[float, float] = (0.9, 0.999),
        lookahead_steps: int = 1,
        spectral_meta_step: bool = True,
        stochastic_rounding: bool = True,
    ):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}.")
        if momentum < 0 or weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {momentum} and {weight_decay}.")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening 0, as in torch.optim.SGD.")
        if not isinstance(max_factor_dim, int) or max_factor_dim < 1:
            raise ValueError(f"max_factor_dim must be an integer >= 1, got {max_factor_dim!r}.")
        if not isinstance(lookahead_steps, int) or lookahead_steps < 1:
            raise ValueError(f"lookahead_steps must be an integer >= 1, got {lookahead_steps!r}.")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults)
        if objective is not None and objective.loss_batch != "same":
            raise ValueError(
                "APO-Precond scores the loss term on the same batch (loss_batch='same'); loss_batch='next' is "
                "supported by APO-LR only."
            )
        self._init_meta(objective, meta_interval, meta_lr, meta_batch_fraction, meta_betas)
        self.max_factor_dim = max_factor_dim
        self.lookahead_steps = lookahead_steps
        self.spectral_meta_step = spectral_meta_step
        self.stochastic_rounding = stochastic_rounding
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

        Accelerate's FSDP2 ``prepare`` (the Trainer builds the optimizer first) swaps each parameter in
        ``param_groups`` for its sharded DTensor; the factors must then be those of the shards. That is only sound
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

    def _update(self, meta_step_due: bool) -> None:
        self._follow_replaced_params()
        if meta_step_due:
            self.meta_update()
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

    def _rounding_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._rounding_generators:
            self._rounding_generators[device] = torch.Generator(device=device).manual_seed(0)
        return self._rounding_generators[device]

    def _stochastic_add_(self, target: torch.Tensor, update: torch.Tensor, alpha: float) -> None:
        """target += alpha · update for a bf16 ``target``, the float32 sum rounded to bf16 without bias.

        A bf16 number is a float32 with its 16 low bits zero: adding a uniform random 16-bit integer to the float32
        sum's bits and clearing them rounds its magnitude up with probability (distance to the lower neighbour) /
        (spacing), the trick of heavyball and Zamirai et al. (2020). inf and NaN stay what they are.
        """
        exact = target.float().add_(update.float(), alpha=alpha)
        noise = torch.randint(0, 1 << 16, exact.shape, dtype=torch.int32, device=exact.device,
                              generator=self._rounding_generator(exact.device))
        target.copy_(exact.view(torch.int32).add_(noise).bitwise_and_(-65536).view(torch.float32))

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
        shards = shard_group(params)  # FSDP2: the group the parameters are sharded over, else None
        target = self.objective.target(meta_batch)

        # θ′ = θ + Δ(φ) in place, group by group; cotangent scale −η·c per parameter
        theta = [local_tensor(p).detach().clone() for p in params]
        scales = []
        for group, group_params in groups:
            if not group_params:
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

        if shards is None:
            result = self.objective.lookahead_gradient(params, batch, meta_batch, target)
            lookahead_grads = result.lookahead_grads
        else:
            # FSDP2: v comes reduce-scattered into .grad; g, which the VJP and the real step still need, is set aside
            grads = [p.grad for p in params]
            result = self.objective.lookahead_gradient(params, batch, meta_batch, target, into_grad=True)
            lookahead_grads = [None if p.grad is None else local_tensor(p.grad) for p in params]
            for p, g in zip(params, grads):
                p.grad = g
        wsd = self.objective.lambda_wsd
        objective = result.objective.to(torch.float64)
        proximity = torch.zeros((), dtype=torch.float64, device=objective.device)  # FSDP2: this rank's shards' part
        meta_grads: list[torch.Tensor] = []
        with _no_autocast(params[0]):
            for index, (p, v, scale) in enumerate(zip(params, lookahead_grads, scales)):
                factors = self.factors[p]
                local = local_tensor(p)
                u = torch.zeros(local.shape, dtype=factors.dtype, device=p.device) if v is None else v.to(factors.dtype)
                if wsd:
                    delta = (local.detach() - theta[index]).to(factors.dtype)
                    u = u + wsd * delta
                    term = 0.5 * wsd * delta.pow(2).sum().to(torch.float64)
                    if shards is None:
                        objective = objective + term
                    else:
                        proximity = proximity + term
                local.copy_(theta[index])  # back to θ: the real step is taken by step() with the updated φ
                theta[index] = None
                meta_grads.extend(factors.vjp(local_tensor(p.grad), u.mul_(scale)))
        del theta, result, lookahead_grads
        flat = torch.cat([g.reshape(-1).to(torch.float64) for g in meta_grads])
        self.last_meta_gradient = meta_grads
        if shards is not None:
            # The VJP's sums over the sharded rows (dense right factors, scales) and ‖Δ‖² are this rank's part:
            # all-reduce them; a diagonal row factor's entries belong to this rank's rows and stay as they are.
            partial = torch.cat([
                torch.full((t.numel(),), summed, device=flat.device)
                for p in params for t, summed in zip(self.factors[p].tensors, self.factors[p].summed_over_shards)
            ])
            packed = all_reduce_sum(torch.cat([flat[partial], proximity.reshape(1).to(flat.device)]), shards)
            flat[partial] = packed[:-1]
            objective = objective + packed[-1]
        if not self._reduce_and_check(flat, objective.to(flat.device), sharded=shards is not None):
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
            "rounding_generators": {str(d): g.get_state() for d, g in self._rounding_generators.items()},
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        apo = state_dict.pop("apo", None)
        super().load_state_dict(state_dict)
        if apo is None:
            return
        self._follow_replaced_params()  # a resumed Trainer run loads after Accelerate's FSDP2 prepare
        self._load_meta_state(apo)
        for factors, saved, is_identity in zip(self.factors.values(), apo["factors"], apo["factor_is_identity"]):
            for tensor, value in zip(factors.tensors, saved):
                tensor.copy_(value.to(device=tensor.device, dtype=tensor.dtype))
            if not is_identity:
                factors.refresh()
        self.meta_optimizer.load_state_dict(apo["meta_optimizer"])
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


def _no_autocast(reference: torch.Tensor):
    """The update rule's own math runs in full precision even when the caller is under autocast."""
    if reference.device.type in ("cpu", "cuda"):
        return torch.autocast(reference.device.type, enabled=False)
    return contextlib.nullcontext()
