"""Where APO's tensors live across processes, in one place: the optimizers call :class:`Layout`, the Trainer glue
saves and loads through the checkpoint functions below, and no other module knows about sharding.

Three layouts, told apart by the optimizer's parameters (:meth:`Layout.of`):

* **one process**: nothing is reduced.
* **data parallel** (DDP, or any launcher with a process group; every rank holds the whole model): the meta-gradient
  and Q are averaged over the ranks with one all-reduce per meta step, so φ stays identical everywhere. Each rank's
  loss and KL are weighted by its share of the global count of target tokens (:func:`shares_of_global_count`), so
  the mean over ranks is the gradient of the global token means, as the Trainer weighs the training loss with
  ``num_items_in_batch``.
* **FSDP2** (``fully_shard``; supported: every parameter a DTensor sharded on dim 0 over one 1-D mesh of all ranks,
  so the shard group is the data-parallel group): parameters, gradients and momentum-like state are this rank's shards
  (:func:`local_tensor`, views). The look-ahead runs through the sharded module, so FSDP gathers the parameters at θ′
  and reduce-scatters v into ``.grad``, already the mean over the ranks (:meth:`Layout.lookahead_gradients`). Dot
  products and norms over the shards are summed (:meth:`Layout.sum_over_shards`, one all-reduce per meta step) and
  only Q and a non-finite flag are averaged (:meth:`Layout.average`). APO-Precond keeps the factors of this rank's
  shard: a shard holds whole rows, so the input side R stays dense where it would be and the row side L is diagonal
  over this rank's rows (a dense L would couple rows held by other ranks); the VJP's sums over rows (R's gradient, a
  scale's) are summed over the ranks, L's entries stay with their rows. HSDP, tensor parallelism and unsharded
  parameters beside sharded ones are refused.

Checkpoints under FSDP2 (:func:`save_local_shards`, :func:`load_local_shards`): each rank saves its whole optimizer
state (its shards of the per-parameter state and the APO state) to its own file, loadable with
``torch.load(weights_only=True)``. The file holds no DTensor: every DTensor becomes its local shard, a plain tensor,
and a record of where it was (its path in the state dict), its placements and its global shape and stride. Loading
puts each shard back as a DTensor on the mesh of the parameters of the resumed run (``DTensor.from_local``, which
keeps the local tensor as it is), so the round trip is exact. Everything else in the state is plain data (tensors,
numbers, strings, None, lists, tuples, dicts), checked when saving so that a checkpoint that could not be resumed is
never written. A file that ``torch.load(weights_only=True)`` refuses (for instance a pickle that would call a function
on load) is refused with :class:`RefusedCheckpointError` before anything is loaded. A file of the earlier layout (the
state dict with its DTensors pickled) still loads: torch's weights-only unpickler accepts DTensor and DeviceMesh once
``torch.distributed.tensor`` is imported.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:  # FSDP2 (torch.distributed.fsdp.fully_shard): sharded parameters are DTensors
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
    from torch.distributed.tensor import DTensor as _DTensor, Shard
except ImportError:  # a torch built without torch.distributed
    _FSDPModule = _DTensor = Shard = None


def is_sharded(tensor: Any) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter or gradient of an FSDP2 ``fully_shard`` model)."""
    return _DTensor is not None and isinstance(tensor, _DTensor)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view: in-place ops reach the parameter), the tensor itself otherwise."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def backward_inputs(params: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
    """The ``inputs`` of a look-ahead backward: the parameters, or None for DTensors, with which
    ``backward(inputs=...)`` silently computes nothing (FSDP2's own backward then reduce-scatters into ``.grad``)."""
    return None if any(is_sharded(p) for p in params) else list(params)


