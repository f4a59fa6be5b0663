"""How fast APO-LR's learning rate moves: Rprop's sign-agreement step sizes on φ and the adaptive meta interval.

The problems are chosen so the sign of each meta-gradient is known in closed form: SGD on ½‖θ‖² with learning rate
η leaves θ·(1 − η), so the next-batch meta-gradient ⟨Δ_t, g_t+1⟩ = −η(1 − η)‖θ‖² says "larger" below η = 1 and
"smaller" above it. θ is rescaled to unit norm before each gradient (the sign is scale-free), so the problem stays
the same however many steps it takes.
"""

import copy
import math

import pytest
import torch

from hf_apo import APOLR, APOTrainingArguments, ProximalObjective
from hf_apo.phi_step import RPROP_ETAS, RPROP_MIN_STEP, keeps_moving
from test_reduction import round_trip


def quadratic(lr, **apo):
    """SGD on ½θ² (θ ∈ R⁴), APO-LR with the next-batch objective and λ 0: meta steps are dot products."""
    theta = torch.nn.Parameter(torch.ones(4))
    objective = ProximalObjective(torch.nn.Linear(1, 1), lambda_fsd=0.0, loss_batch="next")
    return theta, APOLR([theta], objective, base="sgd", lr=lr, **apo, trust_region="none")


def train(theta, optimizer, steps, on_step=None):
    for _ in range(steps):
        theta.data.div_(theta.norm())
        theta.grad = theta.detach().clone()
        optimizer.step()
        if on_step is not None:
            on_step()


def test_rprop_step_grows_while_the_sign_holds_and_halves_without_a_move_when_it_flips():
    _, optimizer = quadratic(1e-3, meta_lr=0.1, meta_optimizer="rprop")
    changes = []
    for meta_grad in [-1.0, -2.0, -0.5, 3.0, 1.0, 1.0]:
        changes.append(optimizer.meta_step(torch.tensor([meta_grad]), torch.tensor(0.0))[0])
    grow, shrink = RPROP_ETAS[1], RPROP_ETAS[0]
    s = [0.1, 0.1 * grow, 0.1 * grow**2]
    expected = [s[0], s[1], s[2], 0.0, -s[2] * shrink, -s[2] * shrink * grow]  # a negative meta-gradient raises φ
    torch.testing.assert_close(torch.tensor(changes), torch.tensor(expected), rtol=1e-5, atol=1e-7)
    assert optimizer.lr_multipliers[0] == pytest.approx(math.exp(sum(expected)), rel=1e-5)


def test_rprop_corrects_a_100x_too_small_learning_rate_in_a_few_meta_steps():
    """From η = 0.01 the meta-gradient says "larger" until η passes 1: Rprop gets there in ln(100) ≈ 4.6 of
    cumulated steps 0.1·(1.2ⁿ − 1)/0.2, i.e. 13 meta steps; Adam at the same meta_lr needs ln(100)/0.1 ≈ 46."""
    reached = {}
    for kind in ("rprop", "adam"):
        theta, optimizer = quadratic(0.01, meta_lr=0.1, meta_interval=1, meta_optimizer=kind)
        for step in range(1, 80):
            train(theta, optimizer, 1)
            if optimizer.lr_multipliers[0] * 0.01 > 1.0:
                reached[kind] = optimizer.meta_steps
                break
    steps_needed = math.ceil(math.log(1 + 0.2 * math.log(100) / 0.1) / math.log(RPROP_ETAS[1]))
    assert reached["rprop"] == steps_needed
    assert reached["adam"] >= 40


@pytest.mark.parametrize("max_meta_step", [1.0, 0.2])
def test_rprop_step_sizes_are_bounded(max_meta_step):
    _, optimizer = quadratic(1e-3, meta_lr=0.1, meta_optimizer="rprop", log_lr_range=(-100.0, 100.0),
                             max_meta_step=max_meta_step)
    changes = [optimizer.meta_step(torch.tensor([-1.0]), torch.tensor(0.0))[0] for _ in range(40)]
    assert max(changes) == pytest.approx(max_meta_step)
    for i in range(40):  # alternating signs: every other step a flip, the size falls to its floor
        optimizer.meta_step(torch.tensor([(1.0, -1.0)[i % 2]]), torch.tensor(0.0))
    state = optimizer.meta_optimizer.state[optimizer.log_lr]
    assert float(state["step_size"]) == pytest.approx(RPROP_MIN_STEP)


def test_keeps_moving():
    assert keeps_moving([-1.0], None)  # the first meta step
    assert keeps_moving([-1.0, 1.0], [-1.0, -1.0]) and keeps_moving([1.0], [1.0])
    assert not keeps_moving([1.0], [-1.0]) and not keeps_moving([0.0], [0.0]) and not keeps_moving([-1.0], [0.0])


