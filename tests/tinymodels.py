"""Tiny random models built from configs (milliseconds), a character tokenizer, random plans, and the skip for a
missing bundled model."""

from __future__ import annotations

import random

import torch
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from fastprune.planning import LayerCut, Plan

VOCAB = 260  # the byte tokenizer's size


def tiny_decoder(
    kind: str = "llama",
    heads: int = 6,
    kv_heads: int = 2,
    layers: int = 4,
    channels: int = 44,
    seed: int = 0,
    tie: bool = True,
    vocab: int = VOCAB,
    hidden: int = 72,
    head_dim: int = 8,
    **extra,
) -> torch.nn.Module:
    """A randomly initialised Llama-family decoder small enough to run in milliseconds."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=channels,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        **extra,
    )
    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }
    config_cls, model_cls = classes[kind]
    model = model_cls(config_cls(**common))
    _perturb_norms(model)
    return model.eval()


def train_briefly(model: torch.nn.Module, windows: torch.Tensor, steps: int = 300, batch: int = 8) -> torch.nn.Module:
    """Train a tiny causal LM in place on ``windows`` (cycled ``batch`` at a time, AdamW at 3e-3) and return it in
    eval mode: enough that cutting it hurts. (120-150 steps at 1e-2 left it at the byte unigram level with
    transformers 5.24 on an AVX2 CPU, where pruning barely changed the loss.)"""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(steps):
        ids = windows[(step * batch) % len(windows) :][:batch]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def tiny_bert(heads: int = 4, layers: int = 3, channels: int = 36, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=channels,
        max_position_embeddings=128,
    )
    model = BertModel(config)
    _perturb_norms(model)
    return model.eval()


def _perturb_norms(model: torch.nn.Module) -> None:
    """Random norm weights and biases, so tests do not pass only because norms are identity."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


def byte_tokenizer():
    """A byte-level tokenizer (one token per UTF-8 byte, plus [PAD] [UNK] [CLS] [SEP]) that saves and reloads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i + 4 for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def bpe_tokenizer(vocab: int = 300):
    """A byte-level BPE tokenizer with merges learnt from Python's docs (GGUF vocabularies need merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from fastprune.data import read_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([read_text("pydoc:calibration")[:200_000]], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )


def random_plan(shape, seed: int, drop: int = 1, gqa: str = "query_heads") -> Plan:
    """A random legal plan: some heads (evenly within KV groups or whole groups), channels and layers."""
    rng = random.Random(seed)
    n = shape.num_layers
    drop_layers = rng.sample(range(n), drop)
    cuts = {}
    for i, s in enumerate(shape.layers):
        if i in drop_layers:
            continue
        g = s.group_size
        heads, kv = [], []
        if gqa == "kv_groups" or g == 1:
            kv = rng.sample(range(s.kv_heads), rng.randrange(s.kv_heads))
            heads = [h for k in kv for h in range(k * g, (k + 1) * g)]
        else:
            per_group = rng.randrange(g)
            for k in range(s.kv_heads):
                heads += rng.sample(range(k * g, (k + 1) * g), per_group)
        channels = rng.sample(range(s.channels), rng.randrange(s.channels))
        cuts[i] = LayerCut(heads, kv, channels)
    return Plan(shape, cuts, drop_layers)


def token_batch(batch: int = 2, length: int = 19, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def require_bundled(name: str) -> None:
    """Skip the calling test when the bundled model ``name`` (smollm2, minilm) is not installed."""
    import pytest

    import fastprune
    from fastprune.models import bundled_path

    try:
        bundled_path(name)
    except fastprune.FastpruneError as exc:
        pytest.skip(str(exc))