def free_gathered(model: nn.Module) -> None:
    """Free the parameters FSDP2 gathered for a forward without backward, in every ``fully_shard`` unit.

    The root unit, and any unit with ``reshard_after_forward=False`` (Accelerate's embedding/LM-head unit), keeps
    its gathered parameters after a forward, for the backward; after a no-grad forward nothing frees them, and the
    next forward would run on those stale copies even after the optimizer changed the shards (measured: the
    look-ahead forward then ran at θ for those units, not θ′).
    """
    if _FSDPModule is None:
        return
    for module in model.modules():
        if isinstance(module, _FSDPModule):
            module.reshard()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over data-parallel ranks, in place; a no-op in a single process.

    The look-ahead backward is not seen by DDP, so without this φ would drift apart across ranks.
    """
    if _world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def shares_of_global_count(counts: list[int | None], device) -> list[float]:
    """Each count times the number of ranks over its sum over ranks: the weight that turns a rank's mean into its part
    of the global mean, which the mean over ranks of the meta-gradient then forms (1.0 in a single process, for
    equal counts on every rank, and for an unknown count, None).

    As the Trainer weighs the training loss by ``num_items_in_batch``: with per-rank token means, ranks with fewer
    target tokens would weigh as much as ranks with more, and several processes would not equal one.
    """
    if _world_size() == 1:
        return [1.0] * len(counts)
    local = torch.tensor([float(c or 0) for c in counts], dtype=torch.float64, device=device)
    totals = local.clone()
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    world = dist.get_world_size()
    return [
        1.0 if c is None or total == 0 else float(c) * world / float(total)
        for c, total in zip(counts, totals.tolist())
    ]


def shard_group(params: Sequence[torch.Tensor]):
    """The process group that FSDP2 shards ``params`` over, or None when they are plain tensors (see the module
    docstring for what is supported)."""
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    mesh = sharded[0].device_mesh
    supported = len(sharded) == len(params) and all(
        p.device_mesh == mesh and tuple(p.placements) == (Shard(0),) for p in sharded
    )
    if not supported or mesh.ndim != 1 or mesh.size() != dist.get_world_size():
        raise NotImplementedError(
            "APO under FSDP2 supports parameters all sharded on dim 0 over one mesh of all ranks (fully_shard with a "
            "1-D mesh); HSDP, tensor parallelism and unsharded parameters next to sharded ones are not supported."
        )
    return mesh.get_group()


class Layout:
    """How an optimizer's parameters are laid out over the processes, and the reductions its meta step needs."""

    def __init__(self, group=None):
        self.group = group  # FSDP2: the process group the parameters are sharded over; None otherwise

    @classmethod
    def of(cls, params: Sequence[torch.Tensor]) -> Layout:
        return cls(shard_group(params))

    @property
    def sharded(self) -> bool:
        return self.group is not None

    def sum_over_shards(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sums over this rank's shards made whole (in place, one all-reduce); unchanged when nothing is sharded."""
        if self.sharded:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def sum_over_shards_where(self, flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``flat`` with its entries under ``mask`` summed over the shards (in place); the others stay this rank's."""
        if self.sharded and bool(mask.any()):
            flat[mask] = self.sum_over_shards(flat[mask].clone())
        return flat

    def average(self, meta_grad: torch.Tensor, objective: torch.Tensor) -> tuple[bool, float]:
        """The mean over ranks of the meta-gradient (in place) and of Q: (all finite on every rank, Q).

        Sharded, v arrived reduce-scattered (already the mean over ranks) and the caller has summed the shards'
        parts, so the meta-gradient is complete, and its entries for a rank's own rows of a factor differ between
        ranks: only Q and the count of non-finite entries are averaged. The check follows the reduction, so every
        rank takes the same decision.
        """
        if self.sharded:
            non_finite = (~torch.isfinite(meta_grad)).sum()
            packed = torch.stack([objective.to(torch.float64), non_finite.to(objective.device, torch.float64)])
            all_reduce_mean(packed)
            return bool(torch.isfinite(packed[0])) and float(packed[1]) == 0, float(packed[0])
        if _world_size() == 1:  # nothing to average: no packed copy of the meta-gradient
            return bool(torch.isfinite(meta_grad).all()) and bool(torch.isfinite(objective)), float(objective)
        packed = torch.cat([meta_grad.reshape(-1), objective.reshape(1).to(meta_grad.dtype)])
        all_reduce_mean(packed)
        meta_grad.copy_(packed[:-1].view_as(meta_grad))
        return bool(torch.isfinite(packed).all()), float(packed[-1])

    def lookahead_gradients(self, objective, params, batch, meta_batch, target):
        """(Q's terms, v per parameter as local tensors) at θ′, leaving ``.grad`` (g) as it was: sharded, FSDP's
        backward reduce-scatters v into ``.grad``, so g is set aside and put back."""
        if not self.sharded:
            result = objective.lookahead_gradient(params, batch, meta_batch, target)
            return result, result.lookahead_grads
        grads = [p.grad for p in params]
        result = objective.lookahead_gradient(params, batch, meta_batch, target, into_grad=True)
        lookahead = [None if p.grad is None else local_tensor(p.grad) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        return result, lookahead


# -- checkpoints under FSDP2 (see the module docstring) ------------------------------------------------------------
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

