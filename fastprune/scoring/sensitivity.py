"""Sensitivity: how much the calibration loss rises when one unit is removed (masked). Costly but direct.

Every layer and every query head costs one pass over the calibration batches, so use few, short windows. A KV
head's score is the sum over its query heads (removing a group removes them all); channels are not scored.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fastprune.adapters.base import Adapter
from fastprune.masking import mask_units, skip_layers
from fastprune.scoring.scores import Scores


def _mean_loss(adapter: Adapter, batches: list[torch.Tensor]) -> float:
    with torch.no_grad():
        return sum(float(adapter.loss(b)) * b.shape[0] for b in batches) / sum(b.shape[0] for b in batches)


def sensitivity_scores(adapter: Adapter, batches: list[torch.Tensor], heads: bool = True) -> Scores:
    """Loss increase per masked layer and (when ``heads``) per masked query head."""
    shape = adapter.shape()
    n = shape.num_layers
    total = n + (sum(s.heads for s in shape.layers) if heads else 0)
    bar = tqdm(total=total, desc="sensitivity", unit="pass", disable=None, leave=False)
    base = _mean_loss(adapter, batches)
    layer_scores = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        with skip_layers(adapter, [i]):
            layer_scores[i] = _mean_loss(adapter, batches) - base
        bar.update()
    head_scores = kv_scores = None
    if heads:
        head_scores = []
        for i, s in enumerate(shape.layers):
            row = torch.zeros(s.heads, dtype=torch.float64)
            for h in range(s.heads):
                with mask_units(adapter, {i: [h]}, {}):
                    row[h] = _mean_loss(adapter, batches) - base
                bar.update()
            head_scores.append(row)
        kv_scores = [torch.zeros(s.kv_heads, dtype=torch.float64) for s in shape.layers]
    bar.close()
    return Scores(
        "sensitivity",
        shape,
        heads=head_scores,
        kv_heads=kv_scores,
        layers=layer_scores,
        info={"base_loss": base},
    )
