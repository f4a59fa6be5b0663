"""The pieces APO's step is made of, tested alone: APO-LR's meta-gradient formulas (pure functions), φ's and D's owned
objects, the profiler regions of both optimizers, ``memory_usage()`` against a hand count, and the one route to the
defaults (hf_apo.defaults through the constructors, ``model=``, ``for_apo`` and ``default_over``)."""

import inspect
import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from hf_apo import APOLR, APOPrecond, ProximalObjective
from hf_apo.defaults import settings
from hf_apo.lr_meta_gradient import displacement_meta_gradient, lookahead_meta_gradient, rescale_step_
from hf_apo.next_batch import Displacement
from hf_apo.phi_step import LogLR
from test_reduction import groups, mlp_batches, run
from tiny import MLP

F32 = 4  # bytes
MLP_NUMEL = 7 * 5 + 7 + 4 * 7 + 4  # MLP(5 → 7 → 4): two weights, two biases
BATCH_BYTES = 16 * 5 * F32 + 16 * 8  # x (16 × 5 float32) and labels (16 int64)


# -- the formulas ----------------------------------------------------------------------------------------------
def test_lookahead_meta_gradient_is_the_dot_product_plus_the_weight_space_term_per_group():
    deltas = [torch.tensor([1.0, 2.0]), torch.tensor([3.0]), torch.tensor([-1.0, 0.5])]
    v = [torch.tensor([0.5, -1.0]), None, torch.tensor([2.0, 4.0])]
    zero = torch.zeros((), dtype=torch.float64)
    meta_grad, proximity = lookahead_meta_gradient(deltas, v, [2, 1], lambda_wsd=0.1, zero=zero)
    # group 0: ⟨Δ, v⟩ = (0.5 − 2) + 0 (v unreached), ‖Δ‖² = 1 + 4 + 9; group 1: −2 + 2, ‖Δ‖² = 1.25
    expected = torch.tensor([-1.5 + 0.1 * 14, 0.0 + 0.1 * 1.25], dtype=torch.float64)
    torch.testing.assert_close(meta_grad, expected)
    assert float(proximity) == pytest.approx(0.5 * 0.1 * 15.25)
    assert torch.equal(v[0], torch.tensor([0.5, -2.0]))  # the .grad buffers now hold Δ ⊙ v


def test_displacement_meta_gradient_skips_parameters_without_a_gradient():
    displacements = [[torch.tensor([1.0, 2.0]), torch.tensor([5.0])], [torch.tensor([-1.0])]]
    grads = [[torch.tensor([3.0, 1.0]), None], [torch.tensor([2.0])]]
    dots = displacement_meta_gradient(displacements, grads, like=torch.zeros(2))
    assert dots.tolist() == [5.0, -2.0]


def test_rescale_step_gives_the_step_of_the_new_multiplier():
    theta, delta = torch.tensor([1.0, 2.0]), torch.tensor([0.1, -0.2])
    lookahead = theta + delta
    rescale_step_([[lookahead]], [[delta]], [math.log(3.0)])
    torch.testing.assert_close(lookahead, theta + 3.0 * delta)


def test_log_lr_only_lowers_during_a_warm_up_and_clamps():
    phi = LogLR(2, meta_lr=0.5, betas=(0.9, 0.999), log_lr_range=(-0.7, 10.0))
    changes, signs = phi.step(torch.tensor([-1.0, 1.0]), only_lower=True)
    assert changes[0] == 0.0 and changes[1] < 0 and signs == [0.0, 1.0]
    for _ in range(5):
        phi.step(torch.tensor([1.0, 1.0]))
    assert phi.log_lr.tolist() == pytest.approx([-0.7, -0.7])
    assert phi.multipliers() == pytest.approx([math.exp(-0.7)] * 2)


def test_displacement_is_the_discounted_sum_of_the_steps():
    theta = torch.tensor([1.0, 1.0])
    displacement = Displacement()
    for step in (torch.tensor([0.5, 0.0]), torch.tensor([0.0, 2.0])):
        displacement.before_step([theta], gamma=0.5)
        theta.add_(step)
        displacement.after_step([theta])
    assert displacement.tensors[0].tolist() == [0.25, 2.0]  # 0.5·(0.5, 0) + (0, 2)


# -- profiler regions ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda m: APOLR(groups(m), ProximalObjective(m, lambda_fsd=1.0), lr=1e-3, meta_interval=2, trust_region="none"),
    lambda m: APOLR(groups(m), ProximalObjective(m, lambda_fsd=0.0, loss_batch="next"), lr=1e-3, meta_interval=2, trust_region="none"),
    lambda m: APOPrecond(groups(m), ProximalObjective(m, lambda_fsd=1.0), lr=0.1, momentum=0.9, meta_interval=2),
    lambda m: APOLR(APOPrecond.from_adamw(torch.optim.AdamW(groups(m)), ProximalObjective(m), shape_only=True,
                                          meta_interval=2), ProximalObjective(m, loss_batch="next", lambda_fsd=0.0),
                    meta_interval=2),
], ids=["lr_same", "lr_next", "precond", "lr_over_precond"])
def test_both_optimizers_mark_the_base_step_and_the_meta_step(build):
    model = MLP()
    optimizer = build(model)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(model, optimizer, mlp_batches(4))
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("apo/")}
    assert counts["apo/base_step"] == 4 and counts["apo/meta_step"] >= 1  # one base step per step, nested or not
    model = MLP()
    optimizer = build(model)
    for apo in (optimizer, getattr(optimizer, "inner", None)):
        if apo is not None:
            apo.meta_lr = 0.0  # meta-learning off: the base step alone
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(model, optimizer, mlp_batches(4))
    assert {e.key for e in prof.key_averages() if e.key.startswith("apo/")} == {"apo/base_step"}


