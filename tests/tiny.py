"""Tiny models and data built from configs and generators: no Hub, deterministic, fast on 2 CPU cores."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 32
PAD, EOS, START = 0, 1, 2


def tiny_t5(seed: int = 0, dropout: float = 0.0, dtype: torch.dtype = torch.float32, **overrides):
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        dropout_rate=dropout, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD,
        **{"tie_word_embeddings": True, **overrides},
    )
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config).to(dtype)


def tiny_llama(seed: int = 0, dropout: float = 0.0):
    """A causal LM with untied embeddings: Accelerate's FSDP2 checkpoints handle it (not T5's shared embeddings)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32, attention_dropout=dropout, pad_token_id=PAD,
        bos_token_id=START, eos_token_id=EOS, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def tiny_bart(seed: int = 0, dtype: torch.dtype = torch.float32):
    """A seq2seq model with plain LayerNorm (T5LayerNorm caps float64 precision, see APO.md §8)."""
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=PAD, eos_token_id=EOS,
        bos_token_id=START, decoder_start_token_id=START, forced_eos_token_id=None,
    )
    torch.manual_seed(seed)
    return BartForConditionalGeneration(config).to(dtype)


def copy_task_batch(generator: torch.Generator, size: int = 8, length: int = 6, pad_tail: bool = True) -> dict:
    """A reverse-the-sequence task; the last label of some rows is -100 so the KL mask matters."""
    tokens = torch.randint(3, VOCAB, (size, length), generator=generator)
    labels = tokens.flip(1).clone()
    if pad_tail:
        labels[: size // 2, -2:] = -100
    return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": labels}


class CopyDataset(torch.utils.data.Dataset):
    """Fixed-length examples of the reverse task (equal token counts per example, so per-rank means agree)."""

    def __init__(self, size: int = 64, length: int = 6, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(3, VOCAB, (size, length), generator=generator)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        tokens = self.tokens[index]
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens.flip(0)}


class MLP(nn.Module):
    def __init__(self, inputs: int = 5, hidden: int = 7, outputs: int = 4, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, outputs))

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return {"loss": loss, "logits": logits}


def mlp_batch(generator: torch.Generator, size: int = 16, inputs: int = 5, outputs: int = 4, dtype=torch.float32):
    x = torch.randn(size, inputs, generator=generator, dtype=dtype)
    return {"x": x, "labels": torch.randint(0, outputs, (size,), generator=generator)}
