"""hf_apo: Amortized Proximal Optimization (Bae et al., NeurIPS 2022) for PyTorch and Hugging Face Transformers.

The optimizer core (``APOLR``, ``APOPrecond``, ``ProximalObjective``) imports torch only; the Trainer glue
(``APOTrainer``, ``APOSeq2SeqTrainer`` and their ``*TrainingArguments``) is imported lazily with transformers, and
TRL's (``APOSFTTrainer``, ``APOSFTConfig``) with trl.
"""

from .factors import KroneckerFactors
from .lr import APOLR
from .objective import ProximalObjective, kl_divergence, squared_error_divergence
from .precond import APOPrecond

__version__ = "0.1.0"

_TRAINER_NAMES = (
    "APOTrainingArguments",
    "APOSeq2SeqTrainingArguments",
    "APOTrainer",
    "APOSeq2SeqTrainer",
)

__all__ = [
    "APOLR",
    "APOPrecond",
    "KroneckerFactors",
    "ProximalObjective",
    "kl_divergence",
    "squared_error_divergence",
    *_TRAINER_NAMES,
]


def __getattr__(name):
    if name in ("APOTrainingArguments", "APOSeq2SeqTrainingArguments"):
        from . import apo_config

        return getattr(apo_config, name)
    if name in ("APOTrainer", "APOSeq2SeqTrainer"):
        from . import apo_trainer

        return getattr(apo_trainer, name)
    if name in ("APOSFTConfig", "APOSFTTrainer"):  # TRL's SFT with APO: needs trl
        try:
            from . import sft
        except ImportError as error:
            raise ImportError(f"hf_apo.{name} needs TRL: pip install 'hf_apo[trl]' ({error}).") from error
        return getattr(sft, name)
    raise AttributeError(f"module 'hf_apo' has no attribute {name!r}")
