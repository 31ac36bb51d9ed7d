"""Budgets: what a pruned model may cost, as a linear function of its widths.

Parameters, memory (weights + KV cache at a context length) and latency (a model fitted to measurements on this
machine, see fastprune.latency) are all, to a good approximation, a fixed part plus a cost per query head, per KV
head, per MLP channel and per layer. The planner removes the units with the lowest score per unit of cost until
the model fits the budget.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from fastprune.adapters.base import LayerShape, ModelShape, ParamCosts
from fastprune.errors import ConfigError


@dataclass(frozen=True)
class Budget:
    """``fixed + sum over layers of (layer + head*heads + kv_head*kv_heads + channel*channels) <= limit``."""

    metric: str  # "params", "memory_mb", "prefill_ms" or "decode_ms"
    limit: float
    fixed: float
    layer: float
    head: float
    kv_head: float
    channel: float

    def layer_cost(self, s: LayerShape) -> float:
        return self.layer + self.head * s.heads + self.kv_head * s.kv_heads + self.channel * s.channels

    def of(self, shape: ModelShape) -> float:
        """The measure of a model of this shape."""
        return self.fixed + sum(self.layer_cost(s) for s in shape.layers)

    def scaled(self, factor: float) -> Budget:
        """The same budget with every cost multiplied by ``factor`` (a latency table put to today's speed)."""
        costs = {k: factor * getattr(self, k) for k in ("fixed", "layer", "head", "kv_head", "channel")}
        return replace(self, **costs)

    def to_dict(self) -> dict:
        return asdict(self)


def param_counter(costs: ParamCosts) -> Budget:
    """Counts non-embedding parameters of any shape (no limit)."""
    return Budget("params", math.inf, costs.outside_layers, costs.layer_fixed, costs.head, costs.kv_head, costs.channel)


def params_budget(shape: ModelShape, costs: ParamCosts, target: float) -> Budget:
    """Non-embedding parameters: ``target`` < 1 is the fraction to remove, >= 1 the count to keep."""
    budget = param_counter(costs)
    total = budget.of(shape)
    limit = total * (1 - target) if target < 1 else float(target)
    if limit >= total:
        raise ConfigError(f"target_params={target:g} keeps {limit:.0f} parameters; the model has only {total}")
    return Budget(**{**asdict(budget), "limit": limit})


def memory_budget(
    shape: ModelShape,
    costs: ParamCosts,
    embedding_params: int,
    bytes_per_param: int,
    context: int,
    limit_mb: float,
) -> Budget:
    """Weights (embeddings included) plus the KV cache of one sequence of ``context`` tokens, in MiB."""
    mib = 2**20
    kv_per_head = 2 * shape.head_dim * context * bytes_per_param  # keys and values
    return Budget(
        "memory_mb",
        limit_mb,
        fixed=(costs.outside_layers + embedding_params) * bytes_per_param / mib,
        layer=costs.layer_fixed * bytes_per_param / mib,
        head=costs.head * bytes_per_param / mib,
        kv_head=(costs.kv_head * bytes_per_param + kv_per_head) / mib,
        channel=costs.channel * bytes_per_param / mib,
    )
