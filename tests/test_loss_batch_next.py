"""APO-LR with ``loss_batch="next"``: the loss term scored on the next training batch, from its gradient.

The reference is slow and obvious: for a perturbed φ it rebuilds θ′ = θ + Δ(φ) from scratch (a deep copy of the
model and a fresh torch optimizer loaded with the base state) and evaluates

    Q(φ) = L_{B_t+1}(θ′) + λ_FSD · KL(f(B′; θ) ‖ f(B′; θ′)) + λ_WSD/2 · ‖θ′ − θ‖²

with B_t+1 the batch of the *following* step. The fast path (dot products with the gradient the loop computes at
θ′, plus the KL look-ahead on B′) is applied one step late and must agree to < 1e-5 relative error.
"""

import copy
import warnings

import pytest
import torch

from hf_apo import APOLR, APOPrecond, ProximalObjective
from test_meta_gradient import (
    BASES,
    LAMBDA_FSD,
    LAMBDA_WSD,
    assert_matches_finite_differences,
    make_problem,
    reference_lookahead,
    reference_q,
    set_grads,
    two_groups,
)
from test_reduction import groups, mlp_batches, round_trip, run, seq2seq_batches
from tiny import MLP, tiny_t5


@pytest.mark.parametrize("kind", ["mlp", "bart"])
@pytest.mark.parametrize("base_name", ["sgd_momentum", "adamw"])
@pytest.mark.parametrize("lambdas", [(LAMBDA_FSD, LAMBDA_WSD), (0.0, 0.0)], ids=["proximity", "loss_only"])
def test_delayed_meta_gradient_matches_finite_differences(kind, base_name, lambdas):
    lambda_fsd, lambda_wsd = lambdas
    model, batches = make_problem(kind)
    base_cls, base_kwargs = BASES[base_name]
    base = base_cls(two_groups(model), **base_kwargs)
    objective = ProximalObjective(model, lambda_fsd=lambda_fsd, lambda_wsd=lambda_wsd, loss_batch="next")
    optimizer = APOLR(base, objective, meta_interval=3, meta_lr=0.05, meta_batch_fraction=0.5, trust_region="none")
    for batch in batches[:2]:  # two plain steps: non-trivial moments and momentum buffers
        set_grads(model, batch)
        optimizer.observe(batch)
        optimizer.step()
    set_grads(model, batches[2])
    optimizer.observe(batches[2])
    model_theta = copy.deepcopy(model)
    base_state = copy.deepcopy(base.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    meta_batch = {k: v[: len(v) // 2] for k, v in batches[1].items()}  # B′: the batch before B, cut in half
    next_batch = batches[3]

    optimizer.step()  # step 3 is the look-ahead: φ is not updated yet
    assert optimizer.meta_steps == 0 and optimizer.lr_multipliers == [1.0, 1.0]
    set_grads(model, next_batch)  # the loop's next backward: ∇L_{B_t+1} at θ′
    optimizer.observe(next_batch)
    optimizer.step()  # finishes the meta step with that gradient, then takes the plain step 4
    assert optimizer.meta_steps == 1

    def q_at(log_lr):
        lookahead = reference_lookahead(model_theta, base_cls, base_kwargs, base_state, grads, log_lr)
        return reference_q(model_theta, lookahead, next_batch, meta_batch, lambda_fsd, lambda_wsd)

    assert_matches_finite_differences(optimizer.last_meta_gradient.double(), q_at)


def test_next_with_zero_lambdas_is_dot_products_only():
    """No forward of its own, no observed batch needed, no warning: the model runs only in the training loop."""
    model = MLP()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        objective = ProximalObjective(model, lambda_fsd=0.0, lambda_wsd=0.0, loss_batch="next")
    optimizer = APOLR(model.parameters(), objective, lr=1e-4, meta_interval=1, meta_lr=0.05, trust_region="none")
    run(model, optimizer, mlp_batches(1) * 30, observe=False)  # one batch to fit: 1e-4 is far too small
    assert len(calls) == 30
    assert optimizer.meta_steps == 29  # the last look-ahead awaits a 31st gradient
    assert optimizer.lr_multipliers[0] > 2.0  # every meta-gradient said "larger": φ rose ~0.05 per meta step


def test_same_batch_with_zero_lambdas_still_warns():
    with pytest.warns(UserWarning, match="loss_batch='next'"):
        ProximalObjective(MLP(), lambda_fsd=0.0, lambda_wsd=0.0)


def test_precond_refuses_next():
    model = MLP()
    with pytest.raises(ValueError, match="loss_batch='next'"):
        APOPrecond(model.parameters(), ProximalObjective(model, loss_batch="next"), lr=0.1)


def test_unknown_loss_batch_is_refused():
    with pytest.raises(ValueError, match="loss_batch"):
        ProximalObjective(MLP(), loss_batch="previous")


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum"])
def test_next_without_meta_learning_is_the_torch_optimizer_bitwise(name):
    from test_reduction import REFERENCES

    cls, kwargs = REFERENCES[name]
    reference_model, model = MLP(), MLP()
    expected = run(reference_model, cls(groups(reference_model), **kwargs), mlp_batches(), observe=False)
    objective = ProximalObjective(model, lambda_fsd=0.0, loss_batch="next")
    optimizer = APOLR(cls(groups(model), **kwargs), objective, meta_lr=0.0, meta_interval=1, trust_region="none")
    got = run(model, optimizer, mlp_batches())
    assert optimizer.meta_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize("lambda_fsd, interval, horizon", [(0.0, 1, 1), (1.0, 3, 1), (0.0, 3, 50)])
def test_state_dict_round_trip_with_a_pending_lookahead_continues_bitwise(lambda_fsd, interval, horizon):
    """The checkpoint falls between a look-ahead and the gradient that finishes it: Δ (or D) travels in the state
    dict."""
    batches = seq2seq_batches(16)

    def build(model):
        objective = ProximalObjective(model, lambda_fsd=lambda_fsd, lambda_wsd=0.1, loss_batch="next", horizon=horizon)
        return APOLR(model.parameters(), objective, base="adamw", lr=1e-3, meta_interval=interval, meta_lr=0.1, trust_region="none")

    uninterrupted_model = tiny_t5()
    uninterrupted = build(uninterrupted_model)
    expected = run(uninterrupted_model, uninterrupted, batches)

    first_model = tiny_t5()
    first = build(first_model)
    run(first_model, first, batches[:9])  # step 9 was a look-ahead (9 % K == 0): it awaits step 10's gradient
    assert first.pending is not None
    state = round_trip(first.state_dict())

    resumed_model = tiny_t5()
    resumed_model.load_state_dict(copy.deepcopy(first_model.state_dict()))
    resumed = build(resumed_model)
    resumed.load_state_dict(state)
    got = run(resumed_model, resumed, batches[9:])
    assert resumed.meta_steps == uninterrupted.meta_steps > 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert torch.equal(resumed.log_lr, uninterrupted.log_lr)


def test_horizon_meta_gradient_is_the_discounted_sum_of_steps_dotted_with_the_next_gradient():
    """horizon H: ∂Q/∂φ_group = ⟨Σ_s γ^(t−s) Δ_s, ∇L_{B_t+1}(θ_t+1)⟩ with γ = 1 − 1/H, over every step s ≤ t (not only
    the look-ahead steps), recomputed here from snapshots of the parameters, in float64."""
    model, batches = make_problem("mlp")
    batches = batches * 3
    horizon, interval = 4.0, 3
    gamma = 1 - 1 / horizon
    base = torch.optim.AdamW(two_groups(model), weight_decay=0.1)
    objective = ProximalObjective(model, lambda_fsd=0.0, loss_batch="next", horizon=horizon)
    optimizer = APOLR(base, objective, meta_interval=interval, meta_lr=0.05, trust_region="none")
    snapshots = [[p.detach().clone() for p in model.parameters()]]
    checked = 0
    for step, batch in enumerate(batches, start=1):
        set_grads(model, batch)
        if (step - 1) % interval == 0 and step > 1:  # this step() finishes the look-ahead of step − 1
            displacement = [torch.zeros_like(p) for p in model.parameters()]
            for before, after in zip(snapshots[:-1], snapshots[1:]):
                displacement = [gamma * d + (a - b) for d, a, b in zip(displacement, after, before)]
            expected = [
                sum(float((displacement[i] * p.grad).sum()) for i, p in enumerate(model.parameters()) if i % 2 == g)
                for g in range(2)
            ]
            optimizer.step()
            torch.testing.assert_close(optimizer.last_meta_gradient.double(), torch.tensor(expected, dtype=torch.float64),
                                       rtol=1e-9, atol=1e-12)
            checked += 1
        else:
            optimizer.step()
        snapshots.append([p.detach().clone() for p in model.parameters()])
    assert checked == 3 and optimizer.meta_steps == 3


def test_horizon_needs_next():
    with pytest.raises(ValueError, match="horizon"):
        ProximalObjective(MLP(), horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        ProximalObjective(MLP(), loss_batch="next", horizon=0.5)


def test_horizon_with_bf16_weights_keeps_a_float32_displacement():
    model = MLP().to(torch.bfloat16)
    objective = ProximalObjective(model, lambda_fsd=0.0, loss_batch="next", horizon=100)
    optimizer = APOLR(model.parameters(), objective, lr=1e-3, meta_interval=1, meta_lr=0.05, trust_region="none")
    generator = torch.Generator().manual_seed(0)
    from tiny import mlp_batch

    batch = mlp_batch(generator, dtype=torch.bfloat16)
    for _ in range(5):
        model.zero_grad()
        model(**batch)["loss"].backward()
        optimizer.step()
    assert all(d.dtype == torch.float32 for d in optimizer.displacement.tensors)
    assert optimizer.meta_steps == 4 and optimizer.log_lr.dtype == torch.float32
    assert all(torch.isfinite(d).all() for d in optimizer.displacement.tensors)


@pytest.mark.parametrize("loss_batch", ["same", "next"])
def test_a_warm_up_holds_increases_of_the_learning_rate(loss_batch):
    """A warm-up is the user's: φ does not rise while the scheduler raises group["lr"], and learns once it stops."""
    model = MLP()
    objective = ProximalObjective(model, lambda_fsd=1.0, loss_batch=loss_batch)
    optimizer = APOLR(model.parameters(), objective, lr=1e-3, meta_interval=1, meta_lr=0.05, trust_region="none")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))
    batch = mlp_batches(1)[0]
    for step in range(1, 21):
        model.zero_grad()
        model(**batch)["loss"].backward()
        optimizer.observe(batch)
        optimizer.step()
        scheduler.step()
        assert optimizer.log_lr.item() <= 0.0 or step > 10  # steps 1-10 ran at rising LRs 1e-4 ... 1e-3
        if step == 10:  # 1e-3 is far too small for one batch: every meta-gradient said "larger", none was applied
            assert optimizer.meta_steps >= 9 and optimizer.lr_multipliers == [1.0]
    assert optimizer.lr_multipliers[0] > 1.0


@pytest.mark.parametrize("meta_optimizer", ["adam", "rprop"])
def test_a_warm_up_still_lowers_a_too_large_learning_rate(meta_optimizer):
    """SGD on ½θ², warmed up towards lr 1.9 (just stable): a step of lr η leaves θ·(1 − η), so the next gradient
    opposes the step once η > 1 and the meta-gradient ⟨Δ_t, g_t+1⟩ = −η(1 − η)θ² is positive: φ falls during the
    warm-up, where no increase is ever applied."""
    theta = torch.nn.Parameter(torch.tensor([1.0]))
    objective = ProximalObjective(torch.nn.Linear(1, 1), lambda_fsd=0.0, loss_batch="next")
    optimizer = APOLR([theta], objective, base="sgd", lr=1.9, meta_interval=1, meta_lr=0.1,
                      meta_optimizer=meta_optimizer, trust_region="none")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 20))
    history = []
    for _ in range(20):  # the whole warm-up: 0.095 ... 1.9
        theta.data.div_(theta.norm())  # the sign of the meta-gradient is scale-free: keep θ from vanishing
        theta.grad = theta.detach().clone()
        optimizer.step()
        scheduler.step()
        history.append(optimizer.log_lr.item())
    assert all(b <= a for a, b in zip(history, history[1:]))  # never rose
    assert history[-1] < -0.2  # and came down once the scheduled LR passed 1
