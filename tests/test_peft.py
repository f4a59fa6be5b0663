"""APO with PEFT LoRA models through the Trainer: the KL's label shift is the model's, seen through the PEFT wrapper;
only the adapters train; the meta-gradient over the adapters matches finite differences; a saved and resumed LoRA
run continues bitwise."""

import math

import pytest
import torch

from hf_apo import APOTrainer, APOTrainingArguments
from hf_apo.apo_trainer import label_shift_of
from tiny import CopyDataset, tiny_bart, tiny_llama, tiny_t5

peft = pytest.importorskip("peft")


def lora(model, task_type):
    config = peft.LoraConfig(task_type=task_type, r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    return peft.get_peft_model(model, config)


def test_label_shift_sees_through_peft_and_compile():
    causal, seq2seq = lora(tiny_llama(), "CAUSAL_LM"), lora(tiny_bart(), "SEQ_2_SEQ_LM")
    assert type(causal).__name__ == "PeftModelForCausalLM"  # not a name in transformers' causal-LM mapping
    assert label_shift_of(causal) == 1 and label_shift_of(torch.compile(causal)) == 1
    assert label_shift_of(seq2seq) == 0 and label_shift_of(tiny_t5()) == 0 and label_shift_of(tiny_llama()) == 1


class CausalCopyDataset(CopyDataset):
    """The reverse task as one causal sequence: labels are the inputs (the model shifts them)."""

    def __getitem__(self, index):
        tokens = torch.cat([self.tokens[index], self.tokens[index].flip(0)])
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens.clone()}


@pytest.mark.parametrize("apo, extra", [("lr", {"apo_loss_batch": "same"}),
                                        ("precond", {"optim": "sgd", "optim_args": "momentum=0.9"})])
@pytest.mark.parametrize("kind", ["causal", "seq2seq"])
def test_lora_model_trains_its_adapters_only_with_the_right_label_shift(tmp_path, apo, extra, kind):
    model = lora(tiny_llama(), "CAUSAL_LM") if kind == "causal" else lora(tiny_bart(), "SEQ_2_SEQ_LM")
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    adapters = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in name for name in adapters)
    args = APOTrainingArguments(
        output_dir=str(tmp_path), apo=apo, use_cpu=True, report_to=[], per_device_train_batch_size=8, max_steps=6,
        save_strategy="no", seed=0, learning_rate=1e-2, apo_meta_interval=2, lr_scheduler_type="constant",
        disable_tqdm=True, **extra)
    dataset = CausalCopyDataset() if kind == "causal" else CopyDataset()
    trainer = APOTrainer(model=model, args=args, train_dataset=dataset)
    trainer.train()
    optimizer = trainer.apo_optimizer
    assert optimizer.objective.label_shift == (1 if kind == "causal" else 0)
    assert optimizer.meta_steps == 3 + (getattr(optimizer, "trust_region", None) is not None)  # and step 1's look-ahead
    named = dict(model.named_parameters())
    assert all(torch.equal(named[name], value) for name, value in frozen.items())  # the base stays frozen
    assert any(not torch.equal(named[name], value) for name, value in adapters.items())
    trained = {id(p) for p in optimizer.all_params()}
    assert trained == {id(named[name]) for name in adapters}  # no factors or state for frozen weights
    if apo == "precond":
        assert set(map(id, optimizer.factors)) == trained


