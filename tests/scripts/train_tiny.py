"""Train the tiny T5 on the copy task with APOSeq2SeqTrainer; used by the distributed and resume tests.

    python train_tiny.py --output_dir DIR [--apo lr] [--kill_at_step N] [--resume_from_checkpoint CKPT] ...
    torchrun --nproc_per_node 2 train_tiny.py --output_dir DIR ...

Writes DIR/final_rank{R}.pt: the parameters, the APO meta-parameters and the log history of rank R.
"""

import os
import signal
import sys

import torch
from transformers import HfArgumentParser, TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_apo import APOSeq2SeqTrainer, APOSeq2SeqTrainingArguments  # noqa: E402
from tiny import CopyDataset, tiny_t5  # noqa: E402


class KillAt(TrainerCallback):
    """SIGKILL this process at the end of a step: no cleanup, no final save, like a preempted job."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def meta_parameters(optimizer):
    if optimizer is None:
        return []
    if hasattr(optimizer, "log_lr"):
        return [optimizer.log_lr.clone()]
    return [t.detach().cpu().clone() for f in optimizer.factors.values() for t in f.tensors]


def main():
    argv = sys.argv[1:]
    kill_at = None
    if "--kill_at_step" in argv:
        index = argv.index("--kill_at_step")
        kill_at = int(argv[index + 1])
        del argv[index : index + 2]
    dropout = 0.0
    if "--dropout" in argv:
        index = argv.index("--dropout")
        dropout = float(argv[index + 1])
        del argv[index : index + 2]
    (args,) = HfArgumentParser(APOSeq2SeqTrainingArguments).parse_args_into_dataclasses(argv)
    trainer = APOSeq2SeqTrainer(
        model=tiny_t5(dropout=dropout),
        args=args,
        train_dataset=CopyDataset(size=64),
        callbacks=[KillAt(kill_at)] if kill_at else [],
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    result = {
        "params": [p.detach().cpu().clone() for p in trainer.model.parameters()],
        "meta": meta_parameters(trainer.apo_optimizer),
        "log_history": trainer.state.log_history,
    }
    torch.save(result, os.path.join(args.output_dir, f"final_rank{args.process_index}.pt"))


if __name__ == "__main__":
    main()
