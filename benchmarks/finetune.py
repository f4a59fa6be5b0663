"""Fine-tuning with APO-LR through the Trainer: a pretrained model and a guessed learning rate, as users meet it.

1. *Pretraining* (cached): the translation example's small Marian model (``examples/translation/offline_default.py``:
   its config and its BPE tokenizer, which covers both languages) is built from scratch with seed 0 and trained on
   English → German number words (AdamW lr 2e-3, 50 warmup steps then linear decay, batch 64). The checkpoint goes
   to ``<tmp>/hf_apo_benchmarks/finetune_pretrained`` with a ``COMPLETE`` marker holding a hash of the settings, and
   is reused while the hash matches.
2. *Fine-tuning*, a different task: German → English (the reverse direction), trained on the training split's pairs
   reversed and evaluated on the first 500 validation pairs reversed (no number is in both splits).
3. One run (:func:`finetune_run`) is ``APOSeq2SeqTrainer`` with the Trainer's defaults a user keeps (linear decay, no
   warmup, ``adamw_torch`` unless the flags set ``optim``), batch 32, a given learning rate, seed and APO flags; it records the eval loss (per target
   token, as the Trainer computes it) every 50 steps from step 0, the logged training losses, and the APO-LR
   multiplier and applied learning rate.

Each finished run is appended as one JSON line to ``--out``; runs already there (same config name, learning rate,
seed and steps) are skipped, so a killed sweep resumes where it stopped.

Usage::

    python benchmarks/finetune.py --lrs 1e-5 1e-4 1e-3 --seeds 0 1 2 \\
        --configs '{"adamw": {"apo": "none"}, "apo_lr": {"apo": "lr"}}' --steps 600 \\
        --out benchmarks/results/finetune_runs.jsonl          # about 1-2 min per run on one CPU thread
    python benchmarks/finetune.py --quick --out /tmp/finetune_quick.jsonl   # seconds: tests/test_trainer_benchmarks.py
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq, PrinterCallback

from benchmarks.common import DEFAULT_OUTPUT_DIR, REPO_ROOT, _jsonable, environment
from hf_apo import APOSeq2SeqTrainer, APOSeq2SeqTrainingArguments

sys.path.insert(0, str(REPO_ROOT / "examples" / "translation"))
import offline_default

CACHE_ROOT = Path(tempfile.gettempdir()) / "hf_apo_benchmarks"
MAX_LENGTH = 32
EVAL_PAIRS = 500
PRETRAIN = {"steps": 1200, "learning_rate": 2e-3, "warmup_steps": 50, "batch_size": 64, "seed": 0}
QUICK_PRETRAIN = {**PRETRAIN, "steps": 100}
DEFAULT_CONFIGS = {"adamw": {"apo": "none"}, "apo_lr": {"apo": "lr"}}


def quiet() -> None:
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights", "Writing model shards"


def load_pairs(split: str) -> list[dict]:
    prepared = offline_default.prepare(str(CACHE_ROOT / "offline_translation"))
    with open(prepared.data_files[split], encoding="utf-8") as reader:
        return [json.loads(line)["translation"] for line in reader]


def encode(tokenizer, pairs: list[dict], source: str, target: str) -> list[dict]:
    """Features for ``DataCollatorForSeq2Seq``: ``input_ids``, ``attention_mask``, ``labels`` (unpadded lists)."""
    enc = tokenizer([p[source] for p in pairs], text_target=[p[target] for p in pairs], max_length=MAX_LENGTH,
                    truncation=True)
    return [{key: enc[key][i] for key in ("input_ids", "attention_mask", "labels")} for i in range(len(pairs))]


def trainer_for(model, tokenizer, args, train, evaluation, optimizer=None) -> APOSeq2SeqTrainer:
    """``optimizer``: a torch optimizer to train with instead of ``--optim``'s (the Trainer still adds its schedule)."""
    trainer = APOSeq2SeqTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                                optimizers=(optimizer, None))
    trainer.remove_callback(PrinterCallback)  # each log dict printed to stdout
    return trainer


