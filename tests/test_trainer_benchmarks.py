"""The Trainer tasks (finetune, lora) run end to end through the study runner in quick mode and store one
well-formed row per run; a second run resumes; a LoRA run is reproducible bit for bit from its seed (the adapters are
drawn after seeding)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

STUDY = """
title = "t"
question = "q"
tasks = ["{task}"]
[grids.adamw]
method = {{ kind = "adamw" }}
lrs = [1e-3]
[cells]
grid = "adamw"
[methods]
apo_lr = {{ kind = "apo_lr" }}
"""


def finite(values) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def run_quick(tmp_path: Path, task: str) -> list[dict]:
    from benchmarks.runner import Study

    (tmp_path / "s").mkdir(exist_ok=True)
    (tmp_path / "s" / "study.toml").write_text(STUDY.format(task=task))
    threads = torch.get_num_threads()
    try:
        study = Study("s", quick=True, runs=tmp_path / "runs", training=True, root=tmp_path)
        study.run()
    finally:
        torch.set_num_threads(threads)
    return list(study.store.rows.values())


@pytest.mark.slow
@pytest.mark.parametrize("task", ["finetune", "lora"])
def test_quick_writes_runs_and_resumes(tmp_path, task):
    pytest.importorskip("peft")
    rows = run_quick(tmp_path, task)
    assert sorted(row["method"]["kind"] for row in rows) == ["adamw", "apo_lr"]
    for row in rows:
        assert row["method"]["schedule"] == "linear"  # the Trainer's default, written out in the row
        assert isinstance(row["lr"], float) and row["seed"] == 0 and row["steps"] == 30
        assert row["diverged"] is False
        assert finite(row["losses"]) and finite(row["train_losses"]) and finite(row["learning_rates"])
        assert row["eval_steps"][0] == 0 and row["eval_steps"][-1] == row["steps"]
        assert len(row["eval_steps"]) == len(row["losses"]) and len(row["train_steps"]) == len(row["train_losses"])
        assert row["final"] == row["losses"][-1]
        # adapting on the new direction (de→en) lowers the pretrained (en→de) model's loss on it
        assert row["final"] < row["losses"][0]
        assert row["wall_s"] > 0 and row["environment"]["threads"] == 1
        assert row["checkpoint"]
    by_kind = {row["method"]["kind"]: row for row in rows}
    assert by_kind["adamw"]["lr_multiplier"] == []
    multipliers = by_kind["apo_lr"]["lr_multiplier"]
    assert len(multipliers) == len(by_kind["apo_lr"]["train_losses"]) and finite(multipliers)
    assert all(m > 0 for m in multipliers)
    # the same step-0 model and data for both methods
    assert by_kind["adamw"]["losses"][0] == by_kind["apo_lr"]["losses"][0]

    if task == "finetune":  # resume: every run is already there
        assert len(run_quick(tmp_path, task)) == len(rows)
    else:
        assert_only_the_adapters_train()


def assert_only_the_adapters_train():
    """The base model's weights, embeddings and lm_head are frozen; an A and a B for every targeted projection."""
    from benchmarks.tasks._trainer import pretrained_dir
    from benchmarks.tasks.lora import LORA, lora_model

    model = lora_model(pretrained_dir("lora", quick=True), seed=0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert len(trainable) == 2 * 2 * len(LORA["target_modules"])  # both layers
    frozen = [p for name, p in model.named_parameters() if "embed_tokens" in name or "lm_head" in name]
    assert frozen and not any(p.requires_grad for p in frozen)


@pytest.mark.slow
def test_a_lora_run_is_reproducible_from_its_seed():
    """The adapters are drawn after seeding: the same seed gives the same adapters and the same run, bit for bit."""
    pytest.importorskip("peft")
    from benchmarks.tasks import lora
    from benchmarks.tasks._trainer import pretrained_dir

    lora.checkpoint(quick=True)
    models = [lora.lora_model(pretrained_dir("lora", True), seed) for seed in (0, 0, 1)]
    adapters = [{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} for model in models]
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])
    assert not all(torch.equal(adapters[0][n], adapters[2][n]) for n in adapters[0])
    threads = torch.get_num_threads()
    try:
        first, second = (lora.run({"apo": "none"}, 1e-2, 0, 6, 3, True) for _ in range(2))
    finally:
        torch.set_num_threads(threads)
    assert first["losses"] == second["losses"] and first["train_losses"] == second["train_losses"]


def test_a_checkpoint_is_named_by_its_weights_not_by_who_wrote_it(tmp_path):
    """The rows' ``checkpoint`` is a hash of the saved tensors: the same weights saved twice (in other files, with other
    metadata) name the same checkpoint, and one changed element names another."""
    from safetensors.torch import save_file

    from benchmarks.tasks._trainer import weights_sha256

    tensors = {"b.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.ones(3, dtype=torch.float16)}
    for name, metadata in (("one", None), ("two", {"format": "pt", "writer": "another version"})):
        (tmp_path / name).mkdir()
        save_file(dict(reversed(tensors.items())) if metadata else tensors, tmp_path / name / "model.safetensors",
                  metadata=metadata)
    assert weights_sha256(tmp_path / "one") == weights_sha256(tmp_path / "two")
    tensors["b.weight"][1, 2] += 1e-6
    (tmp_path / "three").mkdir()
    save_file(tensors, tmp_path / "three" / "model.safetensors")
    assert weights_sha256(tmp_path / "three") != weights_sha256(tmp_path / "one")
