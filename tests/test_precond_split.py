"""APO-Precond's size and shape learned apart (issue 18): shape-only factors, the next-batch hypergradient of the
factors over AdamW, and APO-LR learning the size over them.

* ``shape_only``: after every meta step each dense side has tr(L)/n = 1, a diagonal side mean(a²) = 1 and a 1-D scale
  s² = 1, while the shape has moved (off-diagonal entries, uneven diagonals).
* ``loss_batch="next"``: the factors' meta-gradient read from g_t+1 is ∂L_{B_t+1}(θ_t+1)/∂φ: against float64 central
  differences of the loss with θ_t+1 rebuilt from the formula (AdamW's m_t/denom_t, decoupled decay, the LR the step
  used), along random directions, from non-identity factors.
* APO-LR over APO-Precond: the wrapped optimizer sees every batch (with APO-LR's meta-learning off the run is
  APO-Precond's bitwise), its state travels in the checkpoint (a resume is bitwise), and the Trainer's
  ``--apo_precond_size lr`` builds it.
"""

import copy

import pytest
import torch

from hf_apo import APOLR, APOPrecond, ProximalObjective
from hf_apo.apo_config import APOTrainingArguments
from hf_apo.apo_trainer import APOTrainer
from test_reduction import groups, mlp_batches, round_trip, run
from tiny import MLP, CopyDataset, tiny_t5

LR = 1e-2


def perturb_factors(optimizer, scale=0.2, seed=0):
    """Move every factor away from the identity (a fixed random perturbation), as meta steps would."""
    generator = torch.Generator().manual_seed(seed)
    for factors in optimizer.factors.values():
        for t in factors.tensors:
            t.add_(scale * torch.randn(t.shape, generator=generator, dtype=t.dtype))
        factors.refresh()


def mean_eigenvalues(factors):
    return [float(t.square().sum()) / side for t, side in zip(factors.tensors, factors.sides)]


def test_shape_only_factors_keep_mean_eigenvalue_one_and_learn_a_shape():
    model = MLP(hidden=12)
    objective = ProximalObjective(model, lambda_fsd=10.0)
    optimizer = APOPrecond(groups(model), objective, base="adamw", lr=LR, meta_lr=0.05, meta_interval=2,
                           shape_only=True)
    run(model, optimizer, mlp_batches(20))
    assert optimizer.meta_steps == 10
    kinds = {f.kind for f in optimizer.factors.values()}
    assert kinds == {"dense" + "x" + "dense", "scale"}, kinds
    for factors in optimizer.factors.values():
        assert mean_eigenvalues(factors) == pytest.approx([1.0] * len(factors.tensors), rel=1e-5)
        assert factors.traces() == pytest.approx([1.0] * len(factors.tensors), rel=1e-5)
    dense = [f.left for f in optimizer.factors.values() if f.kind != "scale"]
    assert all(float((a - torch.diag(a.diagonal())).abs().max()) > 1e-3 for a in dense)  # a shape was learned

    # Without shape_only the same run changes the size too: the check above is not vacuous.
    model = MLP(hidden=12)
    free = APOPrecond(groups(model), ProximalObjective(model, lambda_fsd=10.0), base="adamw", lr=LR, meta_lr=0.05,
                      meta_interval=2)
    run(model, free, mlp_batches(20))
    sizes = [m for f in free.factors.values() for m in mean_eigenvalues(f)]
    assert max(abs(m - 1) for m in sizes) > 1e-2


