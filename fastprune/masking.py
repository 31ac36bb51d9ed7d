"""Remove units without touching weights: hooks that zero heads or channels and skip whole layers.

A masked model computes what the pruned model computes (the invariant surgery is tested against), which also makes
masking the direct way to measure a unit's importance (the sensitivity criterion).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch

from fastprune.adapters.base import Adapter


@contextmanager
def skip_layers(adapter: Adapter, layers: list[int]):
    """Make each listed layer return its input hidden states unchanged."""

    def hook(_module, args, kwargs, output):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = [adapter.layers[i].register_forward_hook(hook, with_kwargs=True) for i in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _zero_inputs(module: torch.nn.Module, columns: torch.Tensor):
    def hook(_module, args):
        x = args[0].clone()
        x[..., columns] = 0
        return (x, *args[1:])

    return module.register_forward_pre_hook(hook)


@contextmanager
def mask_units(adapter: Adapter, heads: dict[int, list[int]], channels: dict[int, list[int]]):
    """Zero the outputs of the given query heads and MLP channels (per layer index)."""
    d = adapter.head_dim
    handles = []
    for i, hs in heads.items():
        if hs:
            cols = torch.cat([torch.arange(h * d, (h + 1) * d) for h in hs])
            handles.append(_zero_inputs(adapter.attention(i).o, cols))
    for i, cs in channels.items():
        if cs:
            handles.append(_zero_inputs(adapter.mlp(i).output, torch.tensor(cs)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def masked(adapter: Adapter, plan):
    """Apply a Plan by masking: the model then behaves as the pruned one would."""
    heads = {i: c.heads for i, c in plan.cuts.items()}
    channels = {i: c.channels for i, c in plan.cuts.items()}
    with ExitStack() as stack:
        stack.enter_context(mask_units(adapter, heads, channels))
        stack.enter_context(skip_layers(adapter, plan.drop_layers))
        yield
