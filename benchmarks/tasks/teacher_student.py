"""Regression on a fixed random teacher network: with 50,000 examples the validation loss measures optimization."""

import torch
from torch import nn

from benchmarks.tasks import Task, TaskData, mlp_builder


def load(quick: bool = False) -> TaskData:
    """A teacher MLP 20-64-64-1 (tanh, weights ×2: markedly non-linear) plus noise of std 0.1 on 50,000 training and
    2,000 validation inputs from N(0, I)."""
    generator = torch.Generator().manual_seed(0)
    n_train, n_val = (4_000 if quick else 50_000), 2_000
    x = torch.randn(n_train + n_val, 20, generator=generator)
    teacher = mlp_builder([20, 64, 64, 1], "gaussian")(12345)
    with torch.no_grad():
        for layer in teacher.net:
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(2.0)
        y = teacher(x)["logits"]
    y = (y - y[:n_train].mean()) / y[:n_train].std() + 0.1 * torch.randn(y.shape, generator=generator)
    return TaskData({"x": x[:n_train], "labels": y[:n_train]}, [{"x": x[n_train:], "labels": y[n_train:]}],
                    mlp_builder([20, 64, 64, 1], "gaussian"))


TASK = Task("teacher_student", "regression on a random teacher MLP 20-64-64-1 plus noise (std 0.1), 50,000 examples, "
            "student MLP 20-64-64-1, ½(y−f)²", "squared_error",
            {"short": (600, 20, (0, 1, 2)), "long": (6000, 300, (0, 1, 2))}, load=load,
            floor=0.5 * 0.1 ** 2)  # the noise: ½·E[ε²] with ε ~ N(0, 0.1²), for the teacher itself
