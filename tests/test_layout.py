"""hf_apo.distributed.Layout's reductions in one process, with a fake communicator standing in for the other rank.

The 2-process tests (test_distributed.py, test_fsdp.py) are the end-to-end check; these pin down what each reduction
does with its inputs: which entries are summed over the shards, which stay this rank's, what is averaged, and that the
one-process layout changes nothing.
"""

import math

import torch

from hf_apo.distributed import Layout


class TwoRanks(Layout):
    """A sharded layout whose other rank holds ``other`` for every reduced tensor (sum over shards = mine + other)."""

    def __init__(self, other: float):
        super().__init__(group=object())
        self.other = other
        self.reduced: list[torch.Tensor] = []

    def sum_over_shards(self, tensor):
        self.reduced.append(tensor.clone())
        return tensor.add_(self.other)


def test_one_process_layout_changes_nothing():
    layout = Layout()
    assert not layout.sharded
    t = torch.tensor([1.0, 2.0, 3.0])
    assert layout.sum_over_shards(t) is t and torch.equal(t, torch.tensor([1.0, 2.0, 3.0]))
    layout.sum_over_shards_where(t, torch.tensor([True, False, True]))
    assert torch.equal(t, torch.tensor([1.0, 2.0, 3.0]))
    finite, q = layout.average(t, torch.tensor(0.5))
    assert finite and q == 0.5 and torch.equal(t, torch.tensor([1.0, 2.0, 3.0]))
    finite, _ = layout.average(torch.tensor([1.0, math.nan]), torch.tensor(0.5))
    assert not finite


def test_sharded_sum_touches_only_the_masked_entries():
    layout = TwoRanks(other=10.0)
    flat = torch.tensor([1.0, 2.0, 3.0, 4.0])
    layout.sum_over_shards_where(flat, torch.tensor([True, False, False, True]))
    assert torch.equal(flat, torch.tensor([11.0, 2.0, 3.0, 14.0]))  # a row factor's own entries stay this rank's
    assert [t.tolist() for t in layout.reduced] == [[1.0, 4.0]]  # one reduction, of the masked entries only
    layout.sum_over_shards_where(flat, torch.zeros(4, dtype=torch.bool))
    assert len(layout.reduced) == 1  # nothing masked: no collective at all


def test_sharded_average_leaves_the_meta_gradient_and_checks_every_entry():
    """Sharded, the meta-gradient is already complete (its per-row entries differ between ranks): average() must not
    touch it; only Q and the non-finite count are reduced (one process: the mean over one rank is the value)."""
    layout = TwoRanks(other=0.0)
    meta_grad = torch.tensor([1.0, -2.0])
    finite, q = layout.average(meta_grad, torch.tensor(3.0))
    assert finite and q == 3.0 and torch.equal(meta_grad, torch.tensor([1.0, -2.0]))
    finite, _ = layout.average(torch.tensor([1.0, math.inf]), torch.tensor(3.0))
    assert not finite


def test_lookahead_gradients_keep_the_real_gradient_in_grad():
    """Both layouts hand back v and leave g in ``.grad`` for the real step (sharded: FSDP writes v there first)."""

    class Objective:
        def lookahead_gradient(self, params, batch, meta_batch, target, into_grad=False):
            v = [torch.full_like(p, 7.0) for p in params]
            if into_grad:
                for p, g in zip(params, v):
                    p.grad = g
            return type("Result", (), {"objective": torch.tensor(1.0), "lookahead_grads": v})()

    for layout in (Layout(), TwoRanks(other=0.0)):
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.ones(3)
        real = p.grad
        _, v = layout.lookahead_gradients(Objective(), [p], None, None, None)
        assert torch.equal(v[0], torch.full((3,), 7.0)) and p.grad is real


def test_the_optimizer_chooses_its_layout_once_and_again_when_its_parameters_change(monkeypatch):
    """APO-LR and APO-Precond read one Layout per set of parameters: not rebuilt at each meta step, rebuilt when the
    groups' parameters are replaced (as Accelerate does when it shards them after the optimizer is built)."""
    from hf_apo import APOLR, APOPrecond, ProximalObjective
    from hf_apo import distributed

    built = []
    original = distributed.Layout.of.__func__

    def counting(cls, params):
        built.append(len(params))
        return original(cls, params)

    monkeypatch.setattr(distributed.Layout, "of", classmethod(counting))
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    batch = {"x": torch.randn(4, 3), "y": torch.randn(4, 2)}

    def forward(m, b):
        out = m(b["x"])
        return {"loss": ((out - b["y"]) ** 2).mean(), "logits": out}

    objective = ProximalObjective(model, forward=forward, divergence="squared_error", lambda_fsd=1.0)
    for optimizer in (APOLR(model.parameters(), objective, lr=1e-2, meta_interval=1),
                      APOPrecond(model.parameters(), objective, base="adamw", lr=1e-2, meta_interval=1)):
        built.clear()
        for _ in range(3):
            optimizer.zero_grad()
            forward(model, batch)["loss"].backward()
            optimizer.observe(batch)
            optimizer.step()
        assert optimizer.meta_steps == 3 and built == [2]
        replaced = [torch.nn.Parameter(p.detach().clone()) for p in optimizer.param_groups[0]["params"]]
        optimizer.param_groups[0]["params"] = replaced
        assert optimizer.layout is optimizer.layout and built == [2, 2]
