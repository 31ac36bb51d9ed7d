"""Settings of the CNN path, validated on construction and serialisable to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from fastprune.cnn.criteria import CNN_CRITERIA
from fastprune.config import RANKINGS, check_target
from fastprune.errors import ConfigError

CNN_TARGETS = ("target_params", "target_flops", "target_latency_ms")


@dataclass
class CnnPruningConfig:
    """What to remove from a CNN and how to choose it.

    ``filter_ratio`` removes that fraction of the units of every group (``ranking="per_layer"``) or of all units
    together (``"global"``, scores normalised per group unless the criterion's scores share one scale). Or a target:
    ``target_params`` / ``target_flops`` (below 1: the fraction of parameters / multiply-accumulates at
    ``input_size`` to remove; from 1: the count to keep) or ``target_latency_ms`` (a forward pass at batch
    ``latency_batch`` on this machine). Groups touching a module that matches a ``protect`` pattern (fnmatch), the
    first ``protect_first`` and last ``protect_last`` groups are never cut; kept widths are multiples of
    ``round_to`` units. ``samples`` calibration images in batches of ``batch_size`` feed the taylor criterion and,
    with ``recalibrate_bn``, re-estimate the pruned model's BatchNorm statistics (fastprune.cnn.recovery).
    """

    criterion: str = "l1"
    filter_ratio: float = 0.0
    target_params: float | None = None
    target_flops: float | None = None
    target_latency_ms: float | None = None
    latency_batch: int = 8
    input_size: tuple[int, ...] = (3, 224, 224)
    ranking: str = "per_layer"
    protect: tuple[str, ...] = ()
    protect_first: int = 0
    protect_last: int = 0
    round_to: int = 8
    samples: int = 64
    batch_size: int = 16
    recalibrate_bn: bool = False
    seed: int = 0

    def __post_init__(self):
        self.input_size = tuple(self.input_size)
        self.protect = tuple(self.protect)
        if self.criterion not in CNN_CRITERIA:
            raise ConfigError(f"criterion must be one of {', '.join(CNN_CRITERIA)}; got {self.criterion!r}")
        if self.ranking not in RANKINGS:
            raise ConfigError(f"ranking must be one of {', '.join(RANKINGS)}; got {self.ranking!r}")
        if not isinstance(self.filter_ratio, int | float) or not 0.0 <= self.filter_ratio < 1.0:
            raise ConfigError(f"filter_ratio must be in [0, 1); got {self.filter_ratio!r}")
        target = check_target(self, CNN_TARGETS, counts=("target_params", "target_flops"))
        if target is not None and self.filter_ratio:
            raise ConfigError(f"give either {target} or filter_ratio, not both")
        if len(self.input_size) < 2 or not all(isinstance(n, int) and n > 0 for n in self.input_size):
            raise ConfigError(
                f"input_size must be channels and spatial sizes, e.g. (3, 224, 224); got {self.input_size}"
            )
        for name in ("latency_batch", "round_to", "samples", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        for name in ("protect_first", "protect_last"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative integer; got {getattr(self, name)!r}")

    @property
    def target_name(self) -> str | None:
        return next((n for n in CNN_TARGETS if getattr(self, n) is not None), None)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["input_size"], d["protect"] = list(self.input_size), list(self.protect)
        return d
