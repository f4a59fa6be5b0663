"""``Trainer`` / ``Seq2SeqTrainer`` with APO: change two names and pass ``--apo lr`` or ``--apo precond``.

Where APO hooks into the training loop:

* ``create_optimizer`` lets the parent build the optimizer that ``--optim`` names, with its weight-decay parameter
  groups and ``learning_rate``, then wraps it (APO-LR) or rebuilds it as APO-Precond over the same AdamW or SGD
  groups and hyperparameters.
  It runs on the unwrapped model before ``accelerator.prepare``; the look-ahead later calls that unwrapped model,
  so DDP reduces nothing of it (the optimizer all-reduces its small meta-gradient) while the mixed-precision
  autocast that Accelerate puts on ``model.forward`` applies to it.
* ``training_step`` shows each micro-batch to the optimizer (:meth:`~hf_apo.meta.MetaLearnedOptimizer.observe`):
  B is the last micro-batch of the accumulation window, B′ the micro-batch before it. No data is drawn twice.
* The Trainer calls ``optimizer.step()`` on synchronized steps only, after unscaling and clipping, and not at
  all when the fp16 GradScaler finds an overflow, so meta steps follow the same rules.
* ``log`` adds the ``apo/*`` scalars to every training log (``trainer_state.json``, progress bar, reporters).
* Checkpoints hold the APO state inside ``optimizer.pt``; ``resume_from_checkpoint`` restores it.
* FSDP2 (``--fsdp`` with ``fsdp_config`` version 2): Accelerate shards the model in place after the optimizer is
  built and swaps the optimizer's parameters for their shards; the optimizers work on the shards (see
  :mod:`hf_apo.meta`). Torch's distributed optimizer state dict keeps only the per-parameter state and drops APO's,
  so each rank saves its whole optimizer state, shards and APO state, to ``apo_optimizer_rank{R}.pt``: a checkpoint
  resumes with the same number of processes. The file holds the shards as plain local tensors with their placements
  (:mod:`hf_apo.distributed`) and loads with ``weights_only=True``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer import SCHEDULER_NAME, get_fsdp_ckpt_kwargs
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .apo_config import DEEPSPEED_REFUSAL, APOArgumentsMixin, check_apo_fsdp
from .distributed import is_sharded, load_local_shards, safe_load, save_local_shards, shard_group
from .lr import APOLR
from .meta import MetaLearnedOptimizer
from .batches import get_output
from .objective import ProximalObjective
from .precond import APOPrecond


def unwrap_apo_optimizer(optimizer: Any) -> MetaLearnedOptimizer | None:
    """The APO optimizer inside Accelerate's ``AcceleratedOptimizer`` (or None)."""
    while optimizer is not None and not isinstance(optimizer, MetaLearnedOptimizer):
        optimizer = getattr(optimizer, "optimizer", None)
    return optimizer


def base_model_of(model):
    """The transformers model inside PEFT (``get_base_model``), ``torch.compile`` (``_orig_mod``) and DDP/FSDP
    (``module``) wrappers."""
    while True:
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            inner = model.get_base_model()
        else:
            inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None or inner is model:
            return model
        model = inner


