"""Llama-family decoders: Llama, Mistral, Qwen2, Qwen3 (GQA, SwiGLU gate/up/down, optional biases, tied embeddings)."""

from __future__ import annotations

import torch
from torch import nn

from fastprune.adapters.base import Adapter, AttentionParts, MlpParts
from fastprune.adapters.layer_config import write_layer_widths


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    causal = True

    @property
    def _decoder(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self._decoder.layers

    def attention(self, i: int) -> AttentionParts:
        a = self.layers[i].self_attn
        return AttentionParts(q=a.q_proj, k=a.k_proj, v=a.v_proj, o=a.o_proj)

    def mlp(self, i: int) -> MlpParts:
        m = self.layers[i].mlp
        return MlpParts(inputs=[m.gate_proj, m.up_proj], output=m.down_proj)

    @property
    def head_dim(self) -> int:
        return self.layers[0].self_attn.head_dim

    def set_layer_widths(self, i: int, heads: int, kv_heads: int) -> None:
        self.layers[i].self_attn.num_key_value_groups = heads // kv_heads

    def embedding_modules(self) -> list[nn.Module]:
        return [self._decoder.embed_tokens, self.model.lm_head]

    def write_config(self) -> None:
        self.config.head_dim = self.head_dim
        write_layer_widths(
            self.config,
            self.shape(),
            heads_key="num_attention_heads",
            kv_key="num_key_value_heads",
            channels_key="intermediate_size",
            # transformers requires hidden_size % num_attention_heads == 0 (head_dim is explicit anyway).
            heads_scalar_ok=lambda heads: self.config.hidden_size % heads == 0,
        )

    def set_layers(self, keep: list[int]) -> None:
        self._decoder.layers = nn.ModuleList([self.layers[i] for i in keep])
        for new_idx, layer in enumerate(self.layers):
            layer.self_attn.layer_idx = new_idx
        self.config.num_hidden_layers = len(keep)
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types is not None:
            self.config.layer_types = [layer_types[i] for i in keep]
        if hasattr(self.config, "max_window_layers"):
            # Qwen2/3 derive sliding-window layers from this when layer_types is absent; keep it consistent.
            self.config.max_window_layers = sum(1 for i in keep if i < self.config.max_window_layers)

    def run_layers(self, input_ids: torch.Tensor) -> None:
        # The LM head would add a fifth of SmolLM2's forward time for logits nobody reads.
        self._decoder(input_ids=input_ids, use_cache=False)

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
