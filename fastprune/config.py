"""User-facing settings, validated on construction and serialisable to JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fastprune.errors import ConfigError

CRITERIA = (
    "magnitude_l1",
    "magnitude_l2",
    "taylor",
    "fisher",
    "activation",
    "activation_frequency",
    "wanda",
    "block_influence",
    "sensitivity",
    "obs",
    "taylor_local",
    "fisher_local",
)
RANKINGS = ("global", "per_layer", "loss_weighted")
DEFAULT_DAMPING = 0.001
GQA_MODES = ("query_heads", "kv_groups")
GRANULARITIES = ("heads", "channels", "layers")
TARGETS = ("target_params", "target_memory_mb", "target_latency_ms")
LATENCY_KINDS = ("prefill", "decode")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_ratio(name: str, value: float) -> None:
    if not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1); got {value!r}")


def check_target(config, names: tuple[str, ...], counts: tuple[str, ...]) -> str | None:
    """The one target among ``names`` that ``config`` sets (None if none), checked: a positive number, and for the
    targets in ``counts`` a fraction to remove below 1 or a whole count to keep from 1."""
    targets = [n for n in names if getattr(config, n) is not None]
    if len(targets) > 1:
        raise ConfigError(f"give one target at a time; got {', '.join(targets)}")
    if not targets:
        return None
    name, value = targets[0], getattr(config, targets[0])
    if not isinstance(value, int | float) or not value > 0 or value != value:
        raise ConfigError(f"{name} must be a positive number; got {value!r}")
    if name in counts and value >= 1 and value != int(value):
        raise ConfigError(f"{name} below 1 is a fraction to remove, from 1 a whole count to keep; got {value!r}")
    return name


@dataclass
class CalibrationConfig:
    """How calibration text becomes batches: ``num_samples`` windows of ``seq_len`` tokens for scoring, up to
    ``recovery_samples`` windows for recovery."""

    # 64 windows of 512 tokens, the length perplexity is measured at. In the exploration
    # (benchmarks/results/quality-exploration.md) they beat the old 64 windows of 256 tokens on all five held-out
    # texts and matched 256 windows of 256 tokens (twice their text, 1.5x their time); even 32 windows of 512 (the
    # old token count) beat the old default on all five: later positions have statistics of their own. The
    # default prune of SmolLM2 takes about a minute and a half on 2 cores.
    num_samples: int = 64
    seq_len: int = 512
    batch_size: int = 4
    # Windows recovery trains on: more text than scoring needs, and enough that a 20-minute budget on 2 cores
    # (about 60 steps of 4 windows in float32, 110 in bfloat16) sees most of them once instead of cycling a few.
    recovery_samples: int = 512

    def __post_init__(self):
        for name in ("num_samples", "seq_len", "batch_size", "recovery_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"calibration {name} must be a positive integer; got {value!r}")


@dataclass
class PruningConfig:
    """What to remove and how to choose it.

    Ratios are fractions of each granularity to remove: ``head_ratio`` of the query heads (of the KV groups when
    ``gqa="kv_groups"``), ``channel_ratio`` of the MLP channels, ``layer_ratio`` of the layers. Alternatively
    a target: ``target_params`` (below 1: the fraction of non-embedding parameters to remove; from 1: the count to
    keep), ``target_memory_mb`` (weights plus the KV cache of one ``memory_context``-token sequence) or
    ``target_latency_ms`` (``latency_kind`` prefill of ``latency_tokens`` tokens, or one decode step, measured on
    this machine). The planner then takes the units of ``granularities`` with the lowest score per unit of cost
    until the model fits, so it chooses the mix of heads and channels itself (meaningful when the criterion's
    scores are comparable across unit kinds, as loss estimates are: taylor, fisher, sensitivity, and obs's output
    errors). ``granularities=("layers",)`` drops whole layers instead.
    With ``ranking="per_layer"`` every unprotected layer is cut alike, so the result keeps a plain config.
    ``ranking="loss_weighted"`` ranks globally after weighting each layer's scores by the calibration loss
    increase measured when that layer alone is cut as the uniform plan would cut it, per unit of score removed
    (fastprune.allocation): widths then differ per layer, following measured sensitivity.

    With ``reconstruct`` the output projections that read the removed heads and channels are refit by least
    squares on the calibration activations (see fastprune.reconstruction), ``damping`` being the ridge term
    relative to the mean input energy.

    With ``sequential`` the cut is made one layer at a time (fastprune.layerwise): layer i's statistics (the refit's
    Gram matrices and, for criteria computed from a layer's own activations, its scores) come from the model whose
    layers before i are already pruned and refit, so each layer corrects the error of the ones before it
    (SparseGPT/SlimGPT style). The planned widths do not change; which units go within a layer may.
    """

    criterion: str = "obs"
    head_ratio: float = 0.0
    channel_ratio: float = 0.0
    layer_ratio: float = 0.0
    target_params: float | None = None
    target_memory_mb: float | None = None
    memory_context: int = 2048
    target_latency_ms: float | None = None
    latency_kind: str = "prefill"
    latency_tokens: int = 512
    granularities: tuple[str, ...] = ("heads", "channels")
    layer_criterion: str = "block_influence"
    ranking: str = "per_layer"
    gqa: str = "query_heads"
    protect_first: int = 0
    protect_last: int = 0
    min_heads: int = 1
    round_to: int = 8
    reconstruct: bool = True
    damping: float = DEFAULT_DAMPING
    sequential: bool = False
    seed: int = 0
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self):
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationConfig(**self.calibration)
        self.granularities = tuple(self.granularities)
        _check_choice("criterion", self.criterion, CRITERIA)
        _check_choice("layer_criterion", self.layer_criterion, CRITERIA)
        _check_choice("ranking", self.ranking, RANKINGS)
        _check_choice("gqa", self.gqa, GQA_MODES)
        for g in self.granularities:
            _check_choice("granularity", g, GRANULARITIES)
        for name in ("head_ratio", "channel_ratio", "layer_ratio"):
            _check_ratio(name, getattr(self, name))
        target = check_target(self, TARGETS, counts=("target_params",))
        if target is not None:
            if not self.granularities:
                raise ConfigError(f"{target} needs at least one granularity to prune")
            if any(getattr(self, f"{n}_ratio") for n in ("head", "channel", "layer")):
                raise ConfigError(f"give either {target} or per-granularity ratios, not both")
        _check_choice("latency_kind", self.latency_kind, LATENCY_KINDS)
        for name in ("memory_context", "latency_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer; got {getattr(self, name)!r}")
        for name in ("protect_first", "protect_last"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be a non-negative integer; got {getattr(self, name)!r}")
        if not isinstance(self.min_heads, int) or self.min_heads < 1:
            raise ConfigError(f"min_heads must be at least 1 (a layer cannot lose every head); got {self.min_heads!r}")
        if not isinstance(self.damping, int | float) or not 0 < self.damping < 10:
            raise ConfigError(f"damping must be in (0, 10); got {self.damping!r}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ConfigError(f"round_to must be a positive integer; got {self.round_to!r}")
        if not isinstance(self.sequential, bool):
            raise ConfigError(f"sequential must be True or False; got {self.sequential!r}")

    @property
    def target_name(self) -> str | None:
        """The target this config asks for (target_params, target_memory_mb, target_latency_ms), if any."""
        return next((n for n in TARGETS if getattr(self, n) is not None), None)

    @property
    def has_target(self) -> bool:
        return self.target_name is not None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["granularities"] = list(self.granularities)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"unknown pruning settings: {', '.join(sorted(unknown))}")
        return cls(**data)