def label_shift_of(model) -> int:
    """1 for a causal LM (its logits at position t predict the label at t + 1: the Trainer's labels are the inputs),
    0 otherwise, decided on the model under any PEFT / compile / DDP wrapper: an encoder-decoder config is 0; a
    class of transformers' causal-LM mapping, or a remote-code class named ``*ForCausalLM`` / ``*LMHeadModel``, is 1."""
    base = base_model_of(model)
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return 0
    name = type(base).__name__
    causal = name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or name.endswith(("ForCausalLM", "LMHeadModel"))
    return 1 if causal else 0


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
                f"{type(self).__name__} needs arguments with the --apo flags (APOTrainingArguments, "
                f"APOSeq2SeqTrainingArguments or, for TRL, APOSFTConfig), got {type(self.args).__name__}: build them "
                "from the APO class with the same fields."
            )
        if self.args.apo != "none":
            if self.optimizer is not None:
                raise ValueError(
                    f"--apo {self.args.apo} builds its own optimizer; do not pass `optimizers=` to the Trainer "
                    "(or use --apo none)."
                )
            # The arguments refuse --deepspeed and FSDP1; this catches the same plugins set by `accelerate launch`.
            if self.is_deepspeed_enabled:
                raise ValueError(DEEPSPEED_REFUSAL)
            if self.is_fsdp_enabled:
                from torch.distributed.fsdp import CPUOffloadPolicy

                plugin = self.accelerator.state.fsdp_plugin
                offload = isinstance(getattr(plugin, "cpu_offload", None), CPUOffloadPolicy)
                check_apo_fsdp(getattr(plugin, "fsdp_version", 1), cpu_offload=offload)
        self._apo_outputs_checked = False
        self._apo_layout_checked = False

    # -- optimizer ------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.args.apo == "none" or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        if not any(p.requires_grad for p in opt_model.parameters()):
            raise ValueError(
                f"--apo {self.args.apo}: the model has no trainable parameters (a PEFT model whose adapters are frozen, "
                "or a model loaded for inference?). Make its adapters trainable (peft: is_trainable=True) or use "
                "--apo none."
            )
        base = super().create_optimizer(model)
        meta = dict(meta_interval=self.args.apo_setting("apo_meta_interval"), meta_lr=self.args.apo_effective_meta_lr,
                    meta_batch_fraction=self.args.apo_meta_batch_fraction)
        objective = self._apo_objective(opt_model)
        if self.args.apo == "lr":
            self.optimizer = self._apo_lr(base, objective, meta)
        else:
            self.optimizer = self._apo_precond(opt_model, base, objective, meta)
        return self.optimizer

    def _apo_objective(self, model) -> ProximalObjective:
        args = self.args
        return ProximalObjective(
            model,
            lambda_fsd=args.apo_setting("apo_lambda_fsd"),
            lambda_wsd=args.apo_lambda_wsd,
            loss_batch=args.apo_setting("apo_loss_batch"),
            horizon=args.apo_setting("apo_horizon"),
            label_shift=label_shift_of(model) if args.apo_label_shift == "auto" else int(args.apo_label_shift),
        )

    def _apo_lr(self, base, objective: ProximalObjective, meta: dict) -> APOLR:
        args = self.args
        return APOLR(base, objective, log_lr_range=(-args.apo_lr_clamp, args.apo_lr_clamp),
                     meta_optimizer=args.apo_setting("apo_meta_optimizer"),
                     adaptive_interval=args.apo_setting("apo_adaptive_interval"),
                     max_meta_step=args.apo_setting("apo_max_meta_step"),
                     trust_region=args.apo_setting("apo_trust_region"),
                     trust_region_opening=args.apo_setting("apo_trust_region_opening"), **meta)

    def _apo_precond(self, model, base, objective: ProximalObjective, meta: dict):
        """APO-Precond over the AdamW or SGD the parent built; with ``--apo_precond_size lr``, inside APO-LR."""
        args = self.args
        size = args.apo_setting("apo_precond_size")
        build = APOPrecond.from_adamw if isinstance(base, torch.optim.AdamW) else APOPrecond.from_sgd
        precond = build(base, objective, max_factor_dim=args.apo_max_factor_dim,
                        lookahead_steps=args.apo_lookahead_steps, spectral_meta_step=args.apo_spectral_meta_step,
                        stochastic_rounding=args.apo_stochastic_rounding,
                        diagonal_row_params=self.apo_diagonal_row_params(model),
                        shape_only=size in ("shape", "lr"), **meta)
        return self._apo_size_learner(model, precond) if size == "lr" else precond

    def _apo_size_learner(self, model, precond: APOPrecond) -> APOLR:
        """``--apo_precond_size lr``: APO-LR's default learns one LR multiplier per group over the shape-only factors;
        the step's LR is the scheduled one times the multiplier."""
        return APOLR.default_over(precond, model, meta_lr=None if self.args.apo_effective_meta_lr > 0 else 0.0,
                                  log_lr_range=(-self.args.apo_lr_clamp, self.args.apo_lr_clamp),
                                  trust_region=self.args.apo_setting("apo_trust_region"),
                                  trust_region_opening=self.args.apo_setting("apo_trust_region_opening"),
                                  label_shift=precond.objective.label_shift)

    def apo_diagonal_row_params(self, model) -> list:
        """``--apo precond``: the parameters whose row side gets a diagonal factor (the vocabulary weights)."""
        return vocabulary_weights(model)

    @property
    def apo_optimizer(self) -> MetaLearnedOptimizer | None:
        """The APO optimizer (reached through Accelerate's wrapper), or None with ``--apo none``."""
        return unwrap_apo_optimizer(self.optimizer)

    # -- batches --------------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        apo = self.apo_optimizer
        if apo is not None:
            apo.observe(inputs)
            if not self._apo_layout_checked:  # an FSDP2 layout APO cannot reduce fails here, before any step
                shard_group(apo.all_params())
                self._apo_layout_checked = True
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self._apo_outputs_checked or self.args.apo == "none" or not model.training:
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        # First training forward: refuse a model APO cannot score before any parameter changes.
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        args = self.args
        uses = ["--apo_lambda_fsd > 0"] if args.apo_setting("apo_lambda_fsd") > 0 else []
        if args.apo_learns_lr() and (bound := args.apo_setting("apo_trust_region")) != "none":
            uses.append(f"--apo_trust_region {bound} (a KL bound on each step; 'none' drops it)")
        if uses and get_output(outputs, "logits") is None:
            raise ValueError(
                f"--apo {args.apo} with {' and '.join(uses)} compares output distributions, but "
                f"{type(self.model).__name__} returns no `logits`. Set --apo_lambda_fsd 0 (and --apo_lambda_wsd > 0) "
                "and --apo_trust_region none, or use --apo none."
            )
        self._apo_outputs_checked = True
        return (loss, outputs) if return_outputs else loss

    # -- checkpoints under FSDP2 ---------------------------------------------------------------------------------
    def _apo_sharded(self) -> bool:
        apo = self.apo_optimizer
        return apo is not None and any(is_sharded(p) for p in apo.all_params())

    def _apo_optimizer_file(self, directory: str) -> str:
        return os.path.join(directory, f"apo_optimizer_rank{self.args.process_index}.pt")

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self._apo_sharded():
            return super()._save_optimizer_and_scheduler(output_dir)
        from accelerate.utils import save_fsdp_model

        save_fsdp_model(
            self.accelerator.state.fsdp_plugin, self.accelerator, self.model, output_dir, **get_fsdp_ckpt_kwargs()
        )
        # Plain local shards and their placements, no DTensor: resuming loads it with weights_only=True.
        save_local_shards(self.apo_optimizer.state_dict(), self._apo_optimizer_file(output_dir),
                          process_index=self.args.process_index, world_size=self.args.world_size)
        if self.args.should_save:
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self._apo_sharded():
            return super()._load_optimizer_and_scheduler(checkpoint)
        path = self._apo_optimizer_file(checkpoint)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: an --apo run under FSDP2 resumes from a checkpoint it wrote itself, with the same "
                "number of processes (each rank saves its own shards and APO state)."
            )
        # Both files are read with weights_only=True, and checked, before either state is loaded: a refused file
        # (RefusedCheckpointError, naming it) leaves the optimizer and the scheduler untouched.
        device = "cpu" if self.args.device.type == "cpu" else self.args.device  # torch cannot map to "cpu:0"
        optimizer_state = load_local_shards(path, self.apo_optimizer.all_params(), map_location=device,
                                            process_index=self.args.process_index, world_size=self.args.world_size)
        scheduler_state = safe_load(os.path.join(checkpoint, SCHEDULER_NAME))
        self.apo_optimizer.load_state_dict(optimizer_state)
        self.lr_scheduler.load_state_dict(scheduler_state)

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


__all__ = ["APOTrainer", "APOSeq2SeqTrainer", "label_shift_of", "unwrap_apo_optimizer"]
