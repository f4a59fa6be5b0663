"""LoRA fine-tuning through the Trainer and PEFT: a small pretrained causal LM (Llama, hidden 128, 2 layers, untied
embeddings; pretrained on en→de number words, cached) adapted to de→en. One causal sequence per pair,
``<s> {source} = {target} </s>``, labels -100 on the prompt; LoRA r 8, alpha 16 on every attention and MLP
projection, embeddings and ``lm_head`` frozen. The seed is set before the adapters are drawn, so a run is
reproducible from its row (before this, ``get_peft_model`` drew them from an unseeded state)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

from benchmarks.tasks import Task
from benchmarks.tasks._trainer import cached_pretraining, fine_tuning_data, pretrained_dir, quiet, train_and_record

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


def trainer_for(model, tokenizer, args, train, evaluation, optimizer=None):
    from hf_apo import APOTrainer

    collator = transformers.DataCollatorForSeq2Seq(tokenizer, model=None, label_pad_token_id=-100)
    trainer = APOTrainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation, data_collator=collator,
                         optimizers=(optimizer, None))
    trainer.remove_callback(transformers.PrinterCallback)
    return trainer


def lora_model(directory: str | Path, seed: int):
    """The pretrained model wrapped for LoRA, its adapters drawn after seeding; only the adapters train (asserted)."""
    import peft

    base = transformers.LlamaForCausalLM.from_pretrained(directory)
    transformers.set_seed(seed)
    model = peft.get_peft_model(base, peft.LoraConfig(**LORA))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable), trainable
    return model


def checkpoint(quick: bool = False) -> str:
    from hf_apo import APOTrainingArguments

    def model_for(model_dir, tokenizer):
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, **MODEL))

    return cached_pretraining(pretrained_dir("lora", quick), QUICK_PRETRAIN if quick else PRETRAIN, {"model": MODEL},
                              model_for, APOTrainingArguments, trainer_for, encode)


def run(flags: dict, lr: float, seed: int, steps: int, eval_every: int, quick: bool, optimizer_builder=None) -> dict:
    from hf_apo import APOTrainingArguments

    quiet()
    tokenizer = transformers.AutoTokenizer.from_pretrained(pretrained_dir("lora", quick))
    model = lora_model(pretrained_dir("lora", quick), seed)
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    record = train_and_record(model, tokenizer, APOTrainingArguments, trainer_for, flags,
                              fine_tuning_data(encode, tokenizer, quick), lr, seed, steps, eval_every,
                              5 if quick else 10, optimizer_builder)
    # the base model must not have moved: only the adapters train
    assert all(torch.equal(p, frozen[name]) for name, p in model.named_parameters() if name in frozen)
    return record


TASK = Task("lora", "LoRA (r 8) fine-tune of a small pretrained Llama, en→de pretrained, de→en fine-tuned, through "
            "APOTrainer + PEFT with the Trainer's default linear decay", "kl",
            {"long": (300, 25, (0, 1))}, trainer=sys.modules[__name__], default_schedule="linear")
