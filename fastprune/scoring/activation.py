"""Activation-based criteria from the inputs of each attention output projection and MLP down projection.

Those inputs are exactly the per-head outputs and per-channel activations that pruning deletes. One pass collects,
per input column, the sum of squares and how often it is active (mergeable sums and counts):

- ``activation``: RMS of a head's output (over its columns) or of a channel's activation.
- ``activation_frequency``: how often a channel's |activation| exceeds a tenth of its layer's RMS in that batch;
  channels that are almost never active ("dead neurons") score near 0. Channels only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastprune.adapters.base import Adapter
from fastprune.scoring.scores import Scores
from fastprune.scoring.tables import batches_with_progress

#: A channel counts as active on a token when |a| exceeds this fraction of its layer's activation RMS.
ACTIVE_FRACTION_OF_RMS = 0.1


@dataclass
class InputStats:
    """Per layer, per input column of o_proj (``head_*``) and down_proj (``channel_*``)."""

    head_sumsq: list[torch.Tensor]
    channel_sumsq: list[torch.Tensor]
    channel_active: list[torch.Tensor]
    tokens: int


def column_sumsq(x: torch.Tensor) -> torch.Tensor:
    """Sum of squares of every input column of ``x`` ``[..., n]`` over its tokens (float64 ``[n]``)."""
    return x.detach().flatten(0, -2).float().pow(2).sum(0).double()


def column_sumsq_and_activity(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per input column: sum of squares, and on how many tokens it is active (above a tenth of the batch's RMS)."""
    sq = x.detach().flatten(0, -2).float().pow(2)
    threshold = (ACTIVE_FRACTION_OF_RMS**2) * sq.mean()
    return sq.sum(0).double(), (sq > threshold).sum(0).double()


def collect_input_stats(adapter: Adapter, batches: list[torch.Tensor]) -> InputStats:
    """Run the calibration batches once, summing squares (and activity) of every pruned input column."""
    n = len(adapter.layers)
    head_sumsq = [torch.zeros(adapter.attention(i).o.in_features, dtype=torch.float64) for i in range(n)]
    channel_sumsq = [torch.zeros(adapter.mlp(i).output.in_features, dtype=torch.float64) for i in range(n)]
    channel_active = [torch.zeros_like(t) for t in channel_sumsq]
    tokens = 0

    def on_heads(i):
        def hook(_module, args):
            head_sumsq[i] += column_sumsq(args[0])

        return hook

    def on_channels(i):
        def hook(_module, args):
            sumsq, active = column_sumsq_and_activity(args[0])
            channel_sumsq[i] += sumsq
            channel_active[i] += active

        return hook

    handles = []
    for i in range(n):
        handles.append(adapter.attention(i).o.register_forward_pre_hook(on_heads(i)))
        handles.append(adapter.mlp(i).output.register_forward_pre_hook(on_channels(i)))
    try:
        with torch.no_grad():
            for batch in batches_with_progress(batches, "activations"):
                adapter.run_layers(batch)
                tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    return InputStats(head_sumsq, channel_sumsq, channel_active, tokens)


def per_head(columns: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Sum consecutive blocks of ``head_dim`` columns: one value per head."""
    return columns.view(-1, head_dim).sum(1)


def activation_scores(adapter: Adapter, stats: InputStats) -> Scores:
    d = adapter.head_dim
    heads = [per_head(t, d).div(stats.tokens).sqrt() for t in stats.head_sumsq]
    channels = [t.div(stats.tokens).sqrt() for t in stats.channel_sumsq]
    return Scores("activation", adapter.shape(), heads=heads, channels=channels)


def activation_frequency_scores(adapter: Adapter, stats: InputStats) -> Scores:
    channels = [t / stats.tokens for t in stats.channel_active]
    return Scores("activation_frequency", adapter.shape(), channels=channels)
