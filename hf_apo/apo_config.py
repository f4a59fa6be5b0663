"""Training arguments with APO: ``--apo {none,lr,precond}`` and the ``--apo_*`` flags.

Every field carries ``metadata={"help": ...}`` so ``HfArgumentParser`` prints real help, and a bad value raises a
``ValueError`` naming the flag and the fix in ``__post_init__``, before a model is built or anything is written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from transformers import Seq2SeqTrainingArguments, TrainingArguments
from transformers.training_args import OptimizerNames

from .defaults import (  # noqa: F401  (re-exported: the flags' choices and defaults)
    APO_DEFAULTS, APO_LOSS_BATCHES, APO_LR_META_OPTIMIZERS, APO_LR_OPTIMS, APO_MODES, APO_PRECOND_OPTIMS,
    APO_PRECOND_SIZES, DEFAULT_LOSS_BATCH, DEFAULT_PRECOND_SIZE, settings as apo_settings,
)
from .trust_region import kl_bound

DEEPSPEED_REFUSAL = (
    "--apo does not support DeepSpeed (it replaces the optimizer with its own). To shard a model that does not fit "
    "one GPU, use FSDP2 instead: --fsdp full_shard --fsdp_config '{\"version\": 2}'. Or drop --deepspeed, or use "
    "--apo none."
)
FSDP2_OPT_IN = "HF_APO_FSDP2"


def check_apo_fsdp(version: int, xla: bool = False, cpu_offload: bool = False) -> None:
    """Refuse FSDP1, XLA FSDP and CPU offload with --apo; FSDP2 only with the opt-in until it has run on a GPU.

    On the CPU Accelerate ignores --fsdp (it trains as multi-CPU DDP): tests/test_distributed.py forces its FSDP2
    state there; ``python -m benchmarks.checks.fsdp_gpu_check`` is the GPU check.
    """
    if version != 2 or xla:
        raise ValueError(
            "--apo supports FSDP2 only (torch fully_shard through Accelerate), not FSDP1 or XLA FSDP: pass "
            "--fsdp_config '{\"version\": 2}' (the default version), or use --apo none."
        )
    if cpu_offload:
        # the meta step's collectives would get CPU shards on an NCCL group; untested, so refused
        raise ValueError(
            "--apo does not support FSDP2 with CPU offload yet: drop cpu_offload (or 'offload' in --fsdp), or use "
            "--apo none."
        )
    if os.environ.get(FSDP2_OPT_IN) != "1":
        raise ValueError(
            f"--apo with the Trainer's FSDP2 is tested on CPU processes but not yet on GPUs: set {FSDP2_OPT_IN}=1 to "
            "use it (python -m benchmarks.checks.fsdp_gpu_check checks it on a GPU machine), or use --apo none. "
            "APOLR and APOPrecond in your own loop over a fully_shard model need no opt-in."
        )


@dataclass
class APOArgumentsMixin:
    """The APO fields, shared by :class:`APOTrainingArguments` and :class:`APOSeq2SeqTrainingArguments`."""

    apo: str = field(
        default="none",
        metadata={
            "help": "Amortized Proximal Optimization: 'none' (the parent Trainer, unchanged), 'lr' (meta-learn the "
            "learning rate of --optim: adamw_torch(_fused), sgd, rmsprop, adagrad, adafactor, torchao's and "
            "bitsandbytes' low-bit AdamW and Lion) or 'precond' (meta-learn a per-layer Kronecker preconditioner "
            "of --optim's direction: adamw_torch, adamw_torch_fused or sgd).",
            "choices": list(APO_MODES),
        },
    )
    apo_meta_interval: int | None = field(
        default=None, metadata={"help": "Take a meta step every this many optimizer steps (K). Must be >= 1. Default: 10."}
    )
    apo_meta_lr: float | None = field(default=None, metadata={"help": (
        "Adam learning rate of the meta-parameters; 0 switches meta-learning off. Default: 0.1 for --apo lr (the LR "
        "moves about this much in log space per meta step), 0.01 for --apo precond (a dense factor's spectrum moves "
        "about this much per meta step).")})
    apo_lambda_fsd: float | None = field(default=None, metadata={"help": (
        "Weight of the function-space proximity term: KL between the model's output distributions before and after "
        "the step, in nats per target token. Must be >= 0. Default: 0 for --apo lr with --apo_loss_batch next, 10 "
        "with --apo_loss_batch same and for --apo precond.")})
    apo_loss_batch: str | None = field(
        default=None,
        metadata={
            "help": "Where the meta-objective scores the loss after the look-ahead step: 'same' (the batch that gave "
            "the gradient, as in the paper; needs a proximity term) or 'next' (the next training batch, whose "
            "gradient the Trainer computes anyway: a meta step is then dot products, plus the KL pass when "
            "--apo_lambda_fsd > 0; with --apo precond over AdamW the factors' hypergradient, without proximity "
            "terms). Default: 'next' for --apo lr (docs/method.md says why; 'same' alone restores the paper's "
            "settings), 'same' for --apo precond. While the scheduler warms the learning rate up, APO-LR's meta "
            "step only lowers it.",
            "choices": list(APO_LOSS_BATCHES),
        },
    )
    apo_precond_size: str | None = field(
        default=None,
        metadata={
            "help": "--apo precond: what sets the step's size. 'factors' (the learned factors carry size and shape; "
            "the LR is --learning_rate under the schedule), 'shape' (the factors are renormalized to shape only, mean "
            "eigenvalue 1 per side, after every meta step; the size is the scheduled LR) or 'lr' (shape-only factors, "
            "and one LR multiplier per parameter group learned as --apo lr learns it: next batch, horizon 10000, from "
            "--learning_rate as the start). Unset: 'lr' over AdamW, 'factors' over SGD.",
            "choices": list(APO_PRECOND_SIZES),
        },
    )
    apo_lambda_wsd: float = field(default=0.0, metadata={
        "help": "Weight of the weight-space proximity term (1/2)||theta' - theta||^2. Must be >= 0."})
    apo_horizon: float | None = field(
        default=None,
        metadata={
            "help": "--apo_loss_batch next: the meta-objective weighs the losses of about this many future steps "
            "(discount 1 - 1/horizon) instead of the next one only; 1 is the greedy one-step objective, whose "
            "learned LR decays too early in long runs. >= 1. Default: 10000 for --apo lr with --apo_loss_batch next, "
            "else 1."
        },
    )
    apo_meta_optimizer: str | None = field(
        default=None,
        metadata={
            "help": "--apo lr: the meta step on the log learning rate. 'adam' (it moves about --apo_meta_lr per meta "
            "step) or 'rprop' (sign-agreement step sizes: the step starts at --apo_meta_lr, grows x1.2 while the "
            "meta-gradient keeps its sign and halves when it flips, within [1e-3, 1]). Default: adam.",
            "choices": list(APO_LR_META_OPTIMIZERS),
        },
    )
    apo_max_meta_step: float | None = field(default=None, metadata={"help": (
        "--apo lr --apo_meta_optimizer rprop: the largest change of the log learning rate in one meta step (1.0: a "
        "factor e). >= 0.001. Default: 1.0.")})
    apo_adaptive_interval: bool | None = field(default=None, metadata={"help": (
        "--apo lr: 'true' runs a meta step at every step while the learning rate keeps moving one way (from step 1), "
        "every --apo_meta_interval steps after the meta-gradient flips sign. Default: false.")})
    apo_trust_region: str | None = field(default=None, metadata={"help": (
        "--apo lr (and the size learned with --apo_precond_size lr): bound each step by its own KL on the meta batch. "
        "'none' (no bound), or the largest KL a step may have, in nats per target token: a larger step is halved in "
        "place until it fits and the learned LR comes down with it, also during a warm-up, and the learned LR does not "
        "rise while steps are above a tenth of the bound. Measured at step 1, every --apo_meta_interval steps and "
        "after the LR rose (every step of an opening). Default: 1.0.")})
    apo_trust_region_opening: int | None = field(default=None, metadata={"help": (
        "--apo_trust_region: an opening of this many steps, in which the learned LR doubles at each step while steps "
        "stay below a tenth of the bound and the meta-gradient agrees; 0 for a bound that only shrinks (a "
        "from-scratch transformer can look safe for a few steps and collapse at the doubled LR later). >= 0. "
        "Default: 0.")})
    apo_label_shift: str = field(
        default="auto",
        metadata={
            "help": "Where the KL term finds each label's logits: 'auto' (1 for a causal LM, whose logits at t predict "
            "the label at t + 1, seen through PEFT and other wrappers; 0 for encoder-decoders and classifiers), or "
            "'0' / '1' to say it for a model 'auto' does not recognise.",
            "choices": ["auto", "0", "1"],
        },
    )
    apo_meta_batch_fraction: float = field(default=0.25, metadata={"help": (
        "The meta batch B' (for the KL term) is this fraction of the previous training micro-batch. Smaller is "
        "cheaper. In (0, 1].")})
    apo_lr_clamp: float = field(default=10.0, metadata={"help": (
        "--apo lr (and --apo_precond_size lr): the log learning-rate multiplier is clamped to [-c, c] (a numerical "
        "guard). > 0.")})
    apo_max_factor_dim: int = field(default=1024, metadata={
        "help": "--apo precond: a weight side longer than this, or than the weight's other side, gets a diagonal "
        "factor instead of a dense one (the vocabulary side of embeddings always does). >= 1."})
    apo_lookahead_steps: int = field(default=1, metadata={"help": (
        "--apo precond with momentum: the look-ahead follows this many steps of the momentum buffer (no new "
        "gradient), so the meta-objective sees the displacement the fresh preconditioned gradient will carry; 1 is "
        "the paper's one-step look-ahead. >= 1.")})
    apo_spectral_meta_step: bool = field(
        default=True,
        metadata={
            "help": "--apo precond: normalize a dense factor's meta step by its gradient's spectral norm, so the "
            "factor's spectrum moves by about --apo_meta_lr per meta step whatever its size. False: per-entry Adam."
        },
    )
    apo_stochastic_rounding: bool = field(
        default=True,
        metadata={
            "help": "--apo precond, bf16 weights (a model loaded in bfloat16, without --bf16's float32 master "
            "weights): round each update to bf16 stochastically (unbiased) instead of to the nearest, which drops "
            "updates below half a bf16 ulp. No effect on float32 weights."
        },
    )

    def __post_init__(self):
        # Before the parent's checks: a DeepSpeed config would otherwise be loaded (and need deepspeed) first.
        self._validate_apo_choices()
        self._validate_apo_numbers()
        self._validate_apo_combinations()
        self._validate_apo_with_parent()
        super().__post_init__()
        self._validate_apo_fsdp()  # after the parent has normalized --fsdp and --fsdp_config

    def apo_setting(self, flag: str):
        """The value of an ``--apo_*`` flag with a default per mode and loss batch: the user's, else the default."""
        value = getattr(self, flag)
        if value is not None:
            return value
        mode = self.apo if self.apo in DEFAULT_LOSS_BATCH else "lr"
        base = "sgd" if self._optim_name() == "sgd" else "adamw"
        return apo_settings(mode, self.apo_loss_batch, base)[flag[len("apo_"):]]

    def apo_learns_lr(self) -> bool:
        """Whether APO-LR learns the step's size: ``--apo lr``, or ``--apo precond`` with ``--apo_precond_size lr``."""
        return self.apo == "lr" or (self.apo == "precond" and self.apo_setting("apo_precond_size") == "lr")

    def _optim_name(self) -> str:
        try:
            return OptimizerNames(self.optim).value
        except ValueError:
            return str(self.optim)

    def to_dict(self):
        """The parent's dict (what reporters such as W&B record) with each unset ``--apo_*`` flag's value in effect; the
        fields stay unset, so ``dataclasses.replace(args, apo_loss_batch=...)`` still takes that batch's defaults."""
        values = super().to_dict()
        if self.apo != "none":
            for flag in ("apo_loss_batch", *APO_DEFAULTS[("lr", "next")]):
                values[flag] = self.apo_setting(flag)
        if self.apo == "precond":
            values["apo_precond_size"] = self.apo_setting("apo_precond_size")
        return values

    @property
    def apo_effective_meta_lr(self) -> float:
        return self.apo_setting("apo_meta_lr") if self.apo != "none" else 0.0

    def _validate_apo_choices(self) -> None:
        if self.apo not in APO_MODES:
            raise ValueError(f"--apo must be one of {', '.join(APO_MODES)}; got {self.apo!r}.")
        if self.apo_loss_batch is not None and self.apo_loss_batch not in APO_LOSS_BATCHES:
            raise ValueError(
                f"--apo_loss_batch must be one of {', '.join(APO_LOSS_BATCHES)}; got {self.apo_loss_batch!r}."
            )
        if self.apo_precond_size is not None and self.apo_precond_size not in APO_PRECOND_SIZES:
            raise ValueError(
                f"--apo_precond_size must be one of {', '.join(APO_PRECOND_SIZES)}; got {self.apo_precond_size!r}."
            )
        if self.apo_meta_optimizer is not None and self.apo_meta_optimizer not in APO_LR_META_OPTIMIZERS:
            raise ValueError(
                f"--apo_meta_optimizer must be one of {', '.join(APO_LR_META_OPTIMIZERS)}; got "
                f"{self.apo_meta_optimizer!r}."
            )
        if str(self.apo_label_shift) not in ("auto", "0", "1"):
            raise ValueError(f"--apo_label_shift must be auto, 0 or 1; got {self.apo_label_shift!r}.")
        self.apo_label_shift = str(self.apo_label_shift)

    def _validate_apo_numbers(self) -> None:
        if not isinstance(self.apo_lookahead_steps, int) or self.apo_lookahead_steps < 1:
            raise ValueError(
                f"--apo_lookahead_steps must be an integer >= 1 (1 is the one-step look-ahead); "
                f"got {self.apo_lookahead_steps!r}."
            )
        interval = self.apo_meta_interval
        if interval is not None and (not isinstance(interval, int) or interval < 1):
            raise ValueError(
                f"--apo_meta_interval must be an integer >= 1 (a meta step every K optimizer steps); "
                f"got {self.apo_meta_interval!r}."
            )
        if self.apo_meta_lr is not None and not self.apo_meta_lr >= 0:
            raise ValueError(f"--apo_meta_lr must be >= 0 (0 switches meta-learning off); got {self.apo_meta_lr!r}.")
        for flag in ("apo_lambda_fsd", "apo_lambda_wsd"):
            value = getattr(self, flag)
            if value is not None and not value >= 0:
                raise ValueError(f"--{flag} must be >= 0; got {value!r}. Use 0 to drop that proximity term.")
        if self.apo_trust_region not in (None, "none") and not (kl_bound(self.apo_trust_region) or 0) > 0:
            raise ValueError(f"--apo_trust_region must be 'none' or a KL bound > 0 in nats per token (e.g. 1.0); got "
                             f"{self.apo_trust_region!r}.")
        opening = self.apo_trust_region_opening
        if opening is not None and (not isinstance(opening, int) or opening < 0):
            raise ValueError(f"--apo_trust_region_opening must be an integer >= 0 (0: the bound only shrinks); got "
                             f"{opening!r}.")
        if self.apo_max_meta_step is not None and not self.apo_max_meta_step >= 1e-3:
            raise ValueError(f"--apo_max_meta_step must be >= 0.001; got {self.apo_max_meta_step!r}.")
        if self.apo_horizon is not None and not self.apo_horizon >= 1:
            raise ValueError(f"--apo_horizon must be >= 1 (optimizer steps); got {self.apo_horizon!r}.")
        if not 0 < self.apo_meta_batch_fraction <= 1:
            raise ValueError(f"--apo_meta_batch_fraction must be in (0, 1]; got {self.apo_meta_batch_fraction!r}.")
        if not self.apo_lr_clamp > 0:
            raise ValueError(f"--apo_lr_clamp must be > 0; got {self.apo_lr_clamp!r}.")
        if not isinstance(self.apo_max_factor_dim, int) or self.apo_max_factor_dim < 1:
            raise ValueError(f"--apo_max_factor_dim must be an integer >= 1; got {self.apo_max_factor_dim!r}.")

    def _validate_apo_combinations(self) -> None:
        if self.apo_trust_region not in (None, "none") and not self.apo_learns_lr():
            raise ValueError("--apo_trust_region bounds a learned LR: use --apo lr or --apo precond --apo_precond_size lr.")
        if self.apo_trust_region_opening is not None and self.apo_setting("apo_trust_region") == "none":
            raise ValueError("--apo_trust_region_opening is the trust region's: set --apo_trust_region or drop it.")
        if self.apo_precond_size not in (None, "factors") and self.apo != "precond":
            raise ValueError(f"--apo_precond_size {self.apo_precond_size} is --apo precond's; drop it or pass --apo "
                             "precond.")
        if self.apo == "precond" and self.apo_loss_batch == "next" and (
            self.apo_lambda_fsd or self.apo_lambda_wsd or (self.apo_horizon or 1) > 1
        ):
            raise ValueError(
                "--apo precond --apo_loss_batch next scores the factors on the next batch's loss alone: drop "
                "--apo_lambda_fsd, --apo_lambda_wsd and --apo_horizon (or pass --apo_loss_batch same for the "
                "proximal objective)."
            )
        if self.apo == "precond" and (self.apo_meta_optimizer not in (None, "adam") or self.apo_adaptive_interval):
            raise ValueError(
                "--apo_meta_optimizer rprop and --apo_adaptive_interval are --apo lr's (a learning rate's meta step); "
                "--apo precond's factors take their own Adam step every --apo_meta_interval steps. Drop them."
            )
        if (self.apo_horizon or 1) > 1 and self.apo_setting("apo_loss_batch") != "next":
            raise ValueError(
                "--apo_horizon > 1 weighs future losses read from future gradients: it needs --apo_loss_batch next."
            )

    def _validate_apo_with_parent(self) -> None:
        if self.apo == "none":
            return
        optim = self._optim_name()
        if self.apo == "lr" and optim not in APO_LR_OPTIMS:
            raise ValueError(
                f"--apo lr wraps an optimizer whose step is linear in the learning rate (and whose state does not "
                f"depend on it); --optim {optim} is not one (schedule-free optimizers are not). Use --optim one of: "
                f"{', '.join(APO_LR_OPTIMS)}."
            )
        if self.apo == "precond" and optim not in APO_PRECOND_OPTIMS:
            raise ValueError(
                f"--apo precond preconditions AdamW's or SGD's direction, but --optim is {optim}. Pass --optim one of: "
                f"{', '.join(APO_PRECOND_OPTIMS)} (for SGD add --optim_args 'momentum=0.9' for momentum; none is added "
                "for you)."
            )
        if self.apo == "precond" and optim == "sgd" and self.apo_loss_batch == "next":
            raise ValueError(
                "--apo precond --apo_loss_batch next scores the factors from AdamW's moments, which --optim sgd has no "
                "counterpart of: pass --optim adamw_torch, or --apo_loss_batch same."
            )
        if self.apo == "precond" and optim != "sgd" and self.apo_lookahead_steps > 1:
            raise ValueError(
                f"--apo_lookahead_steps > 1 follows SGD's momentum buffer; --apo precond over --optim {optim} takes "
                "the one-step look-ahead. Drop --apo_lookahead_steps (or use --optim sgd)."
            )
        if self.deepspeed:
            raise ValueError(DEEPSPEED_REFUSAL)

    def _validate_apo_fsdp(self) -> None:
        if self.apo == "none" or not self.fsdp:
            return
        config = self.fsdp_config or {}
        offload = str(config.get("cpu_offload", False)).lower() not in ("false", "0", "none", "")
        check_apo_fsdp(int(config.get("version", 2)), xla=bool(config.get("xla")), cpu_offload=offload)


@dataclass
class APOTrainingArguments(APOArgumentsMixin, TrainingArguments):
    """``TrainingArguments`` plus ``--apo`` and the ``--apo_*`` flags."""


@dataclass
class APOSeq2SeqTrainingArguments(APOArgumentsMixin, Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` plus ``--apo`` and the ``--apo_*`` flags."""
