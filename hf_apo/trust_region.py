"""APO-LR's function-space trust region: the step actually taken is bounded by its own KL.

At a measured step, with θ′ = θ + Δ the base step at the current learning rate η = lr · exp(φ) and B′ the meta batch:

    kl    = mean over B′'s real target tokens of KL(f(x; θ) ‖ f(x; θ′))   (the objective's divergence)
    gain  = −⟨g, Δ⟩                                                       (first-order decrease of the batch loss)
    ratio = kl / gain

For the cross-entropy, KL(p_θ ‖ p_θ+Δ) ≈ ½ ΔᵀFΔ and the Fisher F is the loss's Gauss-Newton matrix, so along the
step the loss's quadratic model is L(θ + cΔ) ≈ L(θ) − c·gain + c²·kl. Its best scale is c* = 1/(2·ratio): ratio is
η over twice the model's best learning rate along this direction (0.5 at the best one, 1 where the model predicts no
decrease at all). That makes the test scale-free: a good fine-tuning step may carry ten times the KL of a destructive
from-scratch step, but it also gains more. (For ``squared_error`` outputs, ½‖Δf‖² is the same term for a loss of
½‖f − y‖² per example; other losses shift the ratio by their constant.)

The rule (:class:`TrustRegionRule`), applied by :class:`TrustRegion`:

* **too large** (``criterion="ratio"``: ratio > ``max_ratio``; ``"kl"``: kl > ``max_kl``, a fixed bound in nats per
  token): the step is shrunk in place, θ′ ← θ + Δ/2 (exact: Δ is linear in η for every base APO-LR wraps, and the
  base's state does not depend on η), kl is measured again and the halving repeats, at most ``max_backtracks`` times;
  φ comes down by the same factor. Also during a warm-up: a too-large step is never the user's intent.
* **room to grow** (ratio < ``grow_below``, or kl < ``max_kl``/10 for ``"kl"``): during the *opening* only, and only
  when the meta-gradient also says "larger", φ rises by log ``growth`` (×2) instead of the meta step's small move, and
  the next step is measured. The opening ends at the first measurement without room to grow, or after
  ``opening_steps``. Afterwards growth is never driven by a small KL (a good step's KL falls by orders of magnitude
  over a run, with convergence and the schedule, and growth would undo the schedule): the meta step moves φ as
  usual, except that its increases are dropped while the last measured step had no room to grow
  (additive increase, multiplicative decrease).

Cost: two forwards on B′ (no backward) and one copy of the parameters, on measured steps only: every step of the
opening, every ``interval`` steps after it, and the step after φ rose.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from .defaults import LR_META_STEP, META_INTERVAL
from .distributed import all_reduce_mean, local_tensor

CRITERIA = ("ratio", "kl")
VERDICTS = ("too_large", "room", "hold")


@dataclass(frozen=True)
class TrustRegionRule:
    """When a step is too large, when φ may grow fast, and how far each move goes."""

    criterion: str = "ratio"
    max_ratio: float = 1.0  # "ratio": kl/gain above this is too large (η > 2× the quadratic model's best)
    grow_below: float = 0.125  # "ratio": below this there is room (η < ¼ of the model's best: ×2 stays below ½)
    max_kl: float = 1.0  # "kl": nats per token above which a step is too large; room below max_kl / 10
    shrink: float = 0.5  # the factor of one backtracking halving
    growth: float = 2.0  # the factor of one opening increase
    max_backtracks: int = 6  # at most shrink**6 = 1/64 within one step
    opening_steps: int = LR_META_STEP["trust_region_opening"]  # the opening ends here at the latest (0: none)
    interval: int = META_INTERVAL  # after the opening, a measurement every this many steps

    def __post_init__(self):
        check_rule(self)

    def verdict(self, kl: float, gain: float) -> str:
        """``"too_large"``, ``"room"`` (to grow) or ``"hold"`` for a step with this kl and gain (a pure function)."""
        if not math.isfinite(kl):
            return "too_large"
        if self.criterion == "kl":
            return "too_large" if kl > self.max_kl else "room" if kl < self.max_kl / 10 else "hold"
        if gain <= 0:  # no first-order decrease to compare with (noise, or a converged direction): no evidence
            return "hold"
        ratio = kl / gain
        return "too_large" if ratio > self.max_ratio else "room" if ratio < self.grow_below else "hold"


def check_rule(rule: TrustRegionRule) -> None:
    """ValueError naming the setting and the fix, before the first step."""
    problems = []
    if rule.criterion not in CRITERIA:
        problems.append(f"criterion must be one of {', '.join(CRITERIA)}, got {rule.criterion!r}")
    if not 0 < rule.grow_below < rule.max_ratio:
        problems.append(f"need 0 < grow_below < max_ratio, got {rule.grow_below!r} and {rule.max_ratio!r}")
    if not rule.max_kl > 0:
        problems.append(f"max_kl must be > 0 (nats per token), got {rule.max_kl!r}")
    if not 0 < rule.shrink < 1:
        problems.append(f"shrink must be in (0, 1), got {rule.shrink!r}")
    if not rule.growth > 1:
        problems.append(f"growth must be > 1, got {rule.growth!r}")
    if not (isinstance(rule.max_backtracks, int) and rule.max_backtracks >= 1):
        problems.append(f"max_backtracks must be an integer >= 1, got {rule.max_backtracks!r}")
    if not (isinstance(rule.interval, int) and rule.interval >= 1):
        problems.append(f"interval must be an integer >= 1, got {rule.interval!r}")
    if not (isinstance(rule.opening_steps, int) and rule.opening_steps >= 0):
        problems.append(f"opening_steps must be an integer >= 0, got {rule.opening_steps!r}")
    if problems:
        raise ValueError("trust region: " + "; ".join(problems) + ".")


def first_order_gain(grads: list[torch.Tensor | None], deltas: list[torch.Tensor]) -> torch.Tensor:
    """−⟨g, Δ⟩ summed over the parameters, in at least float32 (float64 when the parameters are)."""
    dtype = torch.promote_types(deltas[0].dtype, torch.float32) if deltas else torch.float32
    total = torch.zeros((), dtype=dtype, device=deltas[0].device if deltas else None)
    for g, d in zip(grads, deltas):
        if g is not None:
            total -= (g.to(dtype) * d.to(dtype)).sum()
    return total


def shrink_step_(params: list[torch.Tensor], deltas: list[torch.Tensor], factor: float) -> None:
    """θ′ ← θ′ + (factor − 1)·Δ and Δ ← factor·Δ, in place: the step the base takes at ``factor`` times the LR."""
    if params:
        torch._foreach_add_(params, deltas, alpha=factor - 1.0)
        torch._foreach_mul_(deltas, factor)


@dataclass
class Measurement:
    """One measured step: its KL on B′ (per token), its first-order gain on B, and what the rule made of it."""

    kl: float
    gain: float
    verdict: str
    shrink: float = 1.0  # the product of the halvings applied to this step

    @property
    def ratio(self) -> float:
        return self.kl / self.gain if self.gain > 0 else math.inf


@dataclass
class TrustRegion:
    """The trust region's state in one APO-LR run: the opening, the last measurement and the counts.

    The optimizer calls :meth:`due` before each step, :meth:`bound_step` right after a measured base step, and
    :meth:`limit` on each meta step's change of φ (see the module docstring for the rule)."""

    rule: TrustRegionRule = field(default_factory=TrustRegionRule)
    opening: bool = True
    last: Measurement | None = None
    last_measured_step: int = 0
    measure_next: bool = True  # the first step, and the step after φ rose
    measurements: int = 0
    shrinks: int = 0

    def due(self, step: int) -> bool:
        """Whether step ``step`` (counted from 1) is measured."""
        if self.measure_next or (self.opening and step <= self.rule.opening_steps):
            return True
        return step - self.last_measured_step >= self.rule.interval

    def bound_step(self, step: int, measure: Callable[[], float], gain: float, shrink_: Callable[[float], None]
                   ) -> Measurement:
        """Judge the step just taken (``measure()`` returns its kl; ``gain`` its first-order gain) and backtrack:
        ``shrink_(factor)`` rescales it in place while the rule says "too large". Returns the measurement; the
        caller lowers φ by log(``measurement.shrink``)."""
        kl = measure()
        verdict, shrink = self.rule.verdict(kl, gain), 1.0
        backtracks = 0
        while verdict == "too_large" and backtracks < self.rule.max_backtracks:
            shrink_(self.rule.shrink)
            shrink *= self.rule.shrink
            gain *= self.rule.shrink
            kl = measure()
            verdict = self.rule.verdict(kl, gain)
            backtracks += 1
        if shrink < 1.0:
            self.shrinks += 1
            self.opening = False
        elif verdict != "room" or step > self.rule.opening_steps:
            self.opening = False
        self.last = Measurement(kl, gain, verdict, shrink)
        self.last_measured_step, self.measure_next = step, False
        self.measurements += 1
        return self.last

    def looks_ahead(self, step: int) -> bool:
        """Whether the opening asks for a meta step at ``step`` (φ may grow at each of its steps): until it ends, and
        at most to ``opening_steps`` (to step 1 without an opening), also where its steps are look-aheads it does not
        measure (``loss_batch="same"``)."""
        return self.opening and step <= max(1, self.rule.opening_steps)

    def limit(self, change: float, meta_gradient: float) -> float:
        """The change of one group's φ the meta step may make: ×``growth`` in the opening where there is room and
        the meta-gradient says larger; no increase after it while the last step had no room."""
        room = self.last is not None and self.last.verdict == "room"
        if self.opening and room and meta_gradient < 0:
            change = math.log(self.rule.growth)
        elif change > 0 and not room and not self.opening:
            change = 0.0
        if change > 0:
            self.measure_next = True
        return change

    def limit_phi(self, phi, changes: list[float], meta_gradients: list[float]) -> list[float]:
        """:meth:`limit` applied to the changes a meta step made to φ (a :class:`~hf_apo.phi_step.LogLR`): φ is
        shifted to the limited values; the changes made."""
        wanted = [self.limit(change, gradient) for change, gradient in zip(changes, meta_gradients)]
        shifts = phi.shift([w - c for w, c in zip(wanted, changes)])
        return [c + s for c, s in zip(changes, shifts)]

    def state_dict(self) -> dict[str, Any]:
        return {"opening": self.opening, "last": None if self.last is None else asdict(self.last),
                "last_measured_step": self.last_measured_step, "measure_next": self.measure_next,
                "measurements": self.measurements, "shrinks": self.shrinks}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        last = state.pop("last")
        self.last = None if last is None else Measurement(**last)
        for name, value in state.items():
            setattr(self, name, value)

    def metrics(self) -> dict[str, float]:
        if self.last is None:
            return {}
        return {"apo/step_kl": self.last.kl, "apo/step_kl_ratio": self.last.ratio,
                "apo/trust_region_shrinks": float(self.shrinks)}


