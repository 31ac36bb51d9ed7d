"""Which slices of which weights make up each unit: the map every weight-based criterion reduces over."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from torch import nn

from fastprune.adapters.base import Adapter


@dataclass(frozen=True)
class UnitSlice:
    """``param`` split along ``dim`` into groups of ``group_size``: group j belongs to unit j of ``kind``."""

    layer: int
    kind: str  # "heads", "kv_heads" or "channels"
    param: nn.Parameter
    dim: int
    group_size: int


def unit_slices(adapter: Adapter, layers: Iterable[int] | None = None) -> Iterator[UnitSlice]:
    """Every (weight or bias, dim, group) that belongs to a prunable unit, layer by layer (all layers, or the
    given ones)."""
    d = adapter.head_dim
    for i in range(len(adapter.layers)) if layers is None else layers:
        att, mlp = adapter.attention(i), adapter.mlp(i)
        parts = [
            ("heads", att.q, 0, d),
            ("heads", att.o, 1, d),
            ("kv_heads", att.k, 0, d),
            ("kv_heads", att.v, 0, d),
            *(("channels", lin, 0, 1) for lin in mlp.inputs),
            ("channels", mlp.output, 1, 1),
        ]
        for kind, lin, dim, group in parts:
            yield UnitSlice(i, kind, lin.weight, dim, group)
            if dim == 0 and lin.bias is not None:
                yield UnitSlice(i, kind, lin.bias, 0, group)
