"""Where to cut: per-layer amounts that follow each layer's measured sensitivity (``ranking="loss_weighted"``).

Unit scores say which units of a layer matter least, and obs's are output errors in the layer's own units, but a
unit of error in one layer does not cost the model's loss what it costs in another. So: plan the uniform cut,
measure the calibration loss increase when each layer alone is cut that way (with its refit, by masking, no
copy), divide by the score mass that cut removed, and weight every score of the layer by that ratio. A global
ranking of the weighted scores then moves cuts from sensitive layers to robust ones, within a band around the
uniform cut (``SPREAD``), and widths differ per layer.
The planner takes ``ranking="loss_weighted"`` as a global ranking of scores that ``weigh_layers`` weighted.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from tqdm.auto import tqdm

from fastprune.adapters.base import Adapter
from fastprune.masking import masked
from fastprune.planning import Plan, make_plan
from fastprune.reconstruction import InputGrams, reconstruct
from fastprune.scoring.scores import Scores

logger = logging.getLogger(__name__)

#: Calibration windows each layer's loss increase is measured on (paired with the unpruned loss, so few suffice).
SENSITIVITY_WINDOWS = 8
#: How far a layer's cut may move from the uniform cut, as a fraction of its width (OWL bounds its per-layer
#: sparsities similarly; a loss rise measured at the uniform cut says little about much larger or smaller cuts).
SPREAD = 0.1


def weigh_layers(
    adapter: Adapter, scores: Scores, config, costs, budget, batches: list[torch.Tensor], grams: InputGrams | None
) -> Scores:
    """``scores`` weighted per layer by measured loss increase per unit of score (recorded in ``info``)."""
    uniform = make_plan(scores, dataclasses.replace(config, ranking="per_layer"), costs, budget, warn=False)
    weights = layer_weights(adapter, uniform, scores, batches, grams, config.damping if config.reconstruct else None)
    out = bounded(weighted(scores, weights), uniform, SPREAD)
    out.info = {**scores.info, "layer_weights": [round(float(w), 6) for w in weights]}
    return out


def bounded(scores: Scores, uniform: Plan, spread: float) -> Scores:
    """Scores that keep every layer's cut within ``spread`` of its width around the uniform plan's cut.

    Per layer and kind (heads, channels), the units the uniform plan would cut minus ``spread`` x width get score
    0 (taken first) and those beyond its cut plus ``spread`` x width a score above all others (taken only if the
    budget cannot be met otherwise); the order of the rest is untouched, so a global ranking moves cuts between
    layers only within the band.
    """
    top = max(float(t.max()) for kind in ("heads", "channels") for t in (getattr(scores, kind) or []))
    never = 1e6 * max(top, 1e-30)
    changed = {}
    for kind in ("heads", "channels"):
        per_layer = getattr(scores, kind)
        if per_layer is None:
            continue
        out = []
        for i, t in enumerate(per_layer):
            n, cut = t.numel(), len(getattr(uniform.cut(i), kind))
            band = round(spread * n)
            order = t.argsort(stable=True)
            t = t.clone()
            t[order[: max(0, cut - band)]] = 0.0
            t[order[min(n, cut + band) :]] = never
            out.append(t)
        changed[kind] = out
    return dataclasses.replace(scores, **changed)


def layer_weights(
    adapter: Adapter,
    plan: Plan,
    scores: Scores,
    batches: list[torch.Tensor],
    grams: InputGrams | None,
    damping: float | None,
) -> torch.Tensor:
    """Per layer: (loss with only this layer cut as ``plan`` says) - (loss uncut), over the score mass it cuts.

    With ``damping`` the cut layer is refit first (as the real cut will be). Layers the plan leaves alone get the
    median weight; a loss that does not rise is floored at 1% of the median rise. Normalised to median 1.
    """
    windows = torch.cat(batches)[:SENSITIVITY_WINDOWS].split(batches[0].shape[0])
    base = _loss(adapter, windows)
    rises, masses = {}, {}
    for i in tqdm(sorted(plan.cuts), desc="layer sensitivity", unit="layer", disable=None):
        single = Plan(plan.shape, {i: plan.cut(i)})
        saved = _output_weights(adapter, i)
        try:
            if damping is not None:
                reconstruct(adapter, single, grams, damping)
            with masked(adapter, single):
                rises[i] = _loss(adapter, windows) - base
        finally:
            _restore(adapter, i, saved)
        masses[i] = _removed_mass(scores, plan, i)
    rising = [r for r in rises.values() if r > 0]
    if not rising:  # no cut hurts: nothing to tell the layers apart by
        return torch.ones(plan.shape.num_layers, dtype=torch.float64)
    floor = 0.01 * torch.tensor(rising).median().item()
    ratios = {i: max(rises[i], floor) / max(masses[i], 1e-30) for i in rises}
    median = torch.tensor(list(ratios.values())).median().item()
    weights = torch.tensor([ratios.get(i, median) for i in range(plan.shape.num_layers)], dtype=torch.float64)
    logger.info("layer sensitivity: loss rises %s", {i: round(r, 4) for i, r in rises.items()})
    return weights / median


def weighted(scores: Scores, weights: torch.Tensor) -> Scores:
    """``scores`` with each layer's head, KV-head and channel scores multiplied by its weight."""

    def scale(per_layer):
        return None if per_layer is None else [t * float(w) for t, w in zip(per_layer, weights, strict=True)]

    return dataclasses.replace(
        scores, heads=scale(scores.heads), kv_heads=scale(scores.kv_heads), channels=scale(scores.channels)
    )


def _removed_mass(scores: Scores, plan: Plan, i: int) -> float:
    cut, mass = plan.cut(i), 0.0
    for kind, units in (("heads", cut.heads), ("kv_heads", cut.kv_heads), ("channels", cut.channels)):
        per_layer = getattr(scores, kind)
        if per_layer is not None and units:
            mass += float(per_layer[i][units].sum())
    return mass


@torch.no_grad()
def _loss(adapter: Adapter, windows) -> float:
    with torch.random.fork_rng():  # an encoder's masked-LM loss draws its masks: the same ones every time
        torch.manual_seed(0)
        return sum(float(adapter.loss(w)) for w in windows) / len(windows)


def _output_weights(adapter: Adapter, i: int) -> list[torch.Tensor]:
    return [adapter.attention(i).o.weight.detach().clone(), adapter.mlp(i).output.weight.detach().clone()]


def _restore(adapter: Adapter, i: int, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        adapter.attention(i).o.weight.copy_(saved[0])
        adapter.mlp(i).output.weight.copy_(saved[1])
