"""Behaviour of APO-LR and APO-Precond as a user sees it (APO.md §2, §4, §8).

* APO-LR rescues a learning rate 100× too small on a convex problem, within a fixed step budget;
* APO-Precond trains a bf16 model with float32 factors, and its state dict survives ``torch.save`` /
  ``torch.load(weights_only=True)`` with the factors still float32 and equal;
* a non-finite meta-objective skips the meta step (warning, counter, φ unchanged) while the base step still
  happens exactly as the base optimizer would take it;
* bad arguments raise errors that name the argument.
"""

from __future__ import annotations

import copy
import io
import math
import os
import sys

import pytest
import torch
from torch import nn

from hf_apo import APOLR, APOPrecond, ProximalObjective

sys.path.insert(0, os.path.dirname(__file__))
from tiny import MLP, copy_task_batch, mlp_batch, tiny_t5  # noqa: E402



# -- a. APO-LR rescues a learning rate 100× too small ---------------------------------------------------------

INPUTS, OUTPUTS, EXAMPLES, BATCH = 8, 2, 512, 32


def _squared_error_forward(model: nn.Module, batch: dict) -> dict:
    """½‖f(x) − y‖² summed over outputs, averaged over examples (the ``squared_error`` divergence's scale)."""
    logits = model(batch["x"])
    return {"loss": 0.5 * (logits - batch["y"]).pow(2).sum(dim=1).mean(), "logits": logits}


