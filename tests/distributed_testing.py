"""Distributed tests in the test process: a function forked onto N CPU processes over gloo, and a tiny token model.

As kfac-pytorch's ``testing/distributed.py``: :func:`run_on_ranks` forks ``world_size`` children from the test
process (no interpreter start, no imports, no launcher), each joins a gloo process group on a free port, calls
``function(rank, world_size, *args)`` and saves what it returns with ``torch.save``; the parent loads and returns
one result per rank. A child that raises fails the test with its traceback; one that never finishes is killed at
``timeout`` seconds. A child may end itself with SIGKILL (a preempted job): ``check=False`` returns the exit codes
instead of raising.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import tempfile
import time
import traceback

import torch
import torch.distributed as dist
from torch import nn

from tiny import VOCAB


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(function, rank, world_size, port, args, out):
    try:
        torch.set_num_threads(1)
        if world_size > 1:
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        result = function(rank, world_size, *args)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
        if world_size > 1:
            dist.barrier()  # no rank tears gloo down while another still sends to it
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - the parent reports it
        with open(os.path.join(out, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)


def run_on_ranks(function, *args, world_size=2, timeout=120, check=True):
    """``[function(rank, world_size, *args) for rank in range(world_size)]``, each in a forked process of one gloo
    group; with ``check=False``, ``(results or None per rank, exit codes)``."""
    import torch._dynamo  # noqa: F401 - FSDP2 imports it at its first use: here once, not in every child (seconds)

    context = multiprocessing.get_context("fork")
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        children = [context.Process(target=_child, args=(function, rank, world_size, port, args, out), daemon=True)
                    for rank in range(world_size)]
        for child in children:
            child.start()
        deadline = time.monotonic() + timeout
        while any(child.is_alive() for child in children) and time.monotonic() < deadline:
            if any(child.exitcode not in (None, 0) for child in children):
                deadline = min(deadline, time.monotonic() + 10)  # the others may wait on it in a collective
            time.sleep(0.02)
        for child in children:
            if child.is_alive():
                child.kill()
            child.join()
        codes = [child.exitcode for child in children]
        errors = {rank: open(os.path.join(out, f"rank{rank}.error")).read() for rank in range(world_size)
                  if os.path.exists(os.path.join(out, f"rank{rank}.error"))}
        results = [torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=False)
                   if os.path.exists(os.path.join(out, f"rank{rank}.pt")) else None for rank in range(world_size)]
    if not check:
        return results, codes
    if errors or any(code != 0 for code in codes):
        details = "\n".join(f"rank {rank}:\n{text}" for rank, text in errors.items())
        raise AssertionError(f"{function.__name__} on {world_size} processes: exit codes {codes}\n{details}")
    return results


class TinyTokenModel(nn.Module):
    """A causal-LM-shaped model small enough to shard: an embedding, two residual tanh blocks, a head. Its loss is
    the mean cross-entropy over the real target tokens (labels ≠ -100), as a language model's, so the ranks' token
    counts weigh APO's loss and KL terms. ``forward`` returns ``{"loss", "logits"}`` with (batch, length, vocab)
    logits."""

    def __init__(self, width: int = 8, blocks: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, width)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(blocks))
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids, labels=None, attention_mask=None):
        hidden = self.embed(input_ids)
        for block in self.blocks:
            hidden = hidden + torch.tanh(block(hidden))  # out of place: FSDP2's hooks sit on each block's output
        logits = self.head(hidden)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits}
