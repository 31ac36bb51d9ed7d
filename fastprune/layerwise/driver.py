"""The layer-at-a-time driver: push the calibration activations through one decoder layer at a time.

Two passes, each over the layers in order, serve both holders of a model (all of it in memory, or one layer at a
time from its safetensors files, fastprune.layerwise.stream):

- ``score_layers`` (the scoring pass): per layer, collect what the layer-local criteria need, score the layer,
  and pass the layer's output on. The Scores it returns are the ones a full-model pass gives, so planning (global
  ranking, layer removal, parameter targets) works as for a model held in memory.
- ``cut_layers`` (the cutting pass): per layer, collect the refit's Gram matrices, refit and cut it as the plan
  says. With ``config.sequential`` the next layer is fed the output of the cut layer, so its statistics come from
  the model whose earlier layers are already pruned and refit; for criteria that depend on a layer's inputs the
  units of each layer are then chosen again from those statistics (same widths as planned).

Batches are this process's share; statistics are all-reduced in ``stats.collect``, so every process scores and
plans the same. With a ``Progress`` directory a pass that is interrupted restarts from its last finished layer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from fastprune.adapters.base import Adapter
from fastprune.config import DEFAULT_DAMPING, PruningConfig
from fastprune.distributed import barrier, current
from fastprune.errors import ConfigError
from fastprune.io import atomic_write_text
from fastprune.layerwise.calls import LayerCall, run_layer
from fastprune.layerwise.stats import (
    LAYER_LOCAL_CRITERIA,
    WEIGHT_ONLY_CRITERIA,
    LayerStats,
    Needs,
    collect,
    layer_scores,
)
from fastprune.planning import LayerCut, Plan, rechoose_layer
from fastprune.reconstruction import InputGrams, reconstruct
from fastprune.scoring import needed_kinds
from fastprune.scoring.scores import Scores
from fastprune.surgery import cut_attention, cut_mlp

logger = logging.getLogger("fastprune")


class Holder(Protocol):
    """Where the layers live: ``load`` makes layer i's weights real, ``unload`` / ``keep`` end its turn (``keep``
    after it was cut: the streaming holder writes it out), ``finish`` drops layers and writes the config."""

    adapter: Adapter

    def calls(self, batches: list[torch.Tensor], indices: list[int]) -> list[LayerCall]: ...

    def load(self, i: int) -> None: ...

    def unload(self, i: int) -> None: ...

    def keep(self, i: int, new_index: int) -> None: ...

    def finish(self, plan: Plan) -> None: ...


class MemoryHolder:
    """A model held entirely in memory: nothing to load or write."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def calls(self, batches, indices):
        from fastprune.layerwise.calls import capture_calls

        return capture_calls(self.adapter, batches, indices)

    def load(self, i: int) -> None:
        pass

    def unload(self, i: int) -> None:
        pass

    def keep(self, i: int, new_index: int) -> None:
        pass

    def finish(self, plan: Plan) -> None:
        if plan.drop_layers:
            self.adapter.set_layers(plan.kept_layers())
        self.adapter.write_config()


def scoring_criteria(config: PruningConfig) -> tuple[str, str | None]:
    """(criterion for the units the config prunes, criterion for whole layers or None), as
    fastprune.scoring.score_for_config chooses them; refuse criteria that need the whole model's loss."""
    kinds = needed_kinds(config)
    if kinds == {"layers"}:
        main, layers = config.layer_criterion, None
    else:
        main = config.criterion
        layers = config.layer_criterion if "layers" in kinds and config.layer_criterion != main else None
    for criterion in (main, layers):
        if criterion is not None and criterion not in LAYER_LOCAL_CRITERIA:
            raise ConfigError(
                f"criterion {criterion!r} needs gradients or losses of the whole model, which a model held one layer "
                f"at a time (or split over processes) does not have; use one of {', '.join(LAYER_LOCAL_CRITERIA)} "
                f"(taylor_local and fisher_local are the layer-local Taylor and Fisher)"
            )
    return main, layers


