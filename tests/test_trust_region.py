"""APO-LR's function-space trust region (hf_apo.trust_region): the rule, the in-place shrink, the backtracking, the
opening's growth and the state. The optimizer-level behaviour (a huge LR, resume, meta-off) is further down."""

import math

import pytest
import torch

from hf_apo.trust_region import TrustRegion, TrustRegionRule, first_order_gain, shrink_step_, trust_region_of


@pytest.mark.parametrize("kl, gain, verdict", [
    (0.6, 1.0, "hold"),  # ratio 0.6: near the quadratic model's best step (0.5)
    (1.1, 1.0, "too_large"),  # ratio 1.1: the model predicts the step raises the loss
    (0.1, 1.0, "room"),  # ratio 0.1 < 1/8: the LR is below a quarter of the model's best
    (20.0, 30.0, "hold"),  # a large KL that gains as much is fine: the test is scale-free
    (1e-3, 1e-4, "too_large"),  # a tiny KL that gains nothing is not
    (1e-3, -1.0, "hold"),  # no first-order decrease to compare with: no evidence either way
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


def test_a_setting_by_name_or_number_becomes_its_rule_and_anything_else_is_refused():
    rule = trust_region_of("0.5", interval=7, opening=0).rule  # the Trainer's flag value is a string
    assert (rule.criterion, rule.max_kl, rule.interval, rule.opening_steps) == ("kl", 0.5, 7, 0)
    assert trust_region_of("ratio", interval=3).rule == TrustRegionRule(criterion="ratio", interval=3)
    assert trust_region_of("none", interval=3) is None
    for bad in ("tight", True):
        with pytest.raises(ValueError, match="trust_region must be 'none', one of ratio, kl, a KL bound"):
            trust_region_of(bad, interval=3)


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
    region = TrustRegion(TrustRegionRule(opening_steps=100))
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


# -- in APO-LR ------------------------------------------------------------------------------------------------------
import copy  # noqa: E402

from distributed_testing import TinyTokenModel, run_on_ranks  # noqa: E402
from hf_apo import APOLR  # noqa: E402
from test_fsdp import batch_of, relative_difference  # noqa: E402
from tiny import copy_task_batch, tiny_bart  # noqa: E402


def _train(model, optimizer, steps, seed=0, trace=None, fixed=False, scheduler=None):
    """``steps`` steps on the reverse task (``fixed``: the same batch every step; ``scheduler`` stepped after each);
    the losses."""
    generator = torch.Generator().manual_seed(seed)
    losses, batch = [], copy_task_batch(generator) if fixed else None
    for _ in range(steps):
        batch = batch if fixed else copy_task_batch(generator)
        loss = model(**batch).loss
        loss.backward()
        if hasattr(optimizer, "observe"):
            optimizer.observe(batch)
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
        if trace is not None:
            trace.append((optimizer.lr_multipliers[0], optimizer.trust_region and optimizer.trust_region.last))
    return losses


def test_the_measured_kl_is_torch_kl_div_of_the_step_on_the_meta_batch():
    """The KL of the step actually taken, on B′ (the previous batch's first quarter), per real target token."""
    model = tiny_bart()
    rule = TrustRegionRule(max_ratio=1e9, grow_below=1e-9, interval=1)  # measures every step, never shrinks
    optimizer = APOLR(model.parameters(), model=model, lr=3e-3, trust_region=rule)
    generator = torch.Generator().manual_seed(0)
    first, second = copy_task_batch(generator), copy_task_batch(generator)
    for batch in (first, second):
        model(**batch).loss.backward()
        optimizer.observe(batch)
        if batch is second:
            meta_batch = {k: v[:2] for k, v in first.items()}  # ceil(0.25 · 8) examples of the previous batch
            with torch.no_grad():
                before = model(**meta_batch).logits
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        after = model(**meta_batch).logits
    mask = meta_batch["labels"] != -100
    expected = torch.nn.functional.kl_div(after[mask].log_softmax(-1), before[mask].log_softmax(-1), log_target=True,
                                          reduction="batchmean")
    assert optimizer.trust_region.last.kl == pytest.approx(float(expected), rel=1e-5)
    assert optimizer.trust_region.measurements == 2 and optimizer.trust_region.last.kl > 1e-4


def test_backtracking_keeps_a_huge_learning_rate_finite():
    """AdamW at lr 3 wrecks the tiny model (its loss 100× the uniform model's); with the trust region the first step
    is shrunk in place, φ comes down with it, and the loss stays near where it started."""
    losses = {}
    for setting in ("none", 0.1):
        model = tiny_bart()
        optimizer = APOLR(model.parameters(), model=model, lr=3.0, trust_region=setting)
        losses[setting] = _train(model, optimizer, 30)
    assert max(losses["none"]) > 10 * losses["none"][0]  # wrecked without it
    assert all(math.isfinite(x) for x in losses[0.1]) and max(losses[0.1]) < 1.2 * losses[0.1][0]
    assert optimizer.trust_region.shrinks >= 1 and optimizer.lr_multipliers[0] <= 2 ** -6


def test_growth_doubles_the_lr_until_the_first_step_out_of_the_quadratic_regime():
    """From a 1e-5 LR on one repeated batch (the meta-gradient says "larger" at every step)."""
    model = tiny_bart()
    optimizer = APOLR(model.parameters(), model=model, lr=1e-5, trust_region="kl", trust_region_opening=100)
    trace = []
    _train(model, optimizer, 40, trace=trace, fixed=True)
    multipliers = [m for m, _ in trace]
    end = next(i for i, (_, measured) in enumerate(trace) if measured.verdict != "room")
    assert end >= 5  # a 1e-5 LR is deep in the quadratic regime: it doubled for several steps
    # ×2 at each step of the opening (the meta step of step t is applied at step t + 1, with the next gradient)
    assert multipliers[:end + 1] == pytest.approx([2.0 ** i for i in range(end + 1)], rel=1e-5)
    assert not optimizer.trust_region.opening
    assert max(b / a for a, b in zip(multipliers[end:], multipliers[end + 1:])) < 1.2  # then the meta step's moves


def test_without_an_opening_the_bound_only_shrinks():
    """``opening_steps=0``: the same 1e-5 start never doubles (φ moves by the meta step's own small steps, every 10),
    and a huge LR is still cut down at the first step."""
    model = tiny_bart()
    rule = TrustRegionRule(criterion="kl", max_kl=1.0, opening_steps=0)
    optimizer = APOLR(model.parameters(), model=model, lr=1e-5, trust_region=rule)
    trace = []
    _train(model, optimizer, 30, trace=trace, fixed=True)
    multipliers = [m for m, _ in trace]
    assert not optimizer.trust_region.opening and trace[0][1].verdict == "room"  # room, and still no growth
    assert multipliers[-1] > 1.0 and max(b / a for a, b in zip(multipliers, multipliers[1:])) < 1.2
    assert optimizer.meta_steps <= 3
    model = tiny_bart()
    rule = TrustRegionRule(criterion="kl", max_kl=0.1, opening_steps=0)
    optimizer = APOLR(model.parameters(), model=model, lr=3.0, trust_region=rule)
    losses = _train(model, optimizer, 5)
    assert max(losses) < 1.2 * losses[0] and optimizer.lr_multipliers[0] <= 2 ** -6


def test_in_a_warm_up_the_meta_steps_keep_their_interval():
    """A warm-up lets φ only fall, so the opening's meta step at every step would only lower it, 100 times (it ended
    teacher-student's warm-up runs at a multiplier of 0.0007): in a warm-up φ moves as without the trust region."""
    runs = {}
    for setting in ("none", 1.0):  # a bound the tiny model's steps never reach: no shrink, no growth in a warm-up
        model = tiny_bart()
        optimizer = APOLR(model.parameters(), model=model, lr=1e-3, trust_region=setting, trust_region_opening=100)
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 40))
        trace = []
        _train(model, optimizer, 30, trace=trace, scheduler=warmup)
        runs[setting] = (optimizer.meta_steps, [m for m, _ in trace], optimizer)
    assert runs[1.0][0] == runs["none"][0] <= 3  # every 10 steps, not every step
    assert runs[1.0][1] == pytest.approx(runs["none"][1], rel=1e-6)
    assert runs[1.0][2].trust_region.measurements == 30 and runs[1.0][2].trust_region.shrinks == 0


