"""APO-LR's meta step on φ = log(multiplier), given its meta-gradient (:mod:`hf_apo.lr`).

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import math

import torch


META_OPTIMIZERS = ("adam", "rprop")
RPROP_ETAS = (0.5, 1.2)  # φ's step halves when the meta-gradient flips sign and grows ×1.2 while it keeps it
RPROP_MIN_STEP = 1e-3  # φ's Rprop step never falls below 0.1% (never frozen); its bound above is max_meta_step


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
class Cadence:
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
    def from_state_dict(cls, state: dict[str, Any] | None) -> Cadence:
        return cls(**state) if state else cls()


class PhiMetaStep:
    """The part of :class:`~hf_apo.lr.APOLR` that applies a meta-gradient to φ (a mixin: it reads the optimizer's
    groups, φ and its meta-optimizer)."""

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

    def _apply_meta_gradient(self, meta_grad: torch.Tensor, objective: torch.Tensor) -> list[float] | None:
        """Reduce over ranks, guard, a meta step on φ and the clamp; the change of φ per group (None: skipped).

        During a warm-up only the parts of the meta-gradient that lower φ (positive ones) are applied, and φ does not
        rise. Then the cadence: the next look-ahead follows at once while φ keeps moving one way."""
        self.last_meta_gradient = meta_grad.detach().cpu()
        if not self._reduce_and_check(meta_grad, objective):
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
