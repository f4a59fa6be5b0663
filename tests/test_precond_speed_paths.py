"""The in-place paths of APO-Precond's step (issue 27, item 5) compute what the out-of-place formulas compute.

The element-wise products run in place in temporaries the caller gives up (``owned``), AdamW's denominator and
m / denom are formed in place, and a dense right side's product is accumulated into the parameter by ``addmm_``.
Products and quotients are the same IEEE operations in place or not: bitwise equal. ``addmm_`` rounds
α·(G·R) + θ once, so it is compared to an ulp-level tolerance.
"""

from __future__ import annotations

import pytest
import torch

from hf_apo import APOPrecond, ProximalObjective
from hf_apo.factors import SPARSE_ROWS, KroneckerFactors
from hf_apo.precond_adamw import _denom_and_step_size

SHAPES = [(6, 5), (40, 70), (70, 40), (9,)]  # dense x dense, dense x diag, diag x dense, scale


def learned_factors(shape, diagonal_rows=False, seed=0) -> KroneckerFactors:
    generator = torch.Generator().manual_seed(seed)
    factors = KroneckerFactors(torch.zeros(shape), max_factor_dim=64, diagonal_rows=diagonal_rows)
    for t in factors.tensors:
        t.add_(0.3 * torch.randn(t.shape, generator=generator))
    factors.refresh()
    return factors


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("diagonal_rows", [False, True])
def test_owned_precondition_and_vjp_equal_the_out_of_place_ones_bitwise(shape, diagonal_rows):
    factors = learned_factors(shape, diagonal_rows)
    generator = torch.Generator().manual_seed(1)
    grad, cotangent = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    grad_copy, cotangent_copy = grad.clone(), cotangent.clone()
    reference = factors.precondition(grad)
    reference_vjp = factors.vjp(grad, cotangent)
    assert torch.equal(grad, grad_copy) and torch.equal(cotangent, cotangent_copy)  # not owned: left as they were
    assert torch.equal(factors.precondition(grad.clone(), owned=True), reference)
    assert torch.equal(factors.precondition_full(grad.clone(), owned=True), reference)
    for ours, theirs in zip(factors.vjp(grad, cotangent.clone(), owned=True), reference_vjp):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
def test_add_preconditioned_is_theta_plus_alpha_p(shape):
    factors = learned_factors(shape)
    generator = torch.Generator().manual_seed(2)
    theta, grad = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    expected = theta.clone().add_(factors.precondition(grad), alpha=-0.01)
    ours, kept = theta.clone(), grad.clone()
    factors.add_preconditioned_(ours, grad, -0.01)
    assert torch.equal(grad, kept)  # not owned: left as it was
    owned = theta.clone()
    factors.add_preconditioned_(owned, grad.clone(), -0.01, owned=True)
    assert torch.equal(owned, ours)
    if len(shape) == 1 or factors.tensors[1].dim() == 1:  # no addmm_: the same ops
        assert torch.equal(ours, expected)
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)
    bf16 = theta.to(torch.bfloat16)  # another dtype than the factors': P(grad) cast, then add_
    reference = bf16.clone().add_(factors.precondition(grad).to(torch.bfloat16), alpha=-0.01)
    factors.add_preconditioned_(bf16, grad, -0.01)
    assert torch.equal(bf16, reference)


@pytest.mark.parametrize("wide", [False, True])
def test_denominator_in_place_is_torch_adamw_s(wide):
    exp_avg_sq = torch.rand(50, 7).to(torch.bfloat16 if wide else torch.float32)
    group = {"betas": (0.9, 0.999), "eps": 1e-8}
    source = exp_avg_sq.float() if wide else exp_avg_sq
    expected = (source.sqrt() / (1 - 0.999**3) ** 0.5).add_(1e-8)
    kept = exp_avg_sq.clone()
    denom, _ = _denom_and_step_size(exp_avg_sq, 3.0, group, 1e-3, wide)
    assert torch.equal(denom, expected) and torch.equal(exp_avg_sq, kept)
    denom, _ = _denom_and_step_size(exp_avg_sq.clone(), 3.0, group, 1e-3, wide, owned=True)
    assert torch.equal(denom, expected)


def test_next_batch_meta_step_leaves_the_gradient_to_the_real_step():
    """The next-batch meta step's cotangent −η/(1 − β₁ᵗ)·g is a new tensor: it once scaled ``.grad`` in place, so the
    real step that followed used −η/(1 − β₁ᵗ)·g as its gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = APOPrecond(model.parameters(), ProximalObjective(model, lambda_fsd=0.0, loss_batch="next"),
                           base="adamw", lr=0.1, meta_interval=1)
    x = torch.randn(5, 4)
    for _ in range(3):
        model(x).pow(2).mean().backward()
        optimizer.observe({"x": x})
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
        optimizer.zero_grad()
    assert optimizer.meta_steps >= 1


@pytest.mark.parametrize("touched", [300, 4000])  # few rows (the sparse path), most rows (the dense one)
def test_a_vocabulary_side_updates_only_the_rows_its_input_touches(touched):
    rows = SPARSE_ROWS + 904
    factors = learned_factors((rows, 8), diagonal_rows=True)
    assert factors.kind == "diagxdense"
    generator = torch.Generator().manual_seed(3)
    theta, grad = torch.randn(rows, 8, generator=generator), torch.zeros(rows, 8)
    seen = torch.randperm(rows, generator=generator)[:touched]
    grad[seen] = torch.randn(touched, 8, generator=generator)
    expected = theta.clone().add_(factors.precondition(grad), alpha=-0.01)
    ours = theta.clone()
    factors.add_preconditioned_(ours, grad.clone(), -0.01, owned=True)
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[seen] = False
    assert torch.equal(ours[untouched], theta[untouched])
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)
