"""APO-LR's φ = log(multiplier) and its meta step, given its meta-gradient (:mod:`hf_apo.lr`): :class:`LogLR` owns φ,
its meta-optimizer and clamp, :class:`Cadence` when the next look-ahead is due, :class:`WarmupWatch` the warm-up rule.

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


class LogLR:
    """φ: one float32 log-multiplier of the learning rate per parameter group (η = group["lr"] · exp(φ)), with its
    meta-optimizer (``"adam"`` or ``"rprop"``) and its clamp, a numerical guard. It lives on the CPU whatever the
    parameters' device and dtype."""

    def __init__(self, groups: int, meta_lr: float, betas, kind: str = "adam", max_step: float = 1.0,
                 log_lr_range: tuple[float, float] = (-10.0, 10.0)):
        self.range = check_meta_step_args(kind, max_step, log_lr_range)
        self.kind = kind
        self.max_step = float(max_step)
        self.log_lr = torch.zeros(groups, dtype=torch.float32)
        self.meta_optimizer = build_meta_optimizer(kind, self.log_lr, meta_lr, betas, self.max_step)

    def __len__(self) -> int:
        return self.log_lr.numel()  # one per parameter group

    def multipliers(self) -> list[float]:
        """exp(φ) per group."""
        return [math.exp(x) for x in self.log_lr.tolist()]

    def step(self, meta_grad: torch.Tensor, only_lower: bool = False) -> tuple[list[float], list[float]]:
        """One step of the meta-optimizer on φ from ∂Q/∂φ per group, then the clamp; the change of φ per group and
        the sign of the gradient applied. ``only_lower`` (a warm-up): the parts that raise φ (negative ones) are
        dropped and φ does not rise."""
        grad = meta_grad.to(device="cpu", dtype=self.log_lr.dtype)
        if only_lower:
            grad = grad.clamp(min=0.0)
        previous = self.log_lr.clone()
        self.log_lr.grad = grad
        self.meta_optimizer.step()
        self.log_lr.grad = None
        if only_lower:
            torch.minimum(self.log_lr, previous, out=self.log_lr)
        self.log_lr.clamp_(*self.range)
        return (self.log_lr - previous).tolist(), torch.sign(grad).tolist()

    def shift(self, changes: list[float]) -> list[float]:
        """φ += ``changes`` per group outside the meta-optimizer (the trust region's moves), then the clamp; the
        change made."""
        previous = self.log_lr.clone()
        self.log_lr.add_(torch.tensor(changes, dtype=self.log_lr.dtype)).clamp_(*self.range)
        return (self.log_lr - previous).tolist()

    def state_dict(self) -> dict[str, Any]:
        return {"log_lr": self.log_lr.clone(), "meta_optimizer": self.meta_optimizer.state_dict(),
                "meta_optimizer_kind": self.kind}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_kind = state.get("meta_optimizer_kind", "adam")
        if saved_kind != self.kind:
            raise ValueError(
                f"This checkpoint's APO-LR meta-optimizer is {saved_kind!r}, this run's is {self.kind!r}: resume with "
                f"--apo_meta_optimizer {saved_kind} (APOLR(meta_optimizer={saved_kind!r})), or start a new run to "
                "change it."
            )
        # φ lives on the CPU in float32 whatever device the checkpoint was mapped to.
        self.log_lr.copy_(state["log_lr"].to(device="cpu", dtype=torch.float32))
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])

    def nbytes(self) -> int:
        """Bytes of φ and of its meta-optimizer's state."""
        tensors = [self.log_lr, *(t for s in self.meta_optimizer.state.values() for t in s.values()
                                  if isinstance(t, torch.Tensor))]
        return sum(t.numel() * t.element_size() for t in tensors)


class WarmupWatch:
    """Whether the scheduler raised group["lr"] since the previous step (a warm-up).

    A warm-up is the user's statement that the first steps must be small; a meta-gradient measured during it says
    "larger" at every meta step and would undo it, so while the scheduled LR rises the meta step only lowers φ
    (a too-large LR must still come down during the warm-up). Before the first step, a schedule that starts below
    group["initial_lr"] (torch schedulers keep it) starts with a warm-up.
    """

    def __init__(self):
        self.previous_lrs: list[float] | None = None  # group["lr"] at the previous step

    def rises(self, param_groups) -> bool:
        """Whether the scheduled LR rose at this step; remembers this step's LRs."""
        scheduled = [float(group["lr"]) for group in param_groups]  # a copy: torchao's LR is a tensor, filled
        if self.previous_lrs is None:
            rises = any(now < float(group.get("initial_lr", now)) for now, group in zip(scheduled, param_groups))
        else:
            rises = any(now > before for now, before in zip(scheduled, self.previous_lrs))
        self.previous_lrs = scheduled
        return rises


def check_meta_step_args(meta_optimizer: str, max_meta_step: float, log_lr_range) -> tuple[float, float]:
    """ValueError on an unknown meta-optimizer, a too-small ``max_meta_step`` or a clamp that excludes φ = 0; the
    clamp as floats."""
    if meta_optimizer not in META_OPTIMIZERS:
        raise ValueError(f"meta_optimizer must be one of {', '.join(META_OPTIMIZERS)}, got {meta_optimizer!r}.")
    if not max_meta_step >= RPROP_MIN_STEP:
        raise ValueError(f"max_meta_step must be >= {RPROP_MIN_STEP}, got {max_meta_step!r}.")
    low, high = (float(x) for x in log_lr_range)
    if not low <= 0 <= high:
        raise ValueError(f"log_lr_range must satisfy low <= 0 <= high, got {log_lr_range!r}.")
    return low, high