def _least_squares_problem():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(EXAMPLES, INPUTS, generator=generator)
    weight = 2 * torch.randn(OUTPUTS, INPUTS, generator=generator)
    bias = torch.randn(OUTPUTS, generator=generator)
    y = x @ weight.T + bias + 0.1 * torch.randn(EXAMPLES, OUTPUTS, generator=generator)
    design = torch.cat([x, torch.ones(EXAMPLES, 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, y.double()).solution
    optimum = float(0.5 * (design @ solution - y.double()).pow(2).sum(dim=1).mean())
    return x, y, optimum


def _train_least_squares(x, y, lr: float, meta_lr: float, steps: int = 400):
    """AdamW (no weight decay, so the optimum is the least-squares one) under APO-LR; returns (loss, multiplier)."""
    torch.manual_seed(0)
    model = nn.Linear(INPUTS, OUTPUTS)
    objective = ProximalObjective(model, lambda_fsd=1.0, divergence="squared_error", forward=_squared_error_forward)
    optimizer = APOLR(model.parameters(), objective, base="adamw", lr=lr, weight_decay=0.0, meta_interval=5,
                      meta_lr=meta_lr, trust_region="none")
    sampler = torch.Generator().manual_seed(1)
    for _ in range(steps):
        index = torch.randint(0, EXAMPLES, (BATCH,), generator=sampler)
        batch = {"x": x[index], "y": y[index]}
        optimizer.zero_grad()
        _squared_error_forward(model, batch)["loss"].backward()
        optimizer.observe(batch)
        optimizer.step()
    with torch.no_grad():
        loss = float(_squared_error_forward(model, {"x": x, "y": y})["loss"])
    return loss, optimizer.lr_multipliers[0], optimizer


def test_apo_lr_rescues_a_learning_rate_100x_too_small():
    x, y, optimum = _least_squares_problem()
    good_loss, _, _ = _train_least_squares(x, y, lr=1e-1, meta_lr=0.0)
    base_loss, base_multiplier, _ = _train_least_squares(x, y, lr=1e-3, meta_lr=0.0)
    apo_loss, multiplier, optimizer = _train_least_squares(x, y, lr=1e-3, meta_lr=0.1)
    print(
        f"rescue: optimum {optimum:.5f}; AdamW lr 1e-1 {good_loss:.5f}, lr 1e-3 {base_loss:.4f}; "
        f"APO-LR from lr 1e-3 {apo_loss:.5f} with multiplier {multiplier:.1f}"
    )
    # The premise: 1e-1 is a good learning rate for this budget, 1e-3 is far too small.
    assert good_loss - optimum < 1e-2
    assert base_multiplier == 1.0 and base_loss - optimum > 1.0
    # The rescue: the learned multiplier grew by more than 10× and APO-LR gets (much) closer to the optimum.
    assert optimizer.meta_steps == 400 // 5 and optimizer.skipped_meta_steps == 0
    assert multiplier > 10
    assert apo_loss - optimum < 0.5 * (base_loss - optimum)
    assert apo_loss - optimum < 1e-2
    assert optimizer.metrics()["apo/lr_multiplier"] == pytest.approx(multiplier)


# -- b. bf16 model, float32 factors, state dict round trip -----------------------------------------------------


def test_precond_trains_bf16_t5_with_float32_factors_and_round_trips():
    model = tiny_t5(dtype=torch.bfloat16)
    objective = ProximalObjective(model, lambda_fsd=10.0)
    optimizer = APOPrecond(
        model.parameters(), objective, lr=0.1, momentum=0.9, meta_interval=5, meta_lr=1e-2, meta_batch_fraction=0.5
    )
    initial = {p: [t.clone() for t in f.tensors] for p, f in optimizer.factors.items()}
    evaluation = copy_task_batch(torch.Generator().manual_seed(123), size=32)
    with torch.no_grad():
        start_loss = float(model(**evaluation).loss)
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        batch = copy_task_batch(generator, size=16)
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.observe(batch)
        optimizer.step()
    with torch.no_grad():
        end_loss = float(model(**evaluation).loss)
    print(f"bf16 T5 under APO-Precond: evaluation loss {start_loss:.3f} -> {end_loss:.3f}")

    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert optimizer.meta_steps == 6 and optimizer.skipped_meta_steps == 0
    assert math.isfinite(end_loss) and end_loss < start_loss - 0.3
    for factors in optimizer.factors.values():
        assert all(t.dtype == torch.float32 for t in factors.tensors)
        assert all(torch.isfinite(t).all() for t in factors.tensors)
        assert not factors.is_identity
    assert any(not torch.equal(t, t0) for p, f in optimizer.factors.items() for t, t0 in zip(f.tensors, initial[p]))
    # The momentum buffers follow the (bf16) parameters; only the factors are float32.
    assert all(optimizer.state[p]["momentum_buffer"].dtype == torch.bfloat16 for p in model.parameters())

    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    restored_model = copy.deepcopy(model)
    restored = APOPrecond(
        restored_model.parameters(), ProximalObjective(restored_model, lambda_fsd=10.0), lr=0.1, momentum=0.9,
        meta_interval=5, meta_lr=1e-2, meta_batch_fraction=0.5,
    )
    restored.load_state_dict(state)
    assert restored.step_count == optimizer.step_count and restored.meta_steps == optimizer.meta_steps
    for original, loaded in zip(optimizer.factors.values(), restored.factors.values()):
        assert not loaded.is_identity
        for t, u in zip(original.tensors, loaded.tensors):
            assert u.dtype == torch.float32 and torch.equal(t, u)
    for p, q in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(optimizer.state[p]["momentum_buffer"], restored.state[q]["momentum_buffer"])

    # One more (base) step from both gives the same parameters: the restored factors are in use.
    assert (optimizer.step_count + 1) % optimizer.meta_interval != 0
    batch = copy_task_batch(generator, size=16)
    for m, opt in ((model, optimizer), (restored_model, restored)):
        opt.zero_grad()
        m(**batch).loss.backward()
        opt.observe(batch)
        opt.step()
    for p, q in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(p, q)


def test_bf16_updates_below_half_an_ulp_accumulate_with_stochastic_rounding():
    """lr · g = 1e-3 on bf16 ones (ulp 2⁻⁷ ≈ 0.0078): rounding to the nearest drops every step; stochastic rounding
    is unbiased (100 steps: mean 1.1), and two optimizers built alike round alike (as data-parallel ranks must)."""

    def train(stochastic_rounding: bool) -> torch.Tensor:
        weight = torch.nn.Parameter(torch.ones(20_000, dtype=torch.bfloat16))
        optimizer = APOPrecond([weight], lr=1e-3, meta_lr=0.0, stochastic_rounding=stochastic_rounding)
        for _ in range(100):
            weight.grad = torch.full_like(weight, -1.0)
            optimizer.step()
        return weight.detach().float()

    assert torch.equal(train(False), torch.ones(20_000))
    rounded = train(True)
    assert rounded.mean().item() == pytest.approx(1.1, abs=1e-3)  # its standard error is 2e-4
    assert rounded.min() >= 1.0 and torch.equal(rounded * 128, (rounded * 128).round())  # on bf16's grid in [1, 2)
    assert rounded.std() > 0.01  # each entry took its own draws
    assert torch.equal(rounded, train(True))


# -- c. the NaN guard --------------------------------------------------------------------------------------------


def _mlp_step(model, optimizer, batch, meta_batch=None):
    """One training step; ``meta_batch`` is observed before ``batch`` so that it becomes B′ (hf_apo/meta.py)."""
    optimizer.zero_grad()
    model(**batch)["loss"].backward()
    if meta_batch is not None:
        optimizer.observe(meta_batch)
    optimizer.observe(batch)
    optimizer.step()


def _adamw_twin(model, optimizer, batch, multiplier):
    """A copy of the model and a torch AdamW in APO-LR's base state, with the gradient of ``batch``."""
    twin_model = copy.deepcopy(model)
    twin = torch.optim.AdamW(twin_model.parameters(), lr=1e-2)
    twin.load_state_dict(copy.deepcopy(optimizer.base_optimizer.state_dict()))
    if multiplier is not None:
        twin.param_groups[0]["lr"] = twin.param_groups[0]["lr"] * multiplier
    twin.zero_grad()
    twin_model(**batch)["loss"].backward()
    return twin_model, twin


def test_nan_guard_apo_lr_skips_meta_step_and_takes_base_step():
    model = MLP()
    objective = ProximalObjective(model, lambda_fsd=1.0)
    optimizer = APOLR(model.parameters(), objective, base="adamw", lr=1e-2, meta_interval=2, meta_lr=0.1, trust_region="none")
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):  # a meta step at step 2
        _mlp_step(model, optimizer, mlp_batch(generator))
    # Control: a finite meta step (step 4) lands where the base optimizer lands with lr · exp(φ_new).
    batch = mlp_batch(generator)
    twin_model, twin = _adamw_twin(model, optimizer, batch, multiplier=None)
    _mlp_step(model, optimizer, batch)
    assert optimizer.meta_steps == 2 and optimizer.log_lr.abs().min() > 0
    twin.param_groups[0]["lr"] = 1e-2 * optimizer.lr_multipliers[0]
    twin.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    _mlp_step(model, optimizer, mlp_batch(generator))  # step 5: no meta step

    batch = mlp_batch(generator)
    poisoned = mlp_batch(generator)
    # B′ with an inf input: tanh saturates, so f(B′) and Q stay finite, but the look-ahead gradient of the first
    # layer is 0 · inf = NaN: the guard must catch a non-finite meta-gradient, not only a non-finite Q.
    poisoned["x"][0, 0] = float("inf")
    log_lr = optimizer.log_lr.clone()
    multiplier = optimizer.lr_multipliers[0]
    meta_state = copy.deepcopy(optimizer.meta_optimizer.state_dict())

    twin_model, twin = _adamw_twin(model, optimizer, batch, multiplier)
    twin.step()

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="skipped"):
        _mlp_step(model, optimizer, batch, meta_batch=poisoned)
    assert optimizer.step_count == 6
    assert optimizer.skipped_meta_steps == 1 and optimizer.meta_steps == 2
    assert math.isfinite(optimizer.last_meta_objective)
    assert not torch.isfinite(optimizer.last_meta_gradient).all()
    assert torch.equal(optimizer.log_lr, log_lr) and optimizer.lr_multipliers[0] == multiplier
    assert _equal_states(optimizer.meta_optimizer.state_dict(), meta_state)
    assert optimizer.param_groups[0]["lr"] == 1e-2  # the scheduled LR is restored
    for p, p0, q in zip(model.parameters(), before, twin_model.parameters()):
        assert not torch.equal(p, p0)
        assert torch.equal(p, q)


