# Copyright 2024 The hf_apo authors. Licensed under the Apache License, Version 2.0.
"""Bad input to ``run_translation.py`` ends with one line, ``error: ...``, on stderr and exit code 2.

An :class:`InputError` says what is wrong and with which flag; :func:`exit_on_input_error` runs the script and prints
it. :class:`ArgumentParser` and :func:`from_pretrained` turn the errors of argument parsing and of model loading
(whose messages already name the flag and the fix, or the file that could not be found) into an ``InputError``.
"""

import json
import sys

from transformers import HfArgumentParser


class InputError(Exception):
    """A problem with the command line or the input data, printed as one line by :func:`exit_on_input_error`."""


def exit_on_input_error(main) -> None:
    """Run ``main()``; an :class:`InputError` ends the process with ``error: <message>`` and exit code 2."""
    try:
        main()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


class ArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose dataclass checks (``__post_init__``: the script's, ``TrainingArguments``', hf_apo's)
    and unreadable arguments files raise :class:`InputError`; their messages name the flag and the fix."""

    def parse_args_into_dataclasses(self, *args, **kwargs):
        try:
            return super().parse_args_into_dataclasses(*args, **kwargs)
        except ValueError as err:
            raise InputError(str(err)) from err

    def parse_dict(self, *args, **kwargs):
        try:
            return super().parse_dict(*args, **kwargs)
        except ValueError as err:
            raise InputError(str(err)) from err

    def parse_json_file(self, json_file, allow_extra_keys: bool = False):
        return self.parse_dict(read_json_arguments(json_file), allow_extra_keys=allow_extra_keys)


def read_json_arguments(json_file) -> dict:
    """The arguments in a ``.json`` file (the script's single argument), as a dict."""
    try:
        with open(json_file, encoding="utf-8") as reader:
            return json.load(reader)
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{json_file}: cannot read the arguments file: {err}") from err


def from_pretrained(auto_class, model_args, flag: str, **kwargs):
    """``auto_class.from_pretrained`` of ``--<flag>``, or of ``--model_name_or_path`` when that flag is not given.

    A missing, unreachable or invalid source becomes an :class:`InputError` naming the flag and the source.
    """
    if getattr(model_args, flag) is None:
        flag = "model_name_or_path"
    name_or_path = getattr(model_args, flag)
    try:
        return auto_class.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:  # not found, offline, or not a checkpoint of a known type
        raise InputError(f"--{flag} {name_or_path}: could not load it: {first_line(err)}") from err


def first_line(err: BaseException) -> str:
    """The first line of the innermost message of ``err``: the parser's complaint, not the library's wrapper."""
    while err.__cause__ is not None:
        err = err.__cause__
    message = str(err).strip().splitlines()
    return f"{type(err).__name__}: {message[0]}" if message else type(err).__name__
