"""Optimal Brain Surgeon for structure: rank units by how well the rest of their layer can make up for them.

For the projection that reads a unit (o_proj for heads, down_proj for channels) with weight W and input Gram
matrix C over the calibration tokens, removing the input columns J and refitting the others by least squares
raises the squared output error by  trace(W_J (H^-1)_JJ^-1 W_J^T),  H = C + damping*I. The criterion removes units
greedily by that cost, updating W and H^-1 after each removal (the refit), and scores each unit by the running
maximum of the costs at which it would go (strictly increasing): a unit removed later scores higher. Removing the
lowest-scoring units and then refitting (fastprune.reconstruction) is exactly this greedy procedure.

Channels go ``CHANNEL_BLOCK`` at a time (matching the default width rounding), heads one at a time. The costs of
heads and channels are both squared errors of what the layer adds to the residual stream, so a parameter target
can trade them.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from fastprune.adapters.base import Adapter
from fastprune.reconstruction import InputGrams, damped
from fastprune.scoring.scores import Scores

CHANNEL_BLOCK = 8


def obs_group_scores(weight: torch.Tensor, gram: torch.Tensor, group: int, block: int, damping: float) -> torch.Tensor:
    """Greedy OBS removal order of the column groups of ``weight``, as monotone scores (float64, one per group)."""
    n = gram.shape[0]
    n_groups = n // group
    w = weight.detach().double().clone()
    hinv = torch.linalg.inv(damped(gram, damping))
    alive = torch.ones(n_groups, dtype=torch.bool)
    scores = torch.zeros(n_groups, dtype=torch.float64)
    level = 0.0
    while int(alive.sum()) > 1:
        cost = _group_costs(w, hinv, group, alive)
        k = min(block, int(alive.sum()) - 1)
        picked = torch.topk(cost, k, largest=False).indices
        for j in picked[torch.argsort(cost[picked])].tolist():
            level = max(math.nextafter(level, math.inf), float(cost[j]))  # strictly increasing: keeps the order
            scores[j] = level
        cols = (picked[:, None] * group + torch.arange(group)).flatten()
        m_inv = torch.linalg.inv(hinv[cols][:, cols])
        w -= w[:, cols] @ m_inv @ hinv[cols]
        hinv -= hinv[:, cols] @ m_inv @ hinv[cols]
        alive[picked] = False
    last = int(alive.nonzero()[0])
    scores[last] = max(math.nextafter(level, math.inf), float(_group_costs(w, hinv, group, alive)[last]))
    return scores


def _group_costs(w: torch.Tensor, hinv: torch.Tensor, group: int, alive: torch.Tensor) -> torch.Tensor:
    """Error increase of removing each alive group now (inf for groups already removed)."""
    cost = torch.full((alive.numel(),), float("inf"), dtype=torch.float64)
    live = alive.nonzero().flatten()
    if group == 1:
        cost[live] = (w[:, live] ** 2).sum(0) / hinv.diagonal()[live]
        return cost
    idx = live[:, None] * group + torch.arange(group)  # [live groups, g]
    blocks = hinv[idx[:, :, None], idx[:, None, :]]  # [live groups, g, g]
    w_groups = w[:, idx].permute(1, 0, 2)  # [live groups, out, g]
    solved = torch.linalg.solve(blocks, w_groups.transpose(1, 2))
    cost[live] = (w_groups * solved.transpose(1, 2)).sum((1, 2))
    return cost


def obs_scores(adapter: Adapter, grams: InputGrams, damping: float) -> Scores:
    """Heads and channels of every layer scored by their greedy OBS removal cost (see the module docstring)."""
    shape = adapter.shape()
    heads, channels = [], []
    for i in tqdm(range(shape.num_layers), desc="obs", unit="layer", disable=None, leave=False):
        heads.append(obs_group_scores(adapter.attention(i).o.weight, grams.heads[i], adapter.head_dim, 1, damping))
        channels.append(obs_group_scores(adapter.mlp(i).output.weight, grams.channels[i], 1, CHANNEL_BLOCK, damping))
    kv_heads = [torch.zeros(s.kv_heads, dtype=torch.float64) for s in shape.layers]
    return Scores("obs", shape, heads=heads, kv_heads=kv_heads, channels=channels, info={"damping": damping})
