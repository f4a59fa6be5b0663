#!/usr/bin/env python
# Copyright 2024 The hf_apo authors and The HuggingFace Team. Licensed under the Apache License, Version 2.0.
"""Fine-tune (or train from scratch) a sequence-to-sequence model for translation, optionally with APO.

This is the Hugging Face ``examples/pytorch/translation/run_translation.py`` for transformers 5.x with two names
changed, ``APOSeq2SeqTrainingArguments`` and ``APOSeq2SeqTrainer``: ``--apo lr`` meta-learns the learning rate of
``--optim``, ``--apo precond`` a per-layer preconditioner over ``--optim sgd``, and ``--apo none`` (the default) is the
plain ``Seq2SeqTrainer``.

Given no model and no data, it trains a small Marian transformer from scratch on English→German number words with a
locally trained tokenizer (see ``offline_default.py``), with no network::

    python examples/translation/run_translation.py --output_dir out/demo --apo lr

Data comes from the Hub (``--dataset_name``) or from files (``--train_file`` ...): JSON lines with one
``{"translation": {"en": "...", "de": "..."}}`` record per line, or CSV with one column per language code.
Bad input ends with one line, ``error: ...``, on stderr and exit code 2.
"""

import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field

import datasets
import evaluate
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as paj
import torch
import transformers
from datasets import Dataset, DatasetDict, load_dataset
from datasets.table import InMemoryTable
from huggingface_hub import constants as hub_constants
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    HfArgumentParser,
    M2M100Tokenizer,
    MBart50Tokenizer,
    MBartTokenizer,
    NllbTokenizer,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from hf_apo import APOSeq2SeqTrainer, APOSeq2SeqTrainingArguments

# Modules beside this script.
import offline_default
from plot_training import plot_training


logger = logging.getLogger(__name__)

# Multilingual tokenizers that need src_lang and tgt_lang (and usually --forced_bos_token).
MULTILINGUAL_TOKENIZERS = (MBartTokenizer, MBart50Tokenizer, M2M100Tokenizer, NllbTokenizer)
DATA_FILE_EXTENSIONS = ("json", "jsonl", "csv")
SPLIT_FLAGS = {"train": "--train_file", "validation": "--validation_file", "test": "--test_file"}
LOCAL_SACREBLEU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "sacrebleu_local")


class InputError(Exception):
    """A problem with the command line or the input data; ``main`` prints it as one line and exits with code 2."""


@dataclass
class ModelArguments:
    """
    Arguments pertaining to which model/config/tokenizer we are going to fine-tune from.
    """

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Path to a pretrained model or model identifier from huggingface.co/models. Leave it out to train "
            "a new model from --config_name and --tokenizer_name (or, with no data either, the offline default)."
        },
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Pretrained config name or path if not the same as model_name_or_path."}
    )
    tokenizer_name: str | None = field(
        default=None, metadata={"help": "Pretrained tokenizer name or path if not the same as model_name_or_path."}
    )
    cache_dir: str | None = field(
        default=None,
        metadata={"help": "Where to store the pretrained models and datasets downloaded from huggingface.co."},
    )
    model_revision: str = field(
        default="main",
        metadata={"help": "The specific model version to use (can be a branch name, tag name or commit id)."},
    )
    token: str | None = field(
        default=None,
        metadata={"help": "The token to use as HTTP bearer authorization for remote files (private models)."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow models defined on the Hub in their own modeling files. Only for repositories you trust."
        },
    )


