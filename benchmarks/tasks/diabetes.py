"""sklearn's diabetes regression (354 training examples: its validation loss measures over-fitting as much as
optimization)."""

import torch

from benchmarks.tasks import Task, TaskData, mlp_builder, split


def load(quick: bool = False) -> TaskData:
    from sklearn.datasets import load_diabetes

    data = load_diabetes()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.float32)[:, None]
    train, val = split(len(x), 0.2)
    x = (x - x[train].mean(0)) / x[train].std(0)
    y = (y - y[train].mean()) / y[train].std()
    return TaskData({"x": x[train], "labels": y[train]}, [{"x": x[val], "labels": y[val]}],
                    mlp_builder([10, 64, 64, 1], "gaussian"))


TASK = Task("diabetes", "sklearn load_diabetes regression, MLP 10-64-64-1, ½(y−f)² on the standardized target",
            "squared_error", {"short": (600, 20, (0, 1, 2))}, load=load)
