"""``Trainer`` / ``Seq2SeqTrainer`` with APO: change two names and pass ``--apo lr`` or ``--apo precond``.

Where APO hooks into the training loop:

* ``create_optimizer`` lets the parent build the optimizer that ``--optim`` names, with its weight-decay parameter
  groups and ``learning_rate``, then wraps it (APO-LR) or rebuilds it as APO-Precond over the same SGD groups.
  It runs on the unwrapped model before ``accelerator.prepare``; the look-ahead later calls that unwrapped model,
  so DDP reduces nothing of it (the optimizer all-reduces its small meta-gradient) while the mixed-precision
  autocast that Accelerate puts on ``model.forward`` applies to it.
* ``training_step`` shows each micro-batch to the optimizer (:meth:`~hf_apo.meta.MetaLearnedOptimizer.observe`):
  B is the last micro-batch of the accumulation window, B′ the micro-batch before it. No data is drawn twice.
* The Trainer calls ``optimizer.step()`` on synchronized steps only, after unscaling and clipping, and not at
  all when the fp16 GradScaler finds an overflow, so meta steps follow the same rules.
* ``log`` adds the ``apo/*`` scalars to every training log (``trainer_state.json``, progress bar, reporters).
* Checkpoints hold the APO state inside ``optimizer.pt``; ``resume_from_checkpoint`` restores it.
"""

from __future__ import annotations

from typing import Any

from transformers import Seq2SeqTrainer, Trainer
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .apo_config import APOArgumentsMixin
from .lr import APOLR
from .meta import MetaLearnedOptimizer
from .objective import ProximalObjective, get_output
from .precond import APOPrecond


def unwrap_apo_optimizer(optimizer: Any) -> MetaLearnedOptimizer | None:
    """The APO optimizer inside Accelerate's ``AcceleratedOptimizer`` (or None)."""
    while optimizer is not None and not isinstance(optimizer, MetaLearnedOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def vocabulary_weights(model) -> list:
    """The input and output embedding weights (rows index the vocabulary) of a ``PreTrainedModel``."""
    if not hasattr(model, "get_input_embeddings"):
        return []
    modules = (model.get_input_embeddings(), model.get_output_embeddings())
    return [m.weight for m in modules if getattr(m, "weight", None) is not None]


class APOTrainerMixin:
    """The APO behaviour, shared by :class:`APOTrainer` and :class:`APOSeq2SeqTrainer`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, APOArgumentsMixin):
            raise TypeError(
                f"{type(self).__name__} needs APOTrainingArguments or APOSeq2SeqTrainingArguments, "
                f"got {type(self.args).__name__}."
            )
        if self.args.apo != "none":
            if self.optimizer is not None:
                raise ValueError(
                    f"--apo {self.args.apo} builds its own optimizer; do not pass `optimizers=` to the Trainer "
                    "(or use --apo none)."
                )
            # The arguments refuse --deepspeed / --fsdp; this catches the same plugins set by `accelerate launch`.
            if self.is_deepspeed_enabled or self.is_fsdp_enabled:
                raise ValueError("--apo does not support DeepSpeed or FSDP yet; use --apo none with them.")
        self._apo_outputs_checked = False

    # -- optimizer ------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.args.apo == "none" or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        base = super().create_optimizer(model)
        args = self.args
        objective = ProximalObjective(
            opt_model,
            lambda_fsd=args.apo_setting("apo_lambda_fsd"),
            lambda_wsd=args.apo_lambda_wsd,
            loss_batch=args.apo_setting("apo_loss_batch"),
            horizon=args.apo_setting("apo_horizon"),
            label_shift=1 if opt_model._get_name() in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() else 0,
        )
        meta = dict(
            meta_interval=args.apo_setting("apo_meta_interval"),
            meta_lr=args.apo_effective_meta_lr,
            meta_batch_fraction=args.apo_meta_batch_fraction,
        )
        if args.apo == "lr":
            self.optimizer = APOLR(base, objective, log_lr_range=(-args.apo_lr_clamp, args.apo_lr_clamp), **meta)
        else:
            self.optimizer = APOPrecond.from_sgd(
                base,
                objective,
                max_factor_dim=args.apo_max_factor_dim,
                lookahead_steps=args.apo_lookahead_steps,
                spectral_meta_step=args.apo_spectral_meta_step,
                diagonal_row_params=vocabulary_weights(opt_model),
                **meta,
            )
        return self.optimizer

    @property
    def apo_optimizer(self) -> MetaLearnedOptimizer | None:
        """The APO optimizer (reached through Accelerate's wrapper), or None with ``--apo none``."""
        return unwrap_apo_optimizer(self.optimizer)

    # -- batches --------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        apo = self.apo_optimizer
        if apo is not None:
            apo.observe(inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._apo_outputs_checked or self.args.apo == "none" or not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        # First training forward: refuse a model APO cannot score before any parameter changes.
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if self.args.apo_setting("apo_lambda_fsd") > 0 and get_output(outputs, "logits") is None:
            raise ValueError(
                f"--apo {self.args.apo} with --apo_lambda_fsd > 0 compares output distributions, but "
                f"{type(self.model).__name__} returns no `logits`. Set --apo_lambda_fsd 0 (and --apo_lambda_wsd > 0) "
                "or use --apo none."
            )
        self._apo_outputs_checked = True
        return (loss, outputs) if return_outputs else loss

    # -- logging --------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        apo = self.apo_optimizer
        if apo is not None and "loss" in logs:
            logs.update(apo.metrics())
        super().log(logs, *args, **kwargs)


class APOTrainer(APOTrainerMixin, Trainer):
    """``transformers.Trainer`` whose optimizer is APO when ``args.apo`` is ``"lr"`` or ``"precond"``."""


class APOSeq2SeqTrainer(APOTrainerMixin, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` whose optimizer is APO when ``args.apo`` is ``"lr"`` or ``"precond"``.

    ``evaluate()`` and ``predict()`` (also with ``predict_with_generate``) are the parent's, untouched.
    """


__all__ = ["APOTrainer", "APOSeq2SeqTrainer", "unwrap_apo_optimizer"]