# -- memory_usage ----------------------------------------------------------------------------------------------
def test_apo_lr_memory_usage_is_the_hand_count():
    model = MLP()
    objective = ProximalObjective(model, lambda_fsd=0.0, loss_batch="next", horizon=100)
    optimizer = APOLR(groups(model), objective, base="adamw", lr=1e-3, meta_interval=2, meta_lr=0.1, trust_region="none")
    run(model, optimizer, mlp_batches(6))
    assert optimizer.pending is not None  # step 6 was a look-ahead
    adamw = 2 * MLP_NUMEL * F32 + 4 * F32  # exp_avg, exp_avg_sq and a float32 step per parameter
    phi = 2 * F32 + (F32 + 2 * 2 * F32)  # φ per group; meta-Adam's step, exp_avg, exp_avg_sq
    displacement = MLP_NUMEL * F32  # D, float32
    pending = 2 * F32 + F32  # ∂Q/∂φ per group and Q
    assert optimizer.memory_usage() == {"state": adamw, "meta": phi + displacement + pending + 2 * BATCH_BYTES}


def test_apo_precond_memory_usage_is_the_hand_count():
    model = MLP()
    optimizer = APOPrecond(model.parameters(), ProximalObjective(model, lambda_fsd=1.0), lr=0.1, momentum=0.9,
                           meta_interval=2)
    run(model, optimizer, mlp_batches(4))
    assert optimizer.meta_steps == 2
    momentum = MLP_NUMEL * F32
    # every side of this MLP is at most 64 long: dense factors 7×7, 5×5 and 4×4, 7×7; a scalar per bias
    factor_entries = 7 * 7 + 5 * 5 + 4 * 4 + 7 * 7 + 2
    factors, cache = factor_entries * F32, factor_entries * F32  # A, B, s and the cached AAᵀ, BBᵀ, s²
    meta_adam = factor_entries * F32 + 4 * F32 + 2 * F32  # exp_avg per entry; one exp_avg_sq per dense factor
    assert optimizer.memory_usage() == {"state": momentum, "meta": factors + cache + meta_adam + 2 * BATCH_BYTES}


def test_apo_lr_over_apo_precond_counts_both_meta_parts_once():
    model = MLP()
    inner = APOPrecond.from_adamw(torch.optim.AdamW(model.parameters(), lr=1e-3), ProximalObjective(model),
                                  shape_only=True, meta_interval=2)
    optimizer = APOLR.default_over(inner, model, trust_region="none")  # K 10: a look-ahead at step 10, done at 11
    run(model, optimizer, mlp_batches(12))
    assert optimizer.meta_steps == 1 and optimizer.pending is None
    usage, inner_usage = optimizer.memory_usage(), inner.memory_usage()
    assert usage["state"] == inner_usage["state"] == 2 * MLP_NUMEL * F32 + 4 * F32
    phi = F32 + (F32 + 2 * F32)  # one group
    assert usage["meta"] == inner_usage["meta"] + phi + MLP_NUMEL * F32  # + φ, its Adam state and D; no batch twice


# -- one route to the defaults ---------------------------------------------------------------------------------
FIELDS = ("loss_batch", "lambda_fsd", "lambda_wsd", "horizon")


def test_model_gives_the_default_objective_and_the_constructors_default_to_hf_apo_defaults():
    model = MLP()
    for cls, mode in ((APOLR, "lr"), (APOPrecond, "precond")):
        optimizer = cls(model.parameters(), model=model)
        expected = settings(mode)
        assert [getattr(optimizer.objective, f) for f in FIELDS] == [expected.get(f, 0.0) for f in FIELDS]
        defaults = {name: p.default for name, p in inspect.signature(cls).parameters.items()}
        assert (defaults["meta_lr"], defaults["meta_interval"]) == (expected["meta_lr"], expected["meta_interval"])
        with pytest.raises(ValueError, match="not both"):
            cls(model.parameters(), ProximalObjective(model), model=model)
    defaults = {name: p.default for name, p in inspect.signature(APOLR).parameters.items()}
    assert all(defaults[k] == settings("lr")[k] for k in ("meta_optimizer", "adaptive_interval", "max_meta_step"))
    over = APOLR.default_over(torch.optim.AdamW(model.parameters()), model)
    assert [getattr(over.objective, f) for f in FIELDS] == [getattr(APOLR(model.parameters(), model=model).objective, f)
                                                            for f in FIELDS]