def test_without_meta_learning_it_is_the_base_optimizer_bit_for_bit():
    model, twin = tiny_bart(), tiny_bart()
    optimizer = APOLR(model.parameters(), model=model, lr=3.0, meta_lr=0.0, trust_region=1e-6)
    _train(model, optimizer, 5)
    _train(twin, torch.optim.AdamW(twin.parameters(), lr=3.0), 5)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    assert optimizer.trust_region.measurements == 0


def test_resume_is_bitwise_with_the_trust_region_state():
    def build(model):
        return APOLR(model.parameters(), model=model, lr=0.1, trust_region=TrustRegionRule(max_kl=0.05,
                                                                                           criterion="kl"))

    model = tiny_bart()
    optimizer = build(model)
    _train(model, optimizer, 24)
    resumed_model = tiny_bart()
    resumed = build(resumed_model)
    generator = torch.Generator().manual_seed(0)
    for step in range(24):
        if step == 12:  # a checkpoint, and a fresh process that loads it
            state, weights = copy.deepcopy(resumed.state_dict()), copy.deepcopy(resumed_model.state_dict())
            resumed_model = tiny_bart(seed=1)
            resumed_model.load_state_dict(weights)
            resumed = build(resumed_model)
            resumed.load_state_dict(state)
        batch = copy_task_batch(generator)
        resumed_model(**batch).loss.backward()
        resumed.observe(batch)
        resumed.step()
        resumed.zero_grad()
    assert optimizer.trust_region.shrinks >= 1  # the state being resumed is not trivial
    assert resumed.trust_region == optimizer.trust_region
    assert torch.equal(resumed.log_lr, optimizer.log_lr)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed_model.parameters()))


