"""Modeling code for pruned models whose widths differ per layer.

fastprune copies this file beside the weights of such a model and points the config's ``auto_map`` at it, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` (``AutoModel`` for encoders) loads the
model without fastprune installed. It must therefore import nothing but torch and transformers.

The config keeps its architecture's own keys and adds lists ``<key>_per_layer`` (for example
``num_key_value_heads_per_layer``); each class builds the stock model and then resizes every layer to those widths
before the weights are loaded.

2:4-sparse models (``fastprune sparsify``) list their compressed linear layers in ``sparse24_modules``; those are
built as ``CompressedSparse24Linear`` (values + 4-bit positions, decompressed in plain PyTorch at each call).
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    BertModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

PER_LAYER_SUFFIX = "_per_layer"
SPARSE24_KEY = "sparse24_modules"
REMOTE_MODULE = "modeling_fastprune"
REMOTE_CLASSES = {
    "llama": {"AutoModelForCausalLM": "FastpruneLlamaForCausalLM"},
    "mistral": {"AutoModelForCausalLM": "FastpruneMistralForCausalLM"},
    "qwen2": {"AutoModelForCausalLM": "FastpruneQwen2ForCausalLM"},
    "qwen3": {"AutoModelForCausalLM": "FastpruneQwen3ForCausalLM"},
    "bert": {"AutoModel": "FastpruneBertModel"},
}


def _resized(linear: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    """An uninitialised nn.Linear like ``linear`` (bias, dtype, device) with new sizes."""
    if (linear.in_features, linear.out_features) == (in_features, out_features):
        return linear
    w = linear.weight
    return nn.Linear(in_features, out_features, bias=linear.bias is not None, dtype=w.dtype, device=w.device)


def _layer_widths(config, key: str, num_layers: int) -> list[int]:
    values = getattr(config, key + PER_LAYER_SUFFIX, None)
    if values is None:
        return [getattr(config, key)] * num_layers
    if len(values) != num_layers:
        raise ValueError(f"{key}{PER_LAYER_SUFFIX} has {len(values)} entries for {num_layers} layers")
    return list(values)


def resize_decoder_layer(layer: nn.Module, heads: int, kv_heads: int, channels: int) -> None:
    """Give a Llama-family decoder layer new head counts and MLP width (weights uninitialised if changed)."""
    attn, mlp = layer.self_attn, layer.mlp
    hidden, head_dim = attn.q_proj.in_features, attn.head_dim
    attn.q_proj = _resized(attn.q_proj, hidden, heads * head_dim)
    attn.k_proj = _resized(attn.k_proj, hidden, kv_heads * head_dim)
    attn.v_proj = _resized(attn.v_proj, hidden, kv_heads * head_dim)
    attn.o_proj = _resized(attn.o_proj, heads * head_dim, hidden)
    attn.num_key_value_groups = heads // kv_heads
    mlp.gate_proj = _resized(mlp.gate_proj, hidden, channels)
    mlp.up_proj = _resized(mlp.up_proj, hidden, channels)
    mlp.down_proj = _resized(mlp.down_proj, channels, hidden)


def resize_bert_layer(layer: nn.Module, heads: int, channels: int) -> None:
    """Give a BERT encoder layer new head count and MLP width (weights uninitialised if changed)."""
    self_attn, out = layer.attention.self, layer.attention.output
    hidden, head_size = self_attn.query.in_features, self_attn.attention_head_size
    self_attn.query = _resized(self_attn.query, hidden, heads * head_size)
    self_attn.key = _resized(self_attn.key, hidden, heads * head_size)
    self_attn.value = _resized(self_attn.value, hidden, heads * head_size)
    self_attn.num_attention_heads = heads
    self_attn.all_head_size = heads * head_size
    out.dense = _resized(out.dense, heads * head_size, hidden)
    layer.intermediate.dense = _resized(layer.intermediate.dense, hidden, channels)
    layer.output.dense = _resized(layer.output.dense, channels, hidden)


def decompress_sparse24(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense [out, in] weight of a 2:4-compressed one, zeros where pruned.

    Layout (fastprune/ops/sparse24.py): ``values`` [out, in/2] holds the 2 kept weights of each group of 4 inputs;
    ``meta`` [out, ceil(in/8)] uint8 one nibble per group (bits 0-1 and 2-3: the kept positions), group 2b in
    the low nibble of byte b.
    """
    out, groups = values.shape[0], values.shape[1] // 2
    m = meta.to(torch.int64)
    nib = torch.stack((m & 15, m >> 4), dim=-1).reshape(out, -1)[:, :groups]
    pos = torch.stack((nib & 3, nib >> 2), dim=-1)
    dense = values.new_zeros(out, groups, 4).scatter(-1, pos, values.reshape(out, groups, 2))
    return dense.reshape(out, 4 * groups)


class CompressedSparse24Linear(nn.Module):
    """``nn.Linear`` whose weight is stored 2:4-compressed (``values``, ``meta``); plain PyTorch, dense arithmetic."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.values = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=dtype, device=device))
        meta_cols = (in_features // 4 + 1) // 2
        self.register_buffer("meta", torch.zeros(out_features, meta_cols, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, decompress_sparse24(self.values, self.meta), self.bias)


def compress_sparse_modules(model: nn.Module, config) -> None:
    """Replace the linear layers named in ``config.sparse24_modules`` by ``CompressedSparse24Linear``."""
    for name in getattr(config, SPARSE24_KEY, None) or []:
        linear = model.get_submodule(name)
        parent, _, attr = name.rpartition(".")
        w, bias = linear.weight, linear.bias is not None
        new = CompressedSparse24Linear(linear.in_features, linear.out_features, bias, w.dtype, w.device)
        setattr(model.get_submodule(parent) if parent else model, attr, new)


def _resize_decoder(model: nn.Module, config) -> None:
    layers = model.model.layers
    n = len(layers)
    heads = _layer_widths(config, "num_attention_heads", n)
    kv_heads = _layer_widths(config, "num_key_value_heads", n)
    channels = _layer_widths(config, "intermediate_size", n)
    for i, layer in enumerate(layers):
        resize_decoder_layer(layer, heads[i], kv_heads[i], channels[i])
    compress_sparse_modules(model, config)


class FastpruneLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        _resize_decoder(self, config)


class FastpruneMistralForCausalLM(MistralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        _resize_decoder(self, config)


class FastpruneQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        _resize_decoder(self, config)


class FastpruneQwen3ForCausalLM(Qwen3ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        _resize_decoder(self, config)


class FastpruneBertModel(BertModel):
    def __init__(self, config, add_pooling_layer: bool = True):
        super().__init__(config, add_pooling_layer=add_pooling_layer)
        layers = self.encoder.layer
        heads = _layer_widths(config, "num_attention_heads", len(layers))
        channels = _layer_widths(config, "intermediate_size", len(layers))
        for i, layer in enumerate(layers):
            resize_bert_layer(layer, heads[i], channels[i])
        compress_sparse_modules(self, config)
