"""An MLP autoencoder on sklearn's digits (pixels in [0, 1], ½‖x − x̂‖² per image)."""

import torch
from torch import nn

from benchmarks.tasks import Task, TaskData, mlp_builder, split


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(data.target, dtype=torch.long), *split(len(x), 0.2)


def load(quick: bool = False) -> TaskData:
    x, _, train, val = digits()
    return TaskData({"x": x[train], "labels": x[train]}, [{"x": x[val], "labels": x[val]}],
                    mlp_builder([64, 32, 8, 32, 64], "gaussian", output_activation=nn.Sigmoid()))


TASK = Task("digits_autoencoder", "sklearn load_digits autoencoder, MLP 64-32-8-32-64 with sigmoid output, ½‖x−x̂‖²",
            "squared_error", {"short": (800, 20, (0, 1, 2)), "long": (8000, 400, (0, 1, 2))}, load=load)
