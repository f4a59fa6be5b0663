"""The translation example's corpus (English → German number words), its BPE tokenizer and its model config
(``examples/translation/offline_default.py``), built from scratch; token cross-entropy on 512 validation pairs."""

import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.tasks import Task, TaskData, seq2seq_data

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_LENGTH, VAL_EXAMPLES = 32, 512


def offline_default():
    sys.path.insert(0, str(REPO_ROOT / "examples" / "translation"))
    import offline_default as module

    return module, module.prepare(str(Path(tempfile.gettempdir()) / "hf_apo_benchmarks" / "offline_translation"))


def load(quick: bool = False) -> TaskData:
    from transformers import AutoConfig, AutoModelForSeq2SeqLM, PreTrainedTokenizerFast

    module, prepared = offline_default()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(prepared.model_dir)
    config = AutoConfig.from_pretrained(prepared.model_dir)

    def encode(split: str, limit: int | None) -> dict[str, torch.Tensor]:
        with open(prepared.data_files[split], encoding="utf-8") as reader:
            pairs = [json.loads(line)["translation"] for line in reader][:limit]
        tokens = {side: tokenizer([p[lang] for p in pairs], max_length=MAX_LENGTH, truncation=True,
                                  padding="max_length", return_tensors="pt")
                  for side, lang in (("source", module.SOURCE_LANG), ("target", module.TARGET_LANG))}
        labels = tokens["target"]["input_ids"]
        return {"input_ids": tokens["source"]["input_ids"], "attention_mask": tokens["source"]["attention_mask"],
                "labels": labels.masked_fill(labels == tokenizer.pad_token_id, -100)}

    train, val = encode("train", 2000 if quick else None), encode("validation", 64 if quick else VAL_EXAMPLES)

    def build(seed: int):
        torch.manual_seed(seed)
        return AutoModelForSeq2SeqLM.from_config(config)

    return seq2seq_data(train, val, build)


TASK = Task("translation", "the example's English→German number words, its BPE tokenizer and its model config (a "
            "Marian transformer built from scratch), token cross-entropy on 512 validation pairs", "kl",
            {"short": (250, 25, (0, 1, 2)), "long": (1500, 150, (0, 1)), "quick": (10, 5, (0,))}, load=load)