class Progress:
    """A pass's position saved after every layer (activations per process, per-layer results), for resuming."""

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory is not None else None

    def _state(self) -> Path:
        return self.directory / "progress.json"

    def _activations(self, name: str, layer: int, rank: int) -> Path:
        return self.directory / f"activations-{name}-layer{layer:05d}-rank{rank:03d}.pt"

    def load(self, name: str) -> tuple[int, list[torch.Tensor] | None, dict]:
        """(next layer, this rank's activations entering it, the pass's saved results); (0, None, {}) if none."""
        if self.directory is None or not self._state().is_file():
            return 0, None, {}
        state = json.loads(self._state().read_text())
        if state.get("pass") != name:
            return 0, None, {}
        layer = state["next_layer"]
        hidden = torch.load(self._activations(name, layer, current().rank), weights_only=True)
        extra = torch.load(self.directory / f"results-{name}.pt", weights_only=True)
        logger.info("resuming the %s pass at layer %d", name, layer)
        return layer, hidden, extra

    def save(self, name: str, next_layer: int, calls: list[LayerCall], extra: dict) -> None:
        """Record that layers before ``next_layer`` are done (every rank's activations first, then the state)."""
        if self.directory is None:
            return
        ranks = current()
        path = self._activations(name, next_layer, ranks.rank)
        tmp = path.with_suffix(".tmp")
        torch.save([c.hidden for c in calls], tmp)
        tmp.replace(path)
        barrier()
        if ranks.is_main:
            results = self.directory / f"results-{name}.pt"
            torch.save(extra, results.with_suffix(".tmp"))
            results.with_suffix(".tmp").replace(results)
            atomic_write_text(self._state(), json.dumps({"pass": name, "next_layer": next_layer}) + "\n")
        barrier()
        previous = self._activations(name, next_layer - 1, ranks.rank)
        previous.unlink(missing_ok=True)


class Timings:
    """Seconds per layer and phase (load, collect, score, refit, cut, write), for reports and projections."""

    def __init__(self):
        self.rows: list[dict] = []

    def start(self, name: str, layer: int) -> dict:
        row = {"pass": name, "layer": layer}
        self.rows.append(row)
        return row

    @contextmanager
    def phase(self, row: dict, phase: str):
        t0 = time.perf_counter()
        yield
        row[phase] = row.get(phase, 0.0) + time.perf_counter() - t0


def score_layers(
    holder: Holder,
    calls: list[LayerCall],
    main: str,
    layer_criterion: str | None = None,
    seed: int = 0,
    damping: float = DEFAULT_DAMPING,
    progress: Progress | None = None,
    timings: Timings | None = None,
) -> Scores:
    """The scoring pass: Scores by ``main`` (with layer scores by ``layer_criterion`` when given), computed one
    layer at a time (``scoring_criteria`` picks the two for a config)."""
    adapter = holder.adapter
    criteria = [main] + ([layer_criterion] if layer_criterion else [])
    needs = Needs.for_criteria(criteria)
    shape = adapter.shape()
    progress, timings = progress or Progress(None), timings or Timings()
    start, hidden, rows = progress.load("score")
    rows = rows.get("rows", [])
    if hidden is not None:
        calls = [c.next(h) for c, h in zip(calls, hidden, strict=True)]
    for i in tqdm(range(start, shape.num_layers), desc="scoring layers", unit="layer", disable=None, leave=False):
        row = timings.start("score", i)
        with timings.phase(row, "load"):
            holder.load(i)
        with timings.phase(row, "collect"):
            stats, outputs = collect(adapter, i, calls, needs, seed)
        with timings.phase(row, "score"):
            rows.append({c: layer_scores(c, adapter, i, stats, damping) for c in criteria})
        del stats
        holder.unload(i)
        calls = [c.next(o) for c, o in zip(calls, outputs, strict=True)]
        progress.save("score", i + 1, calls, {"rows": rows})
    scores = _assemble(main, shape, [r[main] for r in rows], adapter, damping)
    if layer_criterion is not None:
        scores = scores.with_layers_from(
            _assemble(layer_criterion, shape, [r[layer_criterion] for r in rows], adapter, damping)
        )
    return scores


def _assemble(criterion: str, shape, rows: list[dict], adapter: Adapter, damping: float) -> Scores:
    per_kind = {
        kind: [r[kind] for r in rows] if all(kind in r for r in rows) else None
        for kind in ("heads", "kv_heads", "channels")
    }
    layers = torch.stack([r["layers"] for r in rows]) if all("layers" in r for r in rows) else None
    info = {"damping": damping} if criterion == "obs" else {}
    info["param_costs"] = dataclasses.asdict(adapter.param_costs())
    return Scores(criterion, shape, **per_kind, layers=layers, info=info)


