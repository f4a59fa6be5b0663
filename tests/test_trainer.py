"""APOTrainer / APOSeq2SeqTrainer on tiny models built from configs (no Hub)."""

import inspect
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from hf_apo import APOLR, APOPrecond, APOSeq2SeqTrainer, APOSeq2SeqTrainingArguments, APOTrainer, APOTrainingArguments
from hf_apo.apo_config import APO_DEFAULTS, DEFAULT_LOSS_BATCH
from tiny import VOCAB, CopyDataset, tiny_t5


def arguments(output_dir, cls=APOSeq2SeqTrainingArguments, **overrides):
    defaults = dict(
        output_dir=str(output_dir), use_cpu=True, report_to=[], per_device_train_batch_size=8, max_steps=20,
        logging_steps=5, save_strategy="no", seed=0, data_seed=0, disable_tqdm=True, learning_rate=1e-3,
        lr_scheduler_type="constant",
    )
    return cls(**{**defaults, **overrides})


def losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def apo_logs(trainer):
    return [h for h in trainer.state.log_history if "apo/meta_steps" in h]


@pytest.mark.parametrize(
    "apo, optim",
    [("lr", {"optim": "adamw_torch"}), ("lr", {"optim": "sgd", "optim_args": "momentum=0.9"}),
     ("lr", {"optim": "rmsprop"}), ("precond", {"optim": "sgd", "optim_args": "momentum=0.9"}),
     ("precond", {"optim": "adamw_torch"}), ("lr", {"optim": "adafactor"}), ("lr", {"optim": "adagrad"})],
)
def test_meta_lr_zero_equals_parent_trainer(tmp_path, apo, optim):
    parent = Seq2SeqTrainer(
        model=tiny_t5(), args=arguments(tmp_path / "p", cls=Seq2SeqTrainingArguments, weight_decay=0.1, **optim),
        train_dataset=CopyDataset(),
    )
    parent.train()
    trainer = APOSeq2SeqTrainer(
        model=tiny_t5(), args=arguments(tmp_path / "a", apo=apo, apo_meta_lr=0.0, weight_decay=0.1, **optim),
        train_dataset=CopyDataset(),
    )
    trainer.train()
    learns_size = apo == "lr" or optim.get("optim") == "adamw_torch"  # precond over AdamW: APO-LR over the factors
    assert isinstance(trainer.apo_optimizer, APOLR if learns_size else APOPrecond)
    if apo == "precond":  # the default size (chosen by the --optim name) and the builder (by the base's type) agree
        precond = trainer.apo_optimizer.inner if learns_size else trainer.apo_optimizer
        assert isinstance(precond, APOPrecond) and precond.base == optim["optim"].removesuffix("_torch")
    assert losses(trainer) == losses(parent)
    assert all(torch.equal(a, b) for a, b in zip(trainer.model.parameters(), parent.model.parameters()))
    # The Trainer's weight-decay groups survive the wrapping.
    assert [g["weight_decay"] for g in trainer.apo_optimizer.param_groups] == [0.1, 0.0]


def test_apo_none_is_the_parent_trainer(tmp_path):
    trainer = APOSeq2SeqTrainer(model=tiny_t5(), args=arguments(tmp_path), train_dataset=CopyDataset())
    trainer.train()
    assert trainer.apo_optimizer is None
    assert not any(key.startswith("apo/") for h in trainer.state.log_history for key in h)


def test_apo_lr_rescues_a_tiny_learning_rate(tmp_path):
    common = dict(learning_rate=1e-5, max_steps=60, per_device_train_batch_size=16)
    plain = APOSeq2SeqTrainer(model=tiny_t5(), args=arguments(tmp_path / "p", **common), train_dataset=CopyDataset())
    plain.train()
    apo = APOSeq2SeqTrainer(
        model=tiny_t5(),
        args=arguments(tmp_path / "a", apo="lr", apo_meta_interval=2, apo_meta_lr=0.3, **common),
        train_dataset=CopyDataset(),
    )
    apo.train()
    logs = apo_logs(apo)
    multipliers = [h["apo/lr_multiplier"] for h in logs]
    assert multipliers[0] > 1 and max(multipliers) > 20
    # the default objective scores each look-ahead on the next batch: the last one (step 60) awaits a 61st gradient;
    # the default trust region adds one at step 1, the step it first measures (30 = 1 + 29 of steps 2, 4, ..., 58)
    assert apo.apo_optimizer.objective.loss_batch == "next" and apo.apo_optimizer.trust_region.rule.max_kl == 1.0
    assert logs[-1]["apo/meta_steps"] == 30 and logs[-1]["apo/skipped_meta_steps"] == 0
    assert losses(apo)[-1] < losses(plain)[-1] - 0.3


