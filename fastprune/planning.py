"""Plans (what to remove, as reviewable JSON) and the planner that makes them from scores and a config.

A plan names units by their index in the model it was made for: per layer the query heads, KV heads and MLP
channels to remove, plus whole layers to drop. It is checked against that model's shape on construction, so a
hand-edited plan that would leave a layer without heads, break the GQA layout or index past a width is refused
with the reason before any weight is touched.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastprune.adapters.base import LayerShape, ModelShape, ParamCosts
from fastprune.budget import Budget, params_budget
from fastprune.config import PruningConfig
from fastprune.errors import PlanError
from fastprune.scoring.scores import Scores

PLAN_FORMAT = 1
#: Criteria whose head and channel scores share units (a loss or output-error estimate), so a parameter target
#: can trade them per parameter.
COMPARABLE_CRITERIA = ("taylor", "fisher", "sensitivity", "obs", "taylor_local", "fisher_local")

logger = logging.getLogger("fastprune")


@dataclass
class LayerCut:
    """Units removed from one layer (indices in that layer before pruning)."""

    heads: list[int] = field(default_factory=list)
    kv_heads: list[int] = field(default_factory=list)
    channels: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.heads, self.kv_heads, self.channels = (
            sorted(int(i) for i in x) for x in (self.heads, self.kv_heads, self.channels)
        )

    def is_empty(self) -> bool:
        return not (self.heads or self.kv_heads or self.channels)


@dataclass
class Plan:
    """What to cut from a model of shape ``shape``; validated on construction."""

    shape: ModelShape
    cuts: dict[int, LayerCut] = field(default_factory=dict)
    drop_layers: list[int] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.cuts = {int(i): c for i, c in self.cuts.items() if not c.is_empty()}
        self.drop_layers = sorted(int(i) for i in self.drop_layers)
        self.validate()

    # -- queries ---------------------------------------------------------------------------------------------
    def cut(self, i: int) -> LayerCut:
        return self.cuts.get(i, LayerCut())

    def kept_layers(self) -> list[int]:
        dropped = set(self.drop_layers)
        return [i for i in range(self.shape.num_layers) if i not in dropped]

    def kept(self, i: int) -> tuple[list[int], list[int], list[int]]:
        """Kept (query heads, KV heads, channels) of layer i, in original order."""
        s, c = self.shape.layers[i], self.cut(i)
        return (
            _complement(s.heads, c.heads),
            _complement(s.kv_heads, c.kv_heads),
            _complement(s.channels, c.channels),
        )

    def result_shape(self) -> ModelShape:
        """The model's shape after the plan is applied."""
        layers = []
        for i in self.kept_layers():
            heads, kv, channels = self.kept(i)
            layers.append(LayerShape(len(heads), len(kv), len(channels)))
        return ModelShape(self.shape.family, self.shape.hidden_size, self.shape.head_dim, tuple(layers))

    def removed_params(self, costs: ParamCosts) -> int:
        """Parameters the plan removes, from per-unit costs."""
        return _shape_params(self.shape, costs) - _shape_params(self.result_shape(), costs)

    def counts(self) -> dict[str, int]:
        return {
            "layers": len(self.drop_layers),
            "heads": sum(len(c.heads) for c in self.cuts.values()),
            "kv_heads": sum(len(c.kv_heads) for c in self.cuts.values()),
            "channels": sum(len(c.channels) for c in self.cuts.values()),
        }

    # -- validation ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        n = self.shape.num_layers
        _check_indices(self.drop_layers, n, "drop_layers")
        if len(self.drop_layers) >= n:
            raise PlanError(f"the plan drops all {n} layers; at least one layer must remain")
        for i, cut in self.cuts.items():
            if not 0 <= i < n:
                raise PlanError(f"the plan cuts layer {i}, but the model has layers 0..{n - 1}")
            if i in self.drop_layers:
                raise PlanError(f"layer {i} is both dropped and cut; drop it or cut it")
            s = self.shape.layers[i]
            _check_indices(cut.heads, s.heads, f"layer {i} heads")
            _check_indices(cut.kv_heads, s.kv_heads, f"layer {i} kv_heads")
            _check_indices(cut.channels, s.channels, f"layer {i} channels")
            if len(cut.heads) >= s.heads:
                raise PlanError(f"the plan removes every head of layer {i}; keep at least one (or drop the layer)")
            if len(cut.channels) >= s.channels:
                raise PlanError(
                    f"the plan removes every MLP channel of layer {i}; keep at least one (or drop the layer)"
                )
            _check_gqa(i, s, cut)

    # -- serialisation ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "fastprune_plan": PLAN_FORMAT,
            "shape": self.shape.to_dict(),
            "drop_layers": self.drop_layers,
            "cuts": {
                str(i): {"heads": c.heads, "kv_heads": c.kv_heads, "channels": c.channels}
                for i, c in sorted(self.cuts.items())
            },
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        if d.get("fastprune_plan") != PLAN_FORMAT:
            raise PlanError(f"not a fastprune plan (format {PLAN_FORMAT}): missing or wrong 'fastprune_plan' key")
        try:
            cuts = {int(i): LayerCut(**c) for i, c in d.get("cuts", {}).items()}
            return cls(ModelShape.from_dict(d["shape"]), cuts, d.get("drop_layers", []), d.get("info", {}))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"malformed plan: {exc}") from exc

    def save(self, path: str | Path) -> None:
        write_plan_file(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        return cls.from_dict(read_plan_file(path))

    def check_fits(self, shape: ModelShape) -> None:
        """Refuse to apply this plan to a model of another shape."""
        if shape != self.shape:
            raise PlanError(
                f"the plan was made for a {self.shape.family} model with {self.shape.num_layers} layers and widths "
                f"{_widths(self.shape)}; this model has {shape.num_layers} layers and widths {_widths(shape)}"
            )


def _widths(shape: ModelShape) -> str:
    distinct = sorted(set(shape.layers), key=lambda s: (s.heads, s.kv_heads, s.channels))
    return ", ".join(f"{s.heads}h/{s.kv_heads}kv/{s.channels}ch" for s in distinct)


def _complement(n: int, removed: list[int]) -> list[int]:
    gone = set(removed)
    return [i for i in range(n) if i not in gone]


def _check_indices(indices: list[int], n: int, what: str) -> None:
    if len(set(indices)) != len(indices):
        raise PlanError(f"{what} lists an index twice")
    bad = [i for i in indices if not 0 <= i < n]
    if bad:
        raise PlanError(f"{what} has index {bad[0]} out of range 0..{n - 1}")


def _check_gqa(i: int, s: LayerShape, cut: LayerCut) -> None:
    """Kept query heads must all belong to kept KV heads, the same number per KV head."""
    g = s.group_size
    removed_kv = set(cut.kv_heads)
    kept_q = _complement(s.heads, cut.heads)
    orphans = [h for h in kept_q if h // g in removed_kv]
    if orphans:
        raise PlanError(
            f"layer {i}: KV head {orphans[0] // g} is removed but query heads {orphans} that read it are kept; "
            f"remove them too"
        )
    per_group = {kv: 0 for kv in range(s.kv_heads) if kv not in removed_kv}
    for h in kept_q:
        per_group[h // g] += 1
    if len(set(per_group.values())) > 1:
        raise PlanError(
            f"layer {i}: kept query heads per KV head are {sorted(per_group.items())} (kv head: count); every kept "
            f"KV head must keep the same number of query heads (remove heads evenly within groups, or whole groups)"
        )


def _layer_params(s: LayerShape, costs: ParamCosts) -> int:
    return s.heads * costs.head + s.kv_heads * costs.kv_head + s.channels * costs.channel + costs.layer_fixed


def _shape_params(shape: ModelShape, costs: ParamCosts) -> int:
    """Non-embedding parameters of a model of this shape."""
    return sum(_layer_params(s, costs) for s in shape.layers) + costs.outside_layers


# ----------------------------------------------------------------------------------------------------------------
# The planner
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class _Granule:
    """The smallest legal head removal in one layer: one query head per group, or one whole KV group."""

    layer: int
    order: int  # granules of a layer are taken in this order
    score: float
    heads: list[int]
    kv_heads: list[int]


def make_plan(
    scores: Scores, config: PruningConfig, costs: ParamCosts, budget: Budget | None = None, warn: bool = True
) -> Plan:
    """Choose the units to remove: ratios per granularity, or a budget to fit (see PruningConfig).

    A parameter target is turned into its budget here; memory and latency budgets come from the caller
    (fastprune.budget, fastprune.latency), which knows the dtype and the machine.
    """
    scores.check()
    if config.ranking == "loss_weighted" and "layer_weights" not in scores.info:
        raise PlanError(
            "ranking='loss_weighted' plans scores weighted by measured layer sensitivity "
            "(fastprune.allocation.weigh_layers, which fastprune.prune applies); these scores are not weighted"
        )
    planner = _Planner(scores, config)
    if budget is None and config.target_params is not None:
        budget = params_budget(scores.shape, costs, config.target_params)
    if budget is not None:
        plan = _plan_for_budget(planner, budget, warn)
        plan.info["budget"] = {**budget.to_dict(), "predicted": budget.of(plan.result_shape())}
    elif config.has_target:
        raise PlanError(f"{config.target_name} needs a budget measured on the model; plan it through fastprune.prune")
    else:
        plan = planner.plan(config.head_ratio, config.channel_ratio, config.layer_ratio)
    total = _shape_params(scores.shape, costs)
    removed = plan.removed_params(costs)
    plan.info.update(
        {
            "criterion": scores.criterion,
            "config": config.to_dict(),
            "removed_params": removed,
            "removed_fraction": removed / total,
            "counts": plan.counts(),
        }
    )
    if config.ranking == "loss_weighted":
        plan.info["layer_weights"] = scores.info["layer_weights"]
    return plan


def check_feasible(shape: ModelShape, config: PruningConfig, costs: ParamCosts, budget: Budget | None = None) -> None:
    """Raise the PlanError that planning would raise for any scores (illegal GQA ratio, protections, targets),
    so a bad request fails before minutes of scoring."""
    kinds = ("heads", "kv_heads", "channels")
    flat = {k: [torch.ones(getattr(s, k), dtype=torch.float64) for s in shape.layers] for k in kinds}
    layers = torch.ones(shape.num_layers, dtype=torch.float64)
    info = {"layer_weights": [1.0] * shape.num_layers}  # (flat scores stand for weighted ones too)
    make_plan(Scores(config.criterion, shape, **flat, layers=layers, info=info), config, costs, budget, warn=False)


class _Planner:
    """Ranks units once (per-layer head granules, channel orders) and answers plans for any ratios."""

    def __init__(self, scores: Scores, config: PruningConfig):
        self.scores, self.config, self.shape = scores, config, scores.shape
        self.protected = _protected_layers(self.shape.num_layers, config)
        self._granules: dict[int, list[_Granule]] = {}
        self._channel_order: dict[int, torch.Tensor] = {}

    def plan(self, head_ratio: float, channel_ratio: float, layer_ratio: float) -> Plan:
        drop = self.choose_layers(layer_ratio) if layer_ratio else []
        candidates = [i for i in range(self.shape.num_layers) if i not in self.protected and i not in drop]
        cuts = {i: LayerCut() for i in candidates}
        if head_ratio:
            for g in self.choose_heads(head_ratio, candidates, drop):
                cuts[g.layer].heads += g.heads
                cuts[g.layer].kv_heads += g.kv_heads
        if channel_ratio:
            for i, removed in self.choose_channels(channel_ratio, candidates, drop).items():
                cuts[i].channels = removed
        return Plan(self.shape, {i: LayerCut(c.heads, c.kv_heads, c.channels) for i, c in cuts.items()}, drop)

    def _require(self, kind: str) -> None:
        if getattr(self.scores, kind) is None:
            raise PlanError(f"criterion {self.scores.criterion!r} gives no {kind.replace('_', ' ')} scores")

    # -- layers ----------------------------------------------------------------------------------------------
    def choose_layers(self, ratio: float) -> list[int]:
        self._require("layers")
        n_layers = self.shape.num_layers
        n = round(ratio * n_layers)
        free = [i for i in range(n_layers) if i not in self.protected]
        if n >= n_layers:
            raise PlanError(f"layer_ratio={ratio} would remove all {n_layers} layers")
        if n > len(free):
            raise PlanError(
                f"layer_ratio={ratio} asks for {n} layers but only {len(free)} are not protected "
                f"(protect_first/protect_last)"
            )
        order = sorted(free, key=lambda i: (float(self.scores.layers[i]), i))
        return sorted(order[:n])

    # -- heads -----------------------------------------------------------------------------------------------
    def granules(self, i: int) -> list[_Granule]:
        """Legal head removals of layer i in the order they would be taken, respecting min_heads."""
        if i not in self._granules:
            self._granules[i] = self._make_granules(i)
        return self._granules[i]

    def _make_granules(self, i: int) -> list[_Granule]:
        s, config = self.shape.layers[i], self.config
        g = s.group_size
        q = self.scores.heads[i].double().tolist()
        kv_scores = self.scores.kv_heads
        kv = kv_scores[i].double().tolist() if kv_scores is not None else [0.0] * s.kv_heads
        granules = []
        if config.gqa == "kv_groups" or g == 1:
            group_scores = [kv[k] + sum(q[k * g : (k + 1) * g]) for k in range(s.kv_heads)]
            order = sorted(range(s.kv_heads), key=lambda k: (group_scores[k], k))
            for j, k in enumerate(order):
                if (s.kv_heads - j - 1) * g < config.min_heads:
                    break
                granules.append(_Granule(i, j, group_scores[k], list(range(k * g, (k + 1) * g)), [k]))
        else:
            ranked = [sorted(range(k * g, (k + 1) * g), key=lambda h: (q[h], h)) for k in range(s.kv_heads)]
            for j in range(g - 1):
                if s.kv_heads * (g - j - 1) < config.min_heads:
                    break
                heads = [ranked[k][j] for k in range(s.kv_heads)]
                granules.append(_Granule(i, j, sum(q[h] for h in heads), heads, []))
        return granules

    def choose_heads(self, ratio: float, candidates: list[int], drop: list[int]) -> list[_Granule]:
        self._require("heads")
        if self.config.ranking == "per_layer":
            chosen = []
            for i in candidates:
                n_heads = self.shape.layers[i].heads
                size = _granule_size(self.shape.layers[i], self.config)
                granules = self.granules(i)
                k = _legal_count(ratio * n_heads, size, n_heads, f"head_ratio={ratio} in layer {i}", len(granules))
                chosen += granules[:k]
            return chosen
        total = sum(s.heads for i, s in enumerate(self.shape.layers) if i not in drop)
        # Granule scores never decrease within a layer, so the global order takes each layer's granules in order.
        pool = sorted((g for i in candidates for g in self.granules(i)), key=lambda g: (g.score, g.layer, g.order))
        sizes = {_granule_size(self.shape.layers[i], self.config) for i in candidates}
        if len(sizes) > 1:
            raise PlanError("global head ranking needs the same GQA layout in every layer; use ranking='per_layer'")
        size = sizes.pop() if sizes else 1
        return pool[: _legal_count(ratio * total, size, total, f"head_ratio={ratio}", len(pool))]

    # -- steps for a parameter target -------------------------------------------------------------------------
    def steps(self, i: int, kinds: set[str]) -> dict[str, list[_Step]]:
        """Layer i's removals in the order they would be taken: head granules, then channel blocks of round_to
        (the first block also trims the width to a multiple of round_to)."""
        out = {}
        if "heads" in kinds:
            self._require("heads")
            out["heads"] = [
                _Step(
                    g.score,
                    LayerShape(len(g.heads), len(g.kv_heads), 0),
                    "heads",
                    i,
                    {i: (g.heads, g.kv_heads)},
                )
                for g in self.granules(i)
            ]
        if "channels" in kinds:
            self._require("channels")
            ascending = self.channel_order(i).flip(0).tolist()
            values = self.scores.channels[i].double()
            width, block = len(ascending), self.config.round_to
            first = width % block or block
            bounds = [0, first] + list(range(first + block, width - block + 1, block))
            out["channels"] = [
                _Step(
                    float(values[ascending[a:b]].sum()),
                    LayerShape(0, 0, b - a),
                    "channels",
                    i,
                    {i: (ascending[a:b], [])},
                )
                for a, b in zip(bounds, bounds[1:], strict=False)
                if b <= width - min(block, width)
            ]
        return out

    # -- channels --------------------------------------------------------------------------------------------
    def channel_order(self, i: int) -> torch.Tensor:
        """Layer i's channels, most important first."""
        if i not in self._channel_order:
            self._channel_order[i] = torch.sort(self.scores.channels[i].double(), descending=True, stable=True).indices
        return self._channel_order[i]

    def choose_channels(self, ratio: float, candidates: list[int], drop: list[int]) -> dict[int, list[int]]:
        self._require("channels")
        widths = {i: self.shape.layers[i].channels for i in candidates}
        if self.config.ranking == "per_layer":
            keep = {i: widths[i] - round(ratio * widths[i]) for i in candidates}
        else:
            total = sum(s.channels for i, s in enumerate(self.shape.layers) if i not in drop)
            n_remove = round(ratio * total)
            removable = sum(widths.values()) - len(candidates)
            if n_remove > removable:
                raise PlanError(
                    f"channel_ratio={ratio} asks for {n_remove} channels but only {removable} can go from "
                    f"unprotected layers"
                )
            flat = torch.cat([self.scores.channels[i].double() for i in candidates])
            owner = torch.cat([torch.full((widths[i],), i) for i in candidates])
            lowest = torch.topk(flat, n_remove, largest=False, sorted=False).indices
            removed_per_layer = torch.bincount(owner[lowest], minlength=self.shape.num_layers)
            keep = {i: widths[i] - int(removed_per_layer[i]) for i in candidates}
        keep = _round_widths(keep, widths, self.config.round_to)
        return {i: sorted(self.channel_order(i)[k:].tolist()) for i, k in keep.items()}


def rechoose_layer(plan: Plan, i: int, scores: Scores, config: PruningConfig) -> LayerCut:
    """Layer i's cut with as many head granules and channels as ``plan`` removes there, chosen by ``scores``
    instead (scores made after planning, e.g. on the activations of a model whose earlier layers are already cut),
    so the widths, and with them the parameter count and the config, stay as planned."""
    cut, planner = plan.cut(i), _Planner(scores, config)
    heads, kv_heads, channels = [], [], []
    if cut.heads:
        size = _granule_size(plan.shape.layers[i], config)
        granules = planner.granules(i)[: len(cut.heads) // size]
        if sum(len(g.heads) for g in granules) != len(cut.heads) or len(cut.kv_heads) != sum(
            len(g.kv_heads) for g in granules
        ):
            raise PlanError(f"layer {i}: the plan's head cut is not a whole number of {config.gqa} removals")
        for g in granules:
            heads += g.heads
            kv_heads += g.kv_heads
    if cut.channels:
        width = plan.shape.layers[i].channels
        channels = planner.channel_order(i)[width - len(cut.channels) :].tolist()
    return LayerCut(heads, kv_heads, channels)


def _protected_layers(n: int, config: PruningConfig) -> set[int]:
    if config.protect_first + config.protect_last >= n:
        raise PlanError(
            f"protect_first={config.protect_first} and protect_last={config.protect_last} protect every one of the "
            f"{n} layers: nothing can be pruned"
        )
    return set(range(config.protect_first)) | set(range(n - config.protect_last, n))


def _granule_size(s: LayerShape, config: PruningConfig) -> int:
    return s.group_size if config.gqa == "kv_groups" or s.group_size == 1 else s.kv_heads


def _legal_count(want: float, size: int, total: int, what: str, available: int) -> int:
    """How many granules of ``size`` heads remove ``want`` heads; refuse when the GQA layout cannot."""
    exact = want / size
    k = round(exact)
    if abs(exact - k) > 0.005:  # tolerate ratios typed to a few digits, e.g. 0.333 for 1/3
        lo, hi = int(exact) * size, (int(exact) + 1) * size
        raise PlanError(
            f"{what} asks for {want:g} of {total} heads, which the GQA layout cannot remove (heads go "
            f"{size} at a time); nearest legal ratios: {lo / total:.4f} ({lo} heads) or {hi / total:.4f} "
            f"({hi} heads)"
        )
    if k > available:
        raise PlanError(
            f"{what} asks for {k * size} heads but only {available * size} can go while keeping min_heads and "
            f"at least one query head per kept KV head in every unprotected layer"
        )
    return k


def _round_widths(keep: dict[int, int], widths: dict[int, int], multiple: int) -> dict[int, int]:
    """Round kept widths to multiples of ``multiple`` (never 0, never above the width), keeping the total close."""
    if multiple <= 1:
        return {i: max(1, k) for i, k in keep.items()}

    def legal(i: int, k: int) -> int:
        return widths[i] if k >= widths[i] else max(multiple, k)

    rounded = {i: legal(i, multiple * round(k / multiple)) for i, k in keep.items()}
    target = sum(keep.values())
    # Largest-remainder correction: move whole multiples where rounding strayed furthest.
    for _ in range(len(keep) + 1):
        excess = sum(rounded.values()) - target
        if abs(excess) <= multiple / 2:
            break
        step = -multiple if excess > 0 else multiple
        options = [i for i in rounded if legal(i, rounded[i] + step) == rounded[i] + step]
        if not options:
            break
        pick = max(options, key=lambda i: (rounded[i] - keep[i]) * (1 if step < 0 else -1))
        rounded[pick] += step
    return rounded


@dataclass
class _Step:
    """One removal the budget planner may take: its summed score, what it removes, and from which layers."""

    score: float
    removed: LayerShape  # query heads, KV heads and channels it removes in total
    kind: str  # "heads" or "channels"
    layer: int  # -1 for a uniform step that cuts every candidate layer alike
    units: dict[int, tuple[list[int], list[int]]]  # layer -> (heads or channels, kv heads)

    def cost(self, budget: Budget) -> float:
        return budget.layer_cost(self.removed) - budget.layer


def _plan_for_budget(planner: _Planner, budget: Budget, warn: bool = True) -> Plan:
    """Remove the units with the lowest score per unit of cost until the model fits the budget."""
    config, shape = planner.config, planner.shape
    kinds = set(config.granularities)
    current = budget.of(shape)
    if kinds == {"layers"}:
        return _layers_for_budget(planner, budget, current)
    if "layers" in kinds:
        raise PlanError(
            "a target mixes whole layers with heads/channels only through comparable scores; give "
            "granularities heads,channels (width) or layers (depth), or use explicit ratios"
        )
    if warn and len(kinds) > 1 and planner.scores.criterion not in COMPARABLE_CRITERIA:
        logger.warning(
            "the target mixes %s by score per cost, but %s scores are not comparable across unit kinds; "
            "consider taylor, fisher, sensitivity or obs, or explicit ratios",
            " and ".join(sorted(kinds)),
            planner.scores.criterion,
        )
    candidates = [i for i in range(shape.num_layers) if i not in planner.protected]
    per_layer = {i: planner.steps(i, kinds) for i in candidates}
    if config.ranking == "per_layer":
        sequences = _uniform_steps(per_layer, candidates)
    else:
        sequences = [seq for i in candidates for seq in per_layer[i].values()]
    # Each sequence must be taken in order; scores per cost never decrease along one (equal costs, growing
    # scores), so a merged sort by score per cost respects every sequence.
    pool = sorted(
        (
            (step.score / max(step.cost(budget), 1e-30), n, k, step)
            for n, seq in enumerate(sequences)
            for k, step in enumerate(seq)
        ),
        key=lambda t: t[:3],
    )
    taken, left = _fill(pool, budget, current)
    if left > budget.limit:
        raise PlanError(
            f"the {budget.metric} budget {budget.limit:.6g} cannot be met: pruning {'+'.join(sorted(kinds))} under "
            f"the protections and minimum widths gets down to {left:.6g} at best"
        )
    # The step that meets the budget may overshoot it by a whole step (a uniform head step takes a head group from
    # every layer: 6% of SmolLM2). Two ways out, the one that removes less score wins: keep that step and give
    # back the earlier steps it made unnecessary, or leave it (and the rest of its sequence) and go on.
    options = [_give_back(taken, budget, left)]
    if taken:
        n, k, _ = taken[-1]
        other, other_left = _fill(pool, budget, current, skip_from=(n, k))
        if other_left <= budget.limit:
            options.append(_give_back(other, budget, other_left))
    cuts = {i: LayerCut() for i in candidates}
    for _, _, step in min(options, key=lambda steps: sum(step.score for _, _, step in steps)):
        for i, (units, kv) in step.units.items():
            if step.kind == "heads":
                cuts[i].heads += units
                cuts[i].kv_heads += kv
            else:
                cuts[i].channels += units
    return Plan(shape, {i: LayerCut(c.heads, c.kv_heads, c.channels) for i, c in cuts.items()})


_Taken = list[tuple[int, int, _Step]]  # (sequence, position in it, step), in the order taken


def _fill(pool: list, budget: Budget, current: float, skip_from: tuple[int, int] | None = None) -> tuple[_Taken, float]:
    """Steps from the pool (lowest score per cost first) until the budget is met, and the cost left after them;
    ``skip_from=(n, k)`` leaves out sequence n from its step k on."""
    taken = []
    for _, n, k, step in pool:
        if current <= budget.limit:
            break
        if skip_from is not None and n == skip_from[0] and k >= skip_from[1]:
            continue
        taken.append((n, k, step))
        current -= step.cost(budget)
    return taken, current


def _give_back(taken: _Taken, budget: Budget, left: float) -> _Taken:
    """``taken`` less the steps the budget can spare, highest score per cost first, each from the end of its
    sequence (a sequence's steps stay a prefix of it)."""
    ends = {n: k for n, k, _ in taken}  # a sequence's steps are taken in order: its last one is its end
    returned = set()
    for n, k, step in reversed(taken):
        if k == ends[n] and left + step.cost(budget) <= budget.limit:
            returned.add((n, k))
            ends[n] = k - 1
            left += step.cost(budget)
    return [t for t in taken if t[:2] not in returned]


def _uniform_steps(per_layer: dict[int, dict[str, list[_Step]]], candidates: list[int]) -> list[list[_Step]]:
    """Steps that cut every candidate layer alike (so all layers keep equal widths): step k of a kind takes
    step k of that kind in each layer."""
    sequences = []
    for kind in ("heads", "channels"):
        layer_seqs = [per_layer[i].get(kind, []) for i in candidates]
        if not all(layer_seqs):
            continue
        if len({tuple(s.removed for s in seq) for seq in layer_seqs}) > 1:
            raise PlanError("ranking='per_layer' needs the same widths in every unprotected layer; use 'global'")
        uniform = []
        for k in range(min(len(seq) for seq in layer_seqs)):
            group = [seq[k] for seq in layer_seqs]
            total = LayerShape(*(sum(getattr(s.removed, f) for s in group) for f in ("heads", "kv_heads", "channels")))
            units = {step.layer: step.units[step.layer] for step in group}
            uniform.append(_Step(sum(s.score for s in group), total, kind, -1, units))
        sequences.append(uniform)
    return sequences


def _layers_for_budget(planner: _Planner, budget: Budget, current: float) -> Plan:
    planner._require("layers")
    shape = planner.shape
    free = sorted(
        (i for i in range(shape.num_layers) if i not in planner.protected),
        key=lambda i: (float(planner.scores.layers[i]), i),
    )
    drop = []
    for i in free[: shape.num_layers - 1]:
        if current <= budget.limit:
            break
        drop.append(i)
        current -= budget.layer_cost(shape.layers[i])
    if current > budget.limit:
        raise PlanError(
            f"the {budget.metric} budget {budget.limit:.6g} cannot be met by dropping unprotected layers "
            f"(down to {current:.6g} at best)"
        )
    return Plan(shape, drop_layers=drop)


def write_plan_file(d: dict, path: str | Path) -> None:
    """Write a plan's dict as JSON, atomically."""
    from fastprune.io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(d, indent=1) + "\n")


def read_plan_file(path: str | Path) -> dict:
    """A plan file's JSON, with a PlanError naming the file when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PlanError(f"plan file {path} is not valid JSON: {exc}") from exc
