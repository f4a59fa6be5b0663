"""TRL's supervised fine-tuning with APO: :class:`APOSFTConfig` (``SFTConfig`` plus the ``--apo_*`` flags) and
:class:`APOSFTTrainer` (``SFTTrainer`` whose optimizer is APO with ``--apo lr`` / ``--apo precond``).

Importable when ``trl`` is installed (``pip install "hf_apo[trl]"``). The pairing is the one of the Trainer glue:
the APO mixins go in front of TRL's classes, so TRL's dataset preparation, collator, loss and metrics stay TRL's and
APO only builds the optimizer (``create_optimizer``), shows it each micro-batch and logs its ``apo/*`` scalars. The
KL term's label shift is the causal LM's (1), seen through a PEFT wrapper (``peft_config=``).

    from hf_apo import APOSFTConfig, APOSFTTrainer

    args = APOSFTConfig(output_dir="out", learning_rate=2e-4, apo="lr")
    trainer = APOSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
"""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig, SFTTrainer

from .apo_config import APOArgumentsMixin
from .apo_trainer import APOTrainerMixin


@dataclass
class APOSFTConfig(APOArgumentsMixin, SFTConfig):
    """``trl.SFTConfig`` plus ``--apo`` and the ``--apo_*`` flags."""


class APOSFTTrainer(APOTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` whose optimizer is APO when ``args.apo`` is ``"lr"`` or ``"precond"`` (needs
    :class:`APOSFTConfig`: a plain ``SFTConfig`` is refused before training)."""


__all__ = ["APOSFTConfig", "APOSFTTrainer"]