def _ddp_run(rank, world):
    """30 steps of APO-LR with a tight KL bound on this rank's share of each global batch (about 3:2 in tokens)."""
    model = TinyTokenModel()
    trained = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = APOLR(model.parameters(), model=model, lr=0.3, meta_batch_fraction=1.0,
                      trust_region=TrustRegionRule(criterion="kl", max_kl=0.02, interval=3))
    for step in range(30):
        batch = batch_of("lr", step, rank, world)
        tokens = (batch["labels"] != -100).sum().double()
        total = tokens.clone()
        if world > 1:
            torch.distributed.all_reduce(total)
        (trained(**batch)["loss"] * float(tokens * world / total)).backward()
        optimizer.observe(batch)
        optimizer.step()
        optimizer.zero_grad()
    return {"params": [p.detach().clone() for p in model.parameters()], "log_lr": optimizer.log_lr.clone(),
            "region": optimizer.trust_region.state_dict()}


def test_two_processes_take_the_decisions_of_one():
    """The KL is the global token mean (each rank's weighted by its share), so both ranks and one process with the
    global batch shrink the same steps by the same factors."""
    ranks = run_on_ranks(_ddp_run)
    single = _ddp_run(0, 1)
    assert single["region"]["shrinks"] >= 1 and float(single["log_lr"]) < -1.0  # it shrank: φ came down
    for result in ranks:
        assert result["region"]["shrinks"] == single["region"]["shrinks"]
        assert torch.equal(result["log_lr"], single["log_lr"])
        assert relative_difference(result["params"], single["params"]) < 1e-5


@pytest.mark.parametrize("apo", ["lr", "precond"])
def test_the_trainer_flag_bounds_the_step_and_logs_its_kl(tmp_path, apo):
    """``--apo_trust_region 0.05`` at a learning rate that wrecks the tiny T5: the step's KL is logged (apo/step_kl),
    the steps are shrunk and training stays finite; under ``--apo precond`` the size learner carries it, and
    ``--apo_trust_region_opening``."""
    from hf_apo import APOSeq2SeqTrainer, APOSeq2SeqTrainingArguments
    from tiny import CopyDataset, tiny_t5

    args = APOSeq2SeqTrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=8, max_steps=12,
        logging_steps=4, save_strategy="no", seed=0, data_seed=0, disable_tqdm=True, learning_rate=0.1,
        apo=apo, apo_trust_region="0.05", apo_trust_region_opening=0)
    trainer = APOSeq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=CopyDataset())
    trainer.train()
    region = trainer.apo_optimizer.trust_region
    assert region.rule.criterion == "kl" and region.rule.max_kl == 0.05 and region.shrinks >= 1
    assert region.rule.opening_steps == 0 and not region.opening
    logs = [h for h in trainer.state.log_history if "apo/step_kl" in h]
    assert len(logs) == 3 and all(h["apo/step_kl"] <= 0.05 for h in logs)
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)


@pytest.mark.parametrize("loss_batch", ["next", "same"])
def test_the_default_looks_ahead_at_step_1_then_at_the_interval(loss_batch):
    """The default (a bound of 1 nat per token, no opening) adds one look-ahead, at step 1, to the meta steps every
    ``meta_interval``. With ``loss_batch="same"`` every look-ahead step goes unmeasured; the opening's schedule still
    ends after step 1 (it once never did there: a meta step at every step)."""
    from hf_apo import ProximalObjective

    model = tiny_bart()
    objective = ProximalObjective(model, loss_batch=loss_batch, lambda_fsd=0.0 if loss_batch == "next" else 1.0)
    optimizer = APOLR(model.parameters(), objective, base="adamw", lr=1e-3, meta_interval=5)
    assert optimizer.trust_region.rule.max_kl == 1.0 and optimizer.trust_region.rule.opening_steps == 0
    _train(model, optimizer, 20)
    # steps 1, 5, 10, 15, 20 ("next": the look-ahead of step 20 awaits step 21's gradient)
    assert optimizer.meta_steps == (4 if loss_batch == "next" else 5)
    assert not optimizer.trust_region.opening and optimizer.trust_region.measurements >= 2
