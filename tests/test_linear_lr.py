"""Every optimizer APO-LR may wrap (hf_apo.linear_lr.REGISTRY) takes, from the same state, a step c times as large
when its learning rate is c times as large, and keeps a state that does not depend on the learning rate; the others
are refused with the supported list. Entries whose package needs CUDA or is not installed are skipped, with why."""

import pytest
import torch

from hf_apo import APOLR, ProximalObjective
from hf_apo.linear_lr import REGISTRY, check_linear_in_lr, registry_key

SCALE = 3.0


def _transformers_adafactor(params, lr):
    from transformers.optimization import Adafactor

    # what the Trainer's --optim adafactor builds: a fixed LR, no first moment
    return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False, weight_decay=0.01)


def _torchao(name):
    def build(params, lr):
        torchao_optim = pytest.importorskip("torchao.optim", reason="torchao is not installed")
        return getattr(torchao_optim, name)(params, lr=lr, weight_decay=0.01)

    return build


def _bitsandbytes(name):
    def build(params, lr):
        if not torch.cuda.is_available():
            pytest.skip("bitsandbytes' optimizers run on CUDA only; no GPU here")
        bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
        return getattr(bnb.optim, name)(params, lr=lr)

    return build


def _apo_precond(params, lr):
    from hf_apo import APOPrecond

    optimizer = APOPrecond(params, base="adamw", lr=lr, weight_decay=0.01, meta_lr=0.0)
    generator = torch.Generator().manual_seed(1)
    for factors in optimizer.factors.values():  # learned (non-identity) factors, the same in both twins
        for t in factors.tensors:
            t.add_(0.1 * torch.randn(t.shape, generator=generator, dtype=t.dtype))
        factors.refresh()
    return optimizer


BUILDERS = {
    "hf_apo.APOPrecond": _apo_precond,  # --apo_precond_size lr: APO-LR learns the size over the factors
    "torch.SGD": lambda params, lr: torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=0.01),
    "torch.RMSprop": lambda params, lr: torch.optim.RMSprop(params, lr=lr, momentum=0.5, centered=True),
    "torch.Adam": lambda params, lr: torch.optim.Adam(params, lr=lr, weight_decay=0.01),
    "torch.AdamW": lambda params, lr: torch.optim.AdamW(params, lr=lr, weight_decay=0.01),
    "torch.NAdam": lambda params, lr: torch.optim.NAdam(params, lr=lr, weight_decay=0.01, decoupled_weight_decay=True),
    "torch.Adamax": lambda params, lr: torch.optim.Adamax(params, lr=lr, weight_decay=0.01),
    "torch.Adagrad": lambda params, lr: torch.optim.Adagrad(params, lr=lr, lr_decay=0.01),
    "transformers.Adafactor": _transformers_adafactor,
    **{key: _torchao(key.split(".")[1]) for key in REGISTRY if key.startswith("torchao.")},
    **{key: _bitsandbytes(key.split(".")[1]) for key in REGISTRY if key.startswith("bitsandbytes.")},
}


def test_every_entry_has_a_linearity_test():
    assert set(BUILDERS) == set(REGISTRY)


@pytest.mark.parametrize("key", sorted(REGISTRY))
def test_step_is_linear_in_the_learning_rate_from_the_same_state(key):
    device = "cuda" if key.startswith("bitsandbytes.") and torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if key.startswith(("torchao.", "bitsandbytes.")) else torch.float64
    generator = torch.Generator().manual_seed(0)
    # small weights: Δ = θ_after − θ_before loses to the rounding of θ only (float32: ~1e-7·|θ| against |Δ| ~ 1e-3)
    initial = [0.01 * torch.randn(256, 64, generator=generator, dtype=dtype),
               0.01 * torch.randn(64, generator=generator, dtype=dtype)]
    params = [torch.nn.Parameter(t.clone().to(device)) for t in initial]
    twin_params = [torch.nn.Parameter(t.clone().to(device)) for t in initial]
    optimizer, twin = BUILDERS[key](params, 1e-3), BUILDERS[key](twin_params, 1e-3)
    assert registry_key(optimizer) == key
    check_linear_in_lr(optimizer)

    def step(opt, params, lr, grads):
        for group in opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # torchao keeps the LR as a tensor (and refuses a float)
            else:
                group["lr"] = lr
        for p, g in zip(params, grads):
            p.grad = g.clone()
        before = [p.detach().clone() for p in params]
        opt.step()
        return [p.detach() - b for p, b in zip(params, before)]

    for _ in range(3):  # the same non-trivial state in both (torchao's quantized states cannot be deep-copied)
        grads = [torch.randn(p.shape, generator=generator, dtype=dtype).to(device) for p in params]
        step(optimizer, params, 1e-3, grads)
        step(twin, twin_params, 1e-3, grads)
    grads = [torch.randn(p.shape, generator=generator, dtype=dtype).to(device) for p in params]
    small = step(optimizer, params, 1e-3, grads)
    large = step(twin, twin_params, SCALE * 1e-3, grads)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    for a, b in zip(small, large):
        assert float((b - SCALE * a).norm() / (SCALE * a).norm()) < tolerance
    # the state after the step does not depend on the LR either
    state_small, state_large = optimizer.state_dict()["state"], twin.state_dict()["state"]
    for index in state_small:
        for name, value in state_small[index].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1:
                other = state_large[index][name]
                value = value.dequantize() if hasattr(value, "dequantize") else value
                other = other.dequantize() if hasattr(other, "dequantize") else other
                torch.testing.assert_close(other, value, rtol=0, atol=0, msg=f"{key}: state {name!r}")


@pytest.mark.parametrize("build, match", [
    (lambda p: torch.optim.Rprop(p), "torch.Rprop is not known"),
    (lambda p: torch.optim.ASGD(p), "torch.ASGD is not known"),
    (lambda p: __import__("transformers.optimization", fromlist=["Adafactor"]).Adafactor(p, lr=None),
     "relative_step=True"),
    (lambda p: __import__("transformers.optimization", fromlist=["Adafactor"]).Adafactor(
        p, lr=1e-3, relative_step=False, beta1=0.9), "beta1"),
])
def test_others_are_refused_with_the_reason(build, match):
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    with pytest.raises(ValueError, match=match):
        APOLR(build(params), ProximalObjective(torch.nn.Linear(1, 1), lambda_fsd=0.0, loss_batch="next"))


def test_schedule_free_is_refused_naming_the_supported_list():
    schedulefree = pytest.importorskip("schedulefree")
    params = [torch.nn.Parameter(torch.randn(4, 4))]
    with pytest.raises(ValueError, match="Supported: .*torch.AdamW"):
        APOLR(schedulefree.AdamWScheduleFree(params), meta_lr=0.0)
