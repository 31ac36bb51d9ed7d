"""The one protocol every architecture adapter follows.

An adapter is the only code that knows a model's module names. It exposes each layer's attention and MLP as a few
``nn.Linear`` references, the model's current per-layer widths, and how to change those widths and the config.
Everything else (scoring, planning, surgery) speaks in units: query heads, KV heads, MLP channels, layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass(frozen=True)
class LayerShape:
    """Widths of one layer: query heads, key/value heads, MLP channels."""

    heads: int
    kv_heads: int
    channels: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (1 for multi-head attention)."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class ModelShape:
    """Everything the planner needs to know about a model's prunable structure."""

    family: str
    hidden_size: int
    head_dim: int
    layers: tuple[LayerShape, ...]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def to_dict(self) -> dict:
        return {
            "family": self.family,
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "layers": [asdict(s) for s in self.layers],
        }

    @classmethod
    def from_dict(cls, d: dict) -> ModelShape:
        return cls(d["family"], d["hidden_size"], d["head_dim"], tuple(LayerShape(**s) for s in d["layers"]))


@dataclass
class AttentionParts:
    """Projections of one attention block; q/k/v rows and o columns are grouped by head."""

    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear


@dataclass
class MlpParts:
    """Projections of one MLP: ``inputs`` rows and ``output`` columns are indexed by channel."""

    inputs: list[nn.Linear]
    output: nn.Linear


@dataclass(frozen=True)
class ParamCosts:
    """Parameters removed with one unit of each kind in this model (biases included)."""

    head: int  # one query head: q rows (+bias) and o columns
    kv_head: int  # one KV head: k and v rows (+biases), its query heads not included
    channel: int  # one MLP channel
    layer_fixed: int  # a layer's parameters that are not heads or channels (norms, output biases)
    outside_layers: int  # non-embedding parameters outside every layer (final norm, pooler)


class Adapter:
    """Base class: subclasses fill in the module names of one architecture family."""

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    #: True when the model is trained with a next-token loss (perplexity makes sense).
    causal: ClassVar[bool]

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # -- what subclasses provide ---------------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def attention(self, i: int) -> AttentionParts:
        raise NotImplementedError

    def mlp(self, i: int) -> MlpParts:
        raise NotImplementedError

    @property
    def head_dim(self) -> int:
        raise NotImplementedError

    def set_layer_widths(self, i: int, heads: int, kv_heads: int) -> None:
        """Tell layer i's attention module its new head counts (after its weights were sliced)."""
        raise NotImplementedError

    def embedding_modules(self) -> list[nn.Module]:
        """Modules whose parameters count as embeddings (not counted in non-embedding parameters)."""
        raise NotImplementedError

    def write_config(self) -> None:
        """Make the config describe the current widths and layer count."""
        raise NotImplementedError

    def set_layers(self, keep: list[int]) -> None:
        """Keep only the given layers (in order), renumbering whatever is indexed by layer."""
        raise NotImplementedError

    def loss(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The calibration objective whose gradients and increases score units."""
        raise NotImplementedError

    def run_layers(self, input_ids: torch.Tensor) -> None:
        """Run the model through its last layer, skipping what follows (an LM head's logits): for statistics that
        hooks on the layers collect."""
        self.model(input_ids=input_ids)

    # -- derived --------------------------------------------------------------------------------------------
    def shape(self) -> ModelShape:
        """Current per-layer widths, read off the weights (so it is right for pruned models too)."""
        layers = []
        for i in range(len(self.layers)):
            att, mlp = self.attention(i), self.mlp(i)
            layers.append(
                LayerShape(
                    heads=att.q.out_features // self.head_dim,
                    kv_heads=att.k.out_features // self.head_dim,
                    channels=mlp.output.in_features,
                )
            )
        return ModelShape(self.family, self.config.hidden_size, self.head_dim, tuple(layers))

    def param_costs(self) -> ParamCosts:
        """Parameters attached to one unit of each kind, from layer 0's modules."""
        att, mlp = self.attention(0), self.mlp(0)
        d, h = self.config.hidden_size, self.head_dim

        def rows(lin: nn.Linear, n: int) -> int:
            return n * lin.in_features + (n if lin.bias is not None else 0)

        head = rows(att.q, h) + h * d
        kv_head = rows(att.k, h) + rows(att.v, h)
        channel = sum(rows(lin, 1) for lin in mlp.inputs) + d
        layer = self.layers[0]
        shape0 = self.shape().layers[0]
        unit_params = shape0.heads * head + shape0.kv_heads * kv_head + shape0.channels * channel
        layer_fixed = sum(p.numel() for p in layer.parameters()) - unit_params
        in_layers = sum(p.numel() for p in self.layers.parameters())
        outside = self.count_parameters()["non_embedding"] - in_layers
        return ParamCosts(head, kv_head, channel, layer_fixed, outside)

    def block_linears(self, i: int) -> list[list[nn.Module]]:
        """Layer i's linear layers in the order they run, those that read the same input grouped together."""
        att, mlp = self.attention(i), self.mlp(i)
        return [[att.q, att.k, att.v], [att.o], list(mlp.inputs), [mlp.output]]

    def is_uniform(self) -> bool:
        """True when every layer has the same widths (a plain config can describe it)."""
        return len(set(self.shape().layers)) <= 1

    def count_parameters(self) -> dict[str, int]:
        """Total and non-embedding parameter counts (tied weights counted once)."""
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        embedding_ids: set[int] = set()
        embedding = 0
        for module in self.embedding_modules():
            for p in module.parameters():
                if id(p) not in embedding_ids:
                    embedding_ids.add(id(p))
                    embedding += p.numel()
        return {"total": total, "non_embedding": total - embedding}