def test_precond_bf16_is_finite_improving_and_float32(tmp_path):
    trainer = APOSeq2SeqTrainer(
        model=tiny_t5(),
        args=arguments(
            tmp_path, apo="precond", optim="sgd", optim_args="momentum=0.9", learning_rate=0.1, bf16=True,
            max_steps=40, apo_meta_interval=2,
        ),
        train_dataset=CopyDataset(),
    )
    trainer.train()
    history = losses(trainer)
    assert all(torch.isfinite(torch.tensor(history)))
    assert history[-1] < history[0] - 0.3
    optimizer = trainer.apo_optimizer
    assert optimizer.meta_steps == 20 and optimizer.skipped_meta_steps == 0
    assert all(t.dtype == torch.float32 for f in optimizer.factors.values() for t in f.tensors)
    assert apo_logs(trainer)[-1]["apo/left_trace_mean"] != 1.0
    # The vocabulary side of the (tied) embedding is diagonal; the FFN's long side too; square weights dense.
    model = trainer.model
    assert optimizer.factors[model.get_input_embeddings().weight].kind == "diagxdense"
    wi = model.encoder.block[0].layer[1].DenseReluDense.wi.weight  # 32 × 16: both sides <= 64, dense
    assert optimizer.factors[wi].kind == "densexdense"


def test_meta_steps_run_on_sync_steps_only_under_gradient_accumulation(tmp_path):
    trainer = APOSeq2SeqTrainer(
        model=tiny_t5(),
        args=arguments(tmp_path, apo="lr", apo_loss_batch="same", apo_meta_interval=1, gradient_accumulation_steps=3,
                       max_steps=4, per_device_train_batch_size=4, logging_steps=1),
        train_dataset=CopyDataset(),
    )
    seen = []
    optimizer_observe = None

    def record(batch):
        seen.append(batch["input_ids"].clone())
        optimizer_observe(batch)

    trainer.create_optimizer()
    optimizer_observe = trainer.apo_optimizer.observe
    trainer.apo_optimizer.observe = record
    trainer.train()
    assert len(seen) == 12  # every micro-batch observed
    assert trainer.apo_optimizer.meta_steps == 4  # one meta step per optimizer step, not per micro-batch
    # B′ of the last meta step was the second-to-last micro-batch of the window, B the last one.
    batch, meta_batch = trainer.apo_optimizer._meta_batches()
    assert torch.equal(batch["input_ids"], seen[-1])
    assert torch.equal(meta_batch["input_ids"], seen[-2][:1])  # 25% of 4 examples


