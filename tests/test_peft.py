"""APO with PEFT LoRA models through the Trainer: the KL's label shift is the model's, seen through the PEFT wrapper,
and only the adapters train."""

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
    assert optimizer.meta_steps == 3
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
