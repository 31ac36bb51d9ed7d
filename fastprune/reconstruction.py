"""Least-squares repair of the projections that read the pruned units.

Removing heads or MLP channels deletes columns of the attention output projection or the MLP down projection.
The remaining columns can take over part of what the removed ones did: with X the projection's input over the
calibration tokens, C = X^T X its Gram matrix and K the kept columns, the weight that best reproduces the dense
output W X from the kept inputs alone is

    W_K = W C[:, K] (C[K, K] + damping * mean(diag C[K, K]) I)^-1

The Gram matrices are sums over batches (mergeable across processes) collected on the dense model before surgery;
the damping keeps the solve stable and limits fitting to the calibration text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastprune.adapters.base import Adapter
from fastprune.planning import Plan
from fastprune.scoring.tables import batches_with_progress


@dataclass
class InputGrams:
    """Per layer, the Gram matrix of the attention output projection's and MLP down projection's inputs."""

    heads: dict[int, torch.Tensor]
    channels: dict[int, torch.Tensor]


def collect_grams(adapter: Adapter, batches: list[torch.Tensor], plan: Plan) -> InputGrams:
    """One forward pass over the calibration batches, summing x^T x for every projection the plan cuts into."""
    heads = {i: None for i, c in plan.cuts.items() if c.heads}
    channels = {i: None for i, c in plan.cuts.items() if c.channels}

    def accumulate(store: dict, i: int):
        def hook(_module, args):
            x = args[0].detach().flatten(0, -2).double()
            gram = x.T @ x
            store[i] = gram if store[i] is None else store[i] + gram

        return hook

    handles = [adapter.attention(i).o.register_forward_pre_hook(accumulate(heads, i)) for i in heads]
    handles += [adapter.mlp(i).output.register_forward_pre_hook(accumulate(channels, i)) for i in channels]
    try:
        with torch.no_grad():
            for batch in batches_with_progress(batches, "reconstruction stats"):
                adapter.model(input_ids=batch)
    finally:
        for h in handles:
            h.remove()
    return InputGrams(heads, channels)


def least_squares_weight(weight: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damping: float) -> torch.Tensor:
    """The weight over the ``keep`` columns that best reproduces ``weight``'s output on inputs with Gram ``gram``."""
    gram_kk = gram[keep][:, keep]
    ridge = damping * gram_kk.diagonal().mean().clamp_min(1e-12)
    gram_kk = gram_kk + ridge * torch.eye(len(keep), dtype=gram.dtype, device=gram.device)
    rhs = gram[keep] @ weight.detach().double().T  # [k, out]
    solution = torch.linalg.solve(gram_kk, rhs).T
    return solution.to(weight.dtype)


def _head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    idx = torch.tensor(heads, dtype=torch.long)
    return (idx[:, None] * head_dim + torch.arange(head_dim)).flatten()


def reconstruct(adapter: Adapter, plan: Plan, grams: InputGrams, damping: float) -> None:
    """Before surgery: overwrite the kept columns of every cut output projection with their least-squares refit
    (the columns about to be removed are left as they are; surgery drops them)."""
    with torch.no_grad():
        for i, gram in grams.heads.items():
            weight = adapter.attention(i).o.weight
            keep = _head_columns(plan.kept(i)[0], adapter.head_dim).to(weight.device)
            weight[:, keep] = least_squares_weight(weight, gram, keep, damping)
        for i, gram in grams.channels.items():
            weight = adapter.mlp(i).output.weight
            keep = torch.tensor(plan.kept(i)[2], dtype=torch.long, device=weight.device)
            weight[:, keep] = least_squares_weight(weight, gram, keep, damping)