# ---------------------------------------------------------------------------------------------------------------
# pretraining (English → German), cached
# ---------------------------------------------------------------------------------------------------------------
def pretrained_checkpoint(cache_dir: Path, settings: dict) -> dict:
    """Pretrain (or reuse) the en→de Marian model in ``cache_dir``; returns its record (``pretrain.json``)."""
    def model_for(model_dir, tokenizer):
        return AutoModelForSeq2SeqLM.from_config(transformers.AutoConfig.from_pretrained(model_dir))

    return cached_pretraining(cache_dir, settings, {}, model_for, APOSeq2SeqTrainingArguments, trainer_for, encode)


def cached_pretraining(cache_dir: Path, settings: dict, fingerprint: dict, model_for, arguments_class, trainer_of,
                       encoder) -> dict:
    """Pretrain (or reuse) a model on en→de in ``cache_dir`` (finetune.py's and lora.py's): reused when the hash of
    ``settings``, ``fingerprint``, the corpus and the torch and transformers versions matches the one it was made with.
    ``model_for(model_dir, tokenizer)`` builds the fresh model; the Trainer comes from ``arguments_class`` and
    ``trainer_of``, the examples from ``encoder``. Returns the checkpoint's record (``pretrain.json``)."""
    digest = hashlib.sha256(json.dumps({
        **settings, **fingerprint, "corpus": offline_default.cache_fingerprint(), "eval_pairs": EVAL_PAIRS,
        "torch": torch.__version__, "transformers": transformers.__version__}, sort_keys=True).encode()).hexdigest()
    marker, record_file = cache_dir / "COMPLETE", cache_dir / "pretrain.json"
    if marker.is_file() and marker.read_text().strip() == digest and record_file.is_file():
        return json.loads(record_file.read_text())

    print(f"pretraining en→de for {settings['steps']} steps into {cache_dir}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    model_dir = offline_default.prepare(str(CACHE_ROOT / "offline_translation")).model_dir
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    torch.manual_seed(settings["seed"])
    model = model_for(model_dir, tokenizer)
    src, tgt = offline_default.SOURCE_LANG, offline_default.TARGET_LANG
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
    record = {"dir": str(cache_dir), "settings_sha256": digest, "settings": settings, "eval_loss_en_de": eval_loss,
              "train_losses": [[h["step"], h["loss"]] for h in trainer.state.log_history if "loss" in h],
              "wall_s": round(time.perf_counter() - started, 1), "torch_threads": torch.get_num_threads()}
    record_file.write_text(json.dumps(_jsonable(record), indent=2) + "\n")
    marker.write_text(digest + "\n")
    print(f"pretrained in {record['wall_s']} s, en→de eval loss {eval_loss:.4f}", file=sys.stderr, flush=True)
    return record


# ---------------------------------------------------------------------------------------------------------------
# fine-tuning (German → English)
# ---------------------------------------------------------------------------------------------------------------
def finetune_run(learning_rate: float, seed: int, apo_args: dict, steps: int = 600, *,
                 pretrained_dir: str | Path = CACHE_ROOT / "finetune_pretrained", eval_steps: int = 50,
                 logging_steps: int = 10, eval_pairs: int = EVAL_PAIRS, optimizer_builder=None) -> dict:
    """Fine-tune the pretrained checkpoint on de→en with ``APOSeq2SeqTrainer``; ``apo_args`` pass through as is.

    ``optimizer_builder(model)``: a torch optimizer (a peer from another package) used in place of ``--optim``'s,
    under the Trainer's own schedule (``apo_args`` must then keep ``apo="none"``).

    Returns ``final_eval_loss``; the eval curve ``eval_steps``/``eval_losses`` (from step 0); the logged
    ``train_steps``/``train_losses``; per training log ``lr_multiplier`` (``apo/lr_multiplier``, empty without APO)
    and ``learning_rates`` (``apo/learning_rate`` if logged, else the Trainer's ``learning_rate``); ``wall_s`` (the
    whole run, evaluations included) and ``diverged`` (a non-finite training or eval loss).
    """
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(pretrained_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(pretrained_dir)
    src, tgt = offline_default.TARGET_LANG, offline_default.SOURCE_LANG  # reversed: German → English
    train = encode(tokenizer, load_pairs("train"), src, tgt)
    evaluation = encode(tokenizer, load_pairs("validation")[:eval_pairs], src, tgt)
    return train_and_record(model, tokenizer, APOSeq2SeqTrainingArguments, trainer_for, apo_args, (train, evaluation),
                            learning_rate, seed, steps, eval_steps, logging_steps, optimizer_builder, started)


def train_and_record(model, tokenizer, arguments_class, trainer_of, config: dict, data, learning_rate: float, seed: int,
                     steps: int, eval_steps: int, logging_steps: int, optimizer_builder, started: float) -> dict:
    """Fine-tune ``model`` with the Trainer (linear decay, no warm-up, unless ``config`` says otherwise) and return the
    run's record: the validation curve from step 0, the training losses, the learned LR multiplier, time, divergence.
    This script's and lora.py's runs."""
    with tempfile.TemporaryDirectory() as output_dir:
        settings = dict(
            output_dir=output_dir, max_steps=steps, per_device_train_batch_size=32, learning_rate=learning_rate,
            seed=seed, lr_scheduler_type="linear", warmup_steps=0, eval_strategy="steps", eval_steps=eval_steps,
            logging_steps=logging_steps, save_strategy="no", report_to="none", use_cpu=True, optim="adamw_torch",
            per_device_eval_batch_size=100, disable_tqdm=True,
            logging_nan_inf_filter=False,  # a diverged run must log its NaN, not the previous average
        )
        args = arguments_class(**{**settings, **config})  # config may set apo*, optim, the schedule, ...
        optimizer = optimizer_builder(model) if optimizer_builder is not None else None
        trainer = trainer_of(model, tokenizer, args, *data, optimizer)
        # step 0: the pretrained model on the new task (kept here: train() starts a new log history)
        initial = trainer.evaluate()["eval_loss"]
        trainer.train()
        if not any(h.get("step") == steps and "eval_loss" in h for h in trainer.state.log_history):
            trainer.evaluate()
    history = trainer.state.log_history
    evals = [(0, initial)] + [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    logs = [h for h in history if "loss" in h]
    losses = [h["loss"] for h in logs] + [loss for _, loss in evals]
    return {
        "final_eval_loss": evals[-1][1],
        "eval_steps": [s for s, _ in evals],
        "eval_losses": [loss for _, loss in evals],
        "train_steps": [h["step"] for h in logs],
        "train_losses": [h["loss"] for h in logs],
        "lr_multiplier": [h["apo/lr_multiplier"] for h in logs if "apo/lr_multiplier" in h],
        # "learning_rates", not "learning_rate": a row's "learning_rate" is the run's initial learning rate
        "learning_rates": [h.get("apo/learning_rate", h.get("learning_rate")) for h in logs],
        "wall_s": round(time.perf_counter() - started, 2),
        "diverged": not all(math.isfinite(v) for v in losses),
    }


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def run_key(row: dict) -> tuple:
    return row["config"], float(row["learning_rate"]), int(row["seed"]), int(row["steps"])


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    return grid_arguments(__doc__, [1e-5, 1e-4, 1e-3], 600, "finetune", PRETRAIN, QUICK_PRETRAIN,
                          "APO keyword arguments of APOSeq2SeqTrainingArguments", argv)


def grid_arguments(doc: str, lrs: list[float], steps: int, name: str, pretrain: dict, quick_pretrain: dict,
                   configs_help: str, argv=None) -> argparse.Namespace:
    """The command line of this script and of lora.py: configs × LRs × seeds, appended to ``--out``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--lrs", type=float, nargs="+", default=lrs)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--configs", type=json.loads, default=DEFAULT_CONFIGS,
                        help=f"JSON object: config name -> {configs_help}")
    parser.add_argument("--steps", type=int, default=steps, help="fine-tuning steps per run")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUTPUT_DIR / f"{name}_runs.jsonl")
    parser.add_argument("--pretrained_dir", type=Path, default=None,
                        help=f"checkpoint cache (default <tmp>/hf_apo_benchmarks/{name}_pretrained[_quick])")
    parser.add_argument("--pretrain_steps", type=int, default=None, help=f"default {pretrain['steps']}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 keeps a shared machine's noise "
                        "low: 2 threads on 2 busy cores can slow a step by 10-100x)")
    parser.add_argument("--quick", action="store_true", help=f"seconds: pretrain {quick_pretrain['steps']} steps, "
                        "fine-tune 20 steps, the first seed and the largest learning rate, 100 eval pairs")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    return run_grid(args, pretrained_checkpoint, (PRETRAIN, QUICK_PRETRAIN), "finetune_pretrained", finetune_run,
                    "apo_args")


def run_grid(args, pretrain, pretrain_settings, cache_name: str, run, args_key: str, extra: dict | None = None):
    """Every config × LR × seed of ``args`` not yet in ``args.out``, each run with ``run`` on the checkpoint ``pretrain``
    makes (or reuses) and appended as it ends: the command line of this script and of lora.py. ``args_key`` names a
    row's config arguments; ``extra`` goes into every row."""
    torch.set_num_threads(args.threads)
    quiet()
    settings = dict(pretrain_settings[1] if args.quick else pretrain_settings[0])
    if args.pretrain_steps is not None:
        settings["steps"] = args.pretrain_steps
    pretrained_dir = args.pretrained_dir or CACHE_ROOT / (f"{cache_name}_quick" if args.quick else cache_name)
    pretrained = pretrain(pretrained_dir, settings)
    lrs, seeds, steps, run_options = args.lrs, args.seeds, args.steps, {}
    if args.quick:
        lrs, seeds, steps = [max(args.lrs)], args.seeds[:1], 20
        run_options = {"eval_steps": 10, "logging_steps": 5, "eval_pairs": 100}
    info = environment()
    existing = {run_key(row): row for row in read_rows(args.out)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows, skipped = [], 0
    for name, config in args.configs.items():
        for lr, seed in ((lr, seed) for lr in lrs for seed in seeds):
            key = (name, float(lr), seed, steps)
            if key in existing:
                if existing[key][args_key] != config:
                    print(f"warning: {key} is in {args.out} with {args_key} {existing[key][args_key]}, not {config}; "
                          "skipped anyway (rename the config to run it)", file=sys.stderr)
                skipped += 1
                continue
            result = run(lr, seed, config, steps, pretrained_dir=pretrained_dir, **run_options)
            row = {"config": name, args_key: config, "learning_rate": lr, "seed": seed, "steps": steps,
                   **result, "quick": args.quick, **(extra or {}),
                   "pretrained": {k: pretrained[k] for k in ("settings_sha256", "settings", "eval_loss_en_de")},
                   "environment": {**info, "load_average_at_end": list(os.getloadavg())}}
            with open(args.out, "a", encoding="utf-8") as writer:
                writer.write(json.dumps(_jsonable(row), allow_nan=False) + "\n")
            rows.append(row)
            print(f"{name} lr={lr:g} seed={seed}: eval loss {result['eval_losses'][0]:.4f} -> "
                  f"{result['final_eval_loss']:.4f} in {result['wall_s']:.1f} s"
                  + (" (diverged)" if result["diverged"] else ""), file=sys.stderr, flush=True)
    if skipped:
        print(f"{skipped} run(s) already in {args.out}: skipped", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
