"""Zero-initialised per-layer score tables and the progress bar every criterion loops with."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from tqdm.auto import tqdm

from fastprune.adapters.base import ModelShape


def zero_tables(shape: ModelShape, kinds: Iterable[str], dtype=torch.float64) -> dict[str, list[torch.Tensor]]:
    """One zero vector per layer for each of ``kinds`` (heads, kv_heads, channels), sized by the layer's width."""
    return {kind: [torch.zeros(getattr(s, kind), dtype=dtype) for s in shape.layers] for kind in kinds}


def batches_with_progress(batches: list[torch.Tensor], desc: str) -> Iterator[torch.Tensor]:
    """Iterate calibration batches under a tqdm bar (hidden when stderr is not a terminal)."""
    yield from tqdm(batches, desc=desc, unit="batch", disable=None, leave=False)