def cut_layers(
    holder: Holder,
    calls: list[LayerCall],
    plan: Plan,
    scores: Scores | None,
    config: PruningConfig,
    progress: Progress | None = None,
    timings: Timings | None = None,
) -> Plan:
    """The cutting pass: refit (``config.reconstruct``) and cut every layer as ``plan`` says, then drop its layers.

    Returns the plan that was applied: ``plan`` itself, or with ``config.sequential`` and ``scores`` from an
    input-dependent layer-local criterion, the units re-chosen per layer on the sequential activations.
    """
    adapter = holder.adapter
    progress, timings = progress or Progress(None), timings or Timings()
    reselect = (
        config.sequential
        and scores is not None
        and scores.criterion in LAYER_LOCAL_CRITERIA
        and scores.criterion not in WEIGHT_ONLY_CRITERIA
    )
    start, hidden, extra = progress.load("cut")
    cuts = {int(i): LayerCut(**c) for i, c in extra.get("cuts", {}).items()}
    for i, cut in cuts.items():  # layers a resumed pass finished: give their (unloaded) modules the cut widths
        _cut_widths(adapter, Plan(plan.shape, {i: cut}), i)
    if hidden is not None:
        calls = [c.next(h) for c, h in zip(calls, hidden, strict=True)]
    dropped = set(plan.drop_layers)
    new_index = {old: new for new, old in enumerate(plan.kept_layers())}
    for i in tqdm(range(start, plan.shape.num_layers), desc="cutting layers", unit="layer", disable=None, leave=False):
        row = timings.start("cut", i)
        if i in dropped:
            if not config.sequential:  # the next layer sees the dense model's activations
                with timings.phase(row, "load"):
                    holder.load(i)
                with timings.phase(row, "collect"):
                    outputs = run_layer(adapter.layers[i], calls)
                holder.unload(i)
            else:  # the pruned model skips the layer
                outputs = [c.hidden for c in calls]
        else:
            with timings.phase(row, "load"):
                holder.load(i)
            cut = plan.cut(i)
            needs = Needs(
                head_grams=config.reconstruct and bool(cut.heads),
                channel_grams=config.reconstruct and bool(cut.channels),
            )
            if reselect and not cut.is_empty():
                needs = needs | Needs.for_criteria([scores.criterion])
            with timings.phase(row, "collect"):
                if needs.any():
                    stats, outputs = collect(adapter, i, calls, needs, config.seed)
                else:
                    stats, outputs = None, run_layer(adapter.layers[i], calls)
            if reselect and not cut.is_empty():
                with timings.phase(row, "score"):
                    fresh = layer_scores(scores.criterion, adapter, i, stats, config.damping)
                    cut = rechoose_layer(plan, i, _with_layer(scores, i, fresh), config)
            if not cut.is_empty():
                _refit_and_cut(adapter, plan.shape, i, cut, stats, config, timings, row)
                if config.sequential:
                    with timings.phase(row, "collect"):
                        outputs = run_layer(adapter.layers[i], calls)
            del stats
            cuts[i] = cut
            with timings.phase(row, "write"):
                holder.keep(i, new_index[i])
        calls = [c.next(o) for c, o in zip(calls, outputs, strict=True)]
        progress.save("cut", i + 1, calls, {"cuts": {i: dataclasses.asdict(c) for i, c in cuts.items()}})
    applied = Plan(plan.shape, cuts, plan.drop_layers, dict(plan.info))
    applied.info["reconstructed"] = config.reconstruct
    if config.sequential:
        applied.info["sequential"] = {"units_rechosen": reselect}
    holder.finish(applied)
    return applied


def _refit_and_cut(adapter, shape, i: int, cut: LayerCut, stats: LayerStats | None, config, timings, row) -> None:
    one = Plan(shape, {i: cut})
    if config.reconstruct:
        with timings.phase(row, "refit"):
            heads = {i: stats.head_gram} if cut.heads else {}
            channels = {i: stats.channel_gram} if cut.channels else {}
            reconstruct(adapter, one, InputGrams(heads, channels), config.damping)
    with timings.phase(row, "cut"):
        _cut_widths(adapter, one, i)


def _cut_widths(adapter: Adapter, plan: Plan, i: int) -> None:
    """Slice layer i as ``plan`` says (on the meta device this only changes the shapes)."""
    cut = plan.cut(i)
    heads, kv_heads, channels = plan.kept(i)
    if cut.heads or cut.kv_heads:
        cut_attention(adapter, i, heads, kv_heads)
    if cut.channels:
        cut_mlp(adapter, i, channels)


def _with_layer(scores: Scores, i: int, fresh: dict) -> Scores:
    """``scores`` with layer i's unit scores replaced by ``fresh``."""
    per_kind = {}
    for kind in ("heads", "kv_heads", "channels"):
        values = getattr(scores, kind)
        if values is not None and kind in fresh:
            values = list(values)
            values[i] = fresh[kind]
        per_kind[kind] = values
    return Scores(scores.criterion, scores.shape, **per_kind, layers=scores.layers, info=scores.info)
