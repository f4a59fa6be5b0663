"""Train the tiny T5 on the copy task with APOSeq2SeqTrainer; used by the distributed and resume tests.

    python train_tiny.py --output_dir DIR [--apo lr] [--kill_at_step N] [--resume_from_checkpoint CKPT] ...
    torchrun --nproc_per_node 2 train_tiny.py --output_dir DIR [--fsdp full_shard --force_fsdp_on_cpu] ...

or ``main(argv)`` in a process forked from the tests (tests/helpers_subprocess.py, ``train_forked``).

Writes DIR/final_rank{R}.pt: the parameters, the APO meta-parameters and the log history of rank R (under FSDP2 the
full parameters and, for --apo precond, each diagonal row factor gathered whole). Test-only switches:
``--force_fsdp_on_cpu`` lets Accelerate's FSDP2 act on CPU processes (see force_fsdp_on_cpu); ``--diagonal_rows``
gives every matrix a diagonal row factor, the factors FSDP2 allows, so that runs with and without FSDP2 compare;
``--llama`` trains a tiny causal LM instead of the T5 (Accelerate's FSDP2 fails on T5's shared embeddings).
"""

import os
import signal
import sys

import torch
import torch.distributed as dist
from transformers import HfArgumentParser, TrainerCallback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_apo import APOSeq2SeqTrainer, APOSeq2SeqTrainingArguments  # noqa: E402
from hf_apo.distributed import is_sharded  # noqa: E402
from tiny import CopyDataset, tiny_llama, tiny_t5  # noqa: E402


def force_fsdp_on_cpu():
    """Let Accelerate's FSDP plugin act on CPU processes, as it does on GPUs (tests only).

    Accelerate turns FSDP on only for GPU-like devices; with ``--use_cpu`` it drops the plugin and trains with plain
    multi-CPU DDP. Forcing its state runs its FSDP2 preparation (``fully_shard`` of the model, parameters swapped in
    the optimizer, sharded clipping and checkpoints) over gloo.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    AcceleratorState.__init__ = init


class KillAt(TrainerCallback):
    """SIGKILL this process at the end of a step: no cleanup, no final save, like a preempted job."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class DiagonalRowsTrainer(APOSeq2SeqTrainer):
    def apo_diagonal_row_params(self, model):
        return [p for p in model.parameters() if p.dim() >= 2]


def full(tensor):
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def meta_parameters(optimizer):
    if optimizer is None:
        return []
    if hasattr(optimizer, "log_lr"):
        return [optimizer.log_lr.clone()]
    tensors = []
    for param, factors in optimizer.factors.items():
        for tensor, summed in zip(factors.tensors, factors.summed_over_shards):
            tensor = tensor.detach().cpu().clone()
            if is_sharded(param) and not summed:  # this rank's rows of a diagonal factor: gather them in rank order
                pieces = [None] * dist.get_world_size()
                dist.all_gather_object(pieces, tensor)
                tensor = torch.cat(pieces)
            tensors.append(tensor)
    return tensors


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
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
    if "--force_fsdp_on_cpu" in argv:
        argv.remove("--force_fsdp_on_cpu")
        force_fsdp_on_cpu()
    if "--llama" in argv:
        # Accelerate 1.15's FSDP2 fails on T5's shared embeddings, APO or not: the wrap puts `shared` in its own unit
        # and encoder/decoder `embed_tokens` (other modules, same weight) in the root's, and the checkpoint drops
        # their keys, which loading then wants. A causal LM with untied embeddings has neither problem.
        argv.remove("--llama")
        model = tiny_llama(dropout=dropout)
    else:
        model = tiny_t5(dropout=dropout)
    trainer_class = APOSeq2SeqTrainer
    if "--diagonal_rows" in argv:
        argv.remove("--diagonal_rows")
        trainer_class = DiagonalRowsTrainer
    (args,) = HfArgumentParser(APOSeq2SeqTrainingArguments).parse_args_into_dataclasses(argv)
    trainer = trainer_class(
        model=model,
        args=args,
        train_dataset=CopyDataset(size=64),
        callbacks=[KillAt(kill_at)] if kill_at else [],
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    result = {
        "params": [full(p.detach()).cpu().clone() for p in trainer.model.parameters()],
        "sharded": any(is_sharded(p) for p in trainer.model.parameters()),
        "meta": meta_parameters(trainer.apo_optimizer),
        "log_history": trainer.state.log_history,
    }
    torch.save(result, os.path.join(args.output_dir, f"final_rank{args.process_index}.pt"))


if __name__ == "__main__":
    main()
