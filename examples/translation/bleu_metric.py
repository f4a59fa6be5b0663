# Copyright 2024 The hf_apo authors. Licensed under the Apache License, Version 2.0.
"""SacreBLEU for ``run_translation.py``, with no network: the local copy in ``metrics/sacrebleu_local``.

It wraps the same ``sacrebleu.corpus_bleu`` call as the Hub's ``sacrebleu`` metric and gives the same scores;
``--metric_from_hub`` loads the Hub's instead, falling back to the local copy when the Hub cannot be reached.
"""

import logging
import os

import evaluate
from huggingface_hub import constants as hub_constants

from input_errors import first_line


logger = logging.getLogger(__name__)

LOCAL_SACREBLEU = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "sacrebleu_local")


def load_bleu_metric(from_hub: bool, cache_dir: str | None) -> evaluate.EvaluationModule:
    """The local ``metrics/sacrebleu_local`` module, or the Hub's ``sacrebleu`` with ``from_hub``.

    The Hub is tried only when asked for and not switched off (``HF_HUB_OFFLINE`` / ``HF_EVALUATE_OFFLINE``); any
    failure there falls back to the local module.
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