def loss_after_step(model, theta, moments, factors, tensors, batch, lr, weight_decay, betas, eps, step):
    """L_B(θ_t+1) with θ_t+1 = θ_t·(1 − ηω) − η/(1 − β₁ᵗ)·P_φ(m/denom), rebuilt from the formula, for given φ."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p, t0, (m, v), f, ts, wd in zip(model.parameters(), theta, moments, factors, tensors, weight_decay):
            denom = v.sqrt() / (1 - betas[1] ** step) ** 0.5 + eps
            materialized = [t @ t.T if t.dim() == 2 else t * t for t in ts]
            p.copy_(t0 * (1 - lr * wd) - lr / (1 - betas[0] ** step) * f._apply(m / denom, materialized))
        return float(model(**batch)["loss"])


def test_next_batch_meta_gradient_of_the_factors_matches_finite_differences():
    torch.set_default_dtype(torch.float64)
    try:
        model = MLP(hidden=9)
        batches = [{k: v.double() if v.is_floating_point() else v for k, v in b.items()} for b in mlp_batches(2, 3)]
        objective = ProximalObjective(model, loss_batch="next", lambda_fsd=0.0)
        optimizer = APOPrecond(groups(model), objective, base="adamw", lr=LR, meta_lr=1e-3, meta_interval=2)
        perturb_factors(optimizer)
        theta = [p.detach().clone() for p in model.parameters()]
        run(model, optimizer, batches[:1])  # step 1 with the perturbed factors: no meta step
        assert optimizer.meta_steps == 0
        params = list(model.parameters())
        moments = [(optimizer.state[p]["exp_avg"].clone(), optimizer.state[p]["exp_avg_sq"].clone()) for p in params]
        factors = [optimizer.factors[p] for p in params]
        tensors = [[t.clone() for t in f.tensors] for f in factors]
        decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
        weight_decay = [decay_of[id(p)] for p in params]
        order = {id(p): i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
        params_in_group_order = sorted(params, key=lambda p: order[id(p)])
        reference = copy.deepcopy(model)

        run(model, optimizer, batches[1:])  # step 2: the meta step reads g_2 = ∇L_B2(θ_1)
        assert optimizer.meta_steps == 1
        grads = dict(zip(map(id, params_in_group_order), _per_param(optimizer.last_meta_gradient, optimizer,
                                                                    params_in_group_order)))
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            directions = [[torch.randn(t.shape, generator=generator) for t in ts] for ts in tensors]
            analytic = sum(float((g * d).sum()) for p, ds in zip(params, directions) for g, d in zip(grads[id(p)], ds))
            h = 1e-5

            def at(sign):
                moved = [[t + sign * h * d for t, d in zip(ts, ds)] for ts, ds in zip(tensors, directions)]
                return loss_after_step(reference, theta, moments, factors, moved, batches[1], LR, weight_decay,
                                       (0.9, 0.999), 1e-8, 1.0)

            numeric = (at(1) - at(-1)) / (2 * h)
            assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-12)
    finally:
        torch.set_default_dtype(torch.float32)


def _per_param(meta_grads, optimizer, params):
    """The flat list of factor gradients cut per parameter (in the order the meta step visited them)."""
    out, index = [], 0
    for p in params:
        n = len(optimizer.factors[p].tensors)
        out.append(meta_grads[index:index + n])
        index += n
    return out


def test_next_batch_objective_is_refused_where_it_does_not_apply():
    model = MLP()
    with pytest.raises(ValueError, match="base='adamw'"):
        APOPrecond(model.parameters(), ProximalObjective(model, loss_batch="next", lambda_fsd=0.0), base="sgd")
    with pytest.raises(ValueError, match="lambda_fsd = lambda_wsd = 0"):
        APOPrecond(model.parameters(), ProximalObjective(model, loss_batch="next", lambda_fsd=1.0), base="adamw")


def split(model, size_meta_lr=0.1):
    """APO-LR (next batch, horizon 10,000) learning the size over shape-only APO-Precond over AdamW."""
    precond = APOPrecond(groups(model), ProximalObjective(model, lambda_fsd=10.0), base="adamw", lr=LR,
                         meta_lr=0.05, meta_interval=3, shape_only=True)
    return APOLR(precond, ProximalObjective(model, loss_batch="next", horizon=10_000.0, lambda_fsd=0.0), meta_lr=size_meta_lr,
                 meta_interval=2)


def test_apo_lr_off_over_apo_precond_is_apo_precond_bitwise():
    """The wrapped optimizer's meta steps need the observed batches: APO-LR forwards them."""
    alone_model, model = MLP(), MLP()
    alone = APOPrecond(groups(alone_model), ProximalObjective(alone_model, lambda_fsd=10.0), base="adamw", lr=LR,
                       meta_lr=0.05, meta_interval=3, shape_only=True)
    expected = run(alone_model, alone, mlp_batches(12))
    optimizer = split(model, size_meta_lr=0.0)
    got = run(model, optimizer, mlp_batches(12))
    assert alone.meta_steps == optimizer.inner.meta_steps == 4
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_split_learns_the_size_and_resumes_bitwise():
    batches = mlp_batches(16)
    straight_model = MLP()
    straight = split(straight_model)
    expected = run(straight_model, straight, batches)
    assert straight.meta_steps > 0 and straight.inner.meta_steps > 0
    assert straight.lr_multipliers != [1.0, 1.0]  # the size moved
    metrics = straight.metrics()
    assert metrics["apo/precond_left_trace_mean"] == pytest.approx(1.0, rel=1e-5)
    assert "apo/lr_multiplier" in metrics

    model = MLP()
    first = split(model)
    run(model, first, batches[:8])
    saved = round_trip(first.state_dict())
    assert "apo_inner" in saved and "factors" in saved["apo_inner"]
    resumed = split(model)
    resumed.load_state_dict(saved)
    got = run(model, resumed, batches[8:])
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert resumed.lr_multipliers == straight.lr_multipliers


def test_trainer_precond_size_lr_builds_the_split(tmp_path):
    args = APOTrainingArguments(output_dir=str(tmp_path), apo="precond", apo_precond_size="lr", max_steps=12,
                                per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=4, report_to=[],
                                save_strategy="no", use_cpu=True, apo_meta_interval=2, apo_loss_batch="next")
    trainer = APOTrainer(model=tiny_t5(), args=args, train_dataset=CopyDataset())
    trainer.train()
    optimizer = trainer.apo_optimizer
    assert isinstance(optimizer, APOLR) and isinstance(optimizer.inner, APOPrecond)
    assert optimizer.inner.shape_only and optimizer.inner.objective.loss_batch == "next"
    # K 10 for the size (and step 1: its trust region's first step), 2 for the factors
    assert optimizer.meta_steps == 2 and optimizer.inner.meta_steps == 6 and optimizer.trust_region.rule.max_kl == 1.0
    logged = [log for log in trainer.state.log_history if "apo/lr_multiplier" in log]
    assert logged and all(log["apo/precond_left_trace_mean"] == pytest.approx(1.0, rel=1e-4) for log in logged)


def test_trainer_precond_size_shape_keeps_the_scheduled_size(tmp_path):
    args = APOTrainingArguments(output_dir=str(tmp_path), apo="precond", apo_precond_size="shape", max_steps=8,
                                per_device_train_batch_size=4, learning_rate=3e-3, logging_steps=4, report_to=[],
                                save_strategy="no", use_cpu=True, apo_meta_interval=2)
    trainer = APOTrainer(model=tiny_t5(), args=args, train_dataset=CopyDataset())
    trainer.train()
    optimizer = trainer.apo_optimizer
    assert isinstance(optimizer, APOPrecond) and optimizer.shape_only and optimizer.meta_steps == 4
    assert all(f.traces() == pytest.approx([1.0] * len(f.tensors), rel=1e-4) for f in optimizer.factors.values())
