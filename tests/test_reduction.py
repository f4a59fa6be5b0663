"""With meta-learning off, APO is the optimizer it wraps, bit for bit; a state-dict round trip continues bitwise."""

import copy
import io

import pytest
import torch

from hf_apo import APOLR, APOPrecond, ProximalObjective
from tiny import MLP, copy_task_batch, mlp_batch, tiny_t5

STEPS = 50


def run(model, optimizer, batches, observe=True):
    for batch in batches:
        model.zero_grad()
        model(**batch)["loss"].backward()
        if observe:
            optimizer.observe(batch)
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def mlp_batches(count=STEPS, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [mlp_batch(generator) for _ in range(count)]


def groups(model):
    params = list(model.parameters())
    return [{"params": params[::2], "weight_decay": 0.1}, {"params": params[1::2], "weight_decay": 0.0}]


REFERENCES = {
    "adamw": (torch.optim.AdamW, {"lr": 1e-2}),
    "adamw_amsgrad": (torch.optim.AdamW, {"lr": 1e-2, "amsgrad": True}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "sgd_nesterov": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-3, "momentum": 0.5}),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("how", ["meta_lr_zero", "no_meta_step_taken"])
def test_apo_lr_without_meta_learning_is_the_torch_optimizer_bitwise(name, how):
    cls, kwargs = REFERENCES[name]
    reference_model, model = MLP(), MLP()
    expected = run(reference_model, cls(groups(reference_model), **kwargs), mlp_batches(), observe=False)

    objective = ProximalObjective(model, lambda_fsd=10.0)
    meta = {"meta_lr": 0.0} if how == "meta_lr_zero" else {"meta_lr": 0.1, "meta_interval": STEPS + 1}
    optimizer = APOLR(cls(groups(model), **kwargs), objective, **meta, trust_region="none")
    got = run(model, optimizer, mlp_batches())
    assert optimizer.meta_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.1},
        {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
        {"lr": 0.1, "momentum": 0.9, "dampening": 0.2},
        {"lr": 0.1, "momentum": 0.9, "nesterov": True},
    ],
    ids=["sgd", "momentum_decay", "dampening", "nesterov"],
)
def test_apo_precond_with_identity_factors_is_sgd_bitwise(kwargs):
    reference_model, model = MLP(), MLP()
    expected = run(reference_model, torch.optim.SGD(reference_model.parameters(), **kwargs), mlp_batches(), False)
    optimizer = APOPrecond(model.parameters(), ProximalObjective(model), meta_lr=0.0, **kwargs)
    got = run(model, optimizer, mlp_batches())
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    built_from_sgd = APOPrecond.from_sgd(torch.optim.SGD(MLP().parameters(), **kwargs), meta_lr=0.0)
    assert built_from_sgd.param_groups[0]["momentum"] == kwargs.get("momentum", 0.0)


def seq2seq_batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [copy_task_batch(generator) for _ in range(count)]


def round_trip(state_dict):
    """Through bytes, as a checkpoint travels: torch.save, then torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def build(kind, model):
    objective = ProximalObjective(model, lambda_fsd=10.0, lambda_wsd=0.1)
    if kind == "lr":
        return APOLR(model.parameters(), objective, base="adamw", lr=1e-3, meta_interval=3, meta_lr=0.1, trust_region="none")
    return APOPrecond(model.parameters(), objective, lr=0.05, momentum=0.9, meta_interval=3, meta_lr=0.01)


@pytest.mark.parametrize("kind", ["lr", "precond"])
def test_state_dict_round_trip_mid_run_continues_bitwise(kind):
    batches = seq2seq_batches(24)
    uninterrupted_model = tiny_t5()
    uninterrupted = build(kind, uninterrupted_model)
    expected = run(uninterrupted_model, uninterrupted, batches)
    assert uninterrupted.meta_steps == 8

    first_model = tiny_t5()
    first = build(kind, first_model)
    # Stop right before meta step 15: its B′ is the last batch seen before the checkpoint, restored from it.
    run(first_model, first, batches[:14])
    state = round_trip(first.state_dict())

    resumed_model = tiny_t5()
    resumed_model.load_state_dict(copy.deepcopy(first_model.state_dict()))
    resumed = build(kind, resumed_model)
    resumed.load_state_dict(state)
    got = run(resumed_model, resumed, batches[14:])
    assert resumed.meta_steps == uninterrupted.meta_steps
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert resumed.metrics() == uninterrupted.metrics()


def test_state_dict_keeps_meta_parameters_float32_for_bf16_models():
    model = tiny_t5(dtype=torch.bfloat16)
    batches = seq2seq_batches(3)
    for kind in ("lr", "precond"):
        optimizer = build(kind, model)
        run(model, optimizer, batches)
        assert optimizer.meta_steps == 1
        state = round_trip(optimizer.state_dict())
        fresh = build(kind, model)
        fresh.load_state_dict(state)
        if kind == "lr":
            assert fresh.log_lr.dtype == torch.float32 and torch.equal(fresh.log_lr, optimizer.log_lr)
        else:
            for p in model.parameters():
                for saved, loaded in zip(optimizer.factors[p].tensors, fresh.factors[p].tensors):
                    assert loaded.dtype == torch.float32 and torch.equal(saved, loaded)


def test_factor_layout_keeps_factor_entries_near_the_parameter_count():
    """Dense on a weight's shorter side only (cap 1024), diagonal on the vocabulary side: ≈ 1× the parameters."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=1000, d_model=128, d_ff=512, num_layers=1, num_decoder_layers=1, num_heads=4, d_kv=32)
    model = T5ForConditionalGeneration(config)
    embedding = model.get_input_embeddings().weight
    optimizer = APOPrecond(model.parameters(), meta_lr=0.0, diagonal_row_params=[embedding])
    kinds = {name: optimizer.factors[p].kind for name, p in model.named_parameters()}
    assert kinds["shared.weight"] == "diagxdense"
    assert kinds["encoder.block.0.layer.0.SelfAttention.q.weight"] == "densexdense"  # 128 × 128
    assert kinds["encoder.block.0.layer.1.DenseReluDense.wi.weight"] == "diagxdense"  # 512 × 128
    assert kinds["encoder.block.0.layer.1.DenseReluDense.wo.weight"] == "densexdiag"  # 128 × 512
    ratio = optimizer.factor_numel() / sum(p.numel() for p in model.parameters())
    assert 0.5 < ratio < 1.1