class LossOnly(nn.Module):
    """A model whose output has a loss but no logits."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, 4)

    def forward(self, input_ids, attention_mask=None, labels=None):
        return {"loss": self.embedding(input_ids).pow(2).mean()}


def test_refuses_model_without_logits_before_first_step(tmp_path):
    model = LossOnly()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = APOTrainer(
        model=model, args=arguments(tmp_path, cls=APOTrainingArguments, apo="lr", apo_lambda_fsd=1.0,
                                    save_strategy="steps", save_steps=1),
        train_dataset=CopyDataset(),
    )
    with pytest.raises(ValueError, match="--apo_lambda_fsd"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert not any(name.startswith("checkpoint") for name in os.listdir(tmp_path))
    # The default trust region measures each step's KL: refused the same way, naming it
    trainer = APOTrainer(model=model, args=arguments(tmp_path / "default", cls=APOTrainingArguments, apo="lr",
                                                     max_steps=12), train_dataset=CopyDataset())
    with pytest.raises(ValueError, match="--apo_trust_region 1.0"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    # The default objective (next batch, no KL) without the trust region needs no logits: the same model trains.
    trainer = APOTrainer(model=model, args=arguments(tmp_path / "none", cls=APOTrainingArguments, apo="lr",
                                                     apo_trust_region="none", max_steps=12), train_dataset=CopyDataset())
    trainer.train()
    assert trainer.apo_optimizer.meta_steps == 1


@pytest.mark.parametrize(
    "overrides, flag",
    [
        ({"apo": "lr", "optim": "schedule_free_adamw"}, "--optim schedule_free_adamw is not one"),
        ({"apo": "precond", "optim": "adafactor"}, "--optim one of: adamw_torch, adamw_torch_fused, sgd"),
        ({"apo": "precond", "apo_lookahead_steps": 3}, "--apo_lookahead_steps > 1 follows SGD's momentum"),
        ({"apo": "precond", "optim": "sgd", "apo_meta_optimizer": "rprop"}, "--apo lr's"),
        ({"apo": "lr", "apo_lambda_fsd": -1.0}, "--apo_lambda_fsd"),
        ({"apo": "lr", "apo_lambda_wsd": -0.1}, "--apo_lambda_wsd"),
        ({"apo": "lr", "apo_meta_interval": 0}, "--apo_meta_interval"),
        ({"apo": "lr", "apo_meta_lr": -1.0}, "--apo_meta_lr"),
        ({"apo": "lr", "apo_meta_batch_fraction": 0.0}, "--apo_meta_batch_fraction"),
        ({"apo": "lr", "apo_trust_region": "-1"}, "--apo_trust_region must be 'none' or a KL bound > 0"),
        ({"apo": "lr", "apo_trust_region": "tight"}, "--apo_trust_region must be 'none' or a KL bound > 0"),
        ({"apo": "precond", "optim": "sgd", "apo_trust_region": "1.0"}, "--apo_trust_region bounds a learned LR: use --apo lr"),
        ({"apo": "lr", "apo_trust_region": "1.0", "apo_trust_region_opening": -1},
         "--apo_trust_region_opening must be an integer >= 0"),
        ({"apo": "lr", "apo_trust_region": "none", "apo_trust_region_opening": 0},
         "--apo_trust_region_opening is the trust region's: set"),
        ({"apo": "adam"}, "--apo"),
        ({"apo": "lr", "apo_loss_batch": "previous"}, "--apo_loss_batch"),
        ({"apo": "lr", "apo_loss_batch": "next", "apo_horizon": 0.5}, "--apo_horizon"),
        ({"apo": "lr", "apo_loss_batch": "same", "apo_horizon": 100}, "--apo_loss_batch next"),
        ({"apo": "precond", "optim": "sgd", "apo_loss_batch": "next"}, "--apo_loss_batch next.*--optim adamw_torch"),
        ({"apo": "precond", "apo_loss_batch": "next", "apo_lambda_fsd": 10.0}, "drop --apo_lambda_fsd"),
        ({"apo": "lr", "apo_precond_size": "lr"}, "--apo_precond_size lr is --apo precond's"),
        ({"apo": "precond", "apo_precond_size": "both"}, "--apo_precond_size must be one of factors, shape, lr"),
        ({"apo": "precond", "optim": "sgd", "apo_lookahead_steps": 0}, "--apo_lookahead_steps"),
        # DeepSpeed and FSDP1 stay refused, and the message names the supported alternative, FSDP2
        ({"apo": "lr", "deepspeed": "ds_config.json"}, "DeepSpeed.*FSDP2.*--fsdp_config"),
        ({"apo": "lr", "fsdp": "full_shard", "fsdp_config": {"version": 1}}, "FSDP2 only.*version"),
        ({"apo": "lr", "fsdp": "full_shard"}, "HF_APO_FSDP2=1"),  # FSDP2: an opt-in until checked on a GPU
        ({"apo": "lr", "fsdp": "full_shard", "fsdp_config": {"cpu_offload": True}}, "CPU offload"),
    ],
)
def test_bad_configuration_is_refused_naming_the_flag(tmp_path, overrides, flag, monkeypatch):
    monkeypatch.delenv("HF_APO_FSDP2", raising=False)
    with pytest.raises(ValueError, match=flag):
        arguments(tmp_path, **overrides)


def test_user_optimizer_with_apo_is_refused(tmp_path):
    model = tiny_t5()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="optimizers="):
        APOSeq2SeqTrainer(model=model, args=arguments(tmp_path, apo="lr"), train_dataset=CopyDataset(),
                          optimizers=(optimizer, None))


def test_help_lists_apo_flags():
    parser = HfArgumentParser(APOSeq2SeqTrainingArguments)
    text = parser.format_help()
    for flag in ("--apo {none,lr,precond}", "--apo_meta_interval", "--apo_meta_lr", "--apo_lambda_fsd",
                 "--apo_lambda_wsd", "--apo_meta_batch_fraction", "--apo_lr_clamp", "--apo_max_factor_dim",
                 "--apo_loss_batch {same,next}", "--apo_horizon", "--apo_lookahead_steps", "--apo_spectral_meta_step",
                 "--apo_stochastic_rounding", "--apo_meta_optimizer {adam,rprop}", "--apo_adaptive_interval",
                 "--apo_label_shift {auto,0,1}", "--apo_precond_size {factors,shape,lr}"):
        assert flag in text
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--apo", "lr", "--apo_lambda_fsd", "3"])
    assert args.apo == "lr" and args.apo_lambda_fsd == 3.0 and args.apo_setting("apo_lambda_fsd") == 3.0
    assert args.apo_effective_meta_lr == APO_DEFAULTS[("lr", DEFAULT_LOSS_BATCH["lr"])]["apo_meta_lr"]
    # --apo_loss_batch same alone is the paper's setting
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--apo", "lr", "--apo_loss_batch", "same"])
    assert [args.apo_setting(f) for f in ("apo_lambda_fsd", "apo_horizon", "apo_meta_interval")] == [10.0, 1.0, 10]
    # Unset flags take their mode's default; what the user sets wins.
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--apo", "precond", "--optim", "sgd",
                                                  "--apo_meta_interval", "4"])
    assert args.apo_setting("apo_meta_interval") == 4
    assert args.apo_setting("apo_loss_batch") == "same" and args.apo_effective_meta_lr == 0.01
    # the step's size: the factors' over SGD; over AdamW learned by APO-LR (the issue-18 rule's winner)
    assert args.apo_precond_size is None and args.to_dict()["apo_precond_size"] == "factors"
    (adamw,) = parser.parse_args_into_dataclasses(["--output_dir", "x", "--apo", "precond"])
    assert adamw.apo_setting("apo_precond_size") == "lr" and adamw.to_dict()["apo_precond_size"] == "lr"
    # the Trainer's APO-Precond defaults are the optimizer's own
    signature = inspect.signature(APOPrecond).parameters
    assert signature["meta_lr"].default == args.apo_effective_meta_lr
    assert signature["lookahead_steps"].default == args.apo_lookahead_steps
    assert signature["spectral_meta_step"].default == args.apo_spectral_meta_step
    assert signature["stochastic_rounding"].default == args.apo_stochastic_rounding


def test_predict_with_generate_is_untouched(tmp_path):
    dataset = CopyDataset(size=8)
    common = dict(predict_with_generate=True, generation_max_length=8, per_device_eval_batch_size=4)
    parent = Seq2SeqTrainer(model=tiny_t5(), args=arguments(tmp_path / "p", cls=Seq2SeqTrainingArguments, **common))
    apo = APOSeq2SeqTrainer(model=tiny_t5(), args=arguments(tmp_path / "a", apo="lr", **common))
    expected, got = parent.predict(dataset), apo.predict(dataset)
    assert (expected.predictions == got.predictions).all()
    assert expected.metrics["test_loss"] == got.metrics["test_loss"]


def _classification_dataset():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, VOCAB, (32, 6), generator=generator)
    labels = (tokens[:, 0] > VOCAB // 2).long()
    return [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": l} for t, l in zip(tokens, labels)]


def _causal_dataset():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, VOCAB, (32, 6), generator=generator)
    return [{"input_ids": t, "attention_mask": torch.ones_like(t), "labels": t.clone()} for t in tokens]


@pytest.mark.parametrize("kind", ["causal_lm", "classifier"])
def test_apo_lr_trains_causal_lm_and_classifier(tmp_path, kind):
    torch.manual_seed(0)
    if kind == "causal_lm":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16))
        dataset = _causal_dataset()
    else:
        model = BertForSequenceClassification(BertConfig(
            vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, num_labels=2,
        ))
        dataset = _classification_dataset()
    trainer = APOTrainer(
        model=model, args=arguments(tmp_path, cls=APOTrainingArguments, apo="lr", apo_loss_batch="same",
                                    apo_meta_interval=2, max_steps=10),
        train_dataset=dataset,
    )
    trainer.train()
    objective = trainer.apo_optimizer.objective
    assert objective.label_shift == (1 if kind == "causal_lm" else 0)
    # steps 2, 4, ..., 10, and step 1: the default trust region's first step is a look-ahead; it measures the others
    assert trainer.apo_optimizer.meta_steps == 6 and trainer.apo_optimizer.skipped_meta_steps == 0
    assert trainer.apo_optimizer.trust_region.measurements >= 1 and "apo/step_kl" in apo_logs(trainer)[-1]
    assert apo_logs(trainer)[-1]["apo/lr_multiplier"] != 1.0


def test_fp16_overflow_skips_the_meta_step_too():
    """An fp16 GradScaler that finds inf skips optimizer.step(), and with it the meta step."""
    from tiny import MLP, mlp_batch
    from hf_apo import ProximalObjective

    model = MLP()
    optimizer = APOLR(model.parameters(), ProximalObjective(model), base="adamw", lr=1e-3, meta_interval=1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        batch = mlp_batch(generator)
        scaler.scale(model(**batch)["loss"]).backward()
        if step == 1:
            next(model.parameters()).grad[0, 0] = float("inf")
        optimizer.observe(batch)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
    assert optimizer.step_count == 3 and optimizer.meta_steps == 3


def test_to_dict_records_the_values_in_effect(tmp_path):
    """What reporters log (``to_dict``) holds the values the run uses; the fields stay unset, so replacing the loss
    batch still takes that batch's defaults."""
    import dataclasses

    args = arguments(tmp_path, cls=APOTrainingArguments, apo="lr")
    logged = args.to_dict()
    assert args.apo_meta_lr is None and args.apo_lambda_fsd is None
    assert [logged[f] for f in ("apo_loss_batch", "apo_meta_lr", "apo_lambda_fsd", "apo_horizon")] == [
        "next", 0.1, 0.0, 10_000.0]
    same = dataclasses.replace(args, apo_loss_batch="same").to_dict()
    assert [same[f] for f in ("apo_lambda_fsd", "apo_horizon")] == [10.0, 1.0]
    assert arguments(tmp_path, cls=APOTrainingArguments).to_dict()["apo_meta_lr"] is None  # --apo none: untouched


