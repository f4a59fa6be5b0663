"""A plain torch training loop of the tiny T5 with APO, in one process, under DDP or under FSDP2 (``fully_shard``).

    python train_fsdp.py --out DIR --parallel none
    torchrun --standalone --nproc_per_node 2 train_fsdp.py --out DIR --parallel ddp|fsdp
        [--variants lr,lr_next,precond,precond_adamw,precond_split] [--steps 30] [--save_at 5] [--kill_at 8] [--resume]

Every step draws the same global batch of 8 examples whatever the number of processes; rank r trains on its
consecutive share. For APO-LR examples have 4 to 6 real target tokens (the rest of the labels -100), so the ranks'
token counts differ: the training loss is weighted by the rank's share of the global token count (as the Trainer does with
num_items_in_batch), and APO weighs its loss and KL terms the same way. The meta batch is the whole previous per-rank
batch by default (--meta_batch_fraction 1), the only fraction whose B′ is the same examples for 1 and 2 processes.
Writes DIR/{variant}_rank{R}.pt: the full parameters, the meta-parameters (a sharded diagonal row factor gathered
whole) and the learned multipliers; with --save_at, DIR/{variant}_ckpt_rank{R}.pt (this rank's model and optimizer
state at that step), which --resume continues from; --kill_at SIGKILLs the process at the end of that step of the
last variant (the earlier ones have finished and saved their checkpoint).
"""

import argparse
import os
import signal
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from hf_apo import APOLR, APOPrecond, ProximalObjective  # noqa: E402
from hf_apo.distributed import is_sharded  # noqa: E402
from tiny import CopyDataset, tiny_t5  # noqa: E402

GLOBAL_BATCH = 8


def build(variant, parallel, model, fraction):
    """The optimizer of a variant; ``model`` is the module the objective calls (sharded in place under FSDP2)."""
    # The factors FSDP2 allows (diagonal on the sharded row side) for every run, so the runs are comparable.
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    if variant == "precond_split":  # shape-only factors from the next gradient, the size learned by APO-LR over them
        inner = APOPrecond(model.parameters(), ProximalObjective(model, lambda_fsd=0.0, loss_batch="next"),
                           base="adamw", lr=1e-3, weight_decay=0.01, meta_interval=2, meta_lr=0.05,
                           diagonal_row_params=matrices, shape_only=True)
        return APOLR(inner, ProximalObjective(model, lambda_fsd=0.0, loss_batch="next", horizon=10), meta_interval=1,
                     meta_lr=0.2)
    if variant.startswith("precond"):
        objective = ProximalObjective(model, lambda_fsd=1.0, lambda_wsd=0.1)
        base = dict(lr=0.05, momentum=0.9) if variant == "precond" else dict(base="adamw", lr=1e-3, weight_decay=0.01)
        return APOPrecond(model.parameters(), objective, **base, meta_interval=2, meta_lr=0.05,
                          meta_batch_fraction=fraction, diagonal_row_params=matrices)
    if variant == "lr":
        objective = ProximalObjective(model, lambda_fsd=1.0, lambda_wsd=0.1, loss_batch="same")
        interval = 2
    else:  # lr_next: the loss part from the next (reduced) gradient, a KL part, and D kept over the horizon
        objective = ProximalObjective(model, lambda_fsd=1.0, loss_batch="next", horizon=10)
        interval = 1
    return APOLR(model.parameters(), objective, base="adamw", lr=1e-3, weight_decay=0.01, meta_interval=interval,
                 meta_lr=0.2, meta_batch_fraction=fraction)


def gathered_meta_parameters(optimizer):
    """The meta-parameters, a sharded parameter's diagonal row factor gathered from all ranks (in rank order)."""
    if isinstance(optimizer, APOLR):
        inner = [] if optimizer.inner is None else gathered_meta_parameters(optimizer.inner)
        return [optimizer.log_lr.clone(), *inner]
    tensors = []
    for param, factors in optimizer.factors.items():
        for tensor, summed in zip(factors.tensors, factors.summed_over_shards):
            tensor = tensor.detach().clone()
            if is_sharded(param) and not summed:  # this rank's rows of a diagonal factor
                pieces = [None] * dist.get_world_size()
                dist.all_gather_object(pieces, tensor)
                tensor = torch.cat(pieces)
            tensors.append(tensor)
    return tensors


def run(variant, args, rank, world, kill_at=None):
    model = tiny_t5()
    if args.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in (*model.encoder.block, *model.decoder.block):
            fully_shard(block)
        fully_shard(model)
        trained = model
    elif args.parallel == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    else:
        trained = model
    optimizer = build(variant, args.parallel, model, args.meta_batch_fraction)
    data = CopyDataset(size=64)
    checkpoint = os.path.join(args.out, f"{variant}_ckpt_rank{rank}.pt")
    start = 0
    if args.resume:
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start = saved["step"]
    share = GLOBAL_BATCH // world
    for step in range(start, args.steps):
        first = (step * GLOBAL_BATCH) % len(data) + rank * share
        examples = [data[i] for i in range(first, first + share)]
        batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
        if not variant.startswith("precond"):  # (APO-Precond: see docs/distributed.md on FactorAdam and rounding)
            for row, index in enumerate(range(first, first + share)):
                batch["labels"][row, 6 - index % 3:] = -100  # 6, 5 or 4 real target tokens: unequal per rank
        tokens = (batch["labels"] != -100).sum().double()
        total = tokens.clone()
        if world > 1:
            dist.all_reduce(total)
        (trained(**batch).loss * float(tokens * world / total)).backward()
        optimizer.observe(batch)
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 == args.save_at:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}, checkpoint)
        if step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    params = [p.full_tensor().detach() if is_sharded(p) else p.detach().clone() for p in model.parameters()]
    result = {"params": params, "meta": gathered_meta_parameters(optimizer), "meta_steps": optimizer.meta_steps}
    torch.save(result, os.path.join(args.out, f"{variant}_rank{rank}.pt"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--parallel", choices=["none", "ddp", "fsdp"], required=True)
    parser.add_argument("--variants", default="lr,lr_next,precond,precond_adamw,precond_split")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--save_at", type=int, default=None)
    parser.add_argument("--kill_at", type=int, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--meta_batch_fraction", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rank, world = 0, 1
    if args.parallel != "none":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(args.out, exist_ok=True)
    variants = args.variants.split(",")
    for variant in variants:
        run(variant, args, rank, world, kill_at=args.kill_at if variant == variants[-1] else None)
    if args.parallel != "none":
        dist.barrier()  # without it a rank tearing gloo down early once aborted the other (SIGABRT at exit)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
