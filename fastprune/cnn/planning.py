"""CNN plans (which units of which group go, as reviewable JSON) and the planner that makes them.

A plan names units by their index within their group (the group's units in the order its first layer produces
them) and records every group's name and size, so it is refused on a model of another structure. Targets in
parameters or multiply-accumulates are met exactly: the planner searches the fraction to remove (per layer or
global, with the same ranking, protections and rounding as a ratio), measuring each candidate with the exact
cost model, since a CNN's cost is bilinear in its widths (fastprune.cnn.costs).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastprune.cnn.config import CnnPruningConfig
from fastprune.cnn.costs import CostModel
from fastprune.cnn.criteria import COMPARABLE
from fastprune.cnn.graph import ChannelGraph, Group
from fastprune.errors import PlanError
from fastprune.planning import read_plan_file, write_plan_file

CNN_PLAN_FORMAT = 1


@dataclass
class CnnPlan:
    """Units removed per group (indices within the group), for a model whose groups are ``groups``."""

    groups: dict[str, int]  # group name -> number of units, in graph order
    removed: dict[str, list[int]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.removed = {g: sorted(int(i) for i in idx) for g, idx in self.removed.items() if idx}
        for name, idx in self.removed.items():
            if name not in self.groups:
                raise PlanError(f"the plan cuts group {name!r}, which the model does not have")
            size = self.groups[name]
            if len(set(idx)) != len(idx):
                raise PlanError(f"group {name!r}: the plan lists a unit twice")
            if idx and not 0 <= idx[0] <= idx[-1] < size:
                raise PlanError(f"group {name!r}: unit index out of range 0..{size - 1}")
            if len(idx) >= size:
                raise PlanError(
                    f"the plan removes every one of the {size} filters of group {name!r}; keep at least one"
                )

    def counts(self) -> dict[str, int]:
        return {"groups_cut": len(self.removed), "units_removed": sum(len(v) for v in self.removed.values())}

    def check_fits(self, graph: ChannelGraph) -> None:
        """Refuse a plan made for another structure, or one that removes frozen units."""
        mine = {g.name: len(g.units) for g in graph.groups}
        if mine != self.groups:
            differ = sorted(set(mine.items()) ^ set(self.groups.items()))[:3]
            raise PlanError(f"the plan was made for a model with other channel groups (differences: {differ})")
        by_name = {g.name: g for g in graph.groups}
        for name, idx in self.removed.items():
            frozen = [i for i in idx if graph.frozen[by_name[name].units[i]]]
            if frozen:
                raise PlanError(
                    f"group {name!r}: units {frozen[:5]} cannot be removed (an operation reads them that "
                    f"fastprune does not understand, or they are the model's inputs or outputs)"
                )

    def keep_mask(self, graph: ChannelGraph) -> torch.Tensor:
        """True for every unit of ``graph`` the plan keeps."""
        self.check_fits(graph)
        keep = torch.ones(graph.num_units, dtype=torch.bool)
        by_name = {g.name: g for g in graph.groups}
        for name, idx in self.removed.items():
            units = by_name[name].units
            keep[[units[i] for i in idx]] = False
        return keep

    def to_dict(self) -> dict:
        return {
            "fastprune_cnn_plan": CNN_PLAN_FORMAT,
            "groups": self.groups,
            "removed": self.removed,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict) -> CnnPlan:
        if d.get("fastprune_cnn_plan") != CNN_PLAN_FORMAT:
            raise PlanError(f"not a fastprune CNN plan (format {CNN_PLAN_FORMAT}): missing 'fastprune_cnn_plan' key")
        try:
            return cls({str(k): int(v) for k, v in d["groups"].items()}, d.get("removed", {}), d.get("info", {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"malformed CNN plan: {exc}") from exc

    def save(self, path: str | Path) -> None:
        write_plan_file(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> CnnPlan:
        return cls.from_dict(read_plan_file(path))


class CnnPlanner:
    """Ranks each group's units once and answers plans for any fraction."""

    def __init__(self, graph: ChannelGraph, scores: torch.Tensor, config: CnnPruningConfig, costs: CostModel):
        if scores.shape != (graph.num_units,):
            raise PlanError(f"{tuple(scores.shape)} scores for a model with {graph.num_units} units")
        self.graph, self.config, self.costs = graph, config, costs
        self.groups = graph.groups
        protected = _protected(graph.groups, config)
        # Per group: its removable units, least important first.
        self.order: list[list[int]] = []
        for gi, g in enumerate(self.groups):
            free = [u for u in g.units if not graph.frozen[u] and not math.isnan(float(scores[u]))]
            self.order.append([] if gi in protected else sorted(free, key=lambda u: (float(scores[u]), u)))
        self.scores = scores
        self.criterion = config.criterion

    def counts_for(self, fraction: float, strict: bool) -> list[int]:
        """Units to remove from each group for ``fraction``; ``strict`` refuses a group that would lose all."""
        if self.config.ranking == "per_layer":
            counts = []
            for g, order in zip(self.groups, self.order, strict=True):
                if not order:
                    counts.append(0)
                    continue
                size = len(g.units)
                remove = round(fraction * size)
                if remove >= size and strict:
                    raise PlanError(
                        f"removing {fraction:g} of the {size} filters of group {g.name!r} removes all of them; "
                        f"use a smaller ratio"
                    )
                counts.append(min(size - self._round(size - remove, size), len(order)))
            return counts
        return self._global_counts(fraction)

    def _round(self, keep: int, size: int) -> int:
        """Kept width rounded to a multiple of round_to (at least one multiple, at most the full width)."""
        r = self.config.round_to
        if size <= r:
            return max(1, keep)
        return min(size, max(r, r * round(keep / r)))

    def _global_key(self) -> torch.Tensor:
        if not hasattr(self, "_key"):
            key = self.scores.clone()
            if self.criterion not in COMPARABLE:
                for order in self.order:
                    if order:
                        idx = torch.tensor(order)
                        key[idx] = key[idx] / key[idx].mean().clamp_min(1e-30)
            metric = "macs" if self.config.target_flops is not None else "params"
            self._key = key / self.costs.unit_costs(metric).clamp_min(1e-30) if self.config.target_name else key
        return self._key

    def _global_counts(self, fraction: float) -> list[int]:
        key = self._global_key()
        pool = [(float(key[u]), gi, k) for gi, order in enumerate(self.order) for k, u in enumerate(order)]
        pool.sort()
        total = sum(len(g.units) for g, o in zip(self.groups, self.order, strict=True) if o)
        n = round(fraction * total)
        counts = [0] * len(self.groups)
        for _, gi, _ in pool[:n]:
            counts[gi] += 1
        return [
            min(len(g.units) - self._round(len(g.units) - c, len(g.units)), len(o)) if c else 0
            for g, o, c in zip(self.groups, self.order, counts, strict=True)
        ]

    def keep_for(self, counts: list[int]) -> torch.Tensor:
        keep = torch.ones(self.graph.num_units, dtype=torch.bool)
        for order, c in zip(self.order, counts, strict=True):
            keep[order[:c]] = False
        return keep

    def plan(self, counts: list[int]) -> CnnPlan:
        removed = {}
        for g, order, c in zip(self.groups, self.order, counts, strict=True):
            position = {u: i for i, u in enumerate(g.units)}
            removed[g.name] = [position[u] for u in order[:c]]
        return CnnPlan({g.name: len(g.units) for g in self.groups}, removed)

    def for_limit(self, metric: str, limit: float) -> list[int]:
        """Counts of the smallest fraction whose model measures at most ``limit`` (bisection: the measure does not
        grow with the fraction)."""

        def measure(counts: list[int]) -> int:
            return self.costs.measure(metric, self.keep_for(counts))

        lo, hi = 0.0, 0.999
        best = self.counts_for(hi, strict=False)
        if measure(best) > limit:
            raise PlanError(
                f"the {metric} target {limit:.6g} cannot be met: removing every removable unit (under the "
                f"protections and round_to={self.config.round_to}) gets down to {measure(best):.6g}"
            )
        for _ in range(30):
            mid = (lo + hi) / 2
            counts = self.counts_for(mid, strict=False)
            if measure(counts) <= limit:
                hi, best = mid, counts
            else:
                lo = mid
        return best


