"""benchmarks/finetune.py and benchmarks/lora.py --quick run end to end and write one well-formed JSON line per run;
a second finetune.py run resumes (lora.py runs the same ``finetune.run_grid``).

Each runs in a subprocess, as a user runs it, so its torch thread setting cannot leak into other tests; the check that
only the LoRA adapters train runs here, on the quick pretrained checkpoint the subprocess left in the cache.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"adamw": {"apo": "none"}, "apo_lr": {"apo": "lr"}}
# the script, and the field its rows record the Trainer flags under
SCRIPTS = {"finetune": "apo_args", "lora": "trainer_args"}


def run_quick(script: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / f"{script}.py"), "--quick", "--out", str(out),
         "--configs", json.dumps(CONFIGS)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return completed


def finite(values) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_quick_writes_runs_and_resumes(tmp_path, script):
    out = tmp_path / "runs.jsonl"
    run_quick(script, out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["config"] for row in rows) == ["adamw", "apo_lr"]
    for row in rows:
        assert row[SCRIPTS[script]] == CONFIGS[row["config"]] and row["quick"] is True
        assert isinstance(row["learning_rate"], float) and row["seed"] == 0 and row["steps"] == 20
        assert row["diverged"] is False
        assert finite(row["eval_losses"]) and finite(row["train_losses"]) and finite(row["learning_rates"])
        assert row["eval_steps"][0] == 0 and row["eval_steps"][-1] == row["steps"]
        assert len(row["eval_steps"]) == len(row["eval_losses"]) and len(row["train_steps"]) == len(row["train_losses"])
        assert row["final_eval_loss"] == row["eval_losses"][-1]
        # adapting on the new direction (de→en) lowers the pretrained (en→de) model's loss on it
        assert row["final_eval_loss"] < row["eval_losses"][0]
        assert row["wall_s"] > 0 and row["environment"]["torch_threads"] == 1
        assert math.isfinite(row["pretrained"]["eval_loss_en_de"])
    by_config = {row["config"]: row for row in rows}
    assert by_config["adamw"]["lr_multiplier"] == []
    multipliers = by_config["apo_lr"]["lr_multiplier"]
    assert len(multipliers) == len(by_config["apo_lr"]["train_losses"]) and finite(multipliers)
    assert all(m > 0 for m in multipliers)
    # the same step-0 model and data for both configs
    assert by_config["adamw"]["eval_losses"][0] == by_config["apo_lr"]["eval_losses"][0]

    if script == "finetune":  # resume: every run is already there (lora.py runs the same finetune.run_grid)
        completed = run_quick(script, out)
        assert out.read_text().count("\n") == len(rows)
        assert "already in" in completed.stderr
    else:
        assert_only_the_adapters_train()


def assert_only_the_adapters_train():
    """The base model's weights, embeddings and lm_head are frozen; an A and a B for every targeted projection."""
    sys.path.insert(0, str(REPO_ROOT))
    from benchmarks.lora import CACHE_ROOT, LORA, lora_model

    model = lora_model(CACHE_ROOT / "lora_pretrained_quick")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in name or "lora_B" in name for name in trainable)
    assert len(trainable) == 2 * 2 * len(LORA["target_modules"])  # both layers
    frozen = [p for name, p in model.named_parameters() if "embed_tokens" in name or "lm_head" in name]
    assert frozen and not any(p.requires_grad for p in frozen)
