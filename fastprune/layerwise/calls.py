"""One decoder layer at a time: what the model passes a layer, captured once, so the layer can be run on its own.

The model's forward is run up to its first layer (a pre-hook stops it there), which records per batch the hidden
states and the other arguments (position embeddings, attention mask, position ids). Running layer i on the
recorded arguments with the previous layer's output as hidden states computes exactly what the whole model
computes at that layer, so statistics collected layer by layer equal those of a full forward pass.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from fastprune.adapters.base import Adapter


class _Stop(Exception):
    """Raised by the capture hook to end the forward pass at the first layer."""


@dataclass
class LayerCall:
    """One calibration batch's call of a decoder layer: its input hidden states and the other arguments."""

    hidden: torch.Tensor
    args: tuple  # positional arguments after the hidden states
    kwargs: dict
    positional: bool  # whether the model passes the hidden states positionally
    index: int  # the batch's global index (over all processes), for reproducible per-batch randomness

    def run(self, layer: nn.Module) -> torch.Tensor:
        """The layer's output hidden states for this batch."""
        if self.positional:
            out = layer(self.hidden, *self.args, **self.kwargs)
        else:
            out = layer(*self.args, hidden_states=self.hidden, **self.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def next(self, hidden: torch.Tensor) -> LayerCall:
        """The same call with other hidden states (the next layer's input)."""
        return replace(self, hidden=hidden)


def capture_calls(
    adapter: Adapter, batches: list[torch.Tensor], indices: list[int], embed: Callable | None = None
) -> list[LayerCall]:
    """Run the model up to its first layer on every batch and record that layer's arguments. ``embed`` (token ids
    -> input embeddings) replaces the model's own embedding lookup, for models whose embeddings are not loaded."""
    calls: list[LayerCall] = []
    current = {"index": -1}

    def hook(_module, args, kwargs):
        positional = bool(args)
        hidden = args[0] if positional else kwargs.pop("hidden_states")
        rest = args[1:] if positional else args
        calls.append(LayerCall(hidden.detach(), tuple(rest), dict(kwargs), positional, current["index"]))
        raise _Stop

    extra = {"use_cache": False} if adapter.causal else {}
    handle = adapter.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch, index in zip(batches, indices, strict=True):
                current["index"] = index
                inputs = {"input_ids": batch} if embed is None else {"inputs_embeds": embed(batch)}
                with contextlib.suppress(_Stop):
                    adapter.model(**inputs, **extra)
    finally:
        handle.remove()
    if len(calls) != len(batches):
        raise RuntimeError("the model did not call its first decoder layer once per batch")
    return calls


def run_layer(layer: nn.Module, calls: list[LayerCall]) -> list[torch.Tensor]:
    """The layer's outputs on every call (no gradients)."""
    with torch.no_grad():
        return [call.run(layer) for call in calls]
