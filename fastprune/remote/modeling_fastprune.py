"""Modeling code for pruned models whose widths differ per layer.

fastprune copies this file beside the weights of such a model and points the config's ``auto_map`` at it, so
``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` (``AutoModel`` for encoders) loads the
model without fastprune installed. It must therefore import nothing but torch and transformers.

The config keeps its architecture's own keys and adds lists ``<key>_per_layer`` (for example
``num_key_value_heads_per_layer``); each class builds the stock model and then resizes every layer to those widths
before the weights are loaded.
"""

from torch import nn
from transformers import (
    BertModel,
    LlamaForCausalLM,
    MistralForCausalLM,
    Qwen2ForCausalLM,
    Qwen3ForCausalLM,
)

PER_LAYER_SUFFIX = "_per_layer"
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


def _resize_decoder(model: nn.Module, config) -> None:
    layers = model.model.layers
    n = len(layers)
    heads = _layer_widths(config, "num_attention_heads", n)
    kv_heads = _layer_widths(config, "num_key_value_heads", n)
    channels = _layer_widths(config, "intermediate_size", n)
    for i, layer in enumerate(layers):
        resize_decoder_layer(layer, heads[i], kv_heads[i], channels[i])


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
