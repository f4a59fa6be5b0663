"""The fast meta-gradient against central finite differences of Q, in float64.

The reference below is deliberately slow and obvious (schedule_free's ``*_reference`` idea): for a perturbed φ it
rebuilds θ′ from scratch (a deep copy of the model, a fresh torch optimizer loaded with the base state, or the
preconditioned SGD update written out by hand) and evaluates

    Q(φ) = L_B(θ′) + λ_FSD · KL(f(B′; θ) ‖ f(B′; θ′)) (mean over real target tokens) + λ_WSD/2 · ‖θ′ − θ‖²

with its own KL. The fast path (one forward at θ, one forward/backward at θ′, a VJP through the update rule)
must agree to < 1e-5 relative error; a correct implementation reaches ~1e-9.
"""

import copy

import pytest
import torch
from torch import nn

from hf_apo import APOLR, APOPrecond, ProximalObjective
from tiny import MLP, copy_task_batch, mlp_batch, tiny_bart

LAMBDA_FSD, LAMBDA_WSD = 3.0, 0.5
H = 1e-4  # float64 central differences: truncation ~H², round-off ~1e-16·Q/H


def reference_kl(target_logits, logits, labels):
    """Token-mean KL over rows whose label is real (labels None: every row)."""
    p = target_logits.log_softmax(-1)
    q = logits.log_softmax(-1)
    kl = (p.exp() * (p - q)).sum(-1)
    if labels is None:
        return kl.mean()
    mask = labels != -100
    return kl[mask].sum() / mask.sum()


def forward_outputs(model, batch):
    return model(**batch)


def reference_q(model_theta, model_lookahead, batch, meta_batch, lambda_fsd=LAMBDA_FSD, lambda_wsd=LAMBDA_WSD):
    model_theta.eval()
    model_lookahead.eval()
    with torch.no_grad():
        loss = forward_outputs(model_lookahead, batch)["loss"]
        target = forward_outputs(model_theta, meta_batch)["logits"]
        logits = forward_outputs(model_lookahead, meta_batch)["logits"]
        kl = reference_kl(target, logits, meta_batch.get("labels") if logits.dim() == 3 else None)
        distance = sum(
            (a - b).pow(2).sum() for a, b in zip(model_lookahead.parameters(), model_theta.parameters())
        )
    return float(loss + lambda_fsd * kl + 0.5 * lambda_wsd * distance)


def make_problem(kind):
    """(model, list of batches) in float64: an MLP classifier or a tiny BART with tied embeddings."""
    generator = torch.Generator().manual_seed(1)
    if kind == "mlp":
        model = MLP().double()
        batches = [mlp_batch(generator, dtype=torch.float64) for _ in range(4)]
    else:
        model = tiny_bart().double()
        batches = [copy_task_batch(generator) for _ in range(4)]
    return model, batches


def set_grads(model, batch):
    model.zero_grad()
    model.train()
    forward_outputs(model, batch)["loss"].backward()


def prepare_meta_step(model, optimizer, batches):
    """Two plain steps (so moments and momentum buffers are non-trivial), then gradients for the meta step 3.

    Returns (B′, B) as the optimizer will see them: B′ is batch 1 (before its cut), B is batch 2.
    """
    for batch in batches[:2]:
        set_grads(model, batch)
        optimizer.observe(batch)
        optimizer.step()
    set_grads(model, batches[2])
    optimizer.observe(batches[2])
    return batches[1], batches[2]


def two_groups(model):
    params = list(model.parameters())
    return [{"params": params[::2], "lr": 0.05}, {"params": params[1::2], "lr": 0.02}]


BASES = {
    "sgd": (torch.optim.SGD, {}),
    "sgd_momentum": (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01}),
    "sgd_nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "adamw": (torch.optim.AdamW, {"weight_decay": 0.1}),
    "rmsprop": (torch.optim.RMSprop, {"momentum": 0.5}),
}


