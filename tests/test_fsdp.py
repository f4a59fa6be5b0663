"""APO under FSDP2 (``fully_shard``) and DDP in a plain torch loop, on 2 gloo processes forked from the test process.

The same 30 steps of a tiny token model (APO-LR with the loss on the same batch, APO-LR with the loss from the next
gradient, APO-Precond over SGD with momentum and over AdamW, APO-Precond's shape learned with its size by APO-LR),
each global batch of 8 split over the ranks, under FSDP2, under DDP and in one process. For APO-LR the ranks hold
different numbers of target tokens: without APO's weighting of each rank's loss and KL by its share of the global
token count, 2 processes differ from 1 (``test_token_weighting_is_what_makes_two_processes_equal_one``). FSDP2 must
take the look-ahead through the sharded module (so the parameters are gathered at θ′), read v from the
reduce-scattered ``.grad``, sum the shards' dot products and keep the factors of its own rows; a missing all-reduce, a
stale gathered parameter or a factor averaged across ranks breaks these equalities.

Every step draws the same global batch whatever the number of processes; rank r trains on its consecutive share.
The loss is weighted by the rank's share of the global token count (as the Trainer does with num_items_in_batch).
The meta batch is the whole previous per-rank batch (meta_batch_fraction 1), the only fraction whose B′ is the same
examples for 1 and 2 processes. The Trainer's DDP and FSDP2 (Accelerate) run end to end in tests/test_distributed.py.
"""

import os
import signal
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from distributed_testing import TinyTokenModel, run_on_ranks
from hf_apo import APOLR, APOPrecond, ProximalObjective
from hf_apo.distributed import is_sharded, save_local_shards
from test_checkpoint_safety import leaf_types, load_with_default_globals_only
from tiny import CopyDataset

VARIANTS = ("lr", "lr_next", "precond", "precond_adamw", "precond_split")
RESUMED = ("lr_next", "precond", "precond_adamw", "precond_split")  # lr: the same state as lr_next, less
STEPS = 30
GLOBAL_BATCH = 8


def build(variant, model):
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
                          meta_batch_fraction=1.0, diagonal_row_params=matrices)
    if variant == "lr":
        objective = ProximalObjective(model, lambda_fsd=1.0, lambda_wsd=0.1, loss_batch="same")
        interval = 2
    else:  # lr_next: the loss part from the next (reduced) gradient, a KL part, and D kept over the horizon
        objective = ProximalObjective(model, lambda_fsd=1.0, loss_batch="next", horizon=10)
        interval = 1
    return APOLR(model.parameters(), objective, base="adamw", lr=1e-3, weight_decay=0.01, meta_interval=interval,
                 meta_lr=0.2, meta_batch_fraction=1.0)


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


def batch_of(variant, step, rank, world):
    """This rank's share of the step's global batch. For APO-LR an example has 6, 5 or 4 real target tokens in the
    first half of the global batch and 4, 3 or 2 in the second, so two ranks' token counts differ (about 3:2)."""
    data = CopyDataset(size=64)
    share = GLOBAL_BATCH // world
    first = (step * GLOBAL_BATCH) % len(data) + rank * share
    examples = [data[i] for i in range(first, first + share)]
    batch = {key: torch.stack([e[key] for e in examples]) for key in examples[0]}
    if not variant.startswith("precond"):  # (APO-Precond: see docs/distributed.md on FactorAdam and rounding)
        for row, index in enumerate(range(first, first + share)):
            batch["labels"][row, 6 - index % 3 - 2 * (index // 4 % 2):] = -100
    return batch


def train(variant, parallel, rank, world, out=None, save_at=None, stop_at=None, kill_at=None, resume=False):
    """STEPS steps of ``variant``: the full parameters, the meta-parameters and the meta-step count. ``out``: the
    directory of this rank's checkpoint, saved after step ``save_at`` (model and optimizer state) or resumed from;
    under FSDP2 the optimizer's state is also written there as the Trainer writes it (save_local_shards). ``stop_at``
    ends the run after that step, ``kill_at`` SIGKILLs the process."""
    model = TinyTokenModel()
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)  # the root unit holds the embedding and the head, gathered after a forward
        trained = model
    elif parallel == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    else:
        trained = model
    optimizer = build(variant, model)
    checkpoint = None if out is None else os.path.join(out, f"{variant}_ckpt_rank{rank}.pt")
    start = 0
    if resume:
        saved = torch.load(checkpoint, weights_only=False)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        start = saved["step"]
    for step in range(start, STEPS):
        batch = batch_of(variant, step, rank, world)
        tokens = (batch["labels"] != -100).sum().double()
        total = tokens.clone()
        if world > 1:
            dist.all_reduce(total)
        (trained(**batch)["loss"] * float(tokens * world / total)).backward()
        optimizer.observe(batch)
        optimizer.step()
        optimizer.zero_grad()
        if step + 1 == save_at:
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1}, checkpoint)
        if step + 1 == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if step + 1 == stop_at:
            return None
    if out is not None and parallel == "fsdp":
        save_local_shards(optimizer.state_dict(), os.path.join(out, f"{variant}_apo_rank{rank}.pt"),
                          process_index=rank, world_size=world)
    params = [p.full_tensor().detach() if is_sharded(p) else p.detach().clone() for p in model.parameters()]
    return {"params": params, "meta": gathered_meta_parameters(optimizer), "meta_steps": optimizer.meta_steps}


def train_all(rank, world, parallel, variants=VARIANTS, out=None, save_at=None, kill_at=None, resume=False):
    """Each variant in turn; ``kill_at``: the earlier variants stop after that step (their checkpoint is saved) and
    the process is SIGKILLed at the end of that step of the last one."""
    last = variants[-1]
    return {variant: train(variant, parallel, rank, world, out, save_at, None if variant == last else kill_at,
                           kill_at if variant == last else None, resume) for variant in variants}