@dataclass
class DataTrainingArguments:
    """
    Arguments pertaining to what data we are going to input our model for training and eval.
    """

    source_lang: str | None = field(default=None, metadata={"help": "Source language id for translation."})
    target_lang: str | None = field(default=None, metadata={"help": "Target language id for translation."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "The name of the dataset to use (via the datasets library)."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "The configuration name of the dataset to use (via the datasets library)."}
    )
    train_file: str | None = field(
        default=None,
        metadata={
            "help": 'The training data: a JSON lines file (.json/.jsonl) of {"translation": {<source_lang>: ..., '
            "<target_lang>: ...}} records, or a CSV file with one column per language code."
        },
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "The evaluation data (BLEU, exact match), in the format of --train_file."}
    )
    test_file: str | None = field(
        default=None, metadata={"help": "The prediction data, in the format of --train_file."}
    )
    overwrite_cache: bool = field(
        default=False, metadata={"help": "Overwrite the cached training and evaluation sets."}
    )
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "The number of processes to use for the preprocessing."}
    )
    max_source_length: int = field(
        default=1024,
        metadata={
            "help": "The maximum total input sequence length after tokenization; longer sequences are truncated."
        },
    )
    max_target_length: int = field(
        default=128,
        metadata={
            "help": "The maximum total target sequence length after tokenization; longer sequences are truncated."
        },
    )
    val_max_target_length: int | None = field(
        default=None,
        metadata={
            "help": "The maximum total target sequence length for validation and test targets, and the default "
            "`max_length` of `model.generate` when --generation_max_length is not given. Defaults to "
            "--max_target_length."
        },
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "Whether to pad all samples to the maximum length. If False, pad dynamically per batch to the "
            "longest sample (faster on GPU and CPU; TPUs want fixed shapes)."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={
            "help": "For debugging or quicker training, truncate the number of training examples to this value."
        },
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={
            "help": "For debugging or quicker training, truncate the number of evaluation examples to this value."
        },
    )
    max_predict_samples: int | None = field(
        default=None,
        metadata={
            "help": "For debugging or quicker training, truncate the number of prediction examples to this value."
        },
    )
    num_beams: int | None = field(
        default=None,
        metadata={
            "help": "Number of beams for `model.generate` in evaluate and predict. Defaults to --generation_num_beams."
        },
    )
    ignore_pad_token_for_loss: bool = field(
        default=True,
        metadata={"help": "Whether to ignore the padded positions of the labels in the loss."},
    )
    source_prefix: str | None = field(
        default=None, metadata={"help": "A prefix to add before every source text (useful for T5 models)."}
    )
    forced_bos_token: str | None = field(
        default=None,
        metadata={
            "help": "The token to force as the first generated token after the decoder_start_token_id, e.g. the "
            "target language token of multilingual models such as mBART."
        },
    )
    offline_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the offline default (no model and no data given) writes its corpus, tokenizer and model "
            "config. Defaults to <output_dir>/offline_default."
        },
    )
    bleu_tokenize: str | None = field(
        default=None,
        metadata={
            "help": "The SacreBLEU tokenizer for BLEU: '13a' (SacreBLEU's default, the WMT standard), 'intl', 'char', "
            "'zh', 'ja-mecab', ... The offline default uses 'char': a German number is a single word, and word BLEU "
            "of one-word sentences is 0 unless they are exact."
        },
    )
    metric_from_hub: bool = field(
        default=False,
        metadata={
            "help": "Load the sacrebleu metric from the Hugging Face Hub instead of the local copy in "
            "metrics/sacrebleu_local (same scores). Falls back to the local copy when the Hub cannot be reached."
        },
    )

    def __post_init__(self):
        has_data = self.dataset_name is not None or any(
            path is not None for path in (self.train_file, self.validation_file, self.test_file)
        )
        if has_data and (self.source_lang is None or self.target_lang is None):
            raise ValueError("--source_lang and --target_lang are required with --dataset_name or data files.")
        for flag in ("train_file", "validation_file", "test_file"):
            path = getattr(self, flag)
            if path is not None and path.rsplit(".", 1)[-1].lower() not in DATA_FILE_EXTENSIONS:
                raise ValueError(f"--{flag} {path}: must be a .json, .jsonl or .csv file.")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length


def main():
    """Run the script; bad input ends with one line ``error: ...`` on stderr and exit code 2."""
    try:
        run(*parse_arguments())
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def parse_arguments():
    """The three argument dataclasses, from the command line or from a single ``.json`` file argument.

    With no model and no data, the offline default runs, and ``offline_default.ARGUMENT_DEFAULTS`` replace the
    defaults of the flags the user did not give.
    """
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, APOSeq2SeqTrainingArguments))
    json_arguments = None
    if len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        # If we pass only one argument to the script and it's the path to a json file, let's parse it to get our
        # arguments.
        try:
            with open(sys.argv[1], encoding="utf-8") as reader:
                json_arguments = json.load(reader)
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"{sys.argv[1]}: cannot read the arguments file: {err}") from err

    def parse(defaults):
        if json_arguments is not None:
            return parser.parse_dict({**defaults, **json_arguments})
        parser.set_defaults(**defaults)
        return parser.parse_args_into_dataclasses()

    try:
        model_args, data_args, training_args = parse({})
        if is_offline_default(model_args, data_args):
            model_args, data_args, training_args = parse(offline_default.ARGUMENT_DEFAULTS)
    except ValueError as err:
        # The dataclasses' __post_init__ checks (ours, TrainingArguments', hf_apo's) name the flag and the fix.
        raise InputError(str(err)) from err
    return model_args, data_args, training_args


