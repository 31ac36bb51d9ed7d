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

from fastprune.adapters.base import Adapter
from fastprune.parallel import map_per_core
from fastprune.reconstruction import InputGrams, damped
from fastprune.scoring.scores import Scores

CHANNEL_BLOCK = 8


def obs_group_scores(weight: torch.Tensor, gram: torch.Tensor, group: int, block: int, damping: float) -> torch.Tensor:
    """Greedy OBS removal order of the column groups of ``weight``, as monotone scores (float64, one per group).

    The inverse Hessian is not updated in full after each removal: with H0^-1 the damped inverse, the inverse after
    removing the columns S_1..S_t is H0^-1 - D^T D, D stacking one factor F_t = R^-1 H^-1[S_t, :] per step (R the
    Cholesky factor of H^-1[S_t, S_t]). Each step then needs only the rows of the columns it removes and the
    diagonal blocks of its groups, which are downdated in place: O(n * removed) work per step instead of O(n^2).
    """
    n = gram.shape[0]
    n_groups = n // group
    w = weight.detach().double().clone()
    h0 = torch.linalg.inv(damped(gram, damping))
    columns = torch.arange(n_groups)[:, None] * group + torch.arange(group)  # [groups, group]
    blocks = h0[columns[:, :, None], columns[:, None, :]]  # the current inverse's diagonal blocks
    down = torch.empty(n, n, dtype=torch.float64)  # rows 0..rank-1 hold D
    rank = 0
    alive = torch.ones(n_groups, dtype=torch.bool)
    scores = torch.zeros(n_groups, dtype=torch.float64)
    level = 0.0
    while int(alive.sum()) > 1:
        cost = _group_costs(w, blocks, columns, alive)
        k = min(block, int(alive.sum()) - 1)
        picked = torch.topk(cost, k, largest=False).indices
        for j in picked[torch.argsort(cost[picked])].tolist():
            level = max(math.nextafter(level, math.inf), float(cost[j]))  # strictly increasing: keeps the order
            scores[j] = level
        cols = columns[picked].flatten()
        rows = h0[cols] - down[:rank, cols].T @ down[:rank]  # the current inverse's rows of the removed columns
        chol = torch.linalg.cholesky(rows[:, cols])
        factor = torch.linalg.solve_triangular(chol, rows, upper=False)
        # The refit of the kept columns: w -= w[:, S] H^-1[S, S]^-1 H^-1[S, :] = (w[:, S] R^-T) F.
        w -= torch.linalg.solve_triangular(chol, w[:, cols].T, upper=False).T @ factor
        down[rank : rank + cols.numel()] = factor
        rank += cols.numel()
        per_group = factor[:, columns]  # [removed columns, groups, group]
        blocks -= torch.einsum("kgi,kgj->gij", per_group, per_group)
        alive[picked] = False
    last = int(alive.nonzero()[0])
    scores[last] = max(math.nextafter(level, math.inf), float(_group_costs(w, blocks, columns, alive)[last]))
    return scores


def _group_costs(w: torch.Tensor, blocks: torch.Tensor, columns: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    """Error increase of removing each alive group now, w_g H^-1[g, g]^-1 w_g^T (inf for groups already removed)."""
    if columns.shape[1] == 1:  # removed columns have zero weight and variance: masked, not divided
        return ((w * w).sum(0) / blocks[:, 0, 0]).masked_fill(~alive, float("inf"))
    live = alive.nonzero().flatten()
    w_groups = w[:, columns[live]].permute(1, 0, 2)  # [live groups, out, group]
    solved = torch.linalg.solve(blocks[live], w_groups.transpose(1, 2))
    cost = torch.full((alive.numel(),), float("inf"), dtype=torch.float64)
    cost[live] = (w_groups * solved.transpose(1, 2)).sum((1, 2))
    return cost


def obs_scores(adapter: Adapter, grams: InputGrams, damping: float) -> Scores:
    """Heads and channels of every layer scored by their greedy OBS removal cost (see the module docstring)."""
    shape = adapter.shape()
    jobs = []  # (weight, gram, group, block): every layer's heads, then every layer's channels
    for i in range(shape.num_layers):
        jobs.append((adapter.attention(i).o.weight, grams.heads[i], adapter.head_dim, 1))
    for i in range(shape.num_layers):
        jobs.append((adapter.mlp(i).output.weight, grams.channels[i], 1, CHANNEL_BLOCK))
    scores = map_per_core(lambda job: obs_group_scores(*job, damping), jobs, "obs")
    heads, channels = scores[: shape.num_layers], scores[shape.num_layers :]
    kv_heads = [torch.zeros(s.kv_heads, dtype=torch.float64) for s in shape.layers]
    return Scores("obs", shape, heads=heads, kv_heads=kv_heads, channels=channels, info={"damping": damping})
