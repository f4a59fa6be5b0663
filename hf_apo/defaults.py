"""The choices and defaults of the ``--apo_*`` flags, in one place (plain data: no torch, no transformers).

``APO_DEFAULTS[(mode, loss batch)]`` holds the value of every flag left unset, per mode and, for APO-LR, per loss
batch, so that ``--apo_loss_batch same`` alone gives the paper's objective with its settings. Evidence:
benchmarks/results/apo_lr_defaults.md (APO-LR) and benchmarks/results/apo_precond_compare.md (APO-Precond).
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
_LR_META_STEP = {"apo_meta_optimizer": "adam", "apo_adaptive_interval": False, "apo_max_meta_step": 1.0}
APO_DEFAULTS = {
    ("lr", "next"): {"apo_meta_lr": 0.1, "apo_meta_interval": 10, "apo_lambda_fsd": 0.0, "apo_horizon": 10_000.0,
                     **_LR_META_STEP},
    ("lr", "same"): {"apo_meta_lr": 0.1, "apo_meta_interval": 10, "apo_lambda_fsd": 10.0, "apo_horizon": 1.0,
                     **_LR_META_STEP},
    ("precond", "same"): {"apo_meta_lr": 0.01, "apo_meta_interval": 10, "apo_lambda_fsd": 10.0, "apo_horizon": 1.0,
                          "apo_meta_optimizer": "adam", "apo_adaptive_interval": False, "apo_max_meta_step": 1.0},
    ("precond", "next"): {"apo_meta_lr": 0.01, "apo_meta_interval": 10, "apo_lambda_fsd": 0.0, "apo_horizon": 1.0,
                          "apo_meta_optimizer": "adam", "apo_adaptive_interval": False, "apo_max_meta_step": 1.0},
}
APO_PRECOND_SIZES = ("factors", "shape", "lr")