def bounded_step(optimizer, region: TrustRegion, base_step: Callable[[], None]) -> Measurement:
    """``base_step()`` (the wrapped optimizer's step at the current φ), judged on the meta batch and backtracked in
    place by ``region``'s rule. φ is the caller's to lower by log(``measurement.shrink``).

    Costs a no-grad forward on B′ before the step and one after it (one more per halving), and a copy of the
    parameters (θ, turned into Δ in place) until the step is judged. Several processes: the KL is the global token
    mean (each rank's weighted by its share, then the mean over ranks) and the gain is summed over shards, so every
    rank takes the same decision."""
    objective = optimizer.objective
    if optimizer._current_batch is None:
        raise ValueError("APO-LR's trust region measures the step on the batches: call optimizer.observe(batch) "
                         "before each step() (the Trainer does), or pass trust_region='none'.")
    _, meta_batch = optimizer._meta_batches()
    reference = objective.reference(meta_batch)
    stepped = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    params = [local_tensor(p).detach() for p in stepped]
    deltas = [p.clone() for p in params]  # θ
    base_step()
    torch._foreach_sub_(deltas, params)
    torch._foreach_neg_(deltas)  # Δ = θ′ − θ, in place of the copy of θ
    gain = first_order_gain([local_tensor(p.grad) for p in stepped], deltas).reshape(1)
    gain = float(optimizer.layout.sum_over_shards(gain))

    def measure() -> float:
        return float(all_reduce_mean(objective.divergence_from(reference, meta_batch).detach().reshape(1)))

    return region.bound_step(optimizer.step_count, measure, gain, lambda factor: shrink_step_(params, deltas, factor))


