#!/usr/bin/env python
# Copyright 2024 The hf_apo authors. Licensed under the Apache License, Version 2.0.
"""Plot the training loss and what APO learned, from the ``trainer_state.json`` of a finished run.

    python examples/translation/plot_training.py OUTPUT_DIR [--output FILE.png]

Works on any Trainer output directory (or checkpoint folder). The left panel shows the training loss (and the
evaluation loss when the run evaluated during training). The right panel shows the APO statistics that the run
logged: the learned learning-rate multiplier ``apo/lr_multiplier`` and learning rate ``apo/learning_rate`` for
``--apo lr`` (with ``--apo_trust_region``, the measured KL of a step ``apo/step_kl``), the mean traces of the Kronecker
factors ``apo/left_trace_mean`` / ``apo/right_trace_mean`` and ``apo/scale_mean`` for ``--apo precond``; with
``--apo none`` there are none, and it shows the scheduled learning rate instead.
"""

import argparse
import json
import os
import sys

import matplotlib


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen before pyplot is imported)


APO_STATISTICS = {
    "apo/lr_multiplier": "learned LR multiplier exp(phi)",
    "apo/learning_rate": "learned learning rate (schedule x multiplier)",
    "apo/step_kl": "the step's KL on the meta batch, nats/token (--apo_trust_region)",
    "apo/left_trace_mean": "left factors: mean tr(L)/out",
    "apo/right_trace_mean": "right factors: mean tr(R)/in",
    "apo/scale_mean": "diagonal and scalar factors: mean",
}
DEFAULT_FILENAME = "training_curves.png"


def read_log_history(run_dir: str) -> list:
    """The ``log_history`` list of ``run_dir/trainer_state.json``."""
    state_file = os.path.join(run_dir, "trainer_state.json")
    with open(state_file, encoding="utf-8") as reader:
        return json.load(reader)["log_history"]


def series(log_history: list, key: str) -> tuple:
    """The (steps, values) of every log entry that has ``key``."""
    entries = [entry for entry in log_history if key in entry]
    return [entry["step"] for entry in entries], [entry[key] for entry in entries]


def plot_training(run_dir: str, output_file: str = None) -> str:
    """Draw the curves of ``run_dir`` into a PNG (default: ``run_dir/training_curves.png``) and return its path."""
    log_history = read_log_history(run_dir)
    output_file = output_file or os.path.join(run_dir, DEFAULT_FILENAME)

    figure, (loss_axes, apo_axes) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axes.plot(*series(log_history, "loss"), label="training loss")
    eval_steps, eval_losses = series(log_history, "eval_loss")
    if eval_steps:
        loss_axes.plot(eval_steps, eval_losses, "o-", label="evaluation loss")
    loss_axes.set_yscale("log")
    loss_axes.set_xlabel("step")
    loss_axes.set_ylabel("loss")
    loss_axes.set_title("Loss")
    loss_axes.legend()

    logged = {key: label for key, label in APO_STATISTICS.items() if series(log_history, key)[0]}
    for key, label in logged.items():
        apo_axes.plot(*series(log_history, key), label=f"{label} ({key})")
    if logged:
        apo_axes.set_title("What APO learned")
        apo_axes.set_yscale("log")
    else:
        apo_axes.plot(*series(log_history, "learning_rate"), label="learning rate (schedule)")
        apo_axes.set_title("Learning rate (no apo/ statistics in this run)")
    apo_axes.set_xlabel("step")
    apo_axes.legend()

    figure.tight_layout()
    figure.savefig(output_file, dpi=100)
    plt.close(figure)
    return output_file


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="A Trainer output directory or checkpoint folder with trainer_state.json.")
    parser.add_argument("--output", default=None, help=f"The PNG to write. Default: RUN_DIR/{DEFAULT_FILENAME}.")
    args = parser.parse_args()
    try:
        output_file = plot_training(args.run_dir, args.output)
    except (OSError, KeyError, ValueError) as err:
        print(f"error: {args.run_dir}: cannot read trainer_state.json ({err})", file=sys.stderr)
        sys.exit(2)
    print(output_file)


if __name__ == "__main__":
    main()
