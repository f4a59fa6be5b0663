"""The workloads: one module per task, each defining ``TASK`` (a :class:`Task`: model, data, evaluation, named
budgets), collected in :data:`TASKS`. In-process tasks give ``load(quick) -> TaskData``; Trainer tasks give
``trainer``, a module with ``checkpoint(quick)`` (the pretrained model's hash) and ``run(...)``."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

QUICK_BUDGET = (30, 10, (0,))  # steps, eval_every, seeds: --quick checks that a study runs (a task may set its own)


@dataclass
class TaskData:
    """A task's tensors: ``train`` columns (first dimension = examples), fixed validation batches, a model builder."""

    train: dict[str, torch.Tensor]
    val_batches: list[dict[str, torch.Tensor]]
    build_model: Callable[[int], nn.Module]  # seed -> a fresh model (the seed is set before any weight is drawn)
    trim: Callable[[dict], dict] | None = None  # e.g. cut padding columns a batch does not use
    final_metrics: Callable[[nn.Module], dict[str, float]] | None = None  # e.g. BLEU of the trained model

    @property
    def size(self) -> int:
        return next(iter(self.train.values())).shape[0]

    def batch(self, indices: torch.Tensor, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        batch = {k: v[indices] for k, v in self.train.items()}
        batch = self.trim(batch) if self.trim is not None else batch
        return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}

    def train_eval_batches(self, examples: int = 1024, batch_size: int = 256) -> list[dict[str, torch.Tensor]]:
        """The first ``examples`` training examples in batches: the training loss a run reports."""
        end = min(examples, self.size)
        return [self.batch(torch.arange(i, min(i + batch_size, end))) for i in range(0, end, batch_size)]


def trim_padding(batch: dict) -> dict:
    """A seq2seq batch without the padding columns no row of it uses (source by its mask, target by labels -100)."""
    source, target = int(batch["attention_mask"].sum(1).max()), int((batch["labels"] != -100).sum(1).max())
    return {"input_ids": batch["input_ids"][:, :source].contiguous(),
            "attention_mask": batch["attention_mask"][:, :source].contiguous(),
            "labels": batch["labels"][:, :target].contiguous()}


def seq2seq_data(train: dict, val: dict, build: Callable[[int], nn.Module], eval_batch: int = 128,
                 final_metrics=None) -> TaskData:
    """A seq2seq task's data: the validation columns cut into trimmed batches of ``eval_batch``, training batches
    trimmed as they are drawn."""
    return TaskData(train, [trim_padding({k: v[i:i + eval_batch] for k, v in val.items()})
                            for i in range(0, len(val["labels"]), eval_batch)], build, trim_padding, final_metrics)


def translation_metrics(tokenizer, sources: dict[str, torch.Tensor], references: list[str], max_new_tokens: int,
                        batch_size: int = 128) -> Callable[[nn.Module], dict[str, float]]:
    """BLEU and chrF (sacrebleu, corpus level) of a trained model's greedy translations of ``sources`` (input_ids,
    attention_mask) against ``references``."""

    @torch.no_grad()
    def metrics(model: nn.Module) -> dict[str, float]:
        import sacrebleu

        was_training, hypotheses, device = model.training, [], next(model.parameters()).device
        model.eval()
        for i in range(0, len(references), batch_size):
            mask = sources["attention_mask"][i:i + batch_size]
            width = int(mask.sum(1).max())  # without the padding columns no row uses
            source = {"input_ids": sources["input_ids"][i:i + batch_size, :width].to(device),
                      "attention_mask": mask[:, :width].to(device)}
            output = model.generate(**source, num_beams=1, do_sample=False, max_new_tokens=max_new_tokens)
            hypotheses += tokenizer.batch_decode(output, skip_special_tokens=True)
        model.train(was_training)
        return {"bleu": sacrebleu.corpus_bleu(hypotheses, [references]).score,
                "chrf": sacrebleu.corpus_chrf(hypotheses, [references]).score}

    return metrics


@dataclass
class Task:
    name: str
    description: str
    divergence: str  # APO's function-space divergence for this output type
    budgets: dict[str, tuple[int, int, tuple[int, ...]]]  # name -> (steps, eval_every, seeds)
    batch_size: int = 32
    load: Callable[[bool], TaskData] | None = None  # in-process tasks
    trainer: object | None = None  # Trainer tasks: a module with checkpoint(quick) and run(...)
    default_schedule: str = "constant"  # a method that names no schedule gets this one (the Trainer's: linear)
    floor: float | None = None  # the validation loss no model can beat, where the data's construction says it

    def budget(self, name: str, quick: bool = False) -> tuple[int, int, tuple[int, ...]]:
        return self.budgets.get("quick", QUICK_BUDGET) if quick else self.budgets[name]


class MLP(nn.Module):
    """An MLP whose forward returns the loss and the outputs the divergence compares (under ``logits``)."""

    def __init__(self, sizes: list[int], loss: str, output_activation: nn.Module | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
        self.net = nn.Sequential(*layers, *([output_activation] if output_activation is not None else []))
        self.loss = loss

    def forward(self, x, labels=None):
        outputs = self.net(x.to(self.net[0].weight.dtype))
        loss = None
        if labels is not None:  # in float32 whatever the weights' dtype (as HF models upcast logits for the loss)
            prediction = outputs.float()
            if self.loss == "cross_entropy":
                loss = nn.functional.cross_entropy(prediction, labels)
            else:  # Gaussian negative log-likelihood up to a constant: ½‖y − f‖² per example, batch mean
                loss = 0.5 * (prediction - labels.float()).pow(2).reshape(len(labels), -1).sum(1).mean()
        return {"loss": loss, "logits": outputs}


def mlp_builder(sizes, loss, output_activation=None) -> Callable[[int], nn.Module]:
    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return MLP(sizes, loss, output_activation=output_activation)

    return build


def split(n: int, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = int(round(val_fraction * n))
    return order[n_val:], order[:n_val]


TASKS: dict[str, Task] = {}
for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        _task = getattr(importlib.import_module(f"{__name__}.{_module.name}"), "TASK", None)
        if _task is not None:
            TASKS[_task.name] = _task
