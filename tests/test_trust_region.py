"""APO-LR's function-space trust region (hf_apo.trust_region): the rule, the in-place shrink, the backtracking, the
opening's growth and the state. The optimizer-level behaviour (a huge LR, resume, meta-off) is further down."""

import math

import pytest
import torch

from hf_apo.trust_region import TrustRegion, TrustRegionRule, first_order_gain, shrink_step_


@pytest.mark.parametrize("kl, gain, verdict", [
    (0.6, 1.0, "hold"),  # ratio 0.6: near the quadratic model's best step (0.5)
    (1.1, 1.0, "too_large"),  # ratio 1.1: the model predicts the step raises the loss
    (0.1, 1.0, "room"),  # ratio 0.1 < 1/8: the LR is below a quarter of the model's best
    (20.0, 30.0, "hold"),  # a large KL that gains as much is fine: the test is scale-free
    (1e-3, 1e-4, "too_large"),  # a tiny KL that gains nothing is not
    (1e-3, -1.0, "too_large"),  # an ascent step
    (0.0, 0.0, "hold"),
    (math.nan, 1.0, "too_large"),
])
def test_ratio_verdicts(kl, gain, verdict):
    assert TrustRegionRule().verdict(kl, gain) == verdict


@pytest.mark.parametrize("kl, verdict", [(1.5, "too_large"), (0.5, "hold"), (0.05, "room")])
def test_fixed_kl_verdicts_ignore_the_gain(kl, verdict):
    assert TrustRegionRule(criterion="kl", max_kl=1.0).verdict(kl, gain=1e-9) == verdict


@pytest.mark.parametrize("setting, match", [
    ({"criterion": "armijo"}, "criterion must be one of ratio, kl"),
    ({"grow_below": 2.0}, "grow_below < max_ratio"),
    ({"max_kl": 0.0}, "max_kl must be > 0"),
    ({"shrink": 1.0}, "shrink must be in"),
    ({"growth": 1.0}, "growth must be > 1"),
    ({"max_backtracks": 0}, "max_backtracks"),
])
def test_bad_settings_name_the_setting(setting, match):
    with pytest.raises(ValueError, match=match):
        TrustRegionRule(**setting)


def test_first_order_gain_is_minus_the_inner_product():
    generator = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=generator, dtype=torch.float64), None, torch.randn(5, generator=generator)]
    deltas = [torch.randn(3, 4, generator=generator, dtype=torch.float64), torch.randn(2), torch.randn(5)]
    expected = -sum(float((g.double() * d.double()).sum()) for g, d in zip(grads, deltas) if g is not None)
    assert float(first_order_gain(grads, deltas)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("build", [
    lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.01),
    lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.01),
    lambda p, lr: torch.optim.RMSprop(p, lr=lr, momentum=0.5, centered=True),
], ids=["sgd_nesterov", "adamw", "rmsprop"])
def test_a_halved_step_is_the_base_step_at_half_the_lr(build):
    """In place and without the base's state: θ + Δ/2 is the step the base takes from the same state at lr/2, to the
    rounding of θ (float64); the base's state is the same bit for bit."""
    generator = torch.Generator().manual_seed(0)
    initial = [torch.randn(32, 16, generator=generator, dtype=torch.float64), torch.randn(16, dtype=torch.float64)]
    params = [torch.nn.Parameter(t.clone()) for t in initial]
    twins = [torch.nn.Parameter(t.clone()) for t in initial]
    optimizer, twin = build(params, 1e-2), build(twins, 1e-2)
    for step in range(4):
        grads = [torch.randn(p.shape, generator=generator, dtype=torch.float64) for p in params]
        for p, t, g in zip(params, twins, grads):
            p.grad, t.grad = g.clone(), g.clone()
        if step == 3:
            twin.param_groups[0]["lr"] = 0.5e-2
        before = [p.detach().clone() for p in params]
        optimizer.step()
        twin.step()
    deltas = [p.detach() - b for p, b in zip(params, before)]
    shrink_step_([p.detach() for p in params], deltas, 0.5)
    for p, t, b in zip(params, twins, before):
        assert float((p - t).detach().abs().max()) <= 4 * torch.finfo(torch.float64).eps * float(b.abs().max())
        assert float((p - b).detach().norm()) > 0  # a step was taken
    for state, twin_state in zip(optimizer.state.values(), twin.state.values()):
        for name, value in state.items():
            torch.testing.assert_close(twin_state[name], value, rtol=0, atol=0)


