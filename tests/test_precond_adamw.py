"""APO-Precond over AdamW (``base="adamw"``): the base is torch.optim.AdamW, the meta-gradient is exact, a resume is
bitwise, and the constructors refuse what they do not support.

* Identity factors (meta_lr = 0, or before the first meta step) take torch's own ops: bitwise torch.optim.AdamW over
  50 steps with two parameter groups and weight decay (float32, and bf16 without stochastic rounding).
* Factors that are exactly I but go through the learned path (θ.add_(P(m/denom), alpha=−step_size) instead of
  ``addcdiv_``) agree only to rounding: measured and bounded here.
* FSDP2 (equal to DDP and one process, SIGKILL then resume bitwise): the ``precond_adamw`` variant of
  tests/test_fsdp.py.
* The fast meta-gradient (VJP of φ ↦ P_φ(m/denom) with cotangent −η/(1 − β₁ᵗ)·(v + λ_WSD·Δ)) against central finite
  differences of Q with θ′ rebuilt from scratch from the formula (m̂/(√v̂ + ε), decoupled decay), in float64, along a
  random direction and along single entries of a dense left, a dense right, a diagonal factor and a scale.
"""

import copy

import pytest
import torch

from hf_apo import APOPrecond, ProximalObjective
from test_meta_gradient import H, LAMBDA_FSD, LAMBDA_WSD, make_problem, prepare_meta_step, reference_q, zip_grads
from test_reduction import STEPS, groups, mlp_batches, round_trip, run, seq2seq_batches
from tiny import MLP, mlp_batch, tiny_t5

LR = 1e-2
# A random direction moves every factor entry: its truncation error at H = 1e-4 is 4e-7 relative, at 1e-5 3e-9. A single
# entry: 1e-9 to 1e-8 at H = 1e-4 (round-off dominates below). Measured on both problems.
H_RANDOM = 1e-5


def relative_differences(got, expected):
    """max |a − b| / max |b| per tensor."""
    return [float((a.double() - b.double()).abs().max() / b.double().abs().max()) for a, b in zip(got, expected)]


# -- 1. the base is torch.optim.AdamW ----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["meta_lr_zero", "no_meta_step_taken", "from_adamw"])
def test_identity_factors_are_adamw_bitwise(how):
    reference_model, model = MLP(), MLP()
    expected = run(reference_model, torch.optim.AdamW(groups(reference_model), lr=LR), mlp_batches(), observe=False)

    objective = ProximalObjective(model, lambda_fsd=10.0)
    if how == "from_adamw":
        optimizer = APOPrecond.from_adamw(torch.optim.AdamW(groups(model), lr=LR), objective, meta_lr=0.0)
    else:
        meta = {"meta_lr": 0.0} if how == "meta_lr_zero" else {"meta_lr": 0.1, "meta_interval": STEPS + 1}
        optimizer = APOPrecond(groups(model), objective, base="adamw", lr=LR, **meta)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    got = run(model, optimizer, mlp_batches())
    assert optimizer.meta_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    for p in model.parameters():
        assert set(optimizer.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        assert optimizer.state[p]["step"].dtype == torch.float32 and float(optimizer.state[p]["step"]) == STEPS


def test_identity_factors_equal_adamw_foreach_on_cpu():
    reference_model, model = MLP(), MLP()
    base = torch.optim.AdamW(groups(reference_model), lr=LR, foreach=True)
    expected = run(reference_model, base, mlp_batches(), observe=False)
    got = run(model, APOPrecond(groups(model), base="adamw", lr=LR, meta_lr=0.0), mlp_batches())
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_bf16_without_stochastic_rounding_is_adamw_bitwise():
    generator = torch.Generator().manual_seed(0)
    batches = [mlp_batch(generator, dtype=torch.bfloat16) for _ in range(STEPS)]
    reference_model, model = MLP().to(torch.bfloat16), MLP().to(torch.bfloat16)
    expected = run(reference_model, torch.optim.AdamW(groups(reference_model), lr=LR), batches, observe=False)
    optimizer = APOPrecond(groups(model), base="adamw", lr=LR, meta_lr=0.0, stochastic_rounding=False)
    got = run(model, optimizer, batches)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(optimizer.state[p]["exp_avg"].dtype == torch.bfloat16 for p in model.parameters())


def test_learned_path_with_identity_factors_matches_adamw_to_rounding():
    """Factors that are exactly I, but no longer flagged as the identity: the step goes through P(m/denom), whose
    quotient is rounded before the scale (addcdiv scales first). Measured: at most 1.5e-7 relative (max |Δθ| / max |θ|
    per tensor) over 50 steps, about torch's own fused-vs-single-tensor difference."""
    reference_model, model = MLP(), MLP()
    expected = run(reference_model, torch.optim.AdamW(groups(reference_model), lr=LR), mlp_batches(), observe=False)
    optimizer = APOPrecond(groups(model), base="adamw", lr=LR, meta_lr=0.0)
    for factors in optimizer.factors.values():
        factors.refresh()  # L = R = I (and s² = 1) exactly, but the learned path
        assert not factors.is_identity
    got = run(model, optimizer, mlp_batches())
    differences = relative_differences(got, expected)
    assert max(differences) < 1e-6, differences


# -- 2. the meta-gradient against finite differences -------------------------------------------------------------------
def adamw_groups(model):
    """Two groups with their own lr, betas, eps and weight decay, so every per-group hyperparameter matters."""
    params = list(model.parameters())
    return [
        {"params": params[::2], "lr": 0.01, "weight_decay": 0.1},
        {"params": params[1::2], "lr": 0.004, "weight_decay": 0.02, "betas": (0.8, 0.99), "eps": 1e-6},
    ]


def precondition(tensors, u):
    """P(u) = L·U·R (or s²·u) written out with dense matrices."""
    if len(tensors) == 1:
        return tensors[0] ** 2 * u
    left, right = (t @ t.T if t.dim() == 2 else torch.diag(t * t) for t in tensors)
    return (left @ u.reshape(u.shape[0], -1) @ right).reshape(u.shape)


def reference_adamw_step(model_theta, lookahead, grads, factors, states, hypers):
    """θ′ from the formula: m̂ / (√v̂ + ε) at step t + 1 from the saved moments, θ·(1 − ηω) − η·P(u)."""
    with torch.no_grad():
        for p_theta, p, g, tensors, state, h in zip(
            model_theta.parameters(), lookahead.parameters(), grads, factors, states, hypers
        ):
            beta1, beta2 = h["betas"]
            t = float(state["step"]) + 1
            m = beta1 * state["exp_avg"] + (1 - beta1) * g
            v = beta2 * state["exp_avg_sq"] + (1 - beta2) * g * g
            u = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + h["eps"])
            p.copy_(p_theta * (1 - h["lr"] * h["weight_decay"]) - h["lr"] * precondition(tensors, u))