def test_nan_guard_precond_skips_meta_step_and_keeps_factors():
    model = MLP()
    poison = {"lookahead": False}

    def forward(module, batch):
        """NaN loss in the look-ahead forward only (it is the one that runs with grad enabled), when poisoned."""
        outputs = module(**batch)
        if poison["lookahead"] and torch.is_grad_enabled():
            outputs["loss"] = outputs["loss"] * float("nan")
        return outputs

    objective = ProximalObjective(model, lambda_fsd=1.0, forward=forward)
    optimizer = APOPrecond(model.parameters(), objective, lr=0.1, momentum=0.9, meta_interval=2, meta_lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        _mlp_step(model, optimizer, mlp_batch(generator))
    assert optimizer.meta_steps == 2
    factors_before = {p: [t.clone() for t in f.tensors] for p, f in optimizer.factors.items()}
    assert any(not torch.equal(f[0], torch.eye(f[0].shape[0])) for f in factors_before.values() if f[0].dim() == 2)
    meta_state = copy.deepcopy(optimizer.meta_optimizer.state_dict())

    # The twin: torch.optim.SGD with the same momentum buffers, fed L·G·R (s²·g for 1-D) computed here from A, B.
    batch = mlp_batch(generator)
    twin_model = copy.deepcopy(model)
    twin = torch.optim.SGD(twin_model.parameters(), lr=0.1, momentum=0.9)
    twin_model(**batch)["loss"].backward()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        twin.state[q]["momentum_buffer"] = optimizer.state[p]["momentum_buffer"].clone()
        tensors = factors_before[p]
        if len(tensors) == 2:
            left, right = tensors[0] @ tensors[0].T, tensors[1] @ tensors[1].T
            q.grad = left @ q.grad @ right
        else:
            q.grad = tensors[0] * tensors[0] * q.grad
    twin.step()

    before = [p.detach().clone() for p in model.parameters()]
    poison["lookahead"] = True
    with pytest.warns(RuntimeWarning, match="skipped"):
        _mlp_step(model, optimizer, batch)
    poison["lookahead"] = False
    assert optimizer.skipped_meta_steps == 1 and optimizer.meta_steps == 2
    assert math.isnan(optimizer.last_meta_objective)
    for p, f in optimizer.factors.items():
        assert all(torch.equal(t, t0) for t, t0 in zip(f.tensors, factors_before[p]))
    assert _equal_states(optimizer.meta_optimizer.state_dict(), meta_state)
    for p, p0, q in zip(model.parameters(), before, twin_model.parameters()):
        assert not torch.equal(p, p0)
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def _equal_states(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal_states(x, y) for x, y in zip(a, b))
    return a == b


# -- d. bad arguments --------------------------------------------------------------------------------------------


def _model_and_objective():
    model = MLP()
    return model, ProximalObjective(model, lambda_fsd=1.0)


@pytest.mark.parametrize("name", ["lambda_fsd", "lambda_wsd"])
def test_negative_lambda_is_refused(name):
    with pytest.raises(ValueError, match=name):
        ProximalObjective(MLP(), **{name: -1.0})


def test_both_lambdas_zero_warns():
    with pytest.warns(UserWarning, match="lambda_fsd"):
        ProximalObjective(MLP(), lambda_fsd=0.0, lambda_wsd=0.0)


def test_unknown_divergence_is_refused():
    with pytest.raises(ValueError, match="divergence"):
        ProximalObjective(MLP(), divergence="js")


@pytest.mark.parametrize("cls", [APOLR, APOPrecond])
@pytest.mark.parametrize(
    "name, value",
    [
        ("meta_interval", 0),
        ("meta_interval", -3),
        ("meta_interval", 2.5),
        ("meta_batch_fraction", 0.0),
        ("meta_batch_fraction", -0.5),
        ("meta_batch_fraction", 1.5),
        ("meta_lr", -0.1),
        ("meta_betas", (0.9, 1.0)),
    ],
)
def test_bad_meta_arguments_are_refused(cls, name, value):
    model, objective = _model_and_objective()
    with pytest.raises(ValueError, match=name):
        cls(model.parameters(), objective, **{name: value})


def test_meta_learning_without_objective_is_refused():
    model = MLP()
    with pytest.raises(ValueError, match="objective"):
        APOLR(model.parameters(), None, meta_lr=0.1)
    with pytest.raises(ValueError, match="objective"):
        APOPrecond(model.parameters(), None, meta_lr=0.1)


def test_unknown_apo_lr_base_is_refused():
    model, objective = _model_and_objective()
    with pytest.raises(ValueError, match="base"):
        APOLR(model.parameters(), objective, base="lamb")


@pytest.mark.parametrize("log_lr_range", [(1.0, -1.0), (0.5, 2.0), (-2.0, -0.5)])
def test_bad_log_lr_range_is_refused(log_lr_range):
    model, objective = _model_and_objective()
    with pytest.raises(ValueError, match="log_lr_range"):
        APOLR(model.parameters(), objective, log_lr_range=log_lr_range)


def test_apo_lr_refuses_an_optimizer_whose_step_is_not_linear_in_lr():
    model, objective = _model_and_objective()
    # (Adagrad, once here, is linear in the LR: tests/test_linear_lr.py measures it; Rprop's LR is a first step size)
    with pytest.raises(ValueError, match="torch.Rprop is not known"):
        APOLR(torch.optim.Rprop(model.parameters(), lr=0.1), objective)
    with pytest.raises(ValueError, match="lr"):  # keyword arguments only go with a base built here
        APOLR(torch.optim.SGD(model.parameters(), lr=0.1), objective, lr=0.1)


@pytest.mark.parametrize("name, value", [("max_factor_dim", 0), ("lr", -1.0), ("momentum", -0.5)])
def test_bad_precond_arguments_are_refused(name, value):
    model, objective = _model_and_objective()
    with pytest.raises(ValueError, match=name):
        APOPrecond(model.parameters(), objective, **{name: value})


def test_precond_from_sgd_refuses_other_optimizers():
    model, objective = _model_and_objective()
    with pytest.raises(ValueError, match="Adam"):
        APOPrecond.from_sgd(torch.optim.Adam(model.parameters()), objective)


def test_add_param_group_after_construction_is_refused():
    model, objective = _model_and_objective()
    extra = nn.Parameter(torch.zeros(3))
    for optimizer in (APOLR(model.parameters(), objective), APOPrecond(model.parameters(), objective)):
        groups = len(optimizer.param_groups)
        with pytest.raises(NotImplementedError, match="add_param_group"):
            optimizer.add_param_group({"params": [extra]})
        assert len(optimizer.param_groups) == groups
