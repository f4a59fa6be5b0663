"""The choices and defaults of APO, in one place (plain data: no torch, no transformers).

``APO_DEFAULTS[(mode, loss batch)]`` holds the value of every ``--apo_*`` flag left unset, per mode and, for APO-LR,
per loss batch, so that ``--apo_loss_batch same`` alone gives the paper's objective with its settings. Every route to
a default reads it through :func:`settings`: the optimizers' constructor defaults, ``ProximalObjective.for_apo`` and so
``APOLR(params, model=...)``, ``APOPrecond(params, model=...)`` and ``APOLR.default_over``, and the Trainer's
``apo_setting`` for an unset flag. Why these values: docs/method.md, "Why these defaults".
"""

APO_MODES = ("none", "lr", "precond")
# --optim values whose optimizer APO-LR can wrap: its step is linear in the learning rate and its state does not
# depend on it (hf_apo/linear_lr.py says why for each class, and tests/test_linear_lr.py checks it).
APO_LR_OPTIMS = (
    "adamw_torch", "adamw_torch_fused", "sgd", "rmsprop", "adagrad", "adafactor",  # torch, transformers
    "adamw_torch_4bit", "adamw_torch_8bit",  # torchao
    "adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "lion_8bit", "lion_32bit",  # bitsandbytes
    "paged_lion_8bit", "paged_lion_32bit", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit",
)
# --optim values APO-Precond preconditions: AdamW's direction m̂/(√v̂ + ε), or SGD's gradient before its momentum.
APO_PRECOND_OPTIMS = ("adamw_torch", "adamw_torch_fused", "sgd")
APO_LOSS_BATCHES = ("same", "next")
APO_LR_META_OPTIMIZERS = ("adam", "rprop")
DEFAULT_LOSS_BATCH = {"lr": "next", "precond": "same"}
# The paper's objective (Bae et al., 2022): the loss on the batch that gave the gradient, λ_FSD 10. ProximalObjective's
# own defaults, APO-Precond's and APO-LR's with --apo_loss_batch same.
PAPER_OBJECTIVE = {"loss_batch": "same", "lambda_fsd": 10.0, "lambda_wsd": 0.0, "horizon": 1.0}
# APO-LR's next-batch default: the long-horizon estimator, no KL term
NEXT_BATCH_LR = {"lambda_fsd": 0.0, "horizon": 10_000.0}
META_LR = {"lr": 0.1, "precond": 0.01}
META_INTERVAL = 10
APO_PRECOND_SIZES = ("factors", "shape", "lr")
# --apo_precond_size left unset, per base: over AdamW shape-only factors from the same-batch objective with the size
# learned by APO-LR; over SGD the factors that carry size and shape
DEFAULT_PRECOND_SIZE = {"adamw": "lr", "sgd": "factors"}
# APOLR's meta step, and its trust region ("none", "kl", "ratio" or a KL bound in nats per token: hf_apo.trust_region;
# by default 1 nat per token, a bound that only shrinks: its opening, the first steps in which φ may double, is 0;
# docs/method.md says why)
LR_META_STEP = {"meta_optimizer": "adam", "adaptive_interval": False, "max_meta_step": 1.0, "trust_region": 1.0,
                "trust_region_opening": 0}


def _flags(mode: str, lambda_fsd: float, horizon: float) -> dict:
    return {"apo_meta_lr": META_LR[mode], "apo_meta_interval": META_INTERVAL, "apo_lambda_fsd": lambda_fsd,
            "apo_horizon": horizon, **{f"apo_{name}": value for name, value in LR_META_STEP.items()}}


APO_DEFAULTS = {
    ("lr", "next"): _flags("lr", NEXT_BATCH_LR["lambda_fsd"], NEXT_BATCH_LR["horizon"]),
    ("lr", "same"): _flags("lr", PAPER_OBJECTIVE["lambda_fsd"], PAPER_OBJECTIVE["horizon"]),
    ("precond", "same"): _flags("precond", PAPER_OBJECTIVE["lambda_fsd"], PAPER_OBJECTIVE["horizon"]),
    ("precond", "next"): _flags("precond", 0.0, 1.0),  # over AdamW: the factors' free next-batch term, no KL
}


def settings(mode: str, loss_batch: str | None = None, base: str | None = None) -> dict:
    """The defaults of ``--apo {mode}`` (and ``--apo_loss_batch``), named as the constructors' arguments:
    ``loss_batch``, ``lambda_fsd``, ``horizon``, ``meta_lr``, ``meta_interval``, ``meta_optimizer``, ...; with
    ``base`` (``"adamw"`` or ``"sgd"``) also ``precond_size``, what sets APO-Precond's step size over that base."""
    loss_batch = loss_batch or DEFAULT_LOSS_BATCH[mode]
    flags = APO_DEFAULTS[(mode, loss_batch)]
    extra = {} if base is None else {"precond_size": DEFAULT_PRECOND_SIZE[base]}
    return {"loss_batch": loss_batch, **{flag[len("apo_"):]: value for flag, value in flags.items()}, **extra}