def is_offline_default(model_args: ModelArguments, data_args: DataTrainingArguments) -> bool:
    """Whether neither a model nor data was given, so that the embedded English→German task runs."""
    return all(
        value is None
        for value in (
            model_args.model_name_or_path,
            model_args.config_name,
            model_args.tokenizer_name,
            data_args.dataset_name,
            data_args.train_file,
            data_args.validation_file,
            data_args.test_file,
        )
    )


def check_model_and_data_given(model_args: ModelArguments, data_args: DataTrainingArguments) -> None:
    """Outside the offline default, a model (or a config and tokenizer to train from scratch) and data are needed."""
    if model_args.model_name_or_path is None and model_args.config_name is None:
        raise InputError(
            "no model: pass --model_name_or_path, or --config_name and --tokenizer_name to train from scratch (or "
            "pass neither a model nor data to run the offline default)"
        )
    if model_args.model_name_or_path is None and model_args.tokenizer_name is None:
        raise InputError("--config_name without --model_name_or_path needs --tokenizer_name")
    if data_args.dataset_name is None and all(
        path is None for path in (data_args.train_file, data_args.validation_file, data_args.test_file)
    ):
        raise InputError(
            "no data: pass --dataset_name, or --train_file / --validation_file / --test_file (or pass neither a "
            "model nor data to run the offline default)"
        )