@pytest.mark.parametrize("kind", ["mlp", "bart"])
@pytest.mark.parametrize("base_name", ["sgd", "sgd_momentum", "sgd_nesterov", "adamw", "rmsprop"])
def test_apo_lr_meta_gradient_matches_finite_differences(kind, base_name):
    model, batches = make_problem(kind)
    base_cls, base_kwargs = BASES[base_name]
    base = base_cls(two_groups(model), **base_kwargs)
    objective = ProximalObjective(model, lambda_fsd=LAMBDA_FSD, lambda_wsd=LAMBDA_WSD)
    optimizer = APOLR(base, objective, meta_interval=3, meta_lr=0.05, meta_batch_fraction=0.5, trust_region="none")
    meta_batch, batch = prepare_meta_step(model, optimizer, batches)

    model_theta = copy.deepcopy(model)
    base_state = copy.deepcopy(base.state_dict())
    grads = [p.grad.clone() for p in model.parameters()]
    meta_batch_cut = {k: v[: len(v) // 2] for k, v in meta_batch.items()}

    def q_at(log_lr):
        lookahead = reference_lookahead(model_theta, base_cls, base_kwargs, base_state, grads, log_lr)
        return reference_q(model_theta, lookahead, batch, meta_batch_cut)

    optimizer.step()  # the meta step: records ∇_φ Q at φ = 0 before updating φ
    assert optimizer.meta_steps == 1
    assert_matches_finite_differences(optimizer.last_meta_gradient.double(), q_at)


def reference_lookahead(model_theta, base_cls, base_kwargs, base_state, grads, log_lr):
    """θ′ rebuilt from scratch: a copy of θ stepped by a fresh base optimizer with lr · exp(φ) per group."""
    lookahead = copy.deepcopy(model_theta)
    reference_base = base_cls(two_groups(lookahead), **base_kwargs)
    reference_base.load_state_dict(copy.deepcopy(base_state))
    for group, phi in zip(reference_base.param_groups, log_lr):
        group["lr"] = group["lr"] * torch.tensor(phi, dtype=torch.float64).exp().item()
    for p, g in zip(lookahead.parameters(), grads):
        p.grad = g.clone()
    reference_base.step()
    return lookahead


def assert_matches_finite_differences(fast, q_at, groups=2):
    """Each entry of the fast ∇_φ Q against central differences of ``q_at`` at φ = 0, < 1e-5 relative."""
    for index in range(groups):
        plus, minus = [0.0] * groups, [0.0] * groups
        plus[index], minus[index] = H, -H
        finite_difference = (q_at(plus) - q_at(minus)) / (2 * H)
        relative_error = abs(fast[index].item() - finite_difference) / abs(finite_difference)
        assert relative_error < 1e-5, (index, fast[index].item(), finite_difference, relative_error)


def reference_precond_step(model_theta, lookahead, grads, factors, buffers, group, lookahead_steps=1):
    """θ′ for APO-Precond written out per parameter: P(g) = L·G·R, decay outside P, then SGD momentum; then
    ``lookahead_steps − 1`` more steps of that momentum with no new gradient and no decay, one by one."""
    with torch.no_grad():
        for p_theta, p, g, tensors, buffer in zip(model_theta.parameters(), lookahead.parameters(), grads, factors, buffers):
            if len(tensors) == 1:
                pg = tensors[0] ** 2 * g
            else:
                left, right = (t @ t.T if t.dim() == 2 else torch.diag(t * t) for t in tensors)
                pg = (left @ g.reshape(g.shape[0], -1) @ right).reshape(g.shape)
            d = pg + group["weight_decay"] * p_theta
            if group["momentum"]:
                new_buffer = d.clone() if buffer is None else group["momentum"] * buffer + (1 - group["dampening"]) * d
                d = d + group["momentum"] * new_buffer if group["nesterov"] else new_buffer
            p.copy_(p_theta - group["lr"] * d)
            if group["momentum"]:
                for _ in range(lookahead_steps - 1):
                    new_buffer = group["momentum"] * new_buffer
                    d = group["momentum"] * new_buffer if group["nesterov"] else new_buffer
                    p.sub_(group["lr"] * d)


@pytest.mark.parametrize("kind", ["mlp", "bart"])
@pytest.mark.parametrize(
    "sgd",
    [
        dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False),
        dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False),
        dict(momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=True),
        dict(momentum=0.9, dampening=0.1, weight_decay=0.01, nesterov=False, lookahead_steps=5),
        dict(momentum=0.8, dampening=0.0, weight_decay=0.0, nesterov=True, lookahead_steps=3),
    ],
    ids=["sgd", "momentum", "nesterov", "momentum_lookahead5", "nesterov_lookahead3"],
)
def test_apo_precond_meta_gradient_matches_finite_differences(kind, sgd):
    model, batches = make_problem(kind)
    objective = ProximalObjective(model, lambda_fsd=LAMBDA_FSD, lambda_wsd=LAMBDA_WSD)
    # max_factor_dim 20 makes BART's 32-row embedding diagonal on the left, dense on the right.
    optimizer = APOPrecond(
        model.parameters(), objective, lr=0.05, meta_interval=3, meta_lr=0.01, meta_batch_fraction=0.5,
        max_factor_dim=20, **sgd,
    )
    generator = torch.Generator().manual_seed(7)
    params = list(model.parameters())
    for p in params:  # non-identity factors, so every term of the VJP matters
        for t in optimizer.factors[p].tensors:
            t.add_(0.2 * torch.randn(t.shape, generator=generator, dtype=t.dtype))
        optimizer.factors[p].refresh()
    kinds = {optimizer.factors[p].kind for p in params}
    assert {"dense" + "x" + "dense", "scale"} <= kinds
    if kind == "bart":
        assert "diagxdense" in kinds

    meta_batch, batch = prepare_meta_step(model, optimizer, batches)

    model_theta = copy.deepcopy(model)
    grads = [p.grad.clone() for p in params]
    buffers = [optimizer.state[p].get("momentum_buffer") for p in params]
    buffers = [None if b is None else b.clone() for b in buffers]
    factors = [[t.clone() for t in optimizer.factors[p].tensors] for p in params]
    direction = [[torch.randn(t.shape, generator=generator, dtype=t.dtype) for t in fs] for fs in factors]
    meta_batch_cut = {k: v[: len(v) // 2] for k, v in meta_batch.items()}

    def q_at(step):
        lookahead = copy.deepcopy(model_theta)
        moved = [[t + step * d for t, d in zip(fs, ds)] for fs, ds in zip(factors, direction)]
        reference_precond_step(model_theta, lookahead, grads, moved, buffers, optimizer.param_groups[0],
                               optimizer.lookahead_steps)
        return reference_q(model_theta, lookahead, batch, meta_batch_cut)

    optimizer.step()
    assert optimizer.meta_steps == 1
    fast = sum((g * d).sum() for gs, ds in zip_grads(optimizer.last_meta_gradient, direction) for g, d in zip(gs, ds))
    finite_difference = (q_at(H) - q_at(-H)) / (2 * H)
    relative_error = abs(fast.item() - finite_difference) / abs(finite_difference)
    assert relative_error < 1e-5, (fast.item(), finite_difference, relative_error)


def zip_grads(flat_grads, direction):
    """Regroup the optimizer's flat list of factor gradients like ``direction`` (per parameter)."""
    iterator = iter(flat_grads)
    return [([next(iterator) for _ in ds], ds) for ds in direction]


def test_lookahead_restores_training_mode_and_gradients():
    """Meta forwards run in eval mode and leave the caller's mode and .grad of the real step untouched."""
    model = tiny_bart(dtype=torch.float64)
    model.config.dropout = 0.5
    objective = ProximalObjective(model, lambda_fsd=1.0)
    optimizer = APOLR(model.parameters(), objective, base="sgd", lr=0.01, meta_interval=1, trust_region="none")
    batch = copy_task_batch(torch.Generator().manual_seed(0))
    set_grads(model, batch)
    grads = [p.grad.clone() for p in model.parameters()]
    optimizer.observe(batch)
    target = objective.target(batch)
    result = objective.lookahead_gradient(list(model.parameters()), batch, batch, target)
    assert model.training
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    # At θ′ = θ the KL is exactly zero and v is the loss gradient (eval mode: no dropout noise).
    model.eval()
    loss = model(**batch).loss
    assert result.objective.item() == pytest.approx(loss.item(), rel=1e-12)


def test_kl_masks_padding_and_upcasts():
    model = nn.Identity()
    objective = ProximalObjective(model, lambda_fsd=1.0)
    logits = torch.randn(2, 3, 5, dtype=torch.bfloat16)
    batch = {"labels": torch.tensor([[1, 2, -100], [3, -100, -100]])}
    rows = objective._distribution({"logits": logits}, batch)
    assert rows.shape == (3, 5)
    assert objective._divergence(rows, {"logits": logits}, batch).dtype == torch.float32
    shifted = ProximalObjective(model, lambda_fsd=1.0, label_shift=1)
    # causal LM: logits at t predict label t+1, so rows (0,0), (0,1) and (1,0) are real.
    assert shifted._token_mask(logits, batch).tolist() == [[True, False, False], [False, False, False]]
