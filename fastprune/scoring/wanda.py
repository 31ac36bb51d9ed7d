"""Wanda for structure: sum over a unit's output-projection columns of |W_ij| * ||X_j||_2.

X_j is column j of the projection's input over all calibration tokens (o_proj for heads, down_proj for channels):
the output a unit contributes, weighted by how large its input actually is.
"""

from __future__ import annotations

import torch

from fastprune.adapters.base import Adapter
from fastprune.scoring.activation import InputStats, per_head
from fastprune.scoring.scores import Scores


def column_scores(weight: torch.Tensor, sumsq: torch.Tensor) -> torch.Tensor:
    """Per input column j of ``weight``: sum_i |W_ij| * sqrt(sumsq_j)."""
    # Summed in float64 without a float64 copy of the weight (hundreds of MB for a large model's MLP).
    return weight.detach().abs().sum(0, dtype=torch.float64) * sumsq.sqrt()


def wanda_scores(adapter: Adapter, stats: InputStats) -> Scores:
    d = adapter.head_dim
    n = len(adapter.layers)
    heads = [per_head(column_scores(adapter.attention(i).o.weight, stats.head_sumsq[i]), d) for i in range(n)]
    channels = [column_scores(adapter.mlp(i).output.weight, stats.channel_sumsq[i]) for i in range(n)]
    return Scores("wanda", adapter.shape(), heads=heads, channels=channels)