def entry_directions(optimizer, params, factors, fast):
    """One-hot directions at the largest-gradient entry of a dense left, a dense right, a diagonal and a scale (of the
    parameter where that entry is largest: BART's key-projection bias, for one, has an exactly zero gradient)."""
    wanted, largest = {}, {}
    for index, p in enumerate(params):
        kind = optimizer.factors[p].kind
        for side, tensor in enumerate(factors[index]):
            if kind == "scale":
                label = "scale"
            elif tensor.dim() == 1:
                label = "diagonal"
            else:
                label = "dense_left" if side == 0 else "dense_right"
            size = float(fast[index][side].abs().max())
            if size > largest.get(label, 0.0):
                wanted[label], largest[label] = (index, side), size
    assert set(wanted) == {"scale", "diagonal", "dense_left", "dense_right"}, set(wanted)
    directions = {}
    for label, (index, side) in wanted.items():
        direction = [[torch.zeros_like(t) for t in fs] for fs in factors]
        entry = fast[index][side].abs().argmax()
        direction[index][side].view(-1)[entry] = 1.0
        directions[label] = direction
    return directions


@pytest.mark.parametrize("kind", ["mlp", "bart"])
def test_adamw_meta_gradient_matches_finite_differences(kind):
    model, batches = make_problem(kind)
    objective = ProximalObjective(model, lambda_fsd=LAMBDA_FSD, lambda_wsd=LAMBDA_WSD)
    params = list(model.parameters())
    # MLP: its first weight's rows diagonal; BART: max_factor_dim 20 makes the 32-row embedding and FFN sides diagonal.
    layout = {"diagonal_row_params": [params[0]]} if kind == "mlp" else {"max_factor_dim": 20}
    optimizer = APOPrecond(
        adamw_groups(model), objective, base="adamw", meta_interval=3, meta_lr=0.01, meta_batch_fraction=0.5, **layout
    )
    generator = torch.Generator().manual_seed(7)
    for p in params:  # non-identity factors, so every term of the VJP matters (and the learned real step runs)
        for t in optimizer.factors[p].tensors:
            t.add_(0.2 * torch.randn(t.shape, generator=generator, dtype=t.dtype))
        optimizer.factors[p].refresh()

    meta_batch, batch = prepare_meta_step(model, optimizer, batches)  # two real steps: non-trivial moments

    model_theta = copy.deepcopy(model)
    grads = [p.grad.clone() for p in params]
    states = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in params]
    group_of = {id(q): group for group in optimizer.param_groups for q in group["params"]}
    hypers = [dict(group_of[id(p)]) for p in params]
    assert all(float(s["step"]) == 2 for s in states)
    factors = [[t.clone() for t in optimizer.factors[p].tensors] for p in params]
    meta_batch_cut = {k: v[: len(v) // 2] for k, v in meta_batch.items()}

    def q_at(step, direction):
        lookahead = copy.deepcopy(model_theta)
        moved = [[t + step * d for t, d in zip(fs, ds)] for fs, ds in zip(factors, direction)]
        reference_adamw_step(model_theta, lookahead, grads, moved, states, hypers)
        return reference_q(model_theta, lookahead, batch, meta_batch_cut)

    optimizer.step()  # the meta step (∇_φ Q at the factors above), then the real step
    assert optimizer.meta_steps == 1
    # last_meta_gradient runs over the groups' parameters (every other parameter first): back to the model's order
    in_group_order = optimizer.all_params()
    position = {id(p): index for index, p in enumerate(params)}
    per_param = zip_grads(optimizer.last_meta_gradient, [factors[position[id(p)]] for p in in_group_order])
    fast_of = {id(p): gs for p, (gs, _) in zip(in_group_order, per_param)}
    fast = [fast_of[id(p)] for p in params]

    random_direction = [[torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in fs] for fs in factors]
    directions = {"random": random_direction, **entry_directions(optimizer, params, factors, fast)}
    errors = {}
    for label, direction in directions.items():
        predicted = sum((g * d).sum() for gs, ds in zip(fast, direction) for g, d in zip(gs, ds)).item()
        h = H_RANDOM if label == "random" else H
        finite_difference = (q_at(h, direction) - q_at(-h, direction)) / (2 * h)
        errors[label] = abs(predicted - finite_difference) / abs(finite_difference)
    assert max(errors.values()) < 1e-7, errors

    # The look-ahead did not write the moments: the real step wrote them exactly once.
    for p, g, state, h in zip(params, grads, states, hypers):
        beta1, beta2 = h["betas"]
        assert float(optimizer.state[p]["step"]) == 3
        assert torch.equal(optimizer.state[p]["exp_avg"], state["exp_avg"].lerp(g, 1 - beta1))
        second = state["exp_avg_sq"].mul(beta2).addcmul_(g, g, value=1 - beta2)
        assert torch.equal(optimizer.state[p]["exp_avg_sq"], second)


# -- 3. state dict -----------------------------------------------------------------------------------------------------
def build(model):
    objective = ProximalObjective(model, lambda_fsd=10.0, lambda_wsd=0.1)
    return APOPrecond(model.parameters(), objective, base="adamw", lr=1e-3, weight_decay=0.01, meta_interval=3,
                      meta_lr=0.01)


def test_state_dict_round_trip_mid_run_continues_bitwise():
    batches = seq2seq_batches(24)
    uninterrupted_model = tiny_t5()
    uninterrupted = build(uninterrupted_model)
    expected = run(uninterrupted_model, uninterrupted, batches)
    assert uninterrupted.meta_steps == 8
    assert any(not f.is_identity for f in uninterrupted.factors.values())

    first_model = tiny_t5()
    first = build(first_model)
    run(first_model, first, batches[:14])  # stop right before meta step 15
    state = round_trip(first.state_dict())
    saved = state["state"][0]
    assert set(saved) == {"step", "exp_avg", "exp_avg_sq"} and saved["step"].dtype == torch.float32
    assert float(saved["step"]) == 14

    resumed_model = tiny_t5()
    resumed_model.load_state_dict(copy.deepcopy(first_model.state_dict()))
    resumed = build(resumed_model)
    resumed.load_state_dict(state)
    got = run(resumed_model, resumed, batches[14:])
    assert resumed.meta_steps == uninterrupted.meta_steps
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert resumed.metrics() == uninterrupted.metrics()


def test_a_torch_adamw_state_loads_and_continues_bitwise():
    """torch.optim.AdamW's state dict is APO-Precond's base state: switch mid-run (meta off) and nothing changes."""
    batches = mlp_batches()
    reference_model = MLP()
    expected = run(reference_model, torch.optim.AdamW(groups(reference_model), lr=LR), batches, observe=False)

    model = MLP()
    adamw = torch.optim.AdamW(groups(model), lr=LR)
    run(model, adamw, batches[:20], observe=False)
    optimizer = APOPrecond.from_adamw(torch.optim.AdamW(groups(model), lr=LR), meta_lr=0.0)
    optimizer.load_state_dict(round_trip(adamw.state_dict()))
    got = run(model, optimizer, batches[20:])
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


# -- bf16 --------------------------------------------------------------------------------------------------------------
def test_bf16_stochastic_rounding_keeps_small_updates_and_decay_in_expectation():
    """Each step moves θ = 1 by 1.5e-4 (update 1e-4, decay 5e-5), far below half the bf16 spacing under 1 (2⁻⁹):
    rounded to nearest (torch.optim.AdamW) θ never moves; stochastically rounded, its mean follows the exact
    trajectory. Applying the decay as a bf16 ``mul_`` before the rounding would lose it (mean 0.998, not 0.997)."""
    steps, lr, weight_decay = 20, 1e-4, 0.5
    nearest, stochastic = torch.ones(100_000, dtype=torch.bfloat16), torch.ones(100_000, dtype=torch.bfloat16)
    reference = torch.optim.AdamW([nearest], lr=lr, weight_decay=weight_decay)
    optimizer = APOPrecond([stochastic], base="adamw", lr=lr, weight_decay=weight_decay, meta_lr=0.0)
    exact = 1.0
    for _ in range(steps):
        for p in (nearest, stochastic):
            p.grad = torch.ones_like(p)
        reference.step()
        optimizer.step()
        exact = exact * (1 - lr * weight_decay) - lr / (1 + 1e-8)
    assert torch.equal(nearest, torch.ones_like(nearest))
    assert optimizer.state[stochastic]["exp_avg"].dtype == torch.bfloat16
    assert abs(float(stochastic.double().mean()) - exact) < 0.03 * (1 - exact)


def test_bf16_meta_steps_keep_float32_finite_factors():
    model = tiny_t5(dtype=torch.bfloat16)
    optimizer = APOPrecond(model.parameters(), ProximalObjective(model, lambda_fsd=10.0, lambda_wsd=0.1),
                           base="adamw", lr=1e-3, weight_decay=0.01, meta_interval=2, meta_lr=0.01)
    run(model, optimizer, seq2seq_batches(4))
    assert optimizer.meta_steps == 2 and optimizer.skipped_meta_steps == 0
    for factors in optimizer.factors.values():
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in factors.tensors)
    assert all(torch.isfinite(p).all() for p in model.parameters())


# -- 4. what is refused ------------------------------------------------------------------------------------------------
def test_from_adamw_copies_each_group_and_refuses_what_it_cannot_precondition():
    model = MLP()
    params = list(model.parameters())
    adamw = torch.optim.AdamW(
        [{"params": params[:2], "lr": 3e-4, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05},
         {"params": params[2:], "weight_decay": 0.0}],
        lr=1e-3,
    )
    optimizer = APOPrecond.from_adamw(adamw, meta_lr=0.0)
    assert optimizer.base == "adamw"
    first, second = optimizer.param_groups
    assert (first["lr"], first["betas"], first["eps"], first["weight_decay"]) == (3e-4, (0.8, 0.95), 1e-6, 0.05)
    assert (second["lr"], second["betas"], second["eps"], second["weight_decay"]) == (1e-3, (0.9, 0.999), 1e-8, 0.0)

    with pytest.raises(ValueError, match="amsgrad"):
        APOPrecond.from_adamw(torch.optim.AdamW(model.parameters(), amsgrad=True))
    with pytest.raises(ValueError, match="maximize"):
        APOPrecond.from_adamw(torch.optim.AdamW(model.parameters(), maximize=True))
    with pytest.raises(ValueError, match="needs a torch.optim.AdamW; got Adam"):
        APOPrecond.from_adamw(torch.optim.Adam(model.parameters()))
    with pytest.raises(ValueError, match="needs a torch.optim.AdamW; got SGD"):
        APOPrecond.from_adamw(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="preconditions SGD; got AdamW"):
        APOPrecond.from_sgd(torch.optim.AdamW(model.parameters()))


def test_constructor_refuses_what_adamw_does_not_take():
    params = list(MLP().parameters())
    with pytest.raises(ValueError, match="base must be one of"):
        APOPrecond(params, base="adam")
    with pytest.raises(ValueError, match="amsgrad"):
        APOPrecond(params, base="adamw", amsgrad=True)
    with pytest.raises(ValueError, match="lookahead_steps=3 follows SGD's momentum"):
        APOPrecond(params, base="adamw", lookahead_steps=3)
    with pytest.raises(ValueError, match="SGD's hyperparameters"):
        APOPrecond(params, base="adamw", momentum=0.9)
    with pytest.raises(ValueError, match="AdamW's hyperparameters"):
        APOPrecond(params, betas=(0.9, 0.99))
    with pytest.raises(ValueError, match="betas"):
        APOPrecond(params, base="adamw", betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="momentum"):
        APOPrecond([{"params": params, "momentum": 0.9}], base="adamw")
    # a torch AdamW state with amsgrad loaded into APO-Precond is refused, not silently run without it
    amsgrad = torch.optim.AdamW(params, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        APOPrecond(params, base="adamw", meta_lr=0.0).load_state_dict(amsgrad.state_dict())


# FSDP2 (2 gloo processes, against DDP and one process, and SIGKILL + resume): the "precond_adamw" variant of
# tests/test_fsdp.py (its processes forked by tests/distributed_testing.py).
