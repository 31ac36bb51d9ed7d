"""Run calibration batches through a model one layer at a time, so each layer can be changed before the next sees
its output (the way SparseGPT and Wanda calibrate: every layer on the activations of the already changed layers).

The hidden states entering the first layer are captured once, with the keyword arguments the model passes its
layers (attention mask, position embeddings): a pre-hook on layer 0 records them and stops the forward pass. Each
layer is then called directly on every batch; its outputs become the next layer's inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from fastprune.adapters.base import Adapter


class _Captured(Exception):
    """Raised by the layer-0 hook to stop the forward pass once its inputs are recorded."""


class LayerInputs:
    """Per calibration batch, the positional and keyword arguments of the next layer to run."""

    def __init__(self, adapter: Adapter, batches: list[torch.Tensor]):
        self.calls: list[tuple[tuple, dict]] = []
        extra = {"use_cache": False} if adapter.causal else {}

        def hook(_module, args, kwargs):
            self.calls.append((args, kwargs))
            raise _Captured

        handle = adapter.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in batches:
                    with contextlib.suppress(_Captured):
                        adapter.model(input_ids=batch, **extra)
        finally:
            handle.remove()

    def run(self, layer: nn.Module) -> None:
        """Run ``layer`` on every batch (hooks on its modules see the inputs) without advancing."""
        for _ in self._outputs(layer):
            pass

    def advance(self, layer: nn.Module) -> None:
        """Run ``layer`` on every batch and keep its outputs as the next layer's inputs."""
        self.calls = [_with_hidden(args, kwargs, hidden) for (args, kwargs), hidden in self._outputs(layer)]

    def _outputs(self, layer: nn.Module) -> Iterator[tuple[tuple[tuple, dict], torch.Tensor]]:
        with torch.no_grad():
            for args, kwargs in self.calls:
                out = layer(*args, **kwargs)
                yield (args, kwargs), out[0] if isinstance(out, tuple | list) else out


def _with_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def input_hooks(modules: list[nn.Module], fn: Callable[[int, torch.Tensor], None]) -> list:
    """Forward pre-hooks calling ``fn(k, x)`` with module k's input flattened to [tokens, features]."""

    def make(k: int):
        def hook(_module, args):
            fn(k, args[0].detach().flatten(0, -2))

        return hook

    return [m.register_forward_pre_hook(make(k)) for k, m in enumerate(modules)]