def test_docs_flag_table_is_generated_from_the_fields():
    """docs/flags.md's table is what the fields' help says (``python docs/make_flags.py`` rewrites it)."""
    import runpy

    make_flags = runpy.run_path(str(Path(__file__).resolve().parents[1] / "docs" / "make_flags.py"))
    assert make_flags["main"](["--check"]) == 0
    assert "--apo_precond_size {factors,shape,lr}" in make_flags["table"]()


@pytest.mark.parametrize("apo, optim", [("lr", "adamw_torch"), ("precond", "adamw_torch")])
def test_the_plain_pytorch_defaults_are_the_trainers(tmp_path, apo, optim):
    """ProximalObjective.for_apo and the optimizers' own defaults build what --apo lr / precond builds with every
    --apo_* flag left unset (one source: hf_apo.defaults)."""
    from hf_apo import ProximalObjective

    model = tiny_t5()
    trainer = APOSeq2SeqTrainer(model=model, args=arguments(tmp_path, apo=apo, optim=optim),
                                train_dataset=CopyDataset(8))
    built = trainer.create_optimizer()
    if apo == "precond":  # over AdamW, unset --apo_precond_size is lr: APO-LR learns the size over shape-only factors
        assert isinstance(built, APOLR) and isinstance(built.inner, APOPrecond) and built.inner.shape_only
        built = built.inner
    fields = ("lambda_fsd", "lambda_wsd", "loss_batch", "horizon")
    objective = ProximalObjective.for_apo(model, apo)
    assert [getattr(objective, f) for f in fields] == [getattr(built.objective, f) for f in fields]
    # the paper's objective is the constructor's, and --apo_loss_batch same's
    paper = ProximalObjective(model)
    same = ProximalObjective.for_apo(model, "lr", "same")
    assert [getattr(paper, f) for f in fields] == [getattr(same, f) for f in fields] == [10.0, 0.0, "same", 1.0]
    cls = APOLR if apo == "lr" else APOPrecond
    plain = cls(model.parameters(), objective, lr=1e-3, **({"base": "adamw"} if apo == "precond" else {}))
    assert (plain.meta_lr, plain.meta_interval) == (built.meta_lr, built.meta_interval)
    if apo == "lr":
        assert (plain.phi.kind, plain.adaptive_interval, plain.phi.max_step) == (
            built.phi.kind, built.adaptive_interval, built.phi.max_step)
        over = APOLR.default_over(torch.optim.AdamW(model.parameters(), lr=1e-3), model)
        assert [getattr(over.objective, f) for f in fields] == [getattr(built.objective, f) for f in fields]
        assert (over.meta_lr, over.meta_interval) == (built.meta_lr, built.meta_interval)
