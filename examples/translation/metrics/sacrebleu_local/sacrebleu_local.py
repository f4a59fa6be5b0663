# Copyright 2024 The hf_apo authors. Licensed under the Apache License, Version 2.0.
"""SacreBLEU as a local ``evaluate`` metric, so ``evaluate.load`` works without the Hugging Face Hub.

``evaluate.load("sacrebleu")`` downloads the metric script from the Hub. This module wraps the same
``sacrebleu.corpus_bleu`` call and returns the same keys, and loads from disk::

    import evaluate

    bleu = evaluate.load("examples/translation/metrics/sacrebleu_local")
    bleu.compute(predictions=["das ist gut"], references=[["das ist gut"]])["score"]  # 100.0
"""

import datasets
import evaluate
import sacrebleu


_CITATION = """\
@inproceedings{post-2018-call,
    title = "A Call for Clarity in Reporting {BLEU} Scores",
    author = "Post, Matt",
    booktitle = "Proceedings of the Third Conference on Machine Translation: Research Papers",
    year = "2018",
    pages = "186--191",
}
"""

_DESCRIPTION = """\
Corpus-level BLEU computed by SacreBLEU (https://github.com/mjpost/sacrebleu), which tokenizes the text itself
so that scores are comparable across systems. Every prediction needs the same number of references.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[str]`): the system outputs, one string per segment.
    references (`list[list[str]]`): for each prediction, its reference translations.
    smooth_method (`str`): 'none', 'floor', 'add-k' or 'exp' (default).
    smooth_value (`float`, optional): the floor or k value for 'floor' and 'add-k'.
    lowercase (`bool`): lowercase predictions and references first. Defaults to False.
    tokenize (`str`, optional): the SacreBLEU tokenizer ('13a', 'intl', 'zh', 'char', 'none', ...).
        Defaults to SacreBLEU's default, '13a'.
    use_effective_order (`bool`): count only the n-gram orders that have matches. Defaults to False.
Returns:
    score (`float`): BLEU, 0 to 100.
    counts, totals, precisions (`list`): matching n-grams, n-grams, and their ratio, for n = 1..4.
    bp (`float`): the brevity penalty.
    sys_len, ref_len (`int`): the length of the predictions and of the references.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class SacrebleuLocal(evaluate.Metric):
    """Corpus BLEU from ``sacrebleu.corpus_bleu``, with the keys of the Hub's ``sacrebleu`` metric."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Sequence(datasets.Value("string")),
                }
            ),
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
            reference_urls=["https://aclanthology.org/W18-6319/"],
        )

    def _compute(
        self,
        predictions,
        references,
        smooth_method="exp",
        smooth_value=None,
        lowercase=False,
        tokenize=None,
        use_effective_order=False,
    ):
        references_per_prediction = {len(refs) for refs in references}
        if len(references_per_prediction) > 1:
            raise ValueError("sacrebleu_local needs the same number of references for every prediction.")
        # sacrebleu wants one stream per reference position: transpose [segment][ref] to [ref][segment].
        reference_streams = [list(stream) for stream in zip(*references, strict=True)]
        output = sacrebleu.corpus_bleu(
            predictions,
            reference_streams,
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            lowercase=lowercase,
            tokenize=tokenize,
            use_effective_order=use_effective_order,
        )
        return {
            "score": output.score,
            "counts": output.counts,
            "totals": output.totals,
            "precisions": output.precisions,
            "bp": output.bp,
            "sys_len": output.sys_len,
            "ref_len": output.ref_len,
        }