def run(model_args: ModelArguments, data_args: DataTrainingArguments, training_args: APOSeq2SeqTrainingArguments):
    """Load the data and the model, then train, evaluate and predict as ``training_args`` says."""
    # Setup logging
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    if training_args.should_log:
        # The default of training_args.log_level is passive, so we set log level at info here to have that default.
        transformers.utils.logging.set_verbosity_info()

    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    offline_default.logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()

    # Log on each process the small summary:
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"n_gpu: {training_args.n_gpu}, distributed training: {training_args.parallel_mode.value == 'distributed'}, "
        f"16-bits training: {training_args.fp16}, apo: {training_args.apo}"
    )
    logger.info(f"Training/evaluation parameters {training_args}")

    if data_args.source_prefix is None and model_args.model_name_or_path in [
        "google-t5/t5-small",
        "google-t5/t5-base",
        "google-t5/t5-large",
        "google-t5/t5-3b",
        "google-t5/t5-11b",
    ]:
        logger.warning(
            "You're running a t5 model but didn't provide a source prefix, which is expected, e.g. with "
            "`--source_prefix 'translate English to German: ' `"
        )

    if is_offline_default(model_args, data_args):
        if training_args.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            # The embedded model has 1M parameters. On 2 cores one thread took 80 ms a step; two threads took 56 ms
            # at best, but 1.5-3.7 s whenever another process was using the cores.
            logger.info("Using one CPU thread for the small offline model (set OMP_NUM_THREADS to choose).")
            torch.set_num_threads(1)
        cache_dir = data_args.offline_cache_dir or os.path.join(training_args.output_dir, "offline_default")
        with training_args.main_process_first(desc="writing the offline corpus and tokenizer"):
            offline = offline_default.prepare(cache_dir)
        data_args.train_file = offline.data_files["train"]
        data_args.validation_file = offline.data_files["validation"]
        data_args.test_file = offline.data_files["test"]
        model_args.config_name = model_args.tokenizer_name = offline.model_dir
    else:
        check_model_and_data_given(model_args, data_args)

    # Detecting last checkpoint.
    last_checkpoint = None
    if os.path.isdir(training_args.output_dir) and training_args.do_train:
        last_checkpoint = get_last_checkpoint(training_args.output_dir)
        if last_checkpoint is not None and training_args.resume_from_checkpoint is None:
            logger.info(
                f"Checkpoint detected, resuming training at {last_checkpoint}. To avoid this behavior, change "
                "the `--output_dir` or delete its checkpoint-* folders."
            )

    # Set seed before initializing model.
    set_seed(training_args.seed)

    # Get the datasets: the translation pairs end up in a "translation" column of {source_lang: ..., target_lang: ...}
    # records, whether they come from the Hub or from JSON lines or CSV files. load_dataset lets only one local
    # process download a Hub dataset at a time.
    raw_datasets = load_raw_datasets(model_args, data_args)
    for split, flag in (("train", "--do_train"), ("validation", "--do_eval"), ("test", "--do_predict")):
        if getattr(training_args, flag[2:]) and split not in raw_datasets:
            raise InputError(f"{flag} needs a {split} split: pass {SPLIT_FLAGS[split]} or a dataset that has one")

    # Load pretrained model and tokenizer. The .from_pretrained methods guarantee that only one local process can
    # concurrently download model & vocab.
    hub_kwargs = {
        "cache_dir": model_args.cache_dir,
        "revision": model_args.model_revision,
        "token": model_args.token,
        "trust_remote_code": model_args.trust_remote_code,
    }
    config_flag, config_source = (
        ("--config_name", model_args.config_name)
        if model_args.config_name
        else ("--model_name_or_path", model_args.model_name_or_path)
    )
    config = from_pretrained(AutoConfig, config_flag, config_source, **hub_kwargs)
    tokenizer_flag, tokenizer_source = (
        ("--tokenizer_name", model_args.tokenizer_name)
        if model_args.tokenizer_name
        else ("--model_name_or_path", model_args.model_name_or_path)
    )
    tokenizer = from_pretrained(AutoTokenizer, tokenizer_flag, tokenizer_source, **hub_kwargs)
    if model_args.model_name_or_path:
        model = from_pretrained(
            AutoModelForSeq2SeqLM, "--model_name_or_path", model_args.model_name_or_path, config=config, **hub_kwargs
        )
    else:
        model = AutoModelForSeq2SeqLM.from_config(config, trust_remote_code=model_args.trust_remote_code)
        num_parameters = sum(p.numel() for p in model.parameters())
        logger.info(f"Training a new {config.model_type} model from scratch: {num_parameters / 1e6:.2f}M parameters")

    # Some seq2seq models raise NotImplementedError in resize_token_embeddings: resize only when the tokenizer has
    # tokens the embedding matrix cannot look up.
    embedding_size = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > embedding_size:
        model.resize_token_embeddings(len(tokenizer))

    # Set decoder_start_token_id
    if model.config.decoder_start_token_id is None and isinstance(tokenizer, MBartTokenizer):
        model.config.decoder_start_token_id = tokenizer.convert_tokens_to_ids(data_args.target_lang)
    if model.config.decoder_start_token_id is None:
        raise InputError(f"{config_source}: the model config has no decoder_start_token_id")

    prefix = data_args.source_prefix if data_args.source_prefix is not None else ""

    # Preprocessing the datasets.
    # We need to tokenize inputs and targets.
    if training_args.do_train:
        column_names = raw_datasets["train"].column_names
    elif training_args.do_eval:
        column_names = raw_datasets["validation"].column_names
    elif training_args.do_predict:
        column_names = raw_datasets["test"].column_names
    else:
        logger.info("There is nothing to do. Please pass `do_train`, `do_eval` and/or `do_predict`.")
        return

    # For translation we set the codes of our source and target languages (only useful for mBART, the others will
    # ignore those attributes).
    if isinstance(tokenizer, MULTILINGUAL_TOKENIZERS):
        tokenizer.src_lang = data_args.source_lang
        tokenizer.tgt_lang = data_args.target_lang

        # For multilingual translation models like mBART-50 and M2M100 we need to force the target language token
        # as the first generated token. We ask the user to explicitly provide this as --forced_bos_token argument.
        if data_args.forced_bos_token is not None:
            model.config.forced_bos_token_id = tokenizer.convert_tokens_to_ids(data_args.forced_bos_token)

    # Get the language codes for input/target.
    source_lang = data_args.source_lang.split("_")[0]
    target_lang = data_args.target_lang.split("_")[0]

    # Temporarily set max_target_length for training.
    max_target_length = data_args.max_target_length
    padding = "max_length" if data_args.pad_to_max_length else False

    if training_args.label_smoothing_factor > 0 and not hasattr(model, "prepare_decoder_input_ids_from_labels"):
        logger.warning(
            "label_smoothing is enabled but the `prepare_decoder_input_ids_from_labels` method is not defined for "
            f"`{model.__class__.__name__}`. This will lead to loss being calculated twice and will take up more memory"
        )

    def preprocess_function(examples):
        inputs = [prefix + ex[source_lang] for ex in examples["translation"]]
        targets = [ex[target_lang] for ex in examples["translation"]]
        model_inputs = tokenizer(inputs, max_length=data_args.max_source_length, padding=padding, truncation=True)

        # Tokenize targets with the `text_target` keyword argument
        labels = tokenizer(text_target=targets, max_length=max_target_length, padding=padding, truncation=True)

        # If we are padding here, replace all tokenizer.pad_token_id in the labels by -100 when we want to ignore
        # padding in the loss.
        if padding == "max_length" and data_args.ignore_pad_token_for_loss:
            labels["input_ids"] = [
                [(token if token != tokenizer.pad_token_id else -100) for token in label]
                for label in labels["input_ids"]
            ]

        model_inputs["labels"] = labels["input_ids"]
        return model_inputs

    def prepare_split(split, max_samples):
        dataset = raw_datasets[split]
        if max_samples is not None:
            dataset = dataset.select(range(min(len(dataset), max_samples)))
        with training_args.main_process_first(desc=f"{split} dataset map pre-processing"):
            return dataset.map(
                preprocess_function,
                batched=True,
                num_proc=data_args.preprocessing_num_workers,
                remove_columns=column_names,
                load_from_cache_file=not data_args.overwrite_cache,
                desc=f"Running tokenizer on {split} dataset",
            )

    if training_args.do_train:
        train_dataset = prepare_split("train", data_args.max_train_samples)
    max_target_length = data_args.val_max_target_length
    if training_args.do_eval:
        eval_dataset = prepare_split("validation", data_args.max_eval_samples)
    if training_args.do_predict:
        predict_dataset = prepare_split("test", data_args.max_predict_samples)

    # Data collator
    label_pad_token_id = -100 if data_args.ignore_pad_token_for_loss else tokenizer.pad_token_id
    if data_args.pad_to_max_length:
        data_collator = default_data_collator
    else:
        data_collator = DataCollatorForSeq2Seq(
            tokenizer,
            model=model,
            label_pad_token_id=label_pad_token_id,
            pad_to_multiple_of=8 if training_args.fp16 else None,
        )

    # Metric
    metric = load_bleu_metric(data_args.metric_from_hub, model_args.cache_dir)

    def compute_metrics_for(num_samples):
        """``compute_metrics`` for a split of ``num_samples`` sentences.

        In distributed runs Accelerate repeats the first samples so that every process gets full batches, and
        ``Seq2SeqTrainer`` gathers with ``accelerator.gather``, which keeps them (huggingface/transformers#27025).
        The gathered rows are the split in order, then the repeats: the first ``num_samples`` rows are the split.
        """

        def compute_metrics(eval_preds):
            preds, labels = eval_preds
            if isinstance(preds, tuple):
                preds = preds[0]
            preds, labels = preds[:num_samples], labels[:num_samples]
            # Replace -100s used for padding as we can't decode them
            preds = np.where(preds != -100, preds, tokenizer.pad_token_id)
            decoded_preds = [pred.strip() for pred in tokenizer.batch_decode(preds, skip_special_tokens=True)]
            labels = np.where(labels != -100, labels, tokenizer.pad_token_id)
            decoded_labels = [label.strip() for label in tokenizer.batch_decode(labels, skip_special_tokens=True)]

            bleu = metric.compute(
                predictions=decoded_preds,
                references=[[label] for label in decoded_labels],
                tokenize=data_args.bleu_tokenize,
            )
            result = {
                "bleu": bleu["score"],
                # The fraction of sentences translated exactly right: strict, and easy to read next to BLEU.
                "exact_match": float(
                    np.mean([pred == label for pred, label in zip(decoded_preds, decoded_labels, strict=True)])
                ),
                "gen_len": float(np.mean([np.count_nonzero(pred != tokenizer.pad_token_id) for pred in preds])),
            }
            return {key: round(value, 4) for key, value in result.items()}

        return compute_metrics

    # Initialize our Trainer
    trainer = APOSeq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        processing_class=tokenizer,
        data_collator=data_collator,
        compute_metrics=(
            compute_metrics_for(len(eval_dataset))
            if training_args.predict_with_generate and training_args.do_eval
            else None
        ),
    )

    # Training
    if training_args.do_train:
        checkpoint = None
        if training_args.resume_from_checkpoint is not None:
            checkpoint = training_args.resume_from_checkpoint
        elif last_checkpoint is not None:
            checkpoint = last_checkpoint
        train_result = trainer.train(resume_from_checkpoint=checkpoint)
        trainer.save_model()  # Saves the tokenizer too for easy upload

        metrics = train_result.metrics
        metrics["train_samples"] = len(train_dataset)

        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        if trainer.is_world_process_zero():
            logger.info(f"Training curves written to {plot_training(training_args.output_dir)}")

    # Evaluation
    max_length = (
        training_args.generation_max_length
        if training_args.generation_max_length is not None
        else data_args.val_max_target_length
    )
    num_beams = data_args.num_beams if data_args.num_beams is not None else training_args.generation_num_beams
    if training_args.do_eval:
        logger.info("*** Evaluate ***")

        metrics = trainer.evaluate(max_length=max_length, num_beams=num_beams, metric_key_prefix="eval")
        metrics["eval_samples"] = len(eval_dataset)
        if "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 100.0))

        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if training_args.do_predict:
        logger.info("*** Predict ***")

        if training_args.predict_with_generate:
            trainer.compute_metrics = compute_metrics_for(len(predict_dataset))
        predict_results = trainer.predict(
            predict_dataset, metric_key_prefix="predict", max_length=max_length, num_beams=num_beams
        )
        metrics = predict_results.metrics
        metrics["predict_samples"] = len(predict_dataset)

        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)

        if trainer.is_world_process_zero() and training_args.predict_with_generate:
            # The split, without the repeats of a distributed run (see compute_metrics_for).
            predictions = predict_results.predictions[: len(predict_dataset)]
            predictions = np.where(predictions != -100, predictions, tokenizer.pad_token_id)
            predictions = tokenizer.batch_decode(predictions, skip_special_tokens=True)
            output_prediction_file = os.path.join(training_args.output_dir, "generated_predictions.txt")
            with open(output_prediction_file, "w", encoding="utf-8") as writer:
                writer.writelines(prediction.strip() + "\n" for prediction in predictions)

    kwargs = {"finetuned_from": model_args.model_name_or_path, "tasks": "translation"}
    if data_args.dataset_name is not None:
        kwargs["dataset_tags"] = data_args.dataset_name
        if data_args.dataset_config_name is not None:
            kwargs["dataset_args"] = data_args.dataset_config_name
            kwargs["dataset"] = f"{data_args.dataset_name} {data_args.dataset_config_name}"
        else:
            kwargs["dataset"] = data_args.dataset_name
    kwargs["language"] = [data_args.source_lang, data_args.target_lang]

    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    else:
        trainer.create_model_card(**kwargs)


