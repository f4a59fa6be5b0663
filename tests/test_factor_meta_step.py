"""The meta step on APO-Precond's factors moves a dense factor's spectrum by about meta_lr, whatever its size.

Per-entry Adam turns a structured meta-gradient into a sign matrix whose spectral norm grows like d · meta_lr: on the
translation benchmark (d 128, meta_lr 0.01) the largest eigenvalue of L went from 1 to 3 in one meta step, kept
growing, and 2 of 3 float32 seeds diverged late (the failure quality.md had recorded in bf16). These tests fail with
per-entry Adam on dense factors (``spectral_meta_step=False``).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from hf_apo import APOPrecond, ProximalObjective
from hf_apo.factors import FactorAdam, spectral_norm_lower_bound

sys.path.insert(0, os.path.dirname(__file__))
from tiny import MLP, mlp_batch  # noqa: E402


def test_per_entry_mode_is_adam():
    generator = torch.Generator().manual_seed(0)
    ours = [torch.randn(5, 5, generator=generator), torch.randn(7, generator=generator)]
    reference = [t.clone() for t in ours]
    factor_adam, adam = FactorAdam(ours, lr=0.01, spectral=False), torch.optim.Adam(reference, lr=0.01)
    for _ in range(5):
        for a, b in zip(ours, reference):
            a.grad = torch.randn(a.shape, generator=generator)
            b.grad = a.grad.clone()
        factor_adam.step()
        adam.step()
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_spectral_norm_lower_bound_is_a_close_lower_bound():
    generator = torch.Generator().manual_seed(0)
    for shape in [(40, 40), (30, 70), (70, 30)]:
        matrix = torch.randn(shape, generator=generator, dtype=torch.float64)
        exact = torch.linalg.matrix_norm(matrix, 2)
        bound = spectral_norm_lower_bound(matrix)
        assert 0.7 * exact <= bound <= exact * (1 + 1e-12)
        rank_one = torch.randn(shape[0], 1, generator=generator, dtype=torch.float64) @ torch.randn(
            1, shape[1], generator=generator, dtype=torch.float64)
        torch.testing.assert_close(spectral_norm_lower_bound(rank_one), torch.linalg.matrix_norm(rank_one, 2))
    assert spectral_norm_lower_bound(torch.zeros(3, 3)) == 0


@pytest.mark.parametrize("size", [16, 256])
def test_first_spectral_step_moves_the_spectrum_by_lr_whatever_the_size(size):
    """A rank-one gradient (the shape of a one-example meta-gradient): the update's spectral norm is lr, not d·lr."""
    generator = torch.Generator().manual_seed(size)
    factor = torch.eye(size)
    factor.grad = torch.randn(size, 1, generator=generator) @ torch.randn(1, size, generator=generator)
    FactorAdam([factor], lr=0.01).step()
    assert torch.linalg.matrix_norm(factor - torch.eye(size), 2) == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("spectral", [True, False], ids=["spectral", "per_entry"])
def test_two_meta_steps_move_a_64_wide_factor_by_about_meta_lr(spectral):
    """Through APO-Precond: after two meta steps L = AAᵀ of a 64-wide side is within 1 ± 8·meta_lr (A moves about
    meta_lr per step, so L about 2·meta_lr); per-entry Adam moves it far more, which this test pins down too."""
    torch.manual_seed(0)
    model = MLP(hidden=64)
    meta_lr = 0.01
    optimizer = APOPrecond(model.parameters(), ProximalObjective(model, lambda_fsd=10.0), lr=0.1, momentum=0.9,
                           meta_interval=1, meta_lr=meta_lr, spectral_meta_step=spectral)
    weight = model.net[0].weight  # 64 × 5: a dense 64 × 64 left factor
    assert optimizer.factors[weight].left.shape == (64, 64)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        batch = mlp_batch(generator)
        model(**batch)["loss"].backward()
        optimizer.observe(batch)
        optimizer.step()
        optimizer.zero_grad()
    assert optimizer.meta_steps == 2
    left = optimizer.factors[weight]._cache[0].double()
    moved = float(torch.linalg.matrix_norm(left - torch.eye(64, dtype=torch.float64), 2))
    if spectral:
        assert 0.5 * meta_lr < moved <= 8 * meta_lr
    else:
        assert moved > 20 * meta_lr


def test_loads_meta_state_saved_by_torch_adam_or_the_other_geometry():
    """A checkpoint from before FactorAdam (torch.optim.Adam's state) resumes: the run's own hyperparameters stay,
    the moments carry over, and a dense factor's per-entry second moment becomes the spectral scalar (its sum)."""
    generator = torch.Generator().manual_seed(0)
    dense, diagonal = torch.eye(4).requires_grad_(), torch.ones(3).requires_grad_()
    adam = torch.optim.Adam([dense, diagonal], lr=0.01)
    dense.grad, diagonal.grad = torch.randn(4, 4, generator=generator), torch.randn(3, generator=generator)
    adam.step()
    saved = {p: {k: v.clone() for k, v in adam.state[p].items()} for p in (dense, diagonal)}

    ours = FactorAdam([dense, diagonal], lr=0.02, spectral=True)
    with pytest.warns(UserWarning, match="converted"):
        ours.load_state_dict(adam.state_dict())
    assert ours.param_groups[0]["lr"] == 0.02 and ours.param_groups[0]["spectral"] is True
    assert ours.state[dense]["step"] == 1 and ours.state[dense]["exp_avg_sq"].dim() == 0
    torch.testing.assert_close(ours.state[dense]["exp_avg_sq"], saved[dense]["exp_avg_sq"].sum())
    torch.testing.assert_close(ours.state[dense]["exp_avg"], saved[dense]["exp_avg"])
    torch.testing.assert_close(ours.state[diagonal]["exp_avg_sq"], saved[diagonal]["exp_avg_sq"])
    dense.grad, diagonal.grad = torch.randn(4, 4, generator=generator), torch.randn(3, generator=generator)
    before = dense.detach().clone()
    ours.step()
    assert ours.state[dense]["step"] == 2 and torch.isfinite(dense).all() and not torch.equal(dense, before)

    # and back: a spectral scalar broadcast to per-entry second moments
    per_entry = FactorAdam([dense, diagonal], lr=0.02, spectral=False)
    with pytest.warns(UserWarning, match="converted"):
        per_entry.load_state_dict(ours.state_dict())
    assert per_entry.state[dense]["exp_avg_sq"].shape == dense.shape
    torch.testing.assert_close(per_entry.state[dense]["exp_avg_sq"],
                               ours.state[dense]["exp_avg_sq"].expand(4, 4))
