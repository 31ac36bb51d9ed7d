"""Remove units from a convolutional network: slice every conv, linear and BatchNorm they touch with one
``ops.gather_slice`` call, then fix the modules' sizes. Decides nothing: the kept units come from a plan."""

from __future__ import annotations

import torch
from torch import nn

from fastprune.cnn.graph import ChannelGraph
from fastprune.errors import PlanError
from fastprune.ops import gather_slice

NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _kept(units: list[int], keep: torch.Tensor) -> torch.Tensor:
    return keep[torch.tensor(units, dtype=torch.long)].nonzero().flatten()


def apply_keep(model: nn.Module, graph: ChannelGraph, keep: torch.Tensor) -> None:
    """Keep only the units where ``keep`` is True (frozen units always stay), in place; ``model`` must have the
    module names and widths of the model ``graph`` was traced from."""
    keep = keep.bool() | graph.frozen
    modules = dict(model.named_modules())
    sites = graph.site_map()
    jobs: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor | None, torch.Tensor | None, tuple[int, ...]]] = []
    resize: list[tuple[nn.Module, dict[str, int]]] = []
    for layer in graph.layers:
        m = modules[layer.module]
        out_keep = _kept(sites[(layer.module, "out")].units, keep)
        in_keep = _kept(sites[(layer.module, "in")].units, keep)
        n_out, n_in = len(sites[(layer.module, "out")].units), len(sites[(layer.module, "in")].units)
        if len(out_keep) == n_out and len(in_keep) == n_in:
            continue
        w = m.weight.data
        device = w.device
        out_keep, in_keep = out_keep.to(device), in_keep.to(device)
        if layer.kind == "linear":
            jobs.append((m, "weight", w, out_keep, in_keep, (len(out_keep), len(in_keep))))
            resize.append((m, {"out_features": len(out_keep), "in_features": len(in_keep)}))
        elif layer.groups == 1:
            k = layer.kernel
            cols = (in_keep[:, None] * k + torch.arange(k, device=device)).flatten()
            shape = (len(out_keep), len(in_keep), *w.shape[2:])
            jobs.append((m, "weight", w.reshape(w.shape[0], -1), out_keep, cols, shape))
            resize.append((m, {"out_channels": len(out_keep), "in_channels": len(in_keep)}))
        else:
            per_group_out = n_out // layer.groups
            groups = len(out_keep) // per_group_out
            if groups * per_group_out != len(out_keep) or groups * (n_in // layer.groups) != len(in_keep):
                raise PlanError(f"{layer.module}: a grouped convolution loses whole groups only")
            shape = (len(out_keep), *w.shape[1:])
            jobs.append((m, "weight", w.reshape(w.shape[0], -1), out_keep, None, shape))
            resize.append((m, {"out_channels": len(out_keep), "in_channels": len(in_keep), "groups": groups}))
        if m.bias is not None:
            jobs.append((m, "bias", m.bias.data, out_keep, None, (len(out_keep),)))
    for name in graph.norms:
        m = modules[name]
        idx = _kept(sites[(name, "norm")].units, keep)
        if len(idx) == m.num_features:
            continue
        for t in NORM_TENSORS:
            value = getattr(m, t, None)
            if value is not None:
                jobs.append((m, t, value.data, idx.to(value.device), None, (len(idx),)))
        resize.append((m, {"num_features": len(idx)}))
    new = gather_slice([j[2] for j in jobs], [j[3] for j in jobs], [j[4] for j in jobs])
    for (m, name, _, _, _, shape), t in zip(jobs, new, strict=True):
        t = t.reshape(shape)
        old = getattr(m, name)
        if isinstance(old, nn.Parameter):
            setattr(m, name, nn.Parameter(t, requires_grad=old.requires_grad))
        else:
            m._buffers[name] = t
    for m, attrs in resize:
        for k, v in attrs.items():
            setattr(m, k, v)
