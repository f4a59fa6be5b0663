# Copyright 2024 The hf_apo authors. Licensed under the Apache License, Version 2.0.
"""The raw splits of ``run_translation.py``: a Hub dataset or data files, each record checked before tokenization.

Data files are JSON lines (``.json``/``.jsonl``) with one ``{"translation": {"en": "...", "de": "..."}}`` record per
line, or CSV with one column per language code. The language fields are read as text, whatever they look like: left
to infer types, the readers would take a target "2024-03-01" for a timestamp (pyarrow, JSON) and "007" for the number
7 (pandas, CSV). A record without a language ends the run with one line that names the flag, the file and the record
(an :class:`~input_errors.InputError`).
"""

import os

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as paj
from datasets import Dataset, DatasetDict, load_dataset
from datasets.table import InMemoryTable

from input_errors import InputError, first_line


DATA_FILE_EXTENSIONS = ("json", "jsonl", "csv")
SPLIT_FLAGS = {"train": "--train_file", "validation": "--validation_file", "test": "--test_file"}
SPLIT_NEEDED_BY = {"train": "--do_train", "validation": "--do_eval", "test": "--do_predict"}


def check_extension(flag: str, path: str | None) -> None:
    """Raise ``ValueError`` (an argument error) unless ``path`` is None or a ``.json``, ``.jsonl`` or ``.csv`` file."""
    if path is not None and path.rsplit(".", 1)[-1].lower() not in DATA_FILE_EXTENSIONS:
        raise ValueError(f"{flag} {path}: must be a .json, .jsonl or .csv file.")


def load_raw_datasets(model_args, data_args, training_args) -> DatasetDict:
    """The raw splits, each with a "translation" column of ``{source_lang: str, target_lang: str}`` records.

    Every split is checked, and so is the presence of the splits that ``--do_train``, ``--do_eval`` and
    ``--do_predict`` need, before the model is loaded.
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
    else:
        raw_datasets = DatasetDict()
        for split, flag in SPLIT_FLAGS.items():
            path = getattr(data_args, flag[2:])
            if path is not None:
                raw_datasets[split] = load_data_file(f"{flag} {path}", path, languages, model_args.cache_dir)

    for split, flag in SPLIT_NEEDED_BY.items():
        if getattr(training_args, flag[2:]) and split not in raw_datasets:
            raise InputError(f"{flag} needs a {split} split: pass {SPLIT_FLAGS[split]} or a dataset that has one")
    return raw_datasets


def load_data_file(source: str, path: str, languages: tuple, cache_dir: str | None) -> Dataset:
    """One JSON lines or CSV file as a dataset with a checked "translation" column; ``source`` names it in errors."""
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
