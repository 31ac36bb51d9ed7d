"""Apply a Plan: slice the weights of every cut layer, drop layers, and make the config match. Decides nothing."""

from __future__ import annotations

import torch
from torch import nn

from fastprune.adapters.base import Adapter
from fastprune.ops import gather_slice
from fastprune.planning import Plan


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    idx = torch.tensor(heads, dtype=torch.long)
    return (idx[:, None] * head_dim + torch.arange(head_dim)).flatten()


def _slice_linears(specs: list[tuple[nn.Linear, torch.Tensor | None, torch.Tensor | None]]) -> None:
    """Keep rows/cols of several nn.Linear layers with one gather_slice call; biases follow the rows."""
    tensors, rows, cols, targets = [], [], [], []
    for lin, r, c in specs:
        device = lin.weight.device
        r = None if r is None else r.to(device)
        c = None if c is None else c.to(device)
        tensors.append(lin.weight.data)
        rows.append(r)
        cols.append(c)
        targets.append((lin, "weight"))
        if lin.bias is not None and r is not None:
            tensors.append(lin.bias.data)
            rows.append(r)
            cols.append(None)
            targets.append((lin, "bias"))
    new = gather_slice(tensors, rows, cols)
    for (lin, name), t in zip(targets, new, strict=True):
        old = getattr(lin, name)
        setattr(lin, name, nn.Parameter(t, requires_grad=old.requires_grad))
    for lin, _, _ in specs:
        lin.out_features, lin.in_features = lin.weight.shape


def cut_attention(adapter: Adapter, i: int, heads: list[int], kv_heads: list[int]) -> None:
    """Keep only the given query and KV heads of layer i (both in original numbering, ascending)."""
    att, d = adapter.attention(i), adapter.head_dim
    q_rows, kv_rows = _head_rows(heads, d), _head_rows(kv_heads, d)
    _slice_linears([(att.q, q_rows, None), (att.k, kv_rows, None), (att.v, kv_rows, None), (att.o, None, q_rows)])
    adapter.set_layer_widths(i, len(heads), len(kv_heads))


def cut_mlp(adapter: Adapter, i: int, channels: list[int]) -> None:
    """Keep only the given MLP channels of layer i."""
    mlp = adapter.mlp(i)
    idx = torch.tensor(channels, dtype=torch.long)
    _slice_linears([(lin, idx, None) for lin in mlp.inputs] + [(mlp.output, None, idx)])


def apply_plan(adapter: Adapter, plan: Plan) -> None:
    """Cut the model in place as the plan says; the plan must have been made for this model's shape."""
    plan.check_fits(adapter.shape())
    for i, cut in sorted(plan.cuts.items()):
        heads, kv_heads, channels = plan.kept(i)
        if cut.heads or cut.kv_heads:
            cut_attention(adapter, i, heads, kv_heads)
        if cut.channels:
            cut_mlp(adapter, i, channels)
    if plan.drop_layers:
        adapter.set_layers(plan.kept_layers())
    adapter.write_config()
