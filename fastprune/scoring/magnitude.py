"""Weight magnitude: the Lp norm of all weights that belong to a unit (data-free)."""

from __future__ import annotations

import torch

from fastprune.adapters.base import Adapter
from fastprune.scoring.scores import Scores
from fastprune.scoring.tables import zero_tables
from fastprune.scoring.units import unit_slices


def group_power_sum(t: torch.Tensor, dim: int, group_size: int, p: int) -> torch.Tensor:
    """sum(|t|^p) over consecutive groups of ``group_size`` along ``dim``, in float64."""
    t = t.detach().double().abs().pow(p)
    if t.dim() == 1:
        return t.view(-1, group_size).sum(1)
    t = t if dim == 0 else t.T
    return t.reshape(-1, group_size * t.shape[1]).sum(1)


def magnitude_scores(adapter: Adapter, p: int) -> Scores:
    """Per unit (sum |w|^p)^(1/p) over its weights and biases."""
    shape = adapter.shape()
    tables = zero_tables(shape, ("heads", "kv_heads", "channels"))
    for s in unit_slices(adapter):
        tables[s.kind][s.layer] += group_power_sum(s.param, s.dim, s.group_size, p)
    roots = {kind: [t.pow(1.0 / p) for t in per_layer] for kind, per_layer in tables.items()}
    return Scores(f"magnitude_l{p}", shape, **roots)