def load_raw_datasets(model_args: ModelArguments, data_args: DataTrainingArguments) -> DatasetDict:
    """The raw splits, each with a "translation" column of ``{source_lang: str, target_lang: str}`` records.

    Every split is checked before tokenization, so a record without a language ends the run with one line that
    names the flag, the file and the record.
    """
    languages = (data_args.source_lang.split("_")[0], data_args.target_lang.split("_")[0])
    if data_args.dataset_name is not None:
        name = data_args.dataset_name
        try:
            raw_datasets = load_dataset(
                name, data_args.dataset_config_name, cache_dir=model_args.cache_dir, token=model_args.token
            )
        except Exception as err:  # offline, unknown name, missing config...: datasets raises many types
            raise InputError(f"--dataset_name {name}: could not load it: {first_line(err)}") from err
        for split, dataset in raw_datasets.items():
            check_translation_column(dataset, f"--dataset_name {name} (split {split!r})", languages)
        return raw_datasets

    raw_datasets = DatasetDict()
    for split, flag in SPLIT_FLAGS.items():
        path = getattr(data_args, flag[2:])
        if path is not None:
            raw_datasets[split] = load_data_file(f"{flag} {path}", path, languages, model_args.cache_dir)
    return raw_datasets


def load_data_file(source: str, path: str, languages: tuple, cache_dir: str | None) -> Dataset:
    """One JSON lines or CSV file as a dataset with a checked "translation" column; ``source`` names it in errors.

    The language fields are read as text (``Value("string")``), whatever they look like: left to infer types, the
    readers would take a target "2024-03-01" for a timestamp (pyarrow, JSON) and "007" for the number 7 (pandas, CSV).
    """
    if not os.path.isfile(path):
        raise InputError(f"{source}: no such file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{source}: the file is not readable")
    if path.lower().endswith(".csv"):
        return load_csv_file(source, path, languages, cache_dir)
    return load_json_lines_file(source, path, languages, cache_dir)


