"""Fine-tuning a pretrained model through the Trainer, as users meet APO: the translation example's Marian model
pretrained on English → German number words (cached), fine-tuned on German → English (the training pairs reversed;
eval loss per target token on the first 500 validation pairs reversed) with ``APOSeq2SeqTrainer`` and the Trainer's
defaults a user keeps (linear decay, no warm-up, batch 32)."""

from __future__ import annotations

import sys

import transformers

from benchmarks.tasks import Task
from benchmarks.tasks._trainer import cached_pretraining, fine_tuning_data, pretrained_dir, quiet, train_and_record

PRETRAIN = {"steps": 1200, "learning_rate": 2e-3, "warmup_steps": 50, "batch_size": 64, "seed": 0}
QUICK_PRETRAIN = {**PRETRAIN, "steps": 100}
MAX_LENGTH = 32


def encode(tokenizer, pairs: list[dict], source: str, target: str) -> list[dict]:
    enc = tokenizer([p[source] for p in pairs], text_target=[p[target] for p in pairs], max_length=MAX_LENGTH,
                    truncation=True)
    return [{key: enc[key][i] for key in ("input_ids", "attention_mask", "labels")} for i in range(len(pairs))]


def trainer_for(model, tokenizer, args, train, evaluation, optimizer=None):
    from hf_apo import APOSeq2SeqTrainer

    trainer = APOSeq2SeqTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                                data_collator=transformers.DataCollatorForSeq2Seq(tokenizer, model=model),
                                optimizers=(optimizer, None))
    trainer.remove_callback(transformers.PrinterCallback)
    return trainer


def checkpoint(quick: bool = False) -> str:
    """The hash of the pretrained checkpoint's weights (pretrained now if this machine has none cached)."""
    from hf_apo import APOSeq2SeqTrainingArguments

    def model_for(model_dir, tokenizer):
        return transformers.AutoModelForSeq2SeqLM.from_config(transformers.AutoConfig.from_pretrained(model_dir))

    return cached_pretraining(pretrained_dir("finetune", quick), QUICK_PRETRAIN if quick else PRETRAIN, {}, model_for,
                              APOSeq2SeqTrainingArguments, trainer_for, encode)


def run(flags: dict, lr: float, seed: int, steps: int, eval_every: int, quick: bool, optimizer_builder=None) -> dict:
    from hf_apo import APOSeq2SeqTrainingArguments

    quiet()
    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained_dir("finetune", quick))
    transformers.set_seed(seed)
    model = transformers.AutoModelForSeq2SeqLM.from_pretrained(pretrained_dir("finetune", quick))
    return train_and_record(model, tokenizer, APOSeq2SeqTrainingArguments, trainer_for, flags,
                            fine_tuning_data(encode, tokenizer, quick), lr, seed, steps, eval_every,
                            5 if quick else 10, optimizer_builder)


TASK = Task("finetune", "a Marian model pretrained on en→de number words, fine-tuned on de→en through "
            "APOSeq2SeqTrainer with the Trainer's default linear decay", "kl",
            {"long": (600, 50, (0, 1))}, trainer=sys.modules[__name__], default_schedule="linear")