def _protected(groups: list[Group], config: CnnPruningConfig) -> set[int]:
    n = len(groups)
    if config.protect_first + config.protect_last >= n:
        raise PlanError(
            f"protect_first={config.protect_first} and protect_last={config.protect_last} protect all {n} channel "
            f"groups: nothing can be pruned"
        )
    out = set(range(config.protect_first)) | set(range(n - config.protect_last, n))
    for i, g in enumerate(groups):
        if any(fnmatch.fnmatchcase(m, p) for m in g.modules for p in config.protect):
            out.add(i)
    return out


def target_limit(config: CnnPruningConfig, metric: str, full: int) -> float:
    """The measure a params / flops target allows: a fraction removed below 1, a count kept from 1."""
    target = config.target_params if metric == "params" else config.target_flops
    limit = full * (1 - target) if target < 1 else float(target)
    if limit >= full:
        raise PlanError(f"the target keeps {limit:.0f} {metric}; the model has only {full}")
    return limit


def make_cnn_plan(
    graph: ChannelGraph, scores: torch.Tensor, config: CnnPruningConfig, costs: CostModel, limit: float | None = None
) -> CnnPlan:
    """Choose the units to remove: ``config.filter_ratio``, a params / flops target, or a MAC ``limit`` given by
    the caller (a latency target turned into multiply-accumulates)."""
    planner = CnnPlanner(graph, scores, config, costs)
    full = torch.ones(graph.num_units, dtype=torch.bool)
    if limit is not None:
        counts, metric = planner.for_limit("macs", limit), "macs"
    elif config.target_params is not None or config.target_flops is not None:
        metric = "params" if config.target_params is not None else "macs"
        counts = planner.for_limit(metric, target_limit(config, metric, costs.measure(metric, full)))
    else:
        counts, metric = planner.counts_for(config.filter_ratio, strict=True), None
    plan = planner.plan(counts)
    keep = planner.keep_for(counts)
    plan.info = {
        "criterion": config.criterion,
        "config": config.to_dict(),
        "params": [costs.params(full), costs.params(keep)],
        "macs": [costs.macs(full), costs.macs(keep)],
        "removed_params_fraction": 1 - costs.params(keep) / costs.params(full),
        "removed_macs_fraction": 1 - costs.macs(keep) / costs.macs(full),
        "counts": plan.counts(),
        "target_metric": metric,
    }
    return plan