def string_features(languages: tuple) -> datasets.Features:
    """``{language: Value("string")}`` for each of ``languages``."""
    return datasets.Features({language: datasets.Value("string") for language in languages})


def load_with_datasets(source: str, file_format: str, path: str, cache_dir: str | None, **kwargs) -> Dataset:
    """``load_dataset(file_format)`` on one file; a file it cannot read becomes an :class:`InputError`."""
    try:
        return load_dataset(file_format, data_files={"data": path}, split="data", cache_dir=cache_dir, **kwargs)
    except Exception as err:  # datasets wraps the parser's error; its cause says what is wrong with the file
        raise InputError(f"{source}: not a valid {file_format.upper()} file: {first_line(err)}") from err


def load_json_lines_file(source: str, path: str, languages: tuple, cache_dir: str | None) -> Dataset:
    """A JSON lines file of ``{"translation": {language: str}}`` records, read with the languages typed as strings.

    The ``datasets`` JSON loader infers the types first and casts to given features afterwards (a timestamp cast to a
    string is "2024-03-01 00:00:00"), so the file is parsed with pyarrow and an explicit schema, keeping only the
    languages of the "translation" records. A file that does not parse that way (a value that is not a string, a
    JSON array, no "translation" key at all, ...) goes through ``datasets`` as before, and
    :func:`check_translation_column` names what is wrong with it.
    """
    features = datasets.Features({"translation": string_features(languages)})
    parse_options = paj.ParseOptions(explicit_schema=features.arrow_schema, unexpected_field_behavior="ignore")
    try:
        table = paj.read_json(path, parse_options=parse_options)
    except pa.ArrowException:
        table = None
    if table is not None and table.column("translation").null_count < table.num_rows:
        dataset = Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=features))
    else:
        dataset = load_with_datasets(source, "json", path, cache_dir)
    check_translation_column(dataset, source, languages)
    return dataset


