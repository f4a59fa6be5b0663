"""LoRA fine-tuning with APO through the Trainer and PEFT: a small pretrained causal LM adapted to a new task.

The decoder-only analogue of ``benchmarks/finetune.py`` (whose helpers it imports):

1. *Data*: the translation example's number words (``examples/translation/offline_default.py``) and its BPE tokenizer
   (both languages), one causal sequence per pair: ``<s> {source} = {target} </s>``, with labels -100 on the prompt
   ``<s> {source} =`` and on padding. The corpus has no "=", so the tokenizer spells it "▁" "<unk>": a separator that
   occurs nowhere else.
2. *Pretraining* (cached): a ``LlamaForCausalLM`` (hidden 128, 2 layers, 4 heads, MLP 256, untied embeddings) built
   from scratch with seed 0 and fully trained on English → German through ``APOTrainer`` with ``apo="none"`` (AdamW lr
   3e-3, 50 warmup steps then linear decay, batch 64, 600 steps: about 2 min on one CPU thread, en→de eval loss
   0.002, and greedy decoding exact on the validation pairs looked at). The checkpoint goes to
   ``<tmp>/hf_apo_benchmarks/lora_pretrained`` with a ``COMPLETE`` marker holding a hash of the settings, and is
   reused while the hash matches.
3. *Fine-tuning* (:func:`lora_run`), a different task: German → English, trained on the training split's pairs
   reversed and evaluated on the first 500 validation pairs reversed. The model is wrapped by ``peft.get_peft_model``
   (LoRA r 8, alpha 16 on every attention and MLP projection; embeddings and ``lm_head`` frozen) and trained by
   ``APOTrainer`` with the Trainer's defaults a user keeps (linear decay, no warmup, ``adamw_torch`` unless the
   trainer arguments say otherwise), batch 32. It records what ``finetune.finetune_run`` records. A first look (seed 0,
   AdamW, 150 steps): de→en eval loss 11.17 at step 0, then 7.34 at lr 1e-4, 3.26 at 1e-3, 2.27 at 1e-2, 3.72 at 3e-2
   and 3.61 at 1e-1; 1.96 after 300 steps at 1e-2.

Each finished run is appended as one JSON line to ``--out``; runs already there (same config name, learning rate,
seed and steps) are skipped, so a killed sweep resumes where it stopped.

Usage::

    python benchmarks/lora.py --lrs 1e-4 1e-3 1e-2 --seeds 0 1 2 \\
        --configs '{"adamw": {"apo": "none"}, "apo_lr": {"apo": "lr"}}' --steps 300 \\
        --out benchmarks/results/lora_runs.jsonl          # about 45 s per run on one CPU thread
    python benchmarks/lora.py --quick --out /tmp/lora_quick.jsonl   # seconds: tests/test_trainer_benchmarks.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import peft
import torch
from transformers import AutoTokenizer, DataCollatorForSeq2Seq, LlamaConfig, LlamaForCausalLM, PrinterCallback

from benchmarks.finetune import (
    CACHE_ROOT, EVAL_PAIRS, cached_pretraining, grid_arguments, load_pairs, offline_default, run_grid,
    train_and_record,
)
from hf_apo import APOTrainer, APOTrainingArguments

MODEL = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 256,
         "max_position_embeddings": 128, "tie_word_embeddings": False}
PRETRAIN = {"steps": 600, "learning_rate": 3e-3, "warmup_steps": 50, "batch_size": 64, "seed": 0}
QUICK_PRETRAIN = {**PRETRAIN, "steps": 60}
LORA = {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def encode(tokenizer, pairs: list[dict], source: str, target: str) -> list[dict]:
    """Causal features ``<s> {source} = {target} </s>``; ``labels`` are -100 on the prompt (unpadded lists)."""
    prompts = tokenizer([f"{p[source]} =" for p in pairs], add_special_tokens=False)["input_ids"]
    answers = tokenizer([p[target] for p in pairs], add_special_tokens=False)["input_ids"]
    features = []
    for prompt, answer in zip(prompts, answers):
        prompt, answer = [tokenizer.bos_token_id] + prompt, answer + [tokenizer.eos_token_id]
        features.append({"input_ids": prompt + answer, "attention_mask": [1] * (len(prompt) + len(answer)),
                         "labels": [-100] * len(prompt) + answer})
    return features


def trainer_for(model, tokenizer, args, train, evaluation, optimizer=None) -> APOTrainer:
    # pads input_ids with <pad> and labels with -100 (the features carry their own labels: no model needed)
    collator = DataCollatorForSeq2Seq(tokenizer, model=None, label_pad_token_id=-100)
    trainer = APOTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
                         optimizers=(optimizer, None))
    trainer.remove_callback(PrinterCallback)  # each log dict printed to stdout
    return trainer


def lora_model(pretrained_dir: str | Path) -> peft.PeftModel:
    """The pretrained model wrapped for LoRA; only the adapters train (asserted)."""
    model = peft.get_peft_model(LlamaForCausalLM.from_pretrained(pretrained_dir), peft.LoraConfig(**LORA))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable), trainable
    return model


# ---------------------------------------------------------------------------------------------------------------
# pretraining (English → German, full fine-tuning), cached
# ---------------------------------------------------------------------------------------------------------------
def pretrained_checkpoint(cache_dir: Path, settings: dict) -> dict:
    """Pretrain (or reuse) the en→de Llama in ``cache_dir``; returns its record (``pretrain.json``)."""
    def model_for(model_dir, tokenizer):
        return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                            **MODEL))

    return cached_pretraining(cache_dir, settings, {"model": MODEL}, model_for, APOTrainingArguments, trainer_for,
                              encode)


# ---------------------------------------------------------------------------------------------------------------
# LoRA fine-tuning (German → English)
# ---------------------------------------------------------------------------------------------------------------
def lora_run(learning_rate: float, seed: int, trainer_args: dict, steps: int = 300, *,
             pretrained_dir: str | Path = CACHE_ROOT / "lora_pretrained", eval_steps: int = 25,
             logging_steps: int = 10, eval_pairs: int = EVAL_PAIRS, optimizer_builder=None) -> dict:
    """LoRA-fine-tune the pretrained checkpoint on de→en with ``APOTrainer``; ``trainer_args`` pass through as is.

    ``optimizer_builder(model)``, if given, returns a torch optimizer over the PEFT model's trainable parameters; the
    Trainer puts its own schedule on it. Returns the keys of ``finetune.finetune_run``: ``final_eval_loss``; the eval
    curve ``eval_steps``/``eval_losses`` (from step 0); the logged ``train_steps``/``train_losses``; per training log
    ``lr_multiplier`` (empty without APO) and ``learning_rates``; ``wall_s`` and ``diverged``.
    """
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(pretrained_dir)
    model = lora_model(pretrained_dir)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    src, tgt = offline_default.TARGET_LANG, offline_default.SOURCE_LANG  # reversed: German → English
    train = encode(tokenizer, load_pairs("train"), src, tgt)
    evaluation = encode(tokenizer, load_pairs("validation")[:eval_pairs], src, tgt)
    record = train_and_record(model, tokenizer, APOTrainingArguments, trainer_for, trainer_args, (train, evaluation),
                              learning_rate, seed, steps, eval_steps, logging_steps, optimizer_builder, started)
    # the base model must not have moved: only the adapters train
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    return record


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    return grid_arguments(__doc__, [1e-4, 1e-3, 1e-2], 300, "lora", PRETRAIN, QUICK_PRETRAIN,
                          "keyword arguments of APOTrainingArguments (apo*, optim, ...)", argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    return run_grid(args, pretrained_checkpoint, (PRETRAIN, QUICK_PRETRAIN), "lora_pretrained", lora_run,
                    "trainer_args", extra={"lora": LORA})


if __name__ == "__main__":
    main()