def unweighted(rank, world, parallel, variants):
    """``train_all`` with every rank's loss and KL weighted 1 in the meta-objective, whatever its token count."""
    with mock.patch("hf_apo.objective.shares_of_global_count", lambda counts, device: [1.0] * len(counts)):
        return train_all(rank, world, parallel, variants)


def relative_difference(a, b):
    return max(float((x - y).norm() / y.norm()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{"fsdp": [rank 0, rank 1], "ddp": [rank 0, rank 1], "none": [the one process]}, each {variant: result};
    "files": the directory of the FSDP2 optimizer files."""
    files = tmp_path_factory.mktemp("fsdp_files")
    return {"fsdp": run_on_ranks(train_all, "fsdp", VARIANTS, str(files)), "ddp": run_on_ranks(train_all, "ddp"),
            "none": [train_all(0, 1, "none")], "files": files}


@pytest.mark.parametrize("variant", VARIANTS)
def test_fsdp2_equals_ddp_and_one_process(runs, variant):
    fsdp0, fsdp1 = runs["fsdp"][0][variant], runs["fsdp"][1][variant]
    ddp, single = runs["ddp"][0][variant], runs["none"][0][variant]
    # φ and the parameters are identical on both ranks (the shards' sums are all-reduced, not averaged apart), and
    # under DDP (whose all-reduce the look-ahead backward bypasses: the optimizer reduces its meta-gradient itself).
    assert all(torch.equal(a, b) for a, b in zip(fsdp0["meta"], fsdp1["meta"]))
    assert all(torch.equal(a, b) for a, b in zip(fsdp0["params"], fsdp1["params"]))
    ddp1 = runs["ddp"][1][variant]
    assert all(torch.equal(a, b) for a, b in zip(ddp["meta"] + ddp["params"], ddp1["meta"] + ddp1["params"]))
    every_step = variant in ("lr_next", "precond_split")  # APO-LR's next-batch meta steps, K 1
    expected = 29 if every_step else 15 + (variant == "lr")  # "lr": and step 1, its trust region's first step
    assert fsdp0["meta_steps"] == ddp["meta_steps"] == single["meta_steps"] == expected
    # Meta-learning moved φ far from its start, so the comparisons below compare learned values.
    if variant.startswith("precond"):
        assert max(float((m - 1).abs().max()) for m in fsdp0["meta"] if m.dim() == 1) > 0.05
        assert any(not torch.allclose(m, torch.eye(m.shape[0]), atol=0.05) for m in fsdp0["meta"] if m.dim() == 2)
    else:
        assert float(fsdp0["meta"][0].abs().min()) > 1.0
    # Float tolerance after 30 steps.
    for other in (ddp, single):
        assert relative_difference(fsdp0["params"], other["params"]) < 1e-5
        assert relative_difference(fsdp0["meta"], other["meta"]) < 1e-5


def test_token_weighting_is_what_makes_two_processes_equal_one(runs):
    """Without the weighting of each rank's loss and KL by its share of the global token count, DDP differs from one
    process by far more than the tolerance above (measured: 1.6e-3 for APO-LR on the same batch, 7e-4 on the next)."""
    ddp = run_on_ranks(unweighted, "ddp", ("lr", "lr_next"))[0]
    for variant in ("lr", "lr_next"):
        assert relative_difference(ddp[variant]["params"], runs["none"][0][variant]["params"]) > 1e-4


def test_fsdp2_optimizer_files_hold_plain_local_shards(runs):
    """Each rank's optimizer file (the Trainer writes it with save_local_shards) loads with torch's default
    weights-only allowlist: plain tensors and data, the DTensors as local shards with a record of each."""
    for variant in VARIANTS:
        for rank in (0, 1):
            saved = load_with_default_globals_only(runs["files"] / f"{variant}_apo_rank{rank}.pt")
            assert leaf_types(saved) <= {torch.Tensor, int, float, bool, str, type(None)}
            assert saved["process_index"] == rank and saved["world_size"] == 2
            # APO-LR's AdamW keeps DTensor moments, saved as shards; APO-Precond keeps its state as local tensors.
            assert bool(saved["dtensors"]) == (variant in ("lr", "lr_next")), variant


def test_fsdp2_sigkill_then_resume_continues_the_uninterrupted_run(runs, tmp_path):
    """The variants with the most state (APO-LR's pending look-ahead and D, APO-Precond's factors, momentum and AdamW
    moments) save every rank's model and optimizer state (sharded) at step 5; both processes are SIGKILLed at step 8
    of the last variant; fresh processes resume all of them from step 5 and must end bitwise equal to the
    uninterrupted runs. (The Trainer's FSDP2 resume: tests/test_distributed.py.)"""
    results, codes = run_on_ranks(train_all, "fsdp", RESUMED, str(tmp_path), 5, 8, check=False)
    assert all(code != 0 for code in codes)
    assert results == [None, None]  # neither rank got to the end of the last variant
    resumed = run_on_ranks(train_all, "fsdp", RESUMED, str(tmp_path), None, None, True)
    for variant in RESUMED:
        for rank in (0, 1):
            straight, again = runs["fsdp"][rank][variant], resumed[rank][variant]
            assert all(torch.equal(a, b) for a, b in zip(straight["params"], again["params"])), variant
            assert all(torch.equal(a, b) for a, b in zip(straight["meta"], again["meta"])), variant
            assert again["meta_steps"] == straight["meta_steps"]