def _quadratic_step(kl0: float, gain0: float):
    """A step whose KL is quadratic in its scale c and whose gain is linear in it: (measure, shrink_, scale)."""
    scale = [1.0]

    def shrink_(factor):
        scale[0] *= factor

    return (lambda: kl0 * scale[0] ** 2), shrink_, scale


def test_backtracking_halves_until_the_quadratic_model_accepts():
    region = TrustRegion()
    measure, shrink_, scale = _quadratic_step(kl0=8.0, gain0=1.0)  # ratio 8 → 4 → 2 → 1 (not above max_ratio 1)
    measurement = region.bound_step(1, measure, 1.0, shrink_)
    assert scale[0] == measurement.shrink == 0.125
    assert measurement.kl == pytest.approx(0.125) and measurement.gain == pytest.approx(0.125)
    assert measurement.verdict == "hold" and region.shrinks == 1 and not region.opening


def test_backtracking_stops_after_max_backtracks():
    region = TrustRegion(TrustRegionRule(max_backtracks=3))
    measure, shrink_, scale = _quadratic_step(kl0=1e6, gain0=1.0)
    assert region.bound_step(1, measure, 1.0, shrink_).shrink == scale[0] == 0.125


def test_growth_only_in_the_opening_with_room_and_an_agreeing_meta_gradient():
    region = TrustRegion()
    region.bound_step(1, lambda: 1e-4, 1.0, None)  # ratio 1e-4: room
    assert region.opening
    assert region.limit(0.1, meta_gradient=-1.0) == pytest.approx(math.log(2.0))
    assert region.due(2) and region.measure_next
    assert region.limit(-0.1, meta_gradient=+1.0) == -0.1  # the meta-gradient says smaller: it goes down
    region.bound_step(2, lambda: 0.3, 1.0, None)  # ratio 0.3: out of the quadratic regime's room
    assert not region.opening
    assert region.limit(0.1, meta_gradient=-1.0) == 0.0  # no increase while the last step had no room
    assert region.limit(-0.1, meta_gradient=+1.0) == -0.1
    region.bound_step(12, lambda: 1e-4, 1.0, None)  # room again, but after the opening: the meta step's own move
    assert region.limit(0.1, meta_gradient=-1.0) == 0.1


def test_measurements_every_step_in_the_opening_then_every_interval():
    region = TrustRegion(TrustRegionRule(interval=10, opening_steps=5))
    for step in range(1, 4):
        assert region.due(step)
        region.bound_step(step, lambda: 1e-6, 1.0, None)
    region.bound_step(4, lambda: 0.3, 1.0, None)  # ends the opening
    assert [step for step in range(5, 30) if region.due(step)] == [14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
                                                                    26, 27, 28, 29]
    region.bound_step(14, lambda: 0.3, 1.0, None)
    assert [step for step in range(15, 30) if region.due(step)] == [24, 25, 26, 27, 28, 29]


def test_state_dict_round_trip():
    region = TrustRegion(TrustRegionRule(criterion="kl"))
    region.bound_step(1, lambda: 5.0, 1.0, lambda factor: None)
    restored = TrustRegion(TrustRegionRule(criterion="kl"))
    restored.load_state_dict(region.state_dict())
    assert restored == region
    assert restored.metrics()["apo/step_kl"] == region.last.kl
