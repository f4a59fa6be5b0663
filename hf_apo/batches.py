"""Batches as the training loop hands them over (a mapping, a tuple or a tensor), and model outputs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

Batch = Any


def default_forward(model: nn.Module, batch: Batch) -> Any:
    """Hugging Face convention: keyword batch in, output with ``loss`` and ``logits`` out."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def get_output(outputs: Any, key: str) -> torch.Tensor | None:
    """Reads ``key`` from a ``ModelOutput``, a dict or an object attribute; None when absent."""
    if isinstance(outputs, Mapping):
        return outputs.get(key)
    return getattr(outputs, key, None)


def batch_size_of(batch: Batch) -> int | None:
    """The leading dimension of the first tensor in ``batch``."""
    for value in _tensors(batch):
        return value.shape[0] if value.dim() > 0 else None
    return None


def slice_batch(batch: Batch, size: int) -> Batch:
    """The first ``size`` examples of a batch: every tensor whose leading dimension is the batch size is cut."""
    full = batch_size_of(batch)
    if full is None or size >= full:
        return batch

    def cut(value):
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == full:
            return value[:size]
        return value

    if isinstance(batch, Mapping):
        return {k: cut(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(cut(v) for v in batch)
    return cut(batch)


def move_batch(batch: Batch, device: torch.device) -> Batch:
    """``batch`` with every tensor on ``device`` (a restored meta batch may sit on the CPU)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_batch(v, device) for v in batch)
    return batch


def _tensors(batch: Batch) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (tuple, list)):
        for value in batch:
            yield from _tensors(value)
