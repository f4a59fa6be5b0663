"""The proximal meta-objective of APO, in one place.

For one look-ahead step θ′ = θ + Δ(φ) of the update rule on the training batch B, APO scores φ by

    Q(φ) = L_B(θ′) + λ_FSD · mean_{x ∈ B′} D(f(x; θ) ‖ f(x; θ′)) + (λ_WSD / 2) · ‖θ′ − θ‖²

with B′ a different (meta) batch. Since g = ∇L_B(θ) does not depend on φ, the meta-gradient is
∇_φ Q = (∂Δ/∂φ)ᵀ v with v = ∇_{θ′} Q: this module computes Q and v (one forward at θ without grad for the
target distribution, one forward/backward at θ′); the optimizers own ∂Δ/∂φ and the weight-space term,
whose gradient λ_WSD · Δ they know in closed form.

Two estimators of the loss term (``loss_batch``):

* ``"same"`` (the paper's): L_B(θ′) on the batch B that produced the gradient. On its own it rewards far too large
  a step (θ′ over-fits B and the learned learning rate runs away), so λ_FSD (in nats per target token, portable
  across models) or λ_WSD (scale depends on the parameter count) must regularise it; both at 0 warns.
* ``"next"``: L_{B_{t+1}}(θ′) on the *next* training batch. Its gradient at θ′ is the one the training loop computes
  anyway, so the loss part of the meta-gradient, ⟨∂Δ/∂φ, ∇L_{B_{t+1}}(θ′)⟩, costs dot products only and the
  optimizer applies it one step late (hypergradient descent, Baydin et al. 2018). A fresh batch does not reward
  over-fitting, so λ = 0 is sound (the greedy one-step objective); its known bias is the opposite one, towards
  too small a step over long horizons (Wu et al. 2018). Here this module computes only the proximity terms' part
  of v (the optimizer reads the loss part from ``.grad`` at the next step), and none when both λ are 0.

Several data-parallel processes: L_B and the KL are token means over this rank's share of B and B′. Each is
weighted by n_rank · ranks / n_global (one all-reduce of the two counts per meta step), so that the optimizers' mean
over ranks of the meta-gradient is the gradient of the global token means, as the Trainer weighs the training loss
with ``num_items_in_batch``. The weight is 1.0, and skipped, in a single process and when every rank holds as many
target tokens. With sharded parameters the look-ahead runs through the sharded module (:mod:`hf_apo.distributed`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batches import Batch, batch_size_of, default_forward, get_output
from .defaults import PAPER_OBJECTIVE, settings as apo_settings
from .distributed import backward_inputs, free_gathered, shares_of_global_count

ForwardFn = Callable[[nn.Module, Batch], Any]
DivergenceFn = Callable[[Any, Any, Batch], torch.Tensor]

DIVERGENCES = ("kl", "squared_error")
LOSS_BATCHES = ("same", "next")


def kl_divergence(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p ‖ q) = Σ_v p (log p − log q), p = softmax(target_logits), q = softmax(logits).

    Both log-softmaxes run in ``promote_types(dtype, float32)``: float32 under bf16/fp16 autocast and float64
    in a float64 test (a bare ``.float()`` would cap a float64 finite-difference check near 1e-2).
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    target_log_probs = target_logits.detach().to(dtype).log_softmax(dim=-1)
    log_probs = logits.to(dtype).log_softmax(dim=-1)
    per_row = (target_log_probs.exp() * (target_log_probs - log_probs)).sum(dim=-1)
    return per_row.mean()


def squared_error_divergence(target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """½‖f(x; θ′) − f(x; θ)‖² per example, averaged: the Gaussian KL up to a constant (regression outputs)."""
    dtype = torch.promote_types(prediction.dtype, torch.float32)
    diff = prediction.to(dtype) - target.detach().to(dtype)
    return 0.5 * diff.reshape(diff.shape[0], -1).pow(2).sum(dim=1).mean()


def _check_settings(lambda_fsd, lambda_wsd, divergence, label_shift, loss_batch, horizon) -> None:
    """ValueError on a setting :class:`ProximalObjective` cannot take; a warning on one that runs away."""
    if loss_batch not in LOSS_BATCHES:
        raise ValueError(f"loss_batch must be one of {LOSS_BATCHES}, got {loss_batch!r}.")
    if not horizon >= 1:
        raise ValueError(f"horizon must be >= 1 (steps), got {horizon!r}.")
    if horizon > 1 and loss_batch != "next":
        raise ValueError("horizon > 1 needs loss_batch='next' (the future losses are read from future gradients).")
    if lambda_fsd < 0:
        raise ValueError(f"lambda_fsd must be >= 0, got {lambda_fsd}.")
    if lambda_wsd < 0:
        raise ValueError(f"lambda_wsd must be >= 0, got {lambda_wsd}.")
    if isinstance(divergence, str) and divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES} or a callable, got {divergence!r}.")
    if label_shift not in (0, 1):
        raise ValueError(f"label_shift must be 0 or 1, got {label_shift}.")
    if lambda_fsd == 0 and lambda_wsd == 0 and loss_batch == "same":
        warnings.warn(
            "APO with lambda_fsd = lambda_wsd = 0 and loss_batch='same': the meta-objective is then the loss on "
            "the same batch that produced the gradient, which rewards far too large a step; expect the learned "
            "learning rate to run away. Set lambda_fsd > 0 (e.g. 10) or lambda_wsd > 0, or use loss_batch='next'.",
            stacklevel=3,
        )


@dataclass
class MetaStepResult:
    """What one evaluation of the meta-objective produced."""

    objective: torch.Tensor  # Q without the weight-space term (the optimizer adds it), detached
    lookahead_grads: list[torch.Tensor | None]  # v = ∇_{θ′}(L_B + λ_FSD · D), one entry per parameter


class ProximalObjective:
    """Q(θ′) = L_B(θ′) + λ_FSD · D(f(θ) ‖ f(θ′)) on B′ (+ λ_WSD/2 · ‖θ′ − θ‖², added by the optimizer).

    Args:
        model: the module whose parameters the optimizer updates (unwrapped: not the DDP wrapper).
        lambda_fsd: weight of the function-space distance, in nats per target token for ``"kl"``.
        lambda_wsd: weight of the weight-space distance ½‖θ′ − θ‖².
        divergence: ``"kl"`` over output distributions (``logits``; for token outputs averaged over the
            real target tokens, ``labels == -100`` masked), ``"squared_error"`` for regression outputs, or a
            callable ``(outputs_theta, outputs_lookahead, meta_batch) -> scalar``.
        forward: ``(model, batch) -> outputs`` with ``loss`` and ``logits`` (attribute or key). Defaults to
            ``model(**batch)``, the Hugging Face convention.
        label_shift: 1 for causal language models, whose logits at position t predict label t + 1; 0 for
            encoder-decoder and classification models.
        output_key: where the output distribution lives in ``outputs`` (``"logits"``).
        loss_batch: ``"same"`` scores the loss term on the batch B that produced the gradient (the paper);
            ``"next"`` on the next training batch, read from the gradient the loop computes there (see the module
            docstring; supported by :class:`~hf_apo.APOLR`).
        horizon: ``"next"`` only: the loss term is Σ_k γ^k L_{B_t+k+1}(θ_t+k+1) with γ = 1 − 1/horizon, the
            losses of about ``horizon`` future steps rather than of the next one (1: the greedy one-step
            objective, whose learned LR decays too fast over long runs: Wu et al. 2018's short-horizon bias).

    The meta forwards run in eval mode (dropout off, so D(f(θ) ‖ f(θ)) = 0 and finite differences agree);
    the caller's mode is restored afterwards.
    """

    def __init__(
        self,
        model: nn.Module,
        lambda_fsd: float = PAPER_OBJECTIVE["lambda_fsd"],
        lambda_wsd: float = PAPER_OBJECTIVE["lambda_wsd"],
        divergence: str | DivergenceFn = "kl",
        forward: ForwardFn | None = None,
        label_shift: int = 0,
        output_key: str = "logits",
        loss_batch: str = PAPER_OBJECTIVE["loss_batch"],
        horizon: float = PAPER_OBJECTIVE["horizon"],
    ):
        _check_settings(lambda_fsd, lambda_wsd, divergence, label_shift, loss_batch, horizon)
        self.model = model
        self.lambda_fsd = float(lambda_fsd)
        self.lambda_wsd = float(lambda_wsd)
        self.divergence = divergence
        self.forward = forward or default_forward
        self.label_shift = label_shift
        self.output_key = output_key
        self.loss_batch = loss_batch
        self.horizon = float(horizon)

    @classmethod
    def for_apo(cls, model: nn.Module, mode: str = "lr", loss_batch: str | None = None, **kwargs) -> ProximalObjective:
        """The objective ``--apo {mode}`` uses by default (hf_apo.defaults; for ``"lr"``: the next batch, horizon
        10,000, λ 0); ``kwargs`` (``forward``, ``label_shift``, ``lambda_wsd``, ...) as the constructor's."""
        s = apo_settings(mode, loss_batch)
        return cls(model, **{"lambda_fsd": s["lambda_fsd"], "loss_batch": s["loss_batch"], "horizon": s["horizon"],
                             **kwargs})

    @property
    def discount(self) -> float:
        """γ = 1 − 1/horizon: the weight of the loss k steps ahead is γ^k (``loss_batch="next"``)."""
        return 1.0 - 1.0 / self.horizon

    @property
    def uses_meta_batch(self) -> bool:
        return self.lambda_fsd > 0

    @property
    def needs_batches(self) -> bool:
        """Whether a meta step needs the observed batches (not for ``"next"`` with λ_FSD = 0: dot products only)."""
        return self.loss_batch == "same" or self.uses_meta_batch

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _token_mask(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor | None:
        """Boolean mask of the logit rows that predict a real target token (None: every row counts)."""
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if logits.dim() < 3 or labels is None:
            return None
        if self.label_shift:
            labels = labels[:, self.label_shift :]
            return torch.nn.functional.pad(labels != -100, (0, self.label_shift), value=False)
        return labels != -100

    def _distribution(self, outputs: Any, batch: Batch) -> torch.Tensor:
        """The rows of the output distribution that D compares: (N, V) logits of real tokens, or the outputs."""
        logits = get_output(outputs, self.output_key)
        if logits is None:
            raise ValueError(
                f"APO's function-space term needs the model output {self.output_key!r}, which this model does not "
                "return. Pass a divergence callable, or set lambda_fsd = 0."
            )
        if self.divergence != "kl":
            return logits
        mask = self._token_mask(logits, batch)
        if mask is None:
            return logits.reshape(-1, logits.shape[-1])
        return logits[mask]

    def _divergence(self, target: Any, outputs: Any, batch: Batch) -> torch.Tensor:
        if callable(self.divergence):
            return self.divergence(target, outputs, batch)
        prediction = self._distribution(outputs, batch)
        if self.divergence == "kl":
            return kl_divergence(target, prediction)
        return squared_error_divergence(target, prediction)

    def target(self, meta_batch: Batch) -> Any:
        """f(B′; θ): the detached distribution D compares against, computed before the step is taken (None without
        a function-space term)."""
        return self.reference(meta_batch) if self.uses_meta_batch else None

    @torch.no_grad()
    def reference(self, meta_batch: Batch) -> Any:
        """f(B′; θ) at the current parameters, detached, whatever λ_FSD (also the trust region's reference)."""
        with self._eval_mode():
            outputs = self.forward(self.model, meta_batch)
        free_gathered(self.model)  # sharded: the step that follows changes the shards
        if callable(self.divergence):
            return outputs
        return self._distribution(outputs, meta_batch).detach()

    @torch.no_grad()
    def divergence_from(self, reference: Any, meta_batch: Batch) -> torch.Tensor:
        """D(reference ‖ f(B′; θ)) at the current parameters, without grad, weighted by this rank's share of B′'s
        global count (so that its mean over ranks is the global mean, as the KL term's)."""
        with self._eval_mode():
            outputs = self.forward(self.model, meta_batch)
            divergence = self._divergence(reference, outputs, meta_batch)
        free_gathered(self.model)
        count = None if callable(self.divergence) else int(reference.shape[0])
        (share,) = shares_of_global_count([count], divergence.device)
        return divergence * share

    def lookahead_gradient(
        self,
        params: Sequence[torch.Tensor],
        batch: Batch | None,
        meta_batch: Batch | None,
        target: Any,
        into_grad: bool = False,
    ) -> MetaStepResult:
        """Q_partial = L_B(θ′) + λ_FSD · D and v = ∇_{θ′} Q_partial, with the model's parameters at θ′.

        ``batch`` None leaves out the loss term (``loss_batch="next"``: the optimizer takes it from the next step's
        gradient), so only the function-space term is evaluated.

        By default the gradients come from ``torch.autograd.grad``, so the ``.grad`` of the real step is left
        untouched. With ``into_grad=True`` (for a caller that has already used g) the ``.grad`` buffers are freed
        and v is written there instead (None for a parameter the objective does not reach), which saves a copy of
        the parameters; B and B′ are then back-propagated one after the other, so only one of their activation
        graphs is alive at a time. Either way DDP reduces nothing: the optimizer all-reduces its small
        meta-gradient itself.

        Sharded parameters need ``into_grad=True``: autograd does not reach them (the forward uses gathered
        copies), so v comes from the sharded module's own backward, reduce-scattered into ``.grad``: this rank's
        shard of the mean of v over the data-parallel ranks (:mod:`hf_apo.distributed`).
        """
        params = list(params)
        inputs = backward_inputs(params)
        if inputs is None and not into_grad:
            raise ValueError("lookahead_gradient on sharded parameters needs into_grad=True.")
        device = params[0].device if params else None
        loss_share, meta_share = shares_of_global_count(
            [None if batch is None else self._loss_items(batch), self._meta_items(target)], device
        )
        if into_grad:
            for p in params:
                p.grad = None  # freed, not zeroed: backward allocates v as it goes, as a training backward does
        with torch.enable_grad(), self._eval_mode():
            if batch is None:
                loss = torch.zeros((), device=device)
            else:
                loss = self._loss(self.forward(self.model, batch))
                if loss_share != 1.0:
                    loss = loss * loss_share
            if not into_grad:
                objective = loss + self._function_space_term(meta_batch, target, meta_share)
                grads = torch.autograd.grad(objective, params, allow_unused=True)
                return MetaStepResult(objective=objective.detach(), lookahead_grads=list(grads))
            if batch is not None:
                loss.backward(inputs=inputs)
            objective = loss.detach()
            if self.uses_meta_batch:
                fsd = self._function_space_term(meta_batch, target, meta_share)
                fsd.backward(inputs=inputs)
                objective = objective + fsd.detach()
            return MetaStepResult(objective=objective, lookahead_grads=[p.grad for p in params])

    def _function_space_term(self, meta_batch: Batch | None, target: Any, share: float = 1.0) -> torch.Tensor | float:
        """λ_FSD · D(f(B′; θ) ‖ f(B′; θ′)) with the model at θ′ (0 when λ_FSD = 0: no forward on B′)."""
        if not self.uses_meta_batch:
            return 0.0
        outputs = self.forward(self.model, meta_batch)
        divergence = self._divergence(target, outputs, meta_batch)
        return self.lambda_fsd * (divergence if share == 1.0 else divergence * share)

    def _loss_items(self, batch: Batch) -> int:
        """How many terms the model's loss averages: the real target tokens (labels ≠ −100), else the examples."""
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if isinstance(labels, torch.Tensor) and labels.dim() >= 2:
            return int((labels[:, self.label_shift :] != -100).sum())
        return batch_size_of(batch) or 1

    def _meta_items(self, target: Any) -> int | None:
        """How many terms D averages: the rows of the target (tokens for "kl"); None for a divergence callable."""
        if not self.uses_meta_batch or callable(self.divergence):
            return None
        return int(target.shape[0])

    def _loss(self, outputs: Any) -> torch.Tensor:
        loss = get_output(outputs, "loss")
        if loss is None:
            raise ValueError(
                "APO's meta-objective needs the training loss: the forward must return `loss` (pass `labels` in "
                "the batch, or give ProximalObjective a `forward` that returns it)."
            )
        return loss
