"""APO.md §5 (Theorem 1): APO-Precond's meta-objective is minimised by a damped Gauss-Newton preconditioner.

Setting. A linear model f(x) = W x, W of shape (out, in) = (3, 4), no bias, noiseless targets y = W* x and
inputs x ~ N(0, Σ) with a rotated, non-isotropic Σ (eigenvalues 0.5, 1, 2, 4: condition number 8). The loss
follows hf_apo's ``squared_error`` convention, ½‖f(x) − y‖² summed over outputs and averaged over examples:

    L_B(W) = mean_{x ∈ B} ½‖W x − y‖²,     G = ∇L_B(W) = (W − W*) Σ_B,     Σ_B = mean_{x ∈ B} x xᵀ.

APO-Precond with momentum 0 and weight decay 0 steps Δ = −η · L G R (L = AAᵀ, R = BBᵀ). Its meta-objective
(hf_apo/objective.py: ``squared_error_divergence`` is ½‖Δf‖² per example averaged over examples; the optimizer
adds λ_WSD/2 · ‖Δ‖²) is *exactly* quadratic in Δ for a linear model:

    Q(Δ) = L_B(W + Δ) + λ_FSD · mean_{x ∈ B′} ½‖Δ x‖² + (λ_WSD / 2) · ‖Δ‖²
         = L_B(W) + ⟨G, Δ⟩ + ½ tr(Δ M_B Δᵀ),      M_B = Σ_B + λ_FSD Σ_B′ + λ_WSD I.

Q keeps the exact batch loss, so the loss curvature Σ_B adds to the λ_FSD-weighted Gauss-Newton term. For each G
the minimiser is Δ* = −G M_B⁻¹; replacing M_B by its mean M = (1 + λ_FSD) Σ + λ_WSD I, Δ* = −η · L G R holds
for every G exactly when L ⊗ R = I ⊗ M⁻¹/η (the Kronecker product of the (out×out) and (in×in) sides; L and R
are only identified up to a scalar c ↔ 1/c, so we compare kron(L, R), never L and R separately). That point is
in the Kronecker family, so it is also the minimiser of E[Q] over it, up to the O(1/|B|) bias from the
correlation of G with Σ_B (measured: about 3% at |B| = 256 and 0.8% at |B| = 1024 after averaging the
iterates, so this test uses |B| = 1024).

Procedure (θ frozen in the sense of the spec): only meta steps are taken, by ``optimizer.meta_step()`` after
``observe(B′)`` then ``observe(B)`` (hf_apo/meta.py: B is the last observed batch, B′ the one before it, cut by
``meta_batch_fraction`` = 1.0, i.e. not cut); W is resampled around W* before every meta step and the training
gradient G is computed at it on B. The default meta step on (A, B) (hf_apo.factors.FactorAdam: a dense factor moves by
about the meta LR in spectral norm) with meta LR 3e-2 decayed as 1/(1 + t/500), 4000 meta steps,
and the last 1000 iterates of kron(L, R) averaged (Polyak) to remove the meta-optimizer's noise.

η = tr(M⁻¹)/in, so the identity initialisation already has the right mean scale and only the *shape* has to be
learned: the initial error is 51%, which guards against a trivially passing test.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_apo import APOPrecond, ProximalObjective

OUT, IN = 3, 4
BATCH = 1024
META_STEPS = 4000
AVERAGED = 1000
LAMBDA_FSD, LAMBDA_WSD = 1.0, 0.5
TOLERANCE = 0.05


def _squared_error_forward(model: nn.Module, batch: dict) -> dict:
    logits = model(batch["x"])
    return {"loss": 0.5 * (logits - batch["y"]).pow(2).sum(dim=1).mean(), "logits": logits}


def _relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    return float((estimate - reference).norm() / reference.norm())


def _closed_form(covariance: torch.Tensor, loss_weight: float, lambda_fsd: float, lambda_wsd: float, lr: float):
    """I_out ⊗ M⁻¹/η with M = loss_weight · Σ + λ_FSD · Σ + λ_WSD · I."""
    eye = torch.eye(IN, dtype=torch.float64)
    curvature = (loss_weight + lambda_fsd) * covariance + lambda_wsd * eye
    inverse = torch.linalg.inv(curvature).contiguous()
    return torch.kron(torch.eye(OUT, dtype=torch.float64), inverse / lr)



def test_precond_converges_to_damped_gauss_newton():
    generator = torch.Generator().manual_seed(0)
    rotation, _ = torch.linalg.qr(torch.randn(IN, IN, generator=generator, dtype=torch.float64))
    eigenvalues = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=torch.float64)
    covariance = rotation @ torch.diag(eigenvalues) @ rotation.T
    input_map = rotation @ torch.diag(eigenvalues.sqrt())  # x = C z, Cov(x) = C Cᵀ = Σ
    weight_star = torch.randn(OUT, IN, generator=generator, dtype=torch.float64)

    curvature = (1 + LAMBDA_FSD) * covariance + LAMBDA_WSD * torch.eye(IN, dtype=torch.float64)
    lr = float(torch.linalg.inv(curvature).trace() / IN)
    expected = _closed_form(covariance, 1.0, LAMBDA_FSD, LAMBDA_WSD, lr)

    def sample_batch() -> dict:
        x = torch.randn(BATCH, IN, generator=generator, dtype=torch.float64) @ input_map.T
        return {"x": x.float(), "y": (x @ weight_star.T).float()}

    torch.manual_seed(0)
    model = nn.Linear(IN, OUT, bias=False)
    objective = ProximalObjective(
        model, lambda_fsd=LAMBDA_FSD, lambda_wsd=LAMBDA_WSD, divergence="squared_error", forward=_squared_error_forward
    )
    optimizer = APOPrecond(
        model.parameters(), objective, lr=lr, momentum=0.0, weight_decay=0.0, meta_interval=1, meta_lr=3e-2,
        meta_batch_fraction=1.0,
    )
    weight = model.weight
    factors = optimizer.factors[weight]
    assert factors.kind == "densexdense"

    def learned() -> torch.Tensor:
        left, right = (t.detach().double() for t in factors.tensors)
        return torch.kron(left @ left.T, right @ right.T)

    initial_error = _relative_error(learned(), expected)
    averaged = torch.zeros_like(expected)
    for t in range(META_STEPS):
        optimizer.meta_optimizer.param_groups[0]["lr"] = 3e-2 / (1 + t / 500)
        with torch.no_grad():
            weight.copy_(weight_star + torch.randn(OUT, IN, generator=generator, dtype=torch.float64))
        meta_batch, batch = sample_batch(), sample_batch()
        optimizer.observe(meta_batch)
        optimizer.observe(batch)
        weight.grad = None
        _squared_error_forward(model, batch)["loss"].backward()
        assert optimizer.meta_step()
        if t >= META_STEPS - AVERAGED:
            averaged += learned() / AVERAGED

    final_error = _relative_error(averaged, expected)
    print(f"theorem 1: relative Frobenius error {initial_error:.3f} at step 0, {final_error:.4f} after {META_STEPS}")
    assert optimizer.meta_steps == META_STEPS and optimizer.skipped_meta_steps == 0
    assert factors.tensors[0].dtype == torch.float32
    assert initial_error > 0.3, "the identity must be far from the closed form, or the test passes trivially"
    assert final_error < TOLERANCE
    # The tolerance separates the right fixed point from those of plausible wrong objectives (each ≥ 17% away
    # from the right one): no loss curvature in Q, the weight-space term without its ½ or with an extra ½, the
    # function-space term averaged over output entries instead of summed per example.
    for loss_weight, lambda_fsd, lambda_wsd in [
        (0.0, LAMBDA_FSD, LAMBDA_WSD),
        (1.0, LAMBDA_FSD, 2 * LAMBDA_WSD),
        (1.0, LAMBDA_FSD, 0.5 * LAMBDA_WSD),
        (1.0, LAMBDA_FSD / OUT, LAMBDA_WSD),
    ]:
        wrong = _closed_form(covariance, loss_weight, lambda_fsd, lambda_wsd, lr)
        assert _relative_error(averaged, wrong) > 2 * TOLERANCE
    # L alone is a multiple of the identity (all the structure is on the input side).
    left = factors.tensors[0].detach().double()
    left = left @ left.T
    assert _relative_error(left, left.diagonal().mean() * torch.eye(OUT, dtype=torch.float64)) < TOLERANCE


if __name__ == "__main__":
    pytest.main([__file__, "-q", "-s"])