def test_label_shift_flag_overrides(tmp_path):
    args = APOTrainingArguments(output_dir=str(tmp_path), apo="lr", apo_loss_batch="same", apo_label_shift="0",
                                use_cpu=True, report_to=[], max_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = APOTrainer(model=lora(tiny_llama(), "CAUSAL_LM"), args=args, train_dataset=CausalCopyDataset())
    trainer.create_optimizer()
    assert trainer.apo_optimizer.objective.label_shift == 0
    with pytest.raises(ValueError, match="--apo_label_shift"):
        APOTrainingArguments(output_dir=str(tmp_path), apo="lr", apo_label_shift="2", report_to=[])


def test_apo_lr_meta_gradient_on_lora_parameters_matches_finite_differences():
    """The KL and loss look-ahead through a PEFT LoRA BART in float64, the optimizer over the adapters only: ∇_φ Q
    against central differences of Q with θ′ rebuilt from a fresh AdamW over a copy's adapters."""
    import copy

    from hf_apo import APOLR, ProximalObjective
    from test_meta_gradient import assert_matches_finite_differences, prepare_meta_step, reference_q
    from tiny import copy_task_batch

    model = lora(tiny_bart(), "SEQ_2_SEQ_LM").double()
    generator = torch.Generator().manual_seed(1)
    batches = [copy_task_batch(generator) for _ in range(4)]

    def adapters(m):
        return [p for p in m.parameters() if p.requires_grad]

    for p in adapters(model):  # LoRA's B starts at 0: give the adapters a non-trivial point
        p.data.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    base = torch.optim.AdamW(adapters(model), lr=0.005, weight_decay=0.1)
    objective = ProximalObjective(model, lambda_fsd=3.0, lambda_wsd=0.5)
    optimizer = APOLR(base, objective, meta_interval=3, meta_lr=0.05, meta_batch_fraction=0.5, trust_region="none")
    meta_batch, batch = prepare_meta_step(model, optimizer, batches)
    model_theta, base_state = copy.deepcopy(model), copy.deepcopy(base.state_dict())
    grads = [p.grad.clone() for p in adapters(model)]
    meta_batch_cut = {k: v[: len(v) // 2] for k, v in meta_batch.items()}

    def q_at(log_lr):
        lookahead = copy.deepcopy(model_theta)
        reference = torch.optim.AdamW(adapters(lookahead), lr=0.005 * math.exp(log_lr[0]),
                                      weight_decay=0.1)
        state = copy.deepcopy(base_state)
        state["param_groups"][0]["lr"] = reference.param_groups[0]["lr"]
        reference.load_state_dict(state)
        for p, g in zip(adapters(lookahead), grads):
            p.grad = g.clone()
        reference.step()
        return reference_q(model_theta, lookahead, batch, meta_batch_cut, lambda_fsd=3.0, lambda_wsd=0.5)

    optimizer.step()
    assert optimizer.meta_steps == 1
    assert_matches_finite_differences(optimizer.last_meta_gradient.double(), q_at, groups=1)


@pytest.mark.parametrize("apo, extra", [("lr", {}), ("precond", {"optim": "adamw_torch"})])
def test_a_lora_run_saved_and_resumed_continues_bitwise(tmp_path, apo, extra):
    """The adapter and the APO state go into the checkpoint; resuming at step 4 ends where 8 straight steps end."""
    def trainer(output_dir, **more):
        args = APOTrainingArguments(
            output_dir=str(output_dir), apo=apo, use_cpu=True, report_to=[], per_device_train_batch_size=8,
            max_steps=8, seed=0, data_seed=0, learning_rate=1e-2, apo_meta_interval=2, lr_scheduler_type="constant",
            disable_tqdm=True, save_steps=4, apo_loss_batch="same", **{"save_strategy": "steps", **extra, **more})
        return APOTrainer(model=lora(tiny_llama(), "CAUSAL_LM"), args=args, train_dataset=CausalCopyDataset())

    straight = trainer(tmp_path / "straight", save_strategy="no")
    straight.train()
    first = trainer(tmp_path / "run")
    first.args.max_steps = 4
    first.train()
    resumed = trainer(tmp_path / "run")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    a, b = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    assert all(torch.equal(a[name], b[name]) for name in a)
    factors = [t.apo_optimizer.inner if apo == "precond" else t.apo_optimizer for t in (resumed, straight)]
    # over AdamW, APO-LR learns the size over the factors; APO-LR's own count has the trust region's step-1 look-ahead
    assert factors[0].meta_steps == factors[1].meta_steps == (5 if apo == "lr" else 4)
    if apo == "lr":
        assert torch.equal(resumed.apo_optimizer.log_lr, straight.apo_optimizer.log_lr)
