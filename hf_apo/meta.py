"""What APO-LR and APO-Precond share: when a meta step runs, which batches it sees, the distributed reduction of
the meta-gradient, the NaN/inf guard, and the ``apo`` section of the state dict.

A meta step runs inside ``step()`` on every ``meta_interval``-th call. Its batches come from :meth:`observe`,
which the training loop calls with each (micro-)batch it trains on:

* B, the batch whose gradient the step applies, is the most recently observed batch (under gradient
  accumulation: the last micro-batch of the accumulation window);
* B′, the meta batch, is the batch observed before it (the previous micro-batch, or the last one of the
  previous step), cut to its first ``ceil(meta_batch_fraction · size)`` examples. Only on the very first
  step of a run, when nothing was observed before, is B′ = B.

No batch is drawn twice from the data; the last observed batch is part of the state dict so that a resumed run
sees the same B′ as one that never stopped. (Under DDP the Trainer saves rank 0's optimizer state, so after a
multi-process resume every rank's first B′ is rank 0's last batch; φ stays identical on all ranks, the meta-gradient
being reduced. With sharded parameters every rank saves and resumes its own.)

Data parallelism. Each rank's loss and KL are weighted by its share of the global count of target tokens
(:mod:`hf_apo.objective`), so the mean over ranks of the meta-gradient is that of one process with the global batch.
B′ is each rank's own first ``meta_batch_fraction`` of its previous batch: with a fraction below 1 that is not the
subset one process would take, and 2 processes differ from 1 (README, "Distributed").

Sharded parameters: :mod:`hf_apo.distributed` says what each layout of the parameters reduces, and how.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from .distributed import Layout, local_tensor
from .batches import Batch, batch_size_of, move_batch, slice_batch
from .objective import ProximalObjective


def _validate_meta_args(meta_interval: int, meta_lr: float, meta_batch_fraction: float, meta_betas) -> None:
    if not isinstance(meta_interval, int) or meta_interval < 1:
        raise ValueError(f"meta_interval must be an integer >= 1, got {meta_interval!r}.")
    if not meta_lr >= 0:
        raise ValueError(f"meta_lr must be >= 0 (0 switches meta-learning off), got {meta_lr!r}.")
    if not 0 < meta_batch_fraction <= 1:
        raise ValueError(f"meta_batch_fraction must be in (0, 1], got {meta_batch_fraction!r}.")
    if len(meta_betas) != 2 or not all(0 <= b < 1 for b in meta_betas):
        raise ValueError(f"meta_betas must be two numbers in [0, 1), got {meta_betas!r}.")


def default_objective(objective: ProximalObjective | None, model, mode: str) -> ProximalObjective | None:
    """``objective``, or given ``model`` instead, ``--apo {mode}``'s default objective for it
    (:meth:`ProximalObjective.for_apo`, from hf_apo.defaults)."""
    if model is None:
        return objective
    if objective is not None:
        raise ValueError("Pass objective= or model= (for --apo's default objective), not both.")
    return ProximalObjective.for_apo(model, mode)


def tensor_nbytes(obj: Any, seen: set) -> int:
    """Bytes of the tensors in ``obj`` (nested mappings, lists, tuples), each counted once over ``seen``."""
    if isinstance(obj, torch.Tensor):
        key = (obj.data_ptr(), obj.numel(), obj.dtype)
        if key in seen:
            return 0
        seen.add(key)
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_nbytes(item, seen) for item in obj)
    return 0


class MetaLearnedOptimizer(torch.optim.Optimizer):
    """Base class: meta-step cadence, batch bookkeeping, reduction, guard and state; subclasses own the math."""

    def _init_meta(
        self,
        objective: ProximalObjective | None,
        meta_interval: int,
        meta_lr: float,
        meta_batch_fraction: float,
        meta_betas: tuple[float, float],
    ) -> None:
        _validate_meta_args(meta_interval, meta_lr, meta_batch_fraction, meta_betas)
        if meta_lr > 0 and objective is None:
            raise ValueError("meta_lr > 0 needs an objective (a ProximalObjective); pass meta_lr=0 to run the base rule.")
        self.objective = objective
        self.meta_interval = meta_interval
        self.meta_lr = float(meta_lr)
        self.meta_batch_fraction = float(meta_batch_fraction)
        self.meta_betas = tuple(meta_betas)
        self.step_count = 0
        self.meta_steps = 0
        self.skipped_meta_steps = 0
        self.last_meta_objective = float("nan")
        # the meta-parameters' gradient at the last meta step, shaped as they are: APO-LR's one entry per group (φ),
        # APO-Precond's per parameter the list of its factors' gradients
        self.last_meta_gradient = None
        self._layout: tuple[tuple[int, ...], Layout] | None = None
        self._current_batch: Batch | None = None
        self._previous_batch: Batch | None = None

    # -- batches --------------------------------------------------------------------------------------------
    def observe(self, batch: Batch) -> None:
        """Record a batch the model is trained on; call once per (micro-)batch, before ``step()``."""
        self._previous_batch = self._current_batch
        self._current_batch = dict(batch) if isinstance(batch, Mapping) else batch

    def _meta_batches(self) -> tuple[Batch, Batch]:
        batch = self._current_batch
        meta_batch = self._previous_batch if self._previous_batch is not None else batch
        size = batch_size_of(meta_batch)
        if size is not None and self.meta_batch_fraction < 1:
            meta_batch = slice_batch(meta_batch, max(1, math.ceil(self.meta_batch_fraction * size)))
        device = next((p.device for g in self.param_groups for p in g["params"]), None)
        return move_batch(batch, device), move_batch(meta_batch, device)

    def all_params(self) -> list[torch.Tensor]:
        """Every parameter, group after group (sharded: the parameters Accelerate put in place after building)."""
        return [p for group in self.param_groups for p in group["params"]]

    def local_params(self) -> list[torch.Tensor]:
        """:meth:`all_params`, or when sharded this rank's shards of them (views, which follow the steps)."""
        return [local_tensor(p) for p in self.all_params()]

    @property
    def layout(self) -> Layout:
        """How the parameters lie over the processes (:class:`~hf_apo.distributed.Layout`): chosen at the first meta
        step, and again only if the groups' parameters were replaced since (Accelerate puts sharded ones in place
        after the optimizer is built)."""
        params = self.all_params()
        key = tuple(map(id, params))
        if self._layout is None or self._layout[0] != key:
            self._layout = (key, Layout.of(params))
        return self._layout[1]

    @staticmethod
    def _params_with_grad(group: dict[str, Any]) -> list[torch.Tensor]:
        """The parameters of a group that the step updates (torch optimizers skip those without a gradient)."""
        return [p for p in group["params"] if p.grad is not None]

    def _meta_step_due(self) -> bool:
        """Whether this step runs a meta step (a predicate: it changes nothing)."""
        return (
            self.meta_lr > 0
            and self.objective is not None
            and (self._current_batch is not None or not self.objective.needs_batches)
            and self._meta_step_scheduled()
        )

    def _meta_step_scheduled(self) -> bool:
        """The cadence: every ``meta_interval``-th step."""
        return self.step_count % self.meta_interval == 0

    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step; every ``meta_interval``-th one is preceded by a meta step on the observed batches."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_count += 1
        self._update()
        return loss

    def _update(self) -> None:
        """The step itself: the subclass decides with :meth:`_meta_step_due` whether a meta step comes first."""
        raise NotImplementedError

    # -- guard and reduction ------------------------------------------------------------------------------
    def _reduce_and_check(self, meta_grad: torch.Tensor, objective: torch.Tensor) -> bool:
        """The mean over ranks of [meta-gradient, Q] (:meth:`~hf_apo.distributed.Layout.average`, in place); False,
        with a warning, if any is non-finite on any rank (every rank takes the same decision)."""
        finite, self.last_meta_objective = self.layout.average(meta_grad, objective)
        if finite:
            self.meta_steps += 1
        else:
            self.skipped_meta_steps += 1
            warnings.warn(
                f"APO: non-finite meta-objective or meta-gradient at step {self.step_count}; this meta step is "
                "skipped (the meta-parameters are unchanged) and the base update proceeds.",
                RuntimeWarning,
                stacklevel=3,
            )
        return finite

    # -- state ----------------------------------------------------------------------------------------------
    def _meta_state(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "meta_steps": self.meta_steps,
            "skipped_meta_steps": self.skipped_meta_steps,
            "last_meta_objective": self.last_meta_objective,
            "last_batch": self._current_batch,
        }

    def _load_meta_state(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.meta_steps = int(state["meta_steps"])
        self.skipped_meta_steps = int(state["skipped_meta_steps"])
        self.last_meta_objective = float(state["last_meta_objective"])
        self._current_batch = state.get("last_batch")
        self._previous_batch = None

    def memory_usage(self) -> dict[str, int]:
        """Bytes held between steps, each tensor counted once: ``"state"``, the base optimizer's state (moments,
        momentum buffers); ``"meta"``, what APO adds (the meta-parameters and their meta-optimizer's state, cached
        factors, D and a pending meta-gradient, the batches kept for the next meta step)."""
        seen: set = set()
        return {"state": tensor_nbytes(self.state, seen), "meta": tensor_nbytes(self._meta_tensors(), seen)}

    def _meta_tensors(self) -> list:
        """What APO keeps between steps beyond the base optimizer's state (subclasses add their own)."""
        return [self._current_batch, self._previous_batch]

    def metrics(self) -> dict[str, float]:
        """Scalars for the training log, under keys that start with ``apo/``."""
        return {
            "apo/meta_objective": self.last_meta_objective,
            "apo/meta_steps": float(self.meta_steps),
            "apo/skipped_meta_steps": float(self.skipped_meta_steps),
        }

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if getattr(self, "_initialized", False):
            raise NotImplementedError(
                f"{type(self).__name__} does not support add_param_group after construction: its meta-parameters "
                "are sized at construction. Build the optimizer with all parameter groups."
            )
        super().add_param_group(param_group)