@pytest.mark.parametrize("meta_optimizer", ["adam", "rprop"])
def test_adaptive_interval_looks_ahead_every_step_while_moving_and_every_k_after_a_flip(meta_optimizer):
    """The look-ahead steps, recorded, against the rule recomputed from the signs of the applied meta-gradients:
    the first at step 1; then the next step while the sign holds, K steps after the previous look-ahead when not."""
    interval = 5
    theta, optimizer = quadratic(0.3, meta_lr=0.5, meta_interval=interval, adaptive_interval=True,
                                 meta_optimizer=meta_optimizer)
    lookaheads, signs = [], []
    original = optimizer._take_lookahead

    def recording(score_loss):
        lookaheads.append(optimizer.step_count)
        return original(score_loss)

    optimizer._take_lookahead = recording
    seen = [0]

    def note():
        if optimizer.meta_steps > seen[0]:
            seen[0] = optimizer.meta_steps
            signs.append(float(torch.sign(optimizer.last_meta_gradient)[0]))

    train(theta, optimizer, 60, note)
    assert lookaheads[0] == 1
    assert {1.0, -1.0} <= set(signs)  # η crossed 1 and came back: there were flips
    expected, previous = [1], None
    for sign in signs[:-1]:
        moving = previous is None or sign == previous
        expected.append(expected[-1] + (1 if moving else interval))
        previous = sign
    assert lookaheads[:len(expected)] == expected
    fixed_theta, fixed = quadratic(0.3, meta_lr=0.5, meta_interval=interval, meta_optimizer=meta_optimizer)
    train(fixed_theta, fixed, 60)
    assert optimizer.meta_steps > fixed.meta_steps == 60 // interval - 1  # the last look-ahead awaits step 61


@pytest.mark.parametrize("meta_optimizer, adaptive", [("rprop", False), ("rprop", True), ("adam", True)])
def test_state_dict_round_trip_continues_bitwise(meta_optimizer, adaptive):
    def build():
        return quadratic(0.3, meta_lr=0.5, meta_interval=3, meta_optimizer=meta_optimizer, adaptive_interval=adaptive)

    def reset(theta):
        return lambda: theta.data.add_(0.3)  # the minimum moved: the signs vary

    theta, uninterrupted = build()
    train(theta, uninterrupted, 40, reset(theta))
    first_theta, first = build()
    train(first_theta, first, 17, reset(first_theta))
    state = round_trip(first.state_dict())
    resumed_theta, resumed = build()
    resumed_theta.data.copy_(first_theta.detach())
    resumed.load_state_dict(copy.deepcopy(state))
    train(resumed_theta, resumed, 23, reset(resumed_theta))
    assert resumed.meta_steps == uninterrupted.meta_steps > 5
    assert torch.equal(resumed.log_lr, uninterrupted.log_lr) and torch.equal(resumed_theta, theta)


def test_resuming_with_another_meta_optimizer_is_refused_with_the_flag():
    _, adam = quadratic(0.3, meta_lr=0.1)
    _, rprop = quadratic(0.3, meta_lr=0.1, meta_optimizer="rprop")
    with pytest.raises(ValueError, match="--apo_meta_optimizer adam"):
        rprop.load_state_dict(adam.state_dict())


def test_trainer_flags(tmp_path):
    args = APOTrainingArguments(output_dir=str(tmp_path), apo="lr", apo_meta_optimizer="rprop",
                                apo_adaptive_interval=True, report_to="none", use_cpu=True)
    assert args.apo_setting("apo_meta_optimizer") == "rprop" and args.apo_setting("apo_adaptive_interval") is True
    with pytest.raises(ValueError, match="--apo_meta_optimizer must be one of"):
        APOTrainingArguments(output_dir=str(tmp_path), apo="lr", apo_meta_optimizer="sgd", report_to="none")
    with pytest.raises(ValueError, match="--apo lr's"):
        APOTrainingArguments(output_dir=str(tmp_path), apo="precond", optim="sgd", apo_adaptive_interval=True,
                             report_to="none")


def test_meta_off_is_adamw_bitwise_with_rprop_and_the_adaptive_interval():
    from test_reduction import groups, mlp_batches, run
    from tiny import MLP

    reference_model, model = MLP(), MLP()
    expected = run(reference_model, torch.optim.AdamW(groups(reference_model), lr=1e-2), mlp_batches(), observe=False)
    objective = ProximalObjective(model, lambda_fsd=0.0, loss_batch="next", horizon=100)
    optimizer = APOLR(torch.optim.AdamW(groups(model), lr=1e-2), objective, meta_lr=0.0, meta_optimizer="rprop",
                      adaptive_interval=True, trust_region="none")
    got = run(model, optimizer, mlp_batches())
    assert optimizer.meta_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
