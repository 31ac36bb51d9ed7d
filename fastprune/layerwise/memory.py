"""The layer-at-a-time driver on a model held in memory: sequential calibration, layer-local criteria, and
pruning with statistics summed over several processes."""

from __future__ import annotations

import copy

import torch

from fastprune.adapters import adapter_for
from fastprune.adapters.base import Adapter
from fastprune.config import DEFAULT_DAMPING, PruningConfig
from fastprune.distributed import agree, shard
from fastprune.layerwise.driver import MemoryHolder, Timings, cut_layers, score_layers, scoring_criteria
from fastprune.planning import Plan, check_feasible, make_plan
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


def prune_layerwise(
    model: torch.nn.Module,
    config: PruningConfig,
    batches: list[torch.Tensor],
    plan: Plan | None = None,
    timings: Timings | None = None,
) -> tuple[torch.nn.Module, Plan, Scores | None]:
    """Score, plan and cut a copy of an in-memory model layer by layer, the calibration batches shared over the
    processes of torch.distributed (statistics all-reduced: every process makes the same plan and model)."""
    adapter = adapter_for(model)
    costs = adapter.param_costs()
    local, indices = shard(batches)
    scores = None
    if plan is None:
        main, layer_criterion = scoring_criteria(config)
        check_feasible(adapter.shape(), config, costs)
        holder = MemoryHolder(adapter)
        calls = holder.calls(local, indices)
        scores = score_layers(holder, calls, main, layer_criterion, config.seed, config.damping, timings=timings)
        plan = make_plan(scores, config, costs)
        agree(plan.to_dict(), "the plan")
    else:
        plan.check_fits(adapter.shape())
    pruned = copy.deepcopy(model)
    holder = MemoryHolder(adapter_for(pruned))
    calls = holder.calls(local, indices)
    applied = cut_layers(holder, calls, plan, scores, config, timings=timings)
    return pruned, applied, scores
