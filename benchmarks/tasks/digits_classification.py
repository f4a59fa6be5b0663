"""MLP classification of sklearn's digits (train loss reaches ~1e-4 at long budgets: the final validation loss then
measures over-fitting; studies score it by the best validation loss along the run)."""

from benchmarks.tasks import Task, TaskData, mlp_builder
from benchmarks.tasks.digits_autoencoder import digits


def load(quick: bool = False) -> TaskData:
    x, y, train, val = digits()
    return TaskData({"x": x[train], "labels": y[train]}, [{"x": x[val], "labels": y[val]}],
                    mlp_builder([64, 128, 10], "cross_entropy"))


TASK = Task("digits_classification", "sklearn load_digits classification, MLP 64-128-10, cross-entropy", "kl",
            {"short": (600, 20, (0, 1, 2)), "long": (6000, 300, (0, 1, 2))}, load=load)
