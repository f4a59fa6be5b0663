"""The precision of APO-Precond's update: its math in full precision, and bf16 parameters rounded without bias.

bf16 parameters. Rounding θ − η·d to the nearest bf16 drops every update smaller than half a bf16 ulp of its entry
(2⁻⁹ relative), which can leave most entries unmoved in a step (docs/method.md). With
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

import torch


def no_autocast(reference: torch.Tensor):
    """The update rule's own math runs in full precision even when the caller is under autocast."""
    if reference.device.type in ("cpu", "cuda"):
        return torch.autocast(reference.device.type, enabled=False)
    return contextlib.nullcontext()


def stochastic_add_(target: torch.Tensor, update: torch.Tensor, alpha: float, generator: torch.Generator,
                    decay: float = 1.0) -> None:
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
                          generator=generator)
    target.copy_(exact.view(torch.int32).add_(noise).bitwise_and_(-65536).view(torch.float32))


class StochasticRounding:
    """Unbiased rounding of bf16 parameters' updates when ``enabled``, with one generator per device (seeded 0, saved
    in the state dict: every rank rounds alike and a resumed run continues the same stream)."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)
        self.generators: dict[torch.device, torch.Generator] = {}

    def applies(self, param: torch.Tensor) -> bool:
        """Whether ``param``'s update is formed in float32 and rounded stochastically (bf16 only)."""
        return self.enabled and param.dtype == torch.bfloat16

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(0)
        return self.generators[device]

    def add_(self, target: torch.Tensor, update: torch.Tensor, alpha: float, decay: float = 1.0) -> None:
        """target ← SR(decay · target + alpha · update) for a bf16 ``target`` (:func:`stochastic_add_`)."""
        stochastic_add_(target, update, alpha, self.generator(target.device), decay=decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(device): generator.get_state() for device, generator in self.generators.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for device, generator_state in state.items():
            self.generator(torch.device(device)).set_state(generator_state)
