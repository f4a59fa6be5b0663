"""A Trainer run killed with SIGKILL after a checkpoint and resumed ends bitwise equal to the run that never stopped.

Each run is tests/scripts/train_tiny.py's ``main`` in a process forked from the test process: the killed one ends
itself with SIGKILL at the end of a step (no cleanup, no final save, like a preempted job), and the resumed one starts
from its checkpoint in a fresh process. The two-process FSDP2 kill and resume, launched end to end with torchrun, is
in tests/test_distributed.py.
"""

import os

import pytest
import torch

from helpers_subprocess import result, train_forked


# APO-LR on the same batch resumes as APO-Precond does (the meta step needs the B′ of the step before the checkpoint)
# and holds less than lr_next (the pending look-ahead and D).
@pytest.mark.parametrize("apo", ["lr_next", "precond"])
def test_sigkill_then_resume_is_bitwise_equal(tmp_path, apo):
    interval = "5" if apo == "lr_next" else "3"  # lr_next: checkpoint-5 holds a look-ahead awaiting step 6's gradient
    args = ["--max_steps", "12", "--per_device_train_batch_size", "4", "--save_strategy", "steps", "--save_steps", "5",
            "--apo", apo.removesuffix("_next"), "--apo_meta_interval", interval, "--dropout", "0.1"]
    if apo == "lr_next":
        args += ["--apo_loss_batch", "next", "--apo_lambda_fsd", "0", "--apo_horizon", "100"]  # D persists
    if apo == "precond":
        args += ["--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "0.05"]
    train_forked(tmp_path / "straight", *args)

    # Killed at step 8: checkpoint-5 exists, nothing after it was saved. Meta step 6 then needs the B′ of step 5.
    killed = train_forked(tmp_path / "killed", *args, "--kill_at_step", "8", check=False)
    assert killed != 0
    assert sorted(os.listdir(tmp_path / "killed")) == ["checkpoint-5"]
    train_forked(tmp_path / "killed", *args, "--resume_from_checkpoint", tmp_path / "killed" / "checkpoint-5")

    straight, resumed = result(tmp_path / "straight"), result(tmp_path / "killed")
    assert all(torch.equal(a, b) for a, b in zip(straight["params"], resumed["params"]))
    assert all(torch.equal(a, b) for a, b in zip(straight["meta"], resumed["meta"]))
    meta_steps = [h["apo/meta_steps"] for h in resumed["log_history"] if "apo/meta_steps" in h]
    assert meta_steps[-1] == (3 if apo == "lr_next" else 4)  # lr_next: steps 5 and 10, and 1 (the trust region's)
