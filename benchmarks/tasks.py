"""The tasks the quality benchmarks train on, and one training run of one optimizer on one of them.

Every task runs offline on 2 CPU cores; every optimizer gets the same batches and initialization for a given seed
(paired comparisons) and the same plain loop (``common.train_step``). ``quality.py`` (the claims of the paper) and
``apo_lr_defaults.py`` (the APO-LR defaults at long budgets) both train through :func:`run_once`.
"""

from __future__ import annotations

import copy
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import REPO_ROOT, MethodSpec, build_optimizer, set_eval_mode, train_step
from hf_apo import APOLR
from hf_apo.batches import default_forward, get_output

BF16 = torch.bfloat16

# ---------------------------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    """A task's tensors: ``train`` columns (first dimension = examples), fixed validation batches, a model builder."""

    train: dict[str, torch.Tensor]
    val_batches: list[dict[str, torch.Tensor]]
    build_model: Callable[[int], nn.Module]
    trim: Callable[[dict], dict] | None = None  # e.g. cut padding columns a batch does not use
    info: dict = field(default_factory=dict)  # what the task's model is (recorded in the results)

    def train_eval_batches(self, examples: int = 1024, batch_size: int = 256) -> list[dict[str, torch.Tensor]]:
        """The first ``examples`` training examples in batches: the training loss that ``run_once`` reports."""
        end = min(examples, self.size)
        return [self.batch(torch.arange(i, min(i + batch_size, end)), torch.float32) for i in range(0, end, batch_size)]

    @property
    def size(self) -> int:
        return next(iter(self.train.values())).shape[0]

    def batch(self, indices: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        batch = {k: v[indices] for k, v in self.train.items()}
        if self.trim is not None:
            batch = self.trim(batch)
        return cast_floats(batch, dtype)


@dataclass
class Task:
    name: str
    description: str
    divergence: str
    steps: int
    eval_every: int
    batch_size: int
    adamw_lrs: tuple[float, ...]
    sgd_lrs: tuple[float, ...]
    load: Callable[[bool], TaskData]
    decay_search: str = "grid"  # "grid": the whole AdamW grid; "neighbors": best constant LR and the next one up
    bf16_methods: tuple[str, ...] | None = None  # None: every selected method
    sweep: bool = False


def cast_floats(batch: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


class MLP(nn.Module):
    """An MLP whose forward returns the loss and the outputs the divergence compares (under ``logits``)."""

    def __init__(self, sizes: list[int], loss: str, activation=nn.Tanh, output_activation: nn.Module | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(activation())
        if output_activation is not None:
            layers.append(output_activation)
        self.net = nn.Sequential(*layers)
        self.loss = loss

    def forward(self, x, labels=None):
        outputs = self.net(x.to(self.net[0].weight.dtype))
        loss = None
        if labels is not None:
            # The loss in float32 whatever the weights' dtype (as HF models upcast logits for the loss).
            prediction = outputs.float()
            if self.loss == "cross_entropy":
                loss = nn.functional.cross_entropy(prediction, labels)
            else:  # Gaussian negative log-likelihood up to a constant: ½‖y − f‖² per example, batch mean
                loss = 0.5 * (prediction - labels.float()).pow(2).reshape(len(labels), -1).sum(1).mean()
        return {"loss": loss, "logits": outputs}


def _split(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * n))
    return order[n_val:], order[:n_val]


def _mlp_builder(sizes, loss, output_activation=None):
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return MLP(sizes, loss, output_activation=output_activation)

    return build


def load_diabetes(quick: bool = False) -> TaskData:
    from sklearn.datasets import load_diabetes as sk_load

    data = sk_load()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32)[:, None]
    train, val = _split(len(x), 0.2)
    mean, std = x[train].mean(0), x[train].std(0)
    x = (x - mean) / std
    y = (y - y[train].mean()) / y[train].std()
    return TaskData(
        train={"x": x[train], "labels": y[train]},
        val_batches=[{"x": x[val], "labels": y[val]}],
        build_model=_mlp_builder([10, 64, 64, 1], "gaussian"),
    )


def load_teacher_student(quick: bool = False) -> TaskData:
    """Regression on a fixed random teacher network (20-64-64-1, tanh) plus noise of std 0.1, 50,000 training and
    2,000 validation inputs from N(0, I): with this much data the validation loss measures optimization, not
    over-fitting (diabetes, 354 examples, is decided by over-fitting)."""
    generator = torch.Generator().manual_seed(0)
    n_train, n_val = (4_000 if quick else 50_000), 2_000
    x = torch.randn(n_train + n_val, 20, generator=generator)
    teacher = _mlp_builder([20, 64, 64, 1], "gaussian")(12345)
    with torch.no_grad():
        for layer in teacher.net:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(2.0)  # a markedly non-linear teacher (PyTorch's default init is nearly linear here)
        y = teacher(x)["logits"]
    y = (y - y[:n_train].mean()) / y[:n_train].std() + 0.1 * torch.randn(y.shape, generator=generator)
    return TaskData(
        train={"x": x[:n_train], "labels": y[:n_train]},
        val_batches=[{"x": x[n_train:], "labels": y[n_train:]}],
        build_model=_mlp_builder([20, 64, 64, 1], "gaussian"),
    )


def _digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_load

    data = sk_load()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    train, val = _split(len(x), 0.2)
    return x, y, train, val


def load_digits_autoencoder(quick: bool = False) -> TaskData:
    x, _, train, val = _digits()
    return TaskData(
        train={"x": x[train], "labels": x[train]},
        val_batches=[{"x": x[val], "labels": x[val]}],
        build_model=_mlp_builder([64, 32, 8, 32, 64], "gaussian", output_activation=nn.Sigmoid()),
    )


def load_digits_classification(quick: bool = False) -> TaskData:
    x, y, train, val = _digits()
    return TaskData(
        train={"x": x[train], "labels": y[train]},
        val_batches=[{"x": x[val], "labels": y[val]}],
        build_model=_mlp_builder([64, 128, 10], "cross_entropy"),
    )


TRANSLATION_MAX_LENGTH = 32
TRANSLATION_VAL_EXAMPLES = 512


def translation_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "hf_apo_benchmarks" / "offline_translation"


def load_translation(quick: bool = False) -> TaskData:
    """The translation example's corpus, tokenizer and model config (``examples/translation/offline_default.py``);
    whatever architecture that config names is built from scratch (``AutoModelForSeq2SeqLM.from_config``)."""
    sys.path.insert(0, str(REPO_ROOT / "examples" / "translation"))
    import json

    import offline_default
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

    prepared = offline_default.prepare(str(translation_cache_dir()))
    tokenizer = PreTrainedTokenizerFast.from_pretrained(prepared.model_dir)
    config = AutoConfig.from_pretrained(prepared.model_dir)
    source, target = offline_default.SOURCE_LANG, offline_default.TARGET_LANG

    def encode(split: str, limit: int | None) -> dict[str, torch.Tensor]:
        with open(prepared.data_files[split], encoding="utf-8") as reader:
            pairs = [json.loads(line)["translation"] for line in reader]
        pairs = pairs[:limit] if limit else pairs
        inputs = tokenizer([p[source] for p in pairs], max_length=TRANSLATION_MAX_LENGTH, truncation=True,
                           padding="max_length", return_tensors="pt")
        labels = tokenizer([p[target] for p in pairs], max_length=TRANSLATION_MAX_LENGTH, truncation=True,
                           padding="max_length", return_tensors="pt")["input_ids"]
        labels = labels.masked_fill(labels == tokenizer.pad_token_id, -100)
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"], "labels": labels}

    def trim(batch: dict) -> dict:
        source_len = int(batch["attention_mask"].sum(1).max())
        target_len = int((batch["labels"] != -100).sum(1).max())
        return {"input_ids": batch["input_ids"][:, :source_len].contiguous(),
                "attention_mask": batch["attention_mask"][:, :source_len].contiguous(),
                "labels": batch["labels"][:, :target_len].contiguous()}

    train = encode("train", 2000 if quick else None)
    val = encode("validation", 64 if quick else TRANSLATION_VAL_EXAMPLES)
    val_batches = [trim({k: v[i:i + 128] for k, v in val.items()}) for i in range(0, len(val["labels"]), 128)]

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return AutoModelForSeq2SeqLM.from_config(config)

    info = {"model_type": config.model_type, "vocab_size": len(tokenizer), "d_model": getattr(config, "d_model", None),
            "parameters": sum(p.numel() for p in build(0).parameters())}
    return TaskData(train=train, val_batches=val_batches, build_model=build, trim=trim, info=info)


ADAMW_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
TASKS: dict[str, Task] = {
    "diabetes": Task(
        "diabetes", "sklearn load_diabetes regression, MLP 10-64-64-1, ½(y−f)² on the standardized target",
        "squared_error", steps=600, eval_every=20, batch_size=32, adamw_lrs=ADAMW_GRID, sgd_lrs=(1e-3, 3e-3, 1e-2),
        load=load_diabetes, sweep=True,
    ),
    "digits_autoencoder": Task(
        "digits_autoencoder", "sklearn load_digits autoencoder, MLP 64-32-8-32-64 with sigmoid output, ½‖x−x̂‖²",
        "squared_error", steps=800, eval_every=20, batch_size=32, adamw_lrs=ADAMW_GRID, sgd_lrs=(1e-3, 3e-3, 1e-2),
        load=load_digits_autoencoder,
    ),
    "digits_classification": Task(
        "digits_classification", "sklearn load_digits classification, MLP 64-128-10, cross-entropy", "kl",
        steps=600, eval_every=20, batch_size=32, adamw_lrs=ADAMW_GRID, sgd_lrs=(1e-2, 3e-2, 1e-1),
        load=load_digits_classification, sweep=True,
    ),
    "teacher_student": Task(
        "teacher_student", "regression on a random teacher MLP 20-64-64-1 plus noise (std 0.1), 50,000 examples, "
        "student MLP 20-64-64-1, ½(y−f)²", "squared_error", steps=600, eval_every=20, batch_size=32,
        adamw_lrs=ADAMW_GRID, sgd_lrs=(1e-3, 3e-3, 1e-2), load=load_teacher_student,
    ),
    "translation": Task(
        "translation", "the example's English→German number words, its BPE tokenizer and its model config (built from "
        "scratch; see model_info), token cross-entropy on 512 validation pairs", "kl", steps=250, eval_every=25, batch_size=32,
        adamw_lrs=ADAMW_GRID, sgd_lrs=(3e-2, 1e-1, 3e-1), load=load_translation, decay_search="neighbors",
        bf16_methods=("adamw_tuned_decay", "apo_lr_1e-04", "apo_lr_1e-03", "apo_precond_sgdm", "soap"),
    ),
}


# ---------------------------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------------------------
class EpochSampler:
    """Batches of a seeded random permutation, reshuffled every epoch: the same sequence for every optimizer."""

    def __init__(self, size: int, batch_size: int, seed: int):
        self.size, self.batch_size = size, batch_size
        self.generator = torch.Generator().manual_seed(10_000 + seed)
        self.order, self.position = torch.randperm(size, generator=self.generator), 0

    def next(self) -> torch.Tensor:
        if self.position + self.batch_size > self.size:
            self.order, self.position = torch.randperm(self.size, generator=self.generator), 0
        indices = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return indices


def autocast_forward(model, batch):
    with torch.autocast("cpu", dtype=BF16):
        return default_forward(model, batch)


@torch.no_grad()
def evaluate(model: nn.Module, optimizer, data: TaskData, precision: str, batches: list[dict] | None = None) -> float:
    """Mean loss per example (per target token for translation) over ``batches`` (default: the validation batches),
    always computed in float32."""
    set_eval_mode(optimizer, True)
    try:
        eval_model = copy.deepcopy(model).float() if precision == "bf16_weights" else model
        was_training = eval_model.training
        eval_model.eval()
        total, count = 0.0, 0
        for batch in data.val_batches if batches is None else batches:
            loss = float(get_output(default_forward(eval_model, batch), "loss"))
            labels = batch["labels"]
            weight = int((labels != -100).sum()) if labels.dtype == torch.long and labels.dim() > 1 else len(labels)
            total, count = total + loss * weight, count + weight
        eval_model.train(was_training)
    finally:
        set_eval_mode(optimizer, False)
    return total / count


def run_once(task: Task, data: TaskData, spec: MethodSpec, seed: int, precision: str = "fp32",
             callback: Callable[[int, torch.optim.Optimizer], None] | None = None) -> dict:
    """Train one model with one optimizer for the task's budget; the validation curve and its timing.

    ``callback(step, optimizer)``, if given, is called after every optimizer step (outside the timed part)."""
    model = data.build_model(seed)
    forward = default_forward
    dtype = torch.float32
    if precision == "bf16_weights":
        model, dtype = model.to(BF16), BF16
    elif precision == "bf16_autocast":
        forward = autocast_forward
    model.train()
    optimizer, scheduler = build_optimizer(spec, model, total_steps=task.steps, divergence=task.divergence, forward=forward)
    sampler = EpochSampler(data.size, task.batch_size, seed)
    steps, losses, times = [0], [evaluate(model, optimizer, data, precision)], [0.0]
    lr_trace: list[float] = []  # APO-LR: the applied LR (the schedule's times the learned multiplier)
    multiplier_trace: list[float] = []  # APO-LR: the learned multiplier alone
    train_time, diverged = 0.0, False
    for step in range(1, task.steps + 1):
        batch = data.batch(sampler.next(), dtype)
        start = time.perf_counter()
        loss = train_step(model, optimizer, batch, forward, scheduler)
        train_time += time.perf_counter() - start
        if callback is not None:
            callback(step, optimizer)
        if isinstance(optimizer, APOLR):
            lr_trace.append(optimizer.param_groups[0]["lr"] * optimizer.lr_multipliers[0])
            multiplier_trace.append(optimizer.lr_multipliers[0])
        if not math.isfinite(float(loss)):
            diverged = True
            break
        if step % task.eval_every == 0 or step == task.steps:
            steps.append(step)
            losses.append(evaluate(model, optimizer, data, precision))
            times.append(train_time)
            if not math.isfinite(losses[-1]):
                diverged = True
                break
    final = losses[-1] if not diverged else math.inf
    train_final = evaluate(model, optimizer, data, precision, data.train_eval_batches()) if not diverged else math.inf
    return {"final": final, "train_final": train_final, "steps": steps, "losses": losses, "train_time": times,
            "diverged": diverged, "lr_trace": lr_trace, "multiplier_trace": multiplier_trace,
            "total_train_time": train_time}
