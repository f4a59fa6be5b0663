"""A run killed with SIGKILL after a checkpoint and resumed ends bitwise equal to the run that never stopped."""

import os

import pytest
import torch

from helpers_subprocess import result, train


@pytest.mark.parametrize("apo", ["lr", "precond"])
def test_sigkill_then_resume_is_bitwise_equal(tmp_path, apo):
    args = ["--max_steps", "12", "--per_device_train_batch_size", "4", "--save_strategy", "steps",
            "--save_steps", "5", "--apo", apo, "--apo_meta_interval", "3", "--dropout", "0.1"]
    if apo == "precond":
        args += ["--optim", "sgd", "--optim_args", "momentum=0.9", "--learning_rate", "0.05"]
    train(tmp_path / "straight", *args)

    # Killed at step 8: checkpoint-5 exists, nothing after it was saved. Meta step 6 then needs the B′ of step 5.
    killed = train(tmp_path / "killed", *args, "--kill_at_step", "8", check=False)
    assert killed.returncode != 0
    assert sorted(os.listdir(tmp_path / "killed")) == ["checkpoint-5"]
    train(tmp_path / "killed", *args, "--resume_from_checkpoint", tmp_path / "killed" / "checkpoint-5")

    straight, resumed = result(tmp_path / "straight"), result(tmp_path / "killed")
    assert all(torch.equal(a, b) for a, b in zip(straight["params"], resumed["params"]))
    assert all(torch.equal(a, b) for a, b in zip(straight["meta"], resumed["meta"]))
    meta_steps = [h["apo/meta_steps"] for h in resumed["log_history"] if "apo/meta_steps" in h]
    assert meta_steps[-1] == 4
