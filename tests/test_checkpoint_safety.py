"""The per-rank optimizer files of --apo under FSDP2 (hf_apo/distributed.py) load with ``weights_only=True``.

A tampered file, whose pickle would call a function when loaded, is refused by the Trainer glue with an error that
names the file and says nothing was loaded, and the payload never runs. A state with DTensors (on a one-process gloo
mesh) round-trips exactly through a file that needs nothing beyond torch's default weights-only allowlist. The
two-process FSDP2 resume of the Trainer (tests/test_distributed.py) checks the same end to end.
"""

import math
import os
import pickle
import types

import pytest
import torch
import torch.distributed as dist

from hf_apo.distributed import RefusedCheckpointError, is_sharded, load_local_shards, save_local_shards, to_local_state


def load_with_default_globals_only(path):
    """``torch.load(weights_only=True)`` without the allowlist entries that imports add (torch.distributed.tensor
    adds DTensor and DeviceMesh): what a file of plain tensors and data loads with."""
    added = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        return torch.load(path, weights_only=True)
    finally:
        torch.serialization.add_safe_globals(added)


def leaf_types(obj):
    if isinstance(obj, dict):
        return set().union(*map(leaf_types, obj.values())) if obj else set()
    if isinstance(obj, (list, tuple)) and not isinstance(obj, torch.Size):
        return set().union(*map(leaf_types, obj)) if obj else set()
    return {type(obj)}


def _touch(path):
    with open(path, "w") as file:
        file.write("the payload ran")


