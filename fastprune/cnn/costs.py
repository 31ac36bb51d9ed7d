"""Parameters and multiply-accumulates of a CNN for any set of kept units, exactly.

Removing a unit shrinks both the layers that produce it and the layers that read it, so a convolution's cost is
(kept outputs) x (kept inputs per group) x kernel: bilinear in the kept widths, not a fixed price per unit. The
planner therefore evaluates candidate plans with this model instead of summing per-unit costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastprune.cnn.graph import ChannelGraph

METRICS = ("params", "macs")


@dataclass
class _LayerCost:
    out_units: torch.Tensor
    in_units: torch.Tensor
    in_per_group: int  # fixed input width per group of a grouped convolution (whole groups go), else 0
    kernel: int
    bias: bool
    positions: int  # output positions per sample, summed over calls


class CostModel:
    """``params(keep)`` and ``macs(keep)`` of the model after removing the units where ``keep`` is False."""

    def __init__(self, model: nn.Module, graph: ChannelGraph):
        sites = graph.site_map()
        self.frozen = graph.frozen
        self.layers = []
        counted = 0
        modules = dict(model.named_modules())
        for layer in graph.layers:
            out_u = torch.tensor(sites[(layer.module, "out")].units, dtype=torch.long)
            in_u = torch.tensor(sites[(layer.module, "in")].units, dtype=torch.long)
            per_group = len(in_u) // layer.groups if layer.groups > 1 else 0
            self.layers.append(_LayerCost(out_u, in_u, per_group, layer.kernel, layer.bias, sum(layer.positions)))
            m = modules[layer.module]
            counted += m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
        self.norms = []
        for name in graph.norms:
            if modules[name].weight is not None:  # affine: a weight and a bias per channel
                self.norms.append(torch.tensor(sites[(name, "norm")].units, dtype=torch.long))
                counted += 2 * modules[name].num_features
        seen: set[int] = set()
        total = 0
        for p in model.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        self.fixed_params = total - counted  # parameters no unit touches (frozen modules, embeddings, ...)

    def _widths(self, keep: torch.Tensor, layer: _LayerCost) -> tuple[torch.Tensor, torch.Tensor]:
        n_out = keep[layer.out_units].sum()
        n_in = torch.tensor(layer.in_per_group) if layer.in_per_group else keep[layer.in_units].sum()
        return n_out, n_in

    def params(self, keep: torch.Tensor) -> int:
        keep = (keep.bool() | self.frozen).long()
        total = self.fixed_params
        for layer in self.layers:
            n_out, n_in = self._widths(keep, layer)
            total += int(n_out * n_in * layer.kernel + (n_out if layer.bias else 0))
        return total + sum(2 * int(keep[units].sum()) for units in self.norms)

    def macs(self, keep: torch.Tensor) -> int:
        """Multiply-accumulates of one forward pass over one input of the traced size (convs and linear layers)."""
        keep = (keep.bool() | self.frozen).long()
        total = 0
        for layer in self.layers:
            n_out, n_in = self._widths(keep, layer)
            total += int(n_out * n_in * layer.kernel * layer.positions)
        return total

    def measure(self, metric: str, keep: torch.Tensor) -> int:
        return self.params(keep) if metric == "params" else self.macs(keep)

    def unit_costs(self, metric: str) -> torch.Tensor:
        """What removing each unit alone from the full model saves (the planner's price per unit for ranking)."""
        n = len(self.frozen)
        cost = torch.zeros(n, dtype=torch.float64)
        full = torch.ones(n, dtype=torch.long)
        for layer in self.layers:
            n_out, n_in = self._widths(full, layer)
            scale = 1 if metric == "params" else layer.positions
            per_out = float(n_in * layer.kernel + (1 if layer.bias and metric == "params" else 0)) * scale
            cost.index_add_(0, layer.out_units, torch.full((len(layer.out_units),), per_out, dtype=torch.float64))
            if not layer.in_per_group:
                per_in = float(n_out * layer.kernel) * scale
                cost.index_add_(0, layer.in_units, torch.full((len(layer.in_units),), per_in, dtype=torch.float64))
        if metric == "params":
            for units in self.norms:
                cost.index_add_(0, units, torch.full((len(units),), 2.0, dtype=torch.float64))
        return cost
