"""What the two Trainer tasks share: the en→de number-word pairs, a cached pretraining (in ``<tmp>/hf_apo_benchmarks``
with a ``COMPLETE`` marker holding the hash of its settings, corpus and versions), its weights' hash (the rows'
``checkpoint``: the same whatever versions wrote it), a run."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from safetensors.torch import load_file

from benchmarks.tasks.translation import offline_default

CACHE_ROOT = Path(tempfile.gettempdir()) / "hf_apo_benchmarks"
EVAL_PAIRS = 500


def quiet() -> None:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_pairs(split: str) -> list[dict]:
    lines = Path(offline_default()[1].data_files[split]).read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["translation"] for line in lines]


def languages(reverse: bool) -> tuple[str, str]:
    module = offline_default()[0]
    return (module.TARGET_LANG, module.SOURCE_LANG) if reverse else (module.SOURCE_LANG, module.TARGET_LANG)


def pretrained_dir(task: str, quick: bool) -> Path:
    return CACHE_ROOT / f"{task}_pretrained{'_quick' if quick else ''}"


def fine_tuning_data(encode, tokenizer, quick: bool) -> tuple[list, list]:
    """The new task, de→en: the training pairs reversed, and the first validation pairs reversed."""
    src, tgt = languages(reverse=True)
    return (encode(tokenizer, load_pairs("train"), src, tgt),
            encode(tokenizer, load_pairs("validation")[:100 if quick else EVAL_PAIRS], src, tgt))


def cached_pretraining(cache_dir: Path, settings: dict, fingerprint: dict, model_for, arguments_class, trainer_of,
                       encoder) -> str:
    """Pretrain (or reuse) a model on en→de in ``cache_dir``; returns the hash of its weights."""
    digest = hashlib.sha256(json.dumps({
        **settings, **fingerprint, "corpus": offline_default()[0].cache_fingerprint(), "eval_pairs": EVAL_PAIRS,
        "torch": torch.__version__, "transformers": transformers.__version__}, sort_keys=True).encode()).hexdigest()
    marker, record_file = cache_dir / "COMPLETE", cache_dir / "pretrain.json"
    if marker.is_file() and marker.read_text().strip() == digest and record_file.is_file():
        return weights_sha256(cache_dir)
    quiet()
    model_dir = offline_default()[1].model_dir
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(settings["seed"])
    model = model_for(model_dir, tokenizer)
    src, tgt = languages(reverse=False)
    with tempfile.TemporaryDirectory() as output_dir:
        args = arguments_class(
            output_dir=output_dir, apo="none", max_steps=settings["steps"], seed=settings["seed"],
            per_device_train_batch_size=settings["batch_size"], per_device_eval_batch_size=100,
            learning_rate=settings["learning_rate"], warmup_steps=settings["warmup_steps"], lr_scheduler_type="linear",
            optim="adamw_torch", logging_steps=max(1, settings["steps"] // 10), save_strategy="no", report_to="none",
            use_cpu=True, disable_tqdm=True)
        trainer = trainer_of(model, tokenizer, args, encoder(tokenizer, load_pairs("train"), src, tgt),
                             encoder(tokenizer, load_pairs("validation")[:EVAL_PAIRS], src, tgt))
        trainer.train()
        eval_loss = trainer.evaluate()["eval_loss"]
    cache_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    model.save_pretrained(cache_dir)
    tokenizer.save_pretrained(cache_dir)
    record_file.write_text(json.dumps({"dir": str(cache_dir), "settings_sha256": digest, "settings": settings,
                                       "eval_loss_en_de": eval_loss}, indent=2) + "\n")
    marker.write_text(digest + "\n")
    return weights_sha256(cache_dir)


def weights_sha256(model_dir: Path) -> str:
    """A hash of a saved model's tensors (names, dtypes, shapes, bytes): what a row's ``checkpoint`` names."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(model_dir / "model.safetensors").items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def train_and_record(model, tokenizer, arguments_class, trainer_of, flags: dict, data, learning_rate: float, seed: int,
                     steps: int, eval_steps: int, logging_steps: int, optimizer_builder=None) -> dict:
    """Fine-tune ``model`` with the Trainer (linear decay, no warm-up, unless ``flags`` say otherwise): the validation
    curve from step 0, the training losses, the learned LR multiplier, time and divergence."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as output_dir:
        settings = dict(
            output_dir=output_dir, max_steps=steps, per_device_train_batch_size=32, learning_rate=learning_rate,
            seed=seed, lr_scheduler_type="linear", warmup_steps=0, eval_strategy="steps", eval_steps=eval_steps,
            logging_steps=logging_steps, save_strategy="no", report_to="none", use_cpu=True, optim="adamw_torch",
            per_device_eval_batch_size=100, disable_tqdm=True,
            logging_nan_inf_filter=False,  # a diverged run must log its NaN, not the previous average
        )
        args = arguments_class(**{**settings, **flags})
        optimizer = optimizer_builder(model) if optimizer_builder is not None else None
        trainer = trainer_of(model, tokenizer, args, *data, optimizer)
        initial = trainer.evaluate()["eval_loss"]  # step 0: the pretrained model on the new task
        trainer.train()
        if not any(h.get("step") == steps and "eval_loss" in h for h in trainer.state.log_history):
            trainer.evaluate()
    history = trainer.state.log_history
    evals = [(0, initial)] + [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    logs = [h for h in history if "loss" in h]
    diverged = not all(math.isfinite(v) for v in [h["loss"] for h in logs] + [loss for _, loss in evals])
    return {"final": evals[-1][1] if not diverged else math.inf,
            "train_final": logs[-1]["loss"] if logs else math.nan, "eval_steps": [s for s, _ in evals],
            "losses": [loss for _, loss in evals], "diverged": diverged,
            "train_steps": [h["step"] for h in logs], "train_losses": [h["loss"] for h in logs],
            "learning_rates": [h.get("apo/learning_rate", h.get("learning_rate")) for h in logs],
            "lr_multiplier": [h["apo/lr_multiplier"] for h in logs if "apo/lr_multiplier" in h],
            "lr_multiplier_every": logging_steps, "wall_s": round(time.perf_counter() - started, 2)}