class Payload:
    """Unpickling this calls _touch: a checkpoint that runs code on load."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return _touch, (self.marker,)


def fake_trainer(process_index=0, world_size=2):
    """What APOTrainerMixin._load_optimizer_and_scheduler uses of a Trainer, recording the states it loads."""
    from hf_apo.apo_trainer import APOTrainerMixin

    loaded = []
    trainer = types.SimpleNamespace(
        args=types.SimpleNamespace(process_index=process_index, world_size=world_size, device=torch.device("cpu")),
        apo_optimizer=types.SimpleNamespace(all_params=lambda: [], load_state_dict=lambda s: loaded.append("opt")),
        lr_scheduler=types.SimpleNamespace(load_state_dict=lambda s: loaded.append("scheduler")),
        _apo_sharded=lambda: True,
    )
    trainer._apo_optimizer_file = lambda directory: APOTrainerMixin._apo_optimizer_file(trainer, directory)
    return trainer, loaded, lambda checkpoint: APOTrainerMixin._load_optimizer_and_scheduler(trainer, checkpoint)


@pytest.mark.parametrize("tampered", ["apo_optimizer_rank0.pt", "scheduler.pt"])
def test_trainer_refuses_a_tampered_checkpoint_file_and_loads_nothing(tmp_path, tampered):
    checkpoint, marker = tmp_path / "checkpoint-4", tmp_path / "marker"
    checkpoint.mkdir()
    save_local_shards({"state": {}, "param_groups": [], "apo": {"step_count": 4}},
                      str(checkpoint / "apo_optimizer_rank0.pt"), process_index=0, world_size=2)
    torch.save({"last_epoch": 4}, checkpoint / "scheduler.pt")
    torch.save({"state": {}, "param_groups": [], "apo": {"last_batch": Payload(str(marker))}}, checkpoint / tampered)
    trainer, loaded, load = fake_trainer()

    with pytest.raises(RefusedCheckpointError) as refused:
        load(str(checkpoint))
    message = str(refused.value)
    assert isinstance(refused.value, pickle.UnpicklingError)
    assert str(checkpoint / tampered) in message and "weights_only=True" in message
    assert "Unsupported global" in message and "_touch" in message  # why: the function the pickle would call
    assert "Nothing was loaded" in message
    assert loaded == [] and not marker.exists()  # neither state loaded, and the payload never ran
    # The file is a live payload: the old weights_only=False load would have run it.
    torch.load(checkpoint / tampered, weights_only=False)
    assert marker.exists()


def test_trainer_loads_an_untampered_checkpoint(tmp_path):
    save_local_shards({"state": {}, "param_groups": [], "apo": {"step_count": 4}},
                      str(tmp_path / "apo_optimizer_rank1.pt"), process_index=1, world_size=2)
    torch.save({"last_epoch": 4}, tmp_path / "scheduler.pt")
    trainer, loaded, load = fake_trainer(process_index=1)
    load(str(tmp_path))
    assert loaded == ["opt", "scheduler"]
    # Another rank's file (or another number of processes) is refused before anything loads.
    os.rename(tmp_path / "apo_optimizer_rank1.pt", tmp_path / "apo_optimizer_rank0.pt")
    trainer, loaded, load = fake_trainer(process_index=0)
    with pytest.raises(ValueError, match="written by rank 1 of 2 processes"):
        load(str(tmp_path))
    assert loaded == []


def test_saving_refuses_what_weights_only_would_not_load():
    np = pytest.importorskip("numpy")
    for value in (object(), np.float64(1.0)):
        with pytest.raises(TypeError, match=r"at \['apo', 'last_batch', 'x'\]"):
            to_local_state({"state": {}, "apo": {"last_batch": {"x": value}}}, [])


@pytest.fixture
def one_process_mesh():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_dtensor_state_round_trips_exactly_through_plain_local_shards(one_process_mesh, tmp_path):
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    torch.manual_seed(0)
    params = [torch.nn.Parameter(distribute_tensor(torch.randn(5, 3), one_process_mesh, [Shard(0)])),
              torch.nn.Parameter(distribute_tensor(torch.randn(7), one_process_mesh, [Shard(0)]))]
    optimizer = torch.optim.AdamW(params, lr=0.1)
    for p in params:
        p.grad = distribute_tensor(torch.randn(p.shape), one_process_mesh, [Shard(0)])
    optimizer.step()
    generator = torch.Generator().manual_seed(3)
    state = optimizer.state_dict()
    state["apo"] = {"step_count": 1, "last_meta_objective": float("nan"), "previous_signs": [1.0, -1.0],
                    "last_batch": {"input_ids": torch.arange(6).view(2, 3)}, "pending": None,
                    "rounding_generators": {"cpu": generator.get_state()}, "kind": "adam"}
    path = str(tmp_path / "apo_optimizer_rank0.pt")
    save_local_shards(state, path, process_index=0, world_size=1)
    assert all(is_sharded(s["exp_avg"]) for s in optimizer.state.values())  # the live state is left as it was

    plain = load_with_default_globals_only(path)
    assert leaf_types(plain) <= {torch.Tensor, int, float, bool, str, type(None)}
    moments = [["state", i, key] for i in (0, 1) for key in ("exp_avg", "exp_avg_sq")]
    assert [record["path"] for record in plain["dtensors"]] == moments

    loaded = load_local_shards(path, params, process_index=0, world_size=1)
    resumed = torch.optim.AdamW(params, lr=0.1)
    resumed.load_state_dict(loaded)
    for p in params:
        for key in ("exp_avg", "exp_avg_sq"):
            before, after = optimizer.state[p][key], resumed.state[p][key]
            assert isinstance(after, DTensor) and after.placements == before.placements
            assert after.shape == before.shape and after.stride() == before.stride()
            assert torch.equal(after.to_local(), before.to_local())
        assert torch.equal(resumed.state[p]["step"], optimizer.state[p]["step"])
    apo = loaded["apo"]
    assert math.isnan(apo["last_meta_objective"]) and apo["previous_signs"] == [1.0, -1.0] and apo["pending"] is None
    assert torch.equal(apo["last_batch"]["input_ids"], torch.arange(6).view(2, 3))
    restored = torch.Generator()
    restored.set_state(apo["rounding_generators"]["cpu"])
    assert torch.equal(torch.rand(4, generator=restored), torch.rand(4, generator=generator))
