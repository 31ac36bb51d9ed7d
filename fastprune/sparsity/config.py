"""Settings of a 2:4 sparsification, validated on construction and serialisable to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fastprune.config import CalibrationConfig
from fastprune.errors import ConfigError

PATTERNS = ("2:4",)
SPARSIFY_CRITERIA = ("magnitude", "wanda", "sparsegpt")
#: SparseGPT's default ridge: 1% of the mean diagonal of the input Gram matrix.
DEFAULT_SPARSEGPT_DAMPING = 0.01


@dataclass
class SparsifyConfig:
    """How to make every linear layer of every block 2:4-sparse.

    ``criterion``: ``magnitude`` keeps the 2 largest |W| of each group of 4 inputs; ``wanda`` the 2 largest
    |W| * ||X|| (X: the layer's input over the calibration tokens); ``sparsegpt`` chooses and updates the kept
    weights to reproduce the layer's dense output (the OBS update of SparseGPT, ``block_size`` columns at a time,
    ridge ``damping`` times the mean diagonal of X^T X). wanda and sparsegpt run layer after layer, each on the
    activations of the already sparsified layers before it. ``skip``: module names or name parts (``lm_head``,
    ``layers.0``, ``q_proj``) to leave dense.
    """

    pattern: str = "2:4"
    criterion: str = "wanda"
    skip: tuple[str, ...] = ()
    damping: float = DEFAULT_SPARSEGPT_DAMPING
    block_size: int = 128
    seed: int = 0
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self):
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig(**self.calibration)
        if isinstance(self.skip, str):
            self.skip = (self.skip,)
        self.skip = tuple(s.strip() for s in self.skip if s.strip())
        if self.pattern not in PATTERNS:
            raise ConfigError(
                f"pattern must be 2:4 (the N:M pattern fastprune's kernels and GPU tensor cores implement); "
                f"got {self.pattern!r}"
            )
        if self.criterion not in SPARSIFY_CRITERIA:
            raise ConfigError(f"criterion must be one of {', '.join(SPARSIFY_CRITERIA)}; got {self.criterion!r}")
        if not isinstance(self.damping, int | float) or not 0 < self.damping < 10:
            raise ConfigError(f"damping must be in (0, 10); got {self.damping!r}")
        if not isinstance(self.block_size, int) or self.block_size < 4 or self.block_size % 4:
            raise ConfigError(f"block_size must be a positive multiple of 4; got {self.block_size!r}")

    @property
    def needs_calibration(self) -> bool:
        return self.criterion != "magnitude"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["skip"] = list(self.skip)
        return d
