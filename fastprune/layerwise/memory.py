"""The layer-at-a-time driver on a model held in memory: sequential calibration and the layer-local criteria."""

from __future__ import annotations

import torch

from fastprune.adapters.base import Adapter
from fastprune.config import DEFAULT_DAMPING, PruningConfig
from fastprune.layerwise.driver import MemoryHolder, cut_layers, score_layers
from fastprune.planning import Plan
from fastprune.scoring.scores import Scores


def score_layerwise(
    adapter: Adapter, batches: list[torch.Tensor], criterion: str, damping: float = DEFAULT_DAMPING, seed: int = 0
) -> Scores:
    """Score a model in memory by a layer-local criterion, one layer at a time."""
    holder = MemoryHolder(adapter)
    calls = holder.calls(batches, list(range(len(batches))))
    return score_layers(holder, calls, criterion, None, seed, damping)


def cut_sequentially(adapter: Adapter, plan: Plan, scores: Scores | None, config: PruningConfig, batches) -> Plan:
    """Refit and cut the model in place one layer at a time, each layer calibrated on the activations of the
    already cut ones (see fastprune.layerwise.driver.cut_layers); return the plan applied."""
    plan.check_fits(adapter.shape())
    holder = MemoryHolder(adapter)
    calls = holder.calls(batches, list(range(len(batches))))
    return cut_layers(holder, calls, plan, scores, config)