def load_csv_file(source: str, path: str, languages: tuple, cache_dir: str | None) -> Dataset:
    """A CSV file with one column per language code, as a dataset with a "translation" column.

    The language columns are read as strings, and only an empty cell is missing: pandas would otherwise read "42" as
    a number and "None", "NA" or "null" as missing values. The other columns are dropped.
    """
    try:
        columns = [str(column) for column in pd.read_csv(path, nrows=0).columns]
    except Exception as err:  # pandas' parser errors, a file that is not text, ...
        raise InputError(f"{source}: not a valid CSV file: {first_line(err)}") from err
    for language in languages:
        if language not in columns:
            raise InputError(
                f'{source}: no "{language}" column (columns: {", ".join(columns)}); a CSV file needs one column per '
                "language code"
            )
    dataset = load_with_datasets(
        source, "csv", path, cache_dir, features=string_features(languages), keep_default_na=False, na_values=[""]
    )
    for language in languages:
        first_missing = first_true(pc.is_null(dataset.data.column(language)))
        if first_missing is not None:
            raise InputError(f'{source}: row {first_missing + 1} has an empty "{language}" cell')
    return dataset.map(
        lambda batch: {
            "translation": [
                dict(zip(languages, pair, strict=True))
                for pair in zip(*(batch[lang] for lang in languages), strict=True)
            ]
        },
        batched=True,
        remove_columns=dataset.column_names,
        desc="Converting CSV columns to translation records",
    )


