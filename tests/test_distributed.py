"""The Trainer across processes, end to end (tests/scripts/train_tiny.py under torchrun, a tiny Llama, 2 gloo
processes on the CPU): under DDP, φ and the parameters stay identical on both ranks and match one process with the
same global batch; under Accelerate's FSDP2 (forced on CPU processes) they match DDP; an FSDP2 run SIGKILLed after a
checkpoint and resumed ends bitwise equal to the run that never stopped.

One variant, APO-LR with the loss from the next gradient under Rprop and the adaptive cadence: the most state in a
checkpoint (the pending look-ahead, D, the cadence). The optimizer-level equivalences of every variant (DDP = one
process, FSDP2 = DDP, the token weighting, the sharded optimizer files, resume) run in-process in tests/test_fsdp.py;
benchmarks/checks/fsdp_gpu_check.py runs this check for all its variants on GPUs.

The look-ahead backward bypasses DDP, so the first fails unless the optimizer all-reduces its meta-gradient.
Accelerate ignores --fsdp on CPU processes (it trains with multi-CPU DDP); ``--force_fsdp_on_cpu`` lets its FSDP2
act as on GPUs: fully_shard of the model after the optimizer is built, the parameters swapped in it, sharded
clipping and checkpoints. The model is a tiny Llama: Accelerate's FSDP2 fails on T5's shared embeddings.
"""

import os
import sys

import pytest
import torch

from helpers_subprocess import result, train, train_forked
from test_checkpoint_safety import leaf_types, load_with_default_globals_only

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the benchmarks beside the package
from benchmarks.checks.fsdp_gpu_check import VARIANTS, relative_difference  # noqa: E402

pytestmark = pytest.mark.slow

VARIANT = "lr_next"
COMMON = ["--llama", "--max_steps", "8", "--per_device_train_batch_size", "4", "--apo_meta_interval", "2",
          "--apo_meta_batch_fraction", "1.0", *VARIANTS[VARIANT]]
FSDP2 = ["--force_fsdp_on_cpu", "--fsdp", "full_shard", "--fsdp_config", '{"version": 2}', "--save_strategy", "steps",
         "--save_steps", "4"]
OPT_IN = {"HF_APO_FSDP2": "1"}


def meta_steps(run):
    return [h["apo/meta_steps"] for h in run["log_history"] if "apo/meta_steps" in h][-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """FSDP2 (saving at step 4) and DDP on 2 processes, and one process (forked) with the global batch."""
    root = tmp_path_factory.mktemp("trainer")
    train(root / "fsdp", *COMMON, *FSDP2, processes=2, extra_env=OPT_IN)
    train(root / "ddp", *COMMON, "--save_strategy", "no", processes=2)
    train_forked(root / "one", *COMMON, "--save_strategy", "no", "--per_device_train_batch_size", "8")
    return root


def test_ddp_ranks_agree_and_match_one_process(runs):
    rank0, rank1, single = result(runs / "ddp", 0), result(runs / "ddp", 1), result(runs / "one")
    assert all(torch.equal(a, b) for a, b in zip(rank0["meta"], rank1["meta"]))
    assert all(torch.equal(a, b) for a, b in zip(rank0["params"], rank1["params"]))
    assert meta_steps(rank0) == meta_steps(single)
    # Float tolerance: the two runs sum the gradient in a different order, and meta-Adam's normalisation
    # magnifies rounding in meta-gradient entries near zero.
    for a, b in zip(rank0["meta"], single["meta"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=2e-5)
    for a, b in zip(rank0["params"], single["params"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fsdp2_ranks_agree_and_match_ddp(runs):
    fsdp0, fsdp1, ddp = result(runs / "fsdp", 0), result(runs / "fsdp", 1), result(runs / "ddp", 0)
    assert fsdp0["sharded"]
    assert all(torch.equal(a, b) for a, b in zip(fsdp0["meta"], fsdp1["meta"]))
    assert all(torch.equal(a, b) for a, b in zip(fsdp0["params"], fsdp1["params"]))
    # Rprop with the adaptive cadence (a meta step at once while φ keeps moving), the last look-ahead awaiting step
    # 9's gradient.
    assert meta_steps(fsdp0) == meta_steps(ddp)
    assert meta_steps(fsdp0) >= 5
    assert float(fsdp0["meta"][0].abs().min()) > 0.3  # φ moved (about meta_lr per meta step)
    # Measured: parameters equal to 0–2e-8, meta-parameters to 1e-7. A stale gathered unit (Accelerate keeps its
    # embedding/LM-head unit gathered after a forward) gave 1.6e-4 on φ.
    assert relative_difference(fsdp0["params"], ddp["params"]) < 1e-5
    assert relative_difference(fsdp0["meta"], ddp["meta"]) < 1e-5


def test_fsdp2_sigkill_then_resume_is_bitwise_equal(runs, tmp_path):
    killed = train(tmp_path, *COMMON, *FSDP2, "--kill_at_step", "7", processes=2, check=False, extra_env=OPT_IN)
    assert killed.returncode != 0
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-4"]
    assert {"apo_optimizer_rank0.pt", "apo_optimizer_rank1.pt"} <= set(os.listdir(tmp_path / "checkpoint-4"))
    for rank in (0, 1):  # plain local shards and data: they load with torch's default weights-only allowlist
        saved = load_with_default_globals_only(tmp_path / "checkpoint-4" / f"apo_optimizer_rank{rank}.pt")
        assert leaf_types(saved) <= {torch.Tensor, int, float, bool, str, type(None)}
        assert saved["process_index"] == rank and saved["world_size"] == 2
        assert saved["dtensors"]  # APO-LR's AdamW keeps DTensor moments, saved as shards
    train(tmp_path, *COMMON, *FSDP2, "--resume_from_checkpoint", tmp_path / "checkpoint-4", processes=2,
          extra_env=OPT_IN)
    for rank in (0, 1):
        straight, resumed = result(runs / "fsdp", rank), result(tmp_path, rank)
        assert all(torch.equal(a, b) for a, b in zip(straight["params"], resumed["params"]))
        assert all(torch.equal(a, b) for a, b in zip(straight["meta"], resumed["meta"]))
