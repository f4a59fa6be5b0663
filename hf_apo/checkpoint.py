"""Per-rank optimizer checkpoints under FSDP2 that load with ``torch.load(weights_only=True)``.

Under FSDP2 each rank saves its whole optimizer state (its shards of the per-parameter state and the APO state) to
its own file. The file holds no DTensor: every DTensor becomes its local shard, a plain tensor, and a record of where
it was (its path in the state dict), its placements and its global shape and stride. Loading puts each shard back as
a DTensor on the mesh of the parameters of the resumed run (``DTensor.from_local``, which keeps the local tensor as
it is), so the round trip is exact. Everything else in the state is plain data (tensors, numbers, strings, None,
lists, tuples, dicts), checked when saving so that a checkpoint that could not be resumed is never written.

A file that ``torch.load(weights_only=True)`` refuses (for instance a pickle that would call a function on load) is
refused with :class:`RefusedCheckpointError` before anything is loaded. A file of the earlier layout (the state dict
with its DTensors pickled) still loads: torch's weights-only unpickler accepts DTensor and DeviceMesh once
``torch.distributed.tensor`` is imported.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from typing import Any

import torch

from .objective import is_sharded

FORMAT = "hf_apo.fsdp2_optimizer_state/1"
_LEAVES = (torch.Tensor, torch.nn.Parameter, bool, int, float, complex, str, bytes, type(None), torch.dtype,
           torch.device, torch.Size)


class RefusedCheckpointError(pickle.UnpicklingError):
    """A checkpoint file that ``torch.load(weights_only=True)`` would not load, or not in this module's format."""


def _placement_record(placement) -> list:
    from torch.distributed.tensor import Replicate, Shard

    if type(placement) is Shard:
        return ["shard", placement.dim]
    if type(placement) is Replicate:
        return ["replicate"]
    raise NotImplementedError(f"hf_apo cannot checkpoint optimizer state with the DTensor placement {placement!r}.")


def _placement(record: list):
    from torch.distributed.tensor import Replicate, Shard

    if record[0] == "shard":
        return Shard(int(record[1]))
    if record[0] == "replicate":
        return Replicate()
    raise ValueError(f"unknown placement record {record!r}")


def to_local_state(obj: Any, records: list, path: tuple = (), in_tuple: bool = False) -> Any:
    """A copy of the containers of ``obj`` with each DTensor replaced by its local tensor (not copied), recorded in
    ``records``; raises TypeError on anything ``torch.load(weights_only=True)`` might not accept."""
    if is_sharded(obj):
        if in_tuple:
            raise TypeError(f"The optimizer state holds a DTensor inside a tuple, at {list(path)}; hf_apo cannot "
                            "checkpoint it.")
        records.append({
            "path": list(path),
            "placements": [_placement_record(p) for p in obj.placements],
            "shape": list(obj.shape),
            "stride": list(obj.stride()),
        })
        return obj.to_local()
    if type(obj) in _LEAVES:  # exact types: a numpy float or an IntEnum pickles as a global that torch refuses
        return obj
    if type(obj) in (dict, OrderedDict):
        return type(obj)((key, to_local_state(value, records, (*path, key))) for key, value in obj.items())
    if type(obj) in (list, tuple):
        return type(obj)(to_local_state(value, records, (*path, index), type(obj) is tuple)
                         for index, value in enumerate(obj))
    raise TypeError(
        f"The optimizer state holds a {type(obj).__module__}.{type(obj).__qualname__} at {list(path)}: a checkpoint "
        "must hold only tensors, numbers, strings, None, lists, tuples and dicts so that it resumes with "
        "torch.load(weights_only=True)."
    )


def save_local_shards(state: dict, path: str, *, process_index: int, world_size: int) -> None:
    """Write ``state`` (an optimizer state dict, DTensors allowed) to ``path`` as plain tensors and placements."""
    records: list = []
    local = to_local_state(state, records)
    torch.save({"format": FORMAT, "process_index": process_index, "world_size": world_size, "state": local,
                "dtensors": records}, path)


def safe_load(path: str, map_location=None) -> Any:
    """``torch.load(path, weights_only=True)``; a file it refuses raises :class:`RefusedCheckpointError`."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        reason = next((line.strip() for line in text.splitlines() if "WeightsUnpickler error:" in line),
                      text.splitlines()[0] if text else type(error).__name__)
        reason = reason.split(". Please use", 1)[0].removeprefix("WeightsUnpickler error: ")  # not the allowlist advice
        raise RefusedCheckpointError(
            f"Refused to load {path}: torch.load(weights_only=True) does not accept it ({reason}). The file holds "
            "something other than tensors and plain data, which could run code when unpickled: it was changed or "
            "not written by hf_apo. Nothing was loaded from this checkpoint into the optimizer or the LR "
            "scheduler. Resume from a checkpoint this run wrote, or start a new run."
        ) from None


def load_local_shards(path: str, params: list[torch.Tensor], *, process_index: int, world_size: int,
                      map_location=None) -> dict:
    """Read a file written by :func:`save_local_shards` with ``weights_only=True`` and return the optimizer state
    dict with each recorded shard put back as a DTensor on the mesh of ``params`` (this run's parameters)."""
    saved = safe_load(path, map_location=map_location)
    if isinstance(saved, dict) and "format" not in saved and {"state", "param_groups"} <= saved.keys():
        # Written by hf_apo before this format, with the DTensors themselves: torch.load(weights_only=True) accepts
        # those (torch.distributed.tensor allow-lists DTensor and DeviceMesh) and they load as they are.
        return saved
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise RefusedCheckpointError(
            f"Refused to load {path}: it is not an hf_apo FSDP2 optimizer file (format {FORMAT!r}). Nothing was "
            "loaded from this checkpoint into the optimizer or the LR scheduler."
        )
    if (saved["process_index"], saved["world_size"]) != (process_index, world_size):
        raise ValueError(
            f"{path} was written by rank {saved['process_index']} of {saved['world_size']} processes, and is loaded "
            f"by rank {process_index} of {world_size}: resume with the same number of processes. Nothing was loaded."
        )
    state = saved["state"]
    records = saved["dtensors"]
    if records:
        from torch.distributed.tensor import DTensor

        meshes = []
        for mesh in (p.device_mesh for p in params if is_sharded(p)):
            if all(mesh != other for other in meshes):
                meshes.append(mesh)
        if len(meshes) != 1:
            raise ValueError(f"{path} holds shards of DTensors, but this optimizer's parameters are not sharded over "
                             "one mesh (FSDP2). Nothing was loaded.")
        (mesh,) = meshes
        for record in records:
            *parents, last = record["path"]
            container = state
            for key in parents:
                container = container[key]
            container[last] = DTensor.from_local(
                container[last], mesh, [_placement(p) for p in record["placements"]], run_check=False,
                shape=torch.Size(record["shape"]), stride=tuple(record["stride"]),
            )
    return state


__all__ = ["RefusedCheckpointError", "load_local_shards", "safe_load", "save_local_shards", "to_local_state"]