def check_translation_column(dataset: Dataset, source: str, languages: tuple) -> None:
    """Raise :class:`InputError` unless every record has ``{"translation": {language: str}}`` for ``languages``.

    When Arrow already types the column as a struct of strings, a vectorized null scan finds the first bad record
    (fast on WMT-sized data); otherwise (records with differing keys or value types) every record is checked.
    """
    if "translation" not in dataset.column_names:
        raise InputError(
            f'{source}: the records have no "translation" key (found: {", ".join(dataset.column_names)}); expected '
            f'{{"translation": {{"{languages[0]}": ..., "{languages[1]}": ...}}}} per record'
        )
    feature = dataset.features["translation"]
    if isinstance(feature, datasets.Translation):
        string_keys = set(feature.languages)
    elif isinstance(feature, dict):
        string_keys = {key for key, value in feature.items() if value == datasets.Value("string")}
    else:
        string_keys = set()

    if string_keys.issuperset(languages):
        column = dataset.data.column("translation")
        missing = pc.is_null(column)
        for language in languages:
            missing = pc.or_(missing, pc.is_null(pc.struct_field(column, language)))
        first_missing = first_true(missing)
        if first_missing is not None:
            problem = translation_problem(dataset[first_missing]["translation"], languages)
            raise InputError(f"{source}: record {first_missing + 1} {problem}")
        return

    index = 0
    for batch in dataset.select_columns(["translation"]).iter(batch_size=10_000):
        for record in batch["translation"]:
            index += 1
            problem = translation_problem(record, languages)
            if problem is not None:
                raise InputError(f"{source}: record {index} {problem}")


def translation_problem(record, languages: tuple) -> str | None:
    """What is wrong with one "translation" value, worded to follow "record N", or None when it is fine."""
    if record is None:
        return 'has no "translation"'
    if not isinstance(record, dict):
        return f'has a "translation" that is not an object: {record!r}'
    for language in languages:
        if record.get(language) is None:
            return f'has no "{language}" key in "translation"'
        if not isinstance(record[language], str):
            return f'has a "{language}" in "translation" that is not a string: {record[language]!r}'
    return None


def first_true(mask) -> int | None:
    """The index of the first true entry of a boolean Arrow array, or None."""
    index = pc.index(mask, True).as_py()
    return None if index < 0 else index


def from_pretrained(auto_class, flag: str, name_or_path: str, **kwargs):
    """``auto_class.from_pretrained``; a missing, unreachable or invalid source becomes an :class:`InputError`."""
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:  # not found, offline, or not a checkpoint of a known type
        raise InputError(f"{flag} {name_or_path}: could not load it: {first_line(err)}") from err


def load_bleu_metric(from_hub: bool, cache_dir: str | None) -> evaluate.EvaluationModule:
    """SacreBLEU: the local ``metrics/sacrebleu_local`` module, or the Hub's ``sacrebleu`` with ``--metric_from_hub``.

    Both wrap ``sacrebleu.corpus_bleu`` and give the same score. The Hub is tried only when asked for and not
    switched off (``HF_HUB_OFFLINE`` / ``HF_EVALUATE_OFFLINE``); any failure there falls back to the local module.
    """
    if from_hub:
        if hub_constants.HF_HUB_OFFLINE or evaluate.config.HF_EVALUATE_OFFLINE:
            logger.warning("--metric_from_hub is ignored in offline mode; using the local sacrebleu metric.")
        else:
            try:
                return evaluate.load("sacrebleu", cache_dir=cache_dir)
            except Exception as err:  # no network, Hub error, ...: the local copy computes the same score
                logger.warning(f"Could not load sacrebleu from the Hub ({first_line(err)}); using the local copy.")
    return evaluate.load(LOCAL_SACREBLEU, cache_dir=cache_dir)


def first_line(err: BaseException) -> str:
    """The first line of the innermost message of ``err``: the parser's complaint, not the library's wrapper."""
    while err.__cause__ is not None:
        err = err.__cause__
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0]}" if message else type(err).__name__


if __name__ == "__main__":
    main()
