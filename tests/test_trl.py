"""TRL's SFTTrainer with APO (hf_apo.sft): a tiny causal LM fine-tuned on text through APOSFTTrainer, both modes,
also with a LoRA adapter from peft_config; the plain SFTConfig is refused before training."""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from hf_apo import APOSFTConfig, APOSFTTrainer  # noqa: E402
from tiny import VOCAB, tiny_llama  # noqa: E402


def word_tokenizer():
    """A word-level tokenizer over "w3" … "w31" with the tiny Llama's special ids (pad 0, eos 1, bos 2)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def text_dataset(size=48):
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(size):
        words = torch.randint(3, VOCAB, (4,), generator=generator).tolist()
        rows.append({"text": " ".join(f"w{i}" for i in words + words[::-1])})  # a palindrome task
    return datasets.Dataset.from_list(rows)


def config(tmp_path, **apo):
    return APOSFTConfig(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, learning_rate=1e-2,
                        lr_scheduler_type="constant", logging_steps=2, save_strategy="no", report_to=[], use_cpu=True,
                        seed=0, max_length=16, disable_tqdm=True, apo_meta_interval=2, **apo)


@pytest.mark.parametrize("apo, lora", [({"apo": "lr"}, False), ({"apo": "lr", "apo_loss_batch": "same"}, True),
                                       ({"apo": "precond", "optim": "adamw_torch"}, True)],
                         ids=["lr_next_full", "lr_same_lora", "precond_adamw_lora"])
def test_sft_trains_with_apo(tmp_path, apo, lora):
    peft_config = None
    if lora:
        peft = pytest.importorskip("peft")
        peft_config = peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                      task_type="CAUSAL_LM")
    trainer = APOSFTTrainer(model=tiny_llama(), args=config(tmp_path, **apo), train_dataset=text_dataset(),
                            processing_class=word_tokenizer(), peft_config=peft_config)
    trainer.train()
    optimizer = trainer.apo_optimizer
    assert optimizer is not None and optimizer.objective.label_shift == 1  # a causal LM, also under the PEFT wrapper
    if apo["apo"] == "precond":  # over AdamW: APO-LR learns the size (every 10 steps) over the factors
        optimizer = optimizer.inner
    assert optimizer.meta_steps >= 2 and optimizer.skipped_meta_steps == 0
    assert optimizer.objective.label_shift == 1
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert any("apo/meta_steps" in h for h in trainer.state.log_history)
    trained = {id(p) for p in optimizer.all_params()}
    expected = {id(p) for p in trainer.model.parameters() if p.requires_grad}
    assert trained == expected and (not lora or all(
        "lora_" in name for name, p in trainer.model.named_parameters() if p.requires_grad))


def test_plain_sft_config_is_refused_with_the_fix(tmp_path):
    plain = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match="APOSFTConfig"):
        APOSFTTrainer(model=tiny_llama(), args=plain, train_dataset=text_dataset(8), processing_class=word_tokenizer())


def test_a_model_with_nothing_to_train_is_refused_before_step_one(tmp_path):
    model = tiny_llama()
    for p in model.parameters():
        p.requires_grad_(False)
    trainer = APOSFTTrainer(model=model, args=config(tmp_path, apo="lr"), train_dataset=text_dataset(8),
                            processing_class=word_tokenizer())
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainer.train()
