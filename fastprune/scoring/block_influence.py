"""Block Influence (ShortGPT): 1 - mean cosine between a layer's input and output hidden states, per token.

A layer that barely rotates its residual stream scores near 0 and is the first to go.
"""

from __future__ import annotations

import torch

from fastprune.adapters.base import Adapter
from fastprune.ops import block_influence_accumulate_
from fastprune.scoring.scores import Scores
from fastprune.scoring.tables import batches_with_progress


def block_influence_scores(adapter: Adapter, batches: list[torch.Tensor]) -> Scores:
    n = len(adapter.layers)
    sums = [torch.zeros(2, dtype=torch.float64) for _ in range(n)]

    def on_layer(i):
        def hook(_module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            block_influence_accumulate_(sums[i], x.detach(), y.detach())

        return hook

    handles = [adapter.layers[i].register_forward_hook(on_layer(i), with_kwargs=True) for i in range(n)]
    try:
        with torch.no_grad():
            for batch in batches_with_progress(batches, "block influence"):
                adapter.run_layers(batch)
    finally:
        for h in handles:
            h.remove()
    layers = torch.stack([1.0 - s[0] / s[1] for s in sums])
    return Scores("block_influence", adapter.shape(), layers=layers)