def trust_region_of(setting: TrustRegionRule | str | float | None, interval: int,
                    opening: int = LR_META_STEP["trust_region_opening"]) -> TrustRegion | None:
    """The optimizer's trust region from its ``trust_region`` argument: None/"none" (off), "kl" or "ratio" (the rule
    with that criterion and its defaults), a number (``"kl"`` with that bound in nats per token), or a rule; a
    strategy given by name has an opening of ``opening`` steps and measures every ``interval`` steps after it."""
    if setting is None or setting == "none":
        return None
    if (bound := kl_bound(setting)) is not None:
        setting = TrustRegionRule(criterion="kl", max_kl=bound, interval=interval, opening_steps=opening)
    elif setting in CRITERIA:
        setting = TrustRegionRule(criterion=setting, interval=interval, opening_steps=opening)
    if not isinstance(setting, TrustRegionRule):
        raise ValueError(f"trust_region must be 'none', one of {', '.join(CRITERIA)}, a KL bound in nats per token or "
                         f"a TrustRegionRule, got {setting!r}.")
    return TrustRegion(setting)


def kl_bound(setting) -> float | None:
    """The KL bound a ``trust_region`` setting names (a number, or a string that is one), else None."""
    if isinstance(setting, bool) or not isinstance(setting, (int, float, str)):
        return None
    try:
        return float(setting)
    except ValueError:
        return None
