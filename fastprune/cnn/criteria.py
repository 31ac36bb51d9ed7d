"""Filter importance, one score per unit (higher = more important, kept first); NaN where a criterion cannot score.

- ``l1`` / ``l2``: norm of the unit's filters, over every layer that produces it (Li et al., "Pruning Filters
  for Efficient ConvNets"): a residual channel sums the filters of every conv that writes it.
- ``slimming``: |gamma| of the unit's BatchNorm layers (Liu et al., "Learning Efficient Convolutional Networks
  through Network Slimming"); units without a BatchNorm are not scored. ``BnSparsity`` is the paper's L1 penalty
  on gamma, applied during training so that unimportant channels go to zero before pruning.
- ``fpgm``: distance of each filter to the other filters of its layer (He et al., "Filter Pruning via Geometric
  Median"): the filters closest to the geometric median are the most replaceable, so they score lowest.
- ``taylor``: first-order Taylor estimate of the loss change when the unit is removed (Molchanov et al.,
  "Importance Estimation for Neural Network Pruning"): per batch, (sum over every weight that reads the unit's
  channels of gradient x weight)^2, averaged over batches. Reading weights are exactly what removal zeroes.
- ``random``: a uniform random score, the baseline every criterion must beat.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fastprune.cnn.graph import ChannelGraph
from fastprune.errors import CalibrationError, ConfigError, ScoreError

logger = logging.getLogger("fastprune")

CNN_CRITERIA = ("l1", "l2", "slimming", "fpgm", "taylor", "random")
#: Criteria whose scores are on one scale across layers (a global ranking compares them raw); the others are
#: divided by their group's mean first.
COMPARABLE = ("slimming", "taylor", "random")


def _positions(units: list[int]) -> torch.Tensor:
    return torch.tensor(units, dtype=torch.long)


def _weight_layers(model: nn.Module, graph: ChannelGraph):
    modules = dict(model.named_modules())
    sites = graph.site_map()
    for layer in graph.layers:
        yield layer, modules[layer.module], sites[(layer.module, "out")], sites[(layer.module, "in")]


def magnitude(model: nn.Module, graph: ChannelGraph, p: int) -> torch.Tensor:
    """(sum over the unit's filters of |w|^p)^(1/p)."""
    total = torch.zeros(graph.num_units, dtype=torch.float64)
    for _, m, out, _ in _weight_layers(model, graph):
        rows = m.weight.detach().double().flatten(1).abs().pow(p).sum(1)
        total.index_add_(0, _positions(out.units), rows)
    return total.pow(1.0 / p)


def slimming(model: nn.Module, graph: ChannelGraph) -> torch.Tensor:
    """Sum of |gamma| over the unit's BatchNorm layers; NaN for units that have none."""
    modules = dict(model.named_modules())
    sites = graph.site_map()
    total = torch.zeros(graph.num_units, dtype=torch.float64)
    seen = torch.zeros(graph.num_units, dtype=torch.bool)
    for name in graph.norms:
        weight = modules[name].weight
        if weight is None:
            continue
        idx = _positions(sites[(name, "norm")].units)
        total.index_add_(0, idx, weight.detach().double().abs())
        seen[idx] = True
    total[~seen] = float("nan")
    return total


def fpgm(model: nn.Module, graph: ChannelGraph) -> torch.Tensor:
    """Sum over the unit's filters of their Euclidean distances to the other filters of the same layer."""
    total = torch.zeros(graph.num_units, dtype=torch.float64)
    for _, m, out, _ in _weight_layers(model, graph):
        w = m.weight.detach().double().flatten(1)
        total.index_add_(0, _positions(out.units), torch.cdist(w, w).sum(1))
    return total


def _reading_contributions(layer, m: nn.Module) -> torch.Tensor:
    """Per input position of a conv/linear layer: sum of gradient x weight over the weights that read it."""
    gw = (m.weight.grad * m.weight).detach().double()
    if layer.kind == "linear" or layer.groups == 1:
        return gw.flatten(2).sum(2).sum(0) if gw.dim() > 2 else gw.sum(0)
    g = layer.groups
    out, per_group = gw.shape[0], gw.shape[1]
    return gw.flatten(2).sum(2).view(g, out // g, per_group).sum(1).flatten()


def taylor(
    model: nn.Module, graph: ChannelGraph, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]]
) -> torch.Tensor:
    """Molchanov's first-order Taylor importance over calibration batches of (images, labels or None); without
    labels the model's own top-1 predictions are the targets."""
    layers = list(_weight_layers(model, graph))
    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    mode = model.training
    model.eval()  # BatchNorm with its running statistics, as the pruned model will run
    total = torch.zeros(graph.num_units, dtype=torch.float64)
    n = 0
    try:
        for p in params:
            p.requires_grad_(True)
        for images, labels in batches:
            model.zero_grad(set_to_none=True)
            logits = model(images)
            targets = logits.argmax(-1).detach() if labels is None else labels
            F.cross_entropy(logits, targets).backward()
            per_batch = torch.zeros(graph.num_units, dtype=torch.float64)
            for layer, m, _, inp in layers:
                per_batch.index_add_(0, _positions(inp.units), _reading_contributions(layer, m))
            total += per_batch.pow(2)
            n += 1
    finally:
        model.zero_grad(set_to_none=True)
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(mode)
    if n == 0:
        raise CalibrationError("taylor needs calibration images; none were given")
    return total / n


def score_units(
    model: nn.Module,
    graph: ChannelGraph,
    criterion: str,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]] | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """One float64 score per unit of ``graph``; frozen units get NaN (they are never removed)."""
    if criterion not in CNN_CRITERIA:
        raise ConfigError(f"criterion must be one of {', '.join(CNN_CRITERIA)}; got {criterion!r}")
    logger.info("scoring %d units with %s", graph.num_units, criterion)
    if criterion in ("l1", "l2"):
        scores = magnitude(model, graph, 1 if criterion == "l1" else 2)
    elif criterion == "slimming":
        scores = slimming(model, graph)
        unscored = int((scores.isnan() & ~graph.frozen).sum())
        if unscored:
            logger.warning("slimming: %d units have no BatchNorm and are kept", unscored)
    elif criterion == "fpgm":
        scores = fpgm(model, graph)
    elif criterion == "taylor":
        if batches is None:
            raise CalibrationError("taylor needs calibration images (--calibration)")
        scores = taylor(model, graph, batches)
    else:
        scores = torch.rand(graph.num_units, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    scores = scores.clone()
    if torch.isinf(scores).any():
        raise ScoreError(f"{criterion} scores contain infinite values: the calibration pass overflowed")
    scores[graph.frozen] = float("nan")
    return scores


class BnSparsity:
    """Network slimming's sparsity training: after ``loss.backward()``, ``step()`` adds ``strength * sign(gamma)``
    to every BatchNorm weight's gradient (the subgradient of strength * sum |gamma|)."""

    def __init__(self, model: nn.Module, strength: float = 1e-4):
        if not strength >= 0:
            raise ConfigError(f"sparsity strength must be non-negative; got {strength!r}")
        self.strength = strength
        self.weights = [
            m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None
        ]

    def step(self) -> None:
        with torch.no_grad():
            for w in self.weights:
                if w.grad is not None:
                    w.grad.add_(torch.sign(w), alpha=self.strength)
