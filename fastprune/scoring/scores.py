"""Importance scores per unit, as data: higher means more important (kept first)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastprune.adapters.base import ModelShape, ParamCosts
from fastprune.errors import ScoreError

KINDS = ("heads", "kv_heads", "channels", "layers")


@dataclass
class Scores:
    """Scores of one criterion: per layer for heads, KV heads and channels, one per layer for layers.

    ``heads[i]`` has one score per query head of layer i, ``kv_heads[i]`` one per KV head (the key/value part
    only; a KV group's score adds its query heads), ``channels[i]`` one per MLP channel, ``layers`` one per layer.
    A kind the criterion does not score is None.
    """

    criterion: str
    shape: ModelShape
    heads: list[torch.Tensor] | None = None
    kv_heads: list[torch.Tensor] | None = None
    channels: list[torch.Tensor] | None = None
    layers: torch.Tensor | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.check()

    def kinds(self) -> list[str]:
        return [k for k in KINDS if getattr(self, k) is not None]

    def check(self) -> None:
        """Raise ScoreError when a score is NaN/inf or a tensor does not match the model's shape."""
        widths = {
            "heads": [s.heads for s in self.shape.layers],
            "kv_heads": [s.kv_heads for s in self.shape.layers],
            "channels": [s.channels for s in self.shape.layers],
        }
        for kind, expected in widths.items():
            per_layer = getattr(self, kind)
            if per_layer is None:
                continue
            if len(per_layer) != len(expected):
                raise ScoreError(f"{kind} scores cover {len(per_layer)} layers; the model has {len(expected)}")
            for i, (t, n) in enumerate(zip(per_layer, expected, strict=True)):
                if t.shape != (n,):
                    raise ScoreError(f"{kind} scores of layer {i} have shape {tuple(t.shape)}; expected ({n},)")
                _check_finite(t, f"{kind} scores of layer {i}", self.criterion)
        if self.layers is not None:
            if self.layers.shape != (self.shape.num_layers,):
                raise ScoreError(
                    f"layer scores have shape {tuple(self.layers.shape)}; expected ({self.shape.num_layers},)"
                )
            _check_finite(self.layers, "layer scores", self.criterion)

    def param_costs(self) -> ParamCosts:
        """Parameters per unit of the scored model (recorded when scoring), for planning without the model."""
        costs = self.info.get("param_costs")
        if costs is None:
            raise ScoreError("these scores do not record the model's parameter costs; re-run `fastprune score`")
        return ParamCosts(**costs)

    def with_layers_from(self, other: Scores) -> Scores:
        """These scores with the layer scores of ``other`` (e.g. Block Influence for depth pruning)."""
        if other.layers is None:
            raise ScoreError(f"criterion {other.criterion!r} gives no layer scores")
        info = {**self.info, "layers_scored_by": other.criterion}
        return Scores(self.criterion, self.shape, self.heads, self.kv_heads, self.channels, other.layers, info)

    def to_dict(self) -> dict:
        out = {"criterion": self.criterion, "shape": self.shape.to_dict(), "info": self.info}
        for kind in ("heads", "kv_heads", "channels"):
            values = getattr(self, kind)
            out[kind] = None if values is None else [t.tolist() for t in values]
        out["layers"] = None if self.layers is None else self.layers.tolist()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Scores:
        try:
            per_layer = {
                k: None if d.get(k) is None else [torch.tensor(v, dtype=torch.float64) for v in d[k]]
                for k in ("heads", "kv_heads", "channels")
            }
            layers = None if d.get("layers") is None else torch.tensor(d["layers"], dtype=torch.float64)
            return cls(
                d["criterion"],
                ModelShape.from_dict(d["shape"]),
                **per_layer,
                layers=layers,
                info=d.get("info", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ScoreError(f"malformed scores: {exc}") from exc

    def save(self, path: str | Path) -> None:
        from fastprune.io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        path = Path(path)
        if not path.is_file():
            raise ScoreError(f"scores file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ScoreError(f"scores file {path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data)


def _check_finite(t: torch.Tensor, what: str, criterion: str) -> None:
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        kind = "NaN" if torch.isnan(t).any() else "infinite"
        raise ScoreError(
            f"{what} from criterion {criterion!r} contain {bad} {kind} value(s): the calibration forward/backward "
            f"overflowed or diverged (try float32, or fewer/shorter calibration windows)"
        )
