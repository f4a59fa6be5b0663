"""CUDA checks that the CPU test suite cannot make: bf16 and fp16 (with a real GradScaler) through the Trainer,
the fused AdamW kernel under APO-LR, float32 meta-parameters on the GPU, and APO-Precond's stochastic rounding of
bf16 weights with a CUDA generator.

    python -m benchmarks.checks.cuda_check --output_dir OUT      # from the repository root

Writes OUT/cuda_check.json and exits non-zero if a check fails. Needs torch + transformers + a GPU only.
"""

import argparse
import json
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))

from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments  # noqa: E402

from hf_apo import APOPrecond, APOSeq2SeqTrainer, APOSeq2SeqTrainingArguments  # noqa: E402
from tiny import CopyDataset, tiny_bart, tiny_t5  # noqa: E402


def train(trainer_cls, args_cls, model, **overrides):
    with tempfile.TemporaryDirectory() as output_dir:
        defaults = dict(output_dir=output_dir, report_to=[], per_device_train_batch_size=16, max_steps=60,
                        logging_steps=10, save_strategy="no", seed=0, data_seed=0, disable_tqdm=True,
                        learning_rate=1e-3, lr_scheduler_type="constant")
        trainer = trainer_cls(model=model, args=args_cls(**{**defaults, **overrides}), train_dataset=CopyDataset(256))
        trainer.train()
    return trainer


def summary(trainer):
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    apo = trainer.apo_optimizer if hasattr(trainer, "apo_optimizer") else None
    out = {"losses": losses, "finite": all(map(torch.isfinite, map(torch.tensor, losses)))}
    if apo is not None:
        out.update(meta_steps=apo.meta_steps, skipped=apo.skipped_meta_steps, metrics=apo.metrics())
        if hasattr(apo, "factors"):
            out["factor_dtypes"] = sorted({str(t.dtype) for f in apo.factors.values() for t in f.tensors})
            out["factor_device"] = str(next(iter(apo.factors.values())).tensors[0].device)
        else:
            out["log_lr_dtype"] = str(apo.log_lr.dtype)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--output_dir", default=".")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "no GPU"
    results, failures = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}, []

    # meta_lr 0 equals the parent Trainer with the fused AdamW kernel, loss for loss.
    parent = train(Seq2SeqTrainer, Seq2SeqTrainingArguments, tiny_t5(), optim="adamw_torch_fused")
    apo_off = train(APOSeq2SeqTrainer, APOSeq2SeqTrainingArguments, tiny_t5(), optim="adamw_torch_fused", apo="lr",
                    apo_meta_lr=0.0)
    results["fused_meta_off_equal"] = summary(parent)["losses"] == summary(apo_off)["losses"]
    if not results["fused_meta_off_equal"]:
        failures.append("fused_meta_off_equal")

    runs = {
        "lr_bf16": dict(apo="lr", bf16=True, optim="adamw_torch_fused", learning_rate=1e-4, apo_meta_interval=2),
        "lr_fp16": dict(apo="lr", fp16=True, optim="adamw_torch", learning_rate=1e-4, apo_meta_interval=2),
        "precond_bf16": dict(apo="precond", bf16=True, optim="sgd", optim_args="momentum=0.9", learning_rate=0.1,
                             apo_meta_interval=2),
        "precond_fp16": dict(apo="precond", fp16=True, optim="sgd", optim_args="momentum=0.9", learning_rate=0.1,
                             apo_meta_interval=2),
    }
    for name, overrides in runs.items():
        model = tiny_bart() if "fp16" in name else tiny_t5()  # T5 is known to overflow in fp16
        result = summary(train(APOSeq2SeqTrainer, APOSeq2SeqTrainingArguments, model, **overrides))
        results[name] = result
        improved = result["losses"][-1] < result["losses"][0]
        float32 = result.get("log_lr_dtype", "torch.float32") == "torch.float32" and result.get(
            "factor_dtypes", ["torch.float32"]) == ["torch.float32"]
        if not (result["finite"] and improved and float32 and result["meta_steps"] > 0):
            failures.append(name)

    # bf16 weights (no autocast): APO-Precond rounds its updates stochastically on the GPU's own generator
    model = tiny_t5(dtype=torch.bfloat16)
    result = summary(train(APOSeq2SeqTrainer, APOSeq2SeqTrainingArguments, model, apo="precond", optim="sgd",
                           optim_args="momentum=0.9", learning_rate=0.1, apo_meta_interval=2))
    results["precond_bf16_weights"] = result
    if not (result["finite"] and result["losses"][-1] < result["losses"][0] and result["meta_steps"] > 0):
        failures.append("precond_bf16_weights")
    weight = torch.nn.Parameter(torch.ones(100_000, dtype=torch.bfloat16, device="cuda"))
    optimizer = APOPrecond([weight], lr=1e-3, meta_lr=0.0)
    for _ in range(100):  # 1e-3 per step is below half a bf16 ulp at 1.0: only unbiased rounding accumulates it
        weight.grad = torch.full_like(weight, -1.0)
        optimizer.step()
    results["stochastic_rounding_mean"] = float(weight.float().mean())
    results["stochastic_rounding_generators"] = sorted(str(d) for d in optimizer._rounding_generators)
    on_cuda = results["stochastic_rounding_generators"][0].startswith("cuda")
    if abs(results["stochastic_rounding_mean"] - 1.1) > 2e-3 or not on_cuda:
        failures.append("stochastic_rounding")

    results["failures"] = failures
    with open(os.path.join(args.output_dir, "cuda_check.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    print(json.dumps(results, indent=2, default=str))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
