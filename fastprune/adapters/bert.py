"""BERT encoders (BertModel, BertForMaskedLM, ...): multi-head attention, GELU MLP, biases everywhere."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastprune.adapters.base import Adapter, AttentionParts, MlpParts
from fastprune.adapters.layer_config import write_layer_widths
from fastprune.errors import CalibrationError

#: Temperature of the in-batch contrastive objective used for encoders without a language-model head.
CONTRASTIVE_TEMPERATURE = 0.05


class BertAdapter(Adapter):
    family = "bert"
    model_types = ("bert",)
    causal = False

    @property
    def _bert(self) -> nn.Module:
        return getattr(self.model, "bert", self.model)

    @property
    def layers(self) -> nn.ModuleList:
        return self._bert.encoder.layer

    def attention(self, i: int) -> AttentionParts:
        att = self.layers[i].attention
        return AttentionParts(q=att.self.query, k=att.self.key, v=att.self.value, o=att.output.dense)

    def mlp(self, i: int) -> MlpParts:
        layer = self.layers[i]
        return MlpParts(inputs=[layer.intermediate.dense], output=layer.output.dense)

    @property
    def head_dim(self) -> int:
        return self.layers[0].attention.self.attention_head_size

    def set_layer_widths(self, i: int, heads: int, kv_heads: int) -> None:
        self_attn = self.layers[i].attention.self
        self_attn.num_attention_heads = heads
        self_attn.all_head_size = heads * self.head_dim

    def embedding_modules(self) -> list[nn.Module]:
        head = self.model.get_output_embeddings()
        return [self._bert.embeddings] + ([head] if head is not None else [])

    def write_config(self) -> None:
        # BERT derives its head size from hidden_size / num_attention_heads, so fewer heads always need the
        # per-layer list, even when every layer keeps the same number.
        write_layer_widths(
            self.config,
            self.shape(),
            heads_key="num_attention_heads",
            kv_key=None,
            channels_key="intermediate_size",
            heads_scalar_ok=lambda heads: heads == self.config.num_attention_heads,
        )

    def set_layers(self, keep: list[int]) -> None:
        self._bert.encoder.layer = nn.ModuleList([self.layers[i] for i in keep])
        for new_idx, layer in enumerate(self.layers):
            layer.attention.self.layer_idx = new_idx
        self.config.num_hidden_layers = len(keep)

    def run_layers(self, input_ids: torch.Tensor) -> None:
        self._bert(input_ids=input_ids)

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Masked-LM loss when the model has that head; otherwise an in-batch contrastive loss between the
        mean-pooled embeddings of each window's two halves (neighbouring spans of text are positives)."""
        if self.model.get_output_embeddings() is not None:
            return self._masked_lm_loss(input_ids)
        if input_ids.shape[0] < 2:
            raise CalibrationError("encoder calibration needs batches of at least 2 windows (contrastive loss)")
        cls_tok, body, sep_tok = input_ids[:, :1], input_ids[:, 1:-1], input_ids[:, -1:]
        half = body.shape[1] // 2
        if half < 1:
            raise CalibrationError("encoder calibration windows are too short to split into two spans")
        views = [torch.cat([cls_tok, part, sep_tok], dim=1) for part in (body[:, :half], body[:, half : 2 * half])]
        emb = [F.normalize(self._bert(input_ids=v).last_hidden_state.mean(dim=1), dim=-1) for v in views]
        logits = emb[0] @ emb[1].T / CONTRASTIVE_TEMPERATURE
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))

    def _masked_lm_loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        mask = torch.rand(input_ids.shape, generator=gen) < 0.15
        mask[:, 0] = mask[:, -1] = False
        labels = torch.where(mask, input_ids, torch.full_like(input_ids, -100))
        masked = torch.where(mask, torch.full_like(input_ids, self._mask_token_id()), input_ids)
        return self.model(input_ids=masked, labels=labels).loss

    def _mask_token_id(self) -> int:
        # BERT vocabularies put [MASK] at 103; a config may say otherwise.
        return getattr(self.config, "mask_token_id", None) or 103
