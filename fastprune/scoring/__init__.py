"""Importance criteria. ``score(adapter, batches, criterion)`` runs one; higher scores mean more important."""

from __future__ import annotations

import dataclasses
import logging

import torch

from fastprune.adapters.base import Adapter
from fastprune.config import CRITERIA, DEFAULT_DAMPING, PruningConfig
from fastprune.errors import ConfigError
from fastprune.reconstruction import InputGrams, collect_grams
from fastprune.scoring.scores import Scores

logger = logging.getLogger("fastprune")

#: Which unit kinds each criterion scores (the planner refuses a granularity whose scores are missing).
CRITERION_KINDS = {
    "magnitude_l1": ("heads", "kv_heads", "channels"),
    "magnitude_l2": ("heads", "kv_heads", "channels"),
    "taylor": ("heads", "kv_heads", "channels", "layers"),
    "fisher": ("heads", "kv_heads", "channels", "layers"),
    "activation": ("heads", "channels"),
    "activation_frequency": ("channels",),
    "wanda": ("heads", "channels"),
    "block_influence": ("layers",),
    "sensitivity": ("heads", "kv_heads", "layers"),
    "obs": ("heads", "kv_heads", "channels"),
    "taylor_local": ("heads", "kv_heads", "channels", "layers"),
    "fisher_local": ("heads", "kv_heads", "channels", "layers"),
}


def score(
    adapter: Adapter,
    batches: list[torch.Tensor],
    criterion: str,
    grams: InputGrams | None = None,
    damping: float = DEFAULT_DAMPING,
) -> Scores:
    """Score every unit the criterion covers, over the calibration batches (token id tensors).

    ``obs`` works from the output projections' input Gram matrices: pass ``grams`` (all layers) to reuse them,
    and ``damping`` is its ridge term. ``taylor_local`` and ``fisher_local`` run one layer at a time
    (fastprune.layerwise.stats explains them).
    """
    if criterion == "obs":
        from fastprune.scoring.obs import obs_scores

        if grams is None:
            layers = list(range(len(adapter.layers)))
            grams = collect_grams(adapter, batches, layers, layers)
        scores = obs_scores(adapter, grams, damping)
    elif criterion in ("taylor_local", "fisher_local"):
        from fastprune.layerwise import score_layerwise

        # The probes are seeded like everything else in a run (fastprune.prune seeds torch with config.seed).
        return score_layerwise(adapter, batches, criterion, damping, seed=torch.initial_seed())
    else:
        scores = _run_criterion(adapter, batches, criterion)
    scores.info["param_costs"] = dataclasses.asdict(adapter.param_costs())
    return scores


def _run_criterion(adapter: Adapter, batches: list[torch.Tensor], criterion: str) -> Scores:
    if criterion not in CRITERIA:
        raise ConfigError(f"criterion must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    adapter.model.eval()
    logger.info("scoring with %s over %d batches", criterion, len(batches))
    if criterion.startswith("magnitude_l"):
        from fastprune.scoring.magnitude import magnitude_scores

        return magnitude_scores(adapter, p=int(criterion[-1]))
    if criterion in ("taylor", "fisher"):
        from fastprune.scoring.taylor import taylor_fisher_scores

        taylor, fisher = taylor_fisher_scores(adapter, batches)
        return taylor if criterion == "taylor" else fisher
    if criterion in ("activation", "activation_frequency", "wanda"):
        from fastprune.scoring import activation, wanda

        stats = activation.collect_input_stats(adapter, batches)
        if criterion == "wanda":
            return wanda.wanda_scores(adapter, stats)
        if criterion == "activation":
            return activation.activation_scores(adapter, stats)
        return activation.activation_frequency_scores(adapter, stats)
    if criterion == "block_influence":
        from fastprune.scoring.block_influence import block_influence_scores

        return block_influence_scores(adapter, batches)
    from fastprune.scoring.sensitivity import sensitivity_scores

    return sensitivity_scores(adapter, batches)


def needed_kinds(config: PruningConfig) -> set[str]:
    """Unit kinds the config will prune."""
    if config.has_target:
        return set(config.granularities)
    ratios = {"heads": config.head_ratio, "channels": config.channel_ratio, "layers": config.layer_ratio}
    return {kind for kind, ratio in ratios.items() if ratio}


def score_for_config(
    adapter: Adapter, batches: list[torch.Tensor], config: PruningConfig, grams: InputGrams | None = None
) -> Scores:
    """Scores for everything the config prunes: ``criterion`` for heads and channels, ``layer_criterion`` for
    layers (when layers are pruned and the two differ)."""
    kinds = needed_kinds(config)
    if kinds == {"layers"}:
        return score(adapter, batches, config.layer_criterion)
    scores = score(adapter, batches, config.criterion, grams, config.damping)
    if "layers" in kinds and config.layer_criterion != config.criterion:
        scores = scores.with_layers_from(score(adapter, batches, config.layer_criterion))
    return scores


__all__ = ["CRITERION_KINDS", "Scores", "needed_kinds", "score", "score_for_config"]
