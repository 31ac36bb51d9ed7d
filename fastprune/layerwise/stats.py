"""What one layer's calibration passes give the layer-local criteria and the refit: sums and counts, all-reducible.

Layer-local criteria need nothing outside the layer: weights (magnitude), the inputs of its output projections
(activation, activation_frequency, wanda; Gram matrices for obs and the refit), its input and output (Block
Influence), or gradients of a loss defined on the layer alone (taylor_local, fisher_local). The formulas are the
ones of fastprune.scoring, computed per layer, so a model scored layer by layer gets the scores a full pass gives.

taylor_local and fisher_local: the output-reconstruction loss of a layer, ``0.5 * ||F(W') - F(W)||^2`` summed over
tokens, has zero gradient at the dense weights W; what ranks units is its curvature J^T J (J: the Jacobian of the
layer's output in its weights). A Gaussian probe r per output element gives g = J^T r, the gradient of
``<F(W), r>``, with E[g g^T] = J^T J, so ``(w * g)^2`` estimates the first-order output error of removing each weight
and ``|w * g|`` its square root (up to a constant). They are summed per unit like taylor and fisher; the probe is
seeded by (seed, layer, batch), so every process and every holder of the model draws the same one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fastprune.adapters.base import Adapter
from fastprune.distributed import all_reduce_
from fastprune.layerwise.calls import LayerCall
from fastprune.ops import block_influence_accumulate_, head_taylor_accumulate_
from fastprune.reconstruction import batch_gram
from fastprune.scoring.activation import column_sumsq, column_sumsq_and_activity, per_head
from fastprune.scoring.magnitude import group_power_sum
from fastprune.scoring.obs import CHANNEL_BLOCK, obs_group_scores
from fastprune.scoring.units import UnitSlice, unit_slices
from fastprune.scoring.wanda import column_scores

#: Criteria that a layer's own weights and activations determine (the ones streaming and sequential calibration
#: can compute one layer at a time).
LAYER_LOCAL_CRITERIA = (
    "magnitude_l1",
    "magnitude_l2",
    "activation",
    "activation_frequency",
    "wanda",
    "block_influence",
    "obs",
    "taylor_local",
    "fisher_local",
)
#: Layer-local criteria whose scores do not depend on the layer's inputs (the same before and after earlier cuts).
WEIGHT_ONLY_CRITERIA = ("magnitude_l1", "magnitude_l2")


@dataclass(frozen=True)
class Needs:
    """Which statistics a layer's passes must collect."""

    head_grams: bool = False
    channel_grams: bool = False
    input_stats: bool = False
    block_influence: bool = False
    gradients: bool = False

    @classmethod
    def for_criteria(cls, criteria) -> Needs:
        criteria = set(criteria)
        return cls(
            head_grams="obs" in criteria,
            channel_grams="obs" in criteria,
            input_stats=bool(criteria & {"activation", "activation_frequency", "wanda"}),
            block_influence="block_influence" in criteria,
            gradients=bool(criteria & {"taylor_local", "fisher_local"}),
        )

    def __or__(self, other: Needs) -> Needs:
        return Needs(*(a or b for a, b in zip(self.flags(), other.flags(), strict=True)))

    def flags(self) -> tuple[bool, ...]:
        return (self.head_grams, self.channel_grams, self.input_stats, self.block_influence, self.gradients)

    def any(self) -> bool:
        return any(self.flags())


@dataclass
class LayerStats:
    """Sums over the calibration tokens of one layer (None where not needed)."""

    tokens: torch.Tensor  # float64 [1]
    head_gram: torch.Tensor | None = None
    channel_gram: torch.Tensor | None = None
    head_sumsq: torch.Tensor | None = None
    channel_sumsq: torch.Tensor | None = None
    channel_active: torch.Tensor | None = None
    block_influence: torch.Tensor | None = None  # float64 [2]: sum of cosines, tokens
    slices: list[UnitSlice] = field(default_factory=list)
    grad_sums: list[torch.Tensor] = field(default_factory=list)  # per slice, float32 [2, units]: sum |wg|, (wg)^2

    def tensors(self) -> list[torch.Tensor]:
        """Every sum, for all-reducing over processes."""
        fixed = (
            self.tokens,
            self.head_gram,
            self.channel_gram,
            self.head_sumsq,
            self.channel_sumsq,
            self.channel_active,
            self.block_influence,
        )
        return [t for t in fixed if t is not None] + self.grad_sums


def collect(
    adapter: Adapter, i: int, calls: list[LayerCall], needs: Needs, seed: int
) -> tuple[LayerStats, list[torch.Tensor]]:
    """Run layer i on every call, summing what ``needs`` asks for (all-reduced over processes); return the sums
    and the layer's outputs."""
    layer, att, mlp = adapter.layers[i], adapter.attention(i), adapter.mlp(i)
    f64 = {"dtype": torch.float64, "device": att.o.weight.device}  # sums live where the layer runs
    stats = LayerStats(torch.zeros(1, **f64))
    if needs.head_grams:
        stats.head_gram = torch.zeros(att.o.in_features, att.o.in_features, **f64)
    if needs.channel_grams:
        stats.channel_gram = torch.zeros(mlp.output.in_features, mlp.output.in_features, **f64)
    if needs.input_stats:
        stats.head_sumsq = torch.zeros(att.o.in_features, **f64)
        stats.channel_sumsq = torch.zeros(mlp.output.in_features, **f64)
        stats.channel_active = torch.zeros(mlp.output.in_features, **f64)
    if needs.block_influence:
        stats.block_influence = torch.zeros(2, **f64)
    if needs.gradients:
        stats.slices = list(unit_slices(adapter, [i]))
        stats.grad_sums = [
            torch.zeros(2, s.param.shape[s.dim] // s.group_size, dtype=torch.float32, device=f64["device"])
            for s in stats.slices
        ]

    def on_heads(_module, args):
        x = args[0]
        if stats.head_gram is not None:
            stats.head_gram += batch_gram(x).to(stats.head_gram.device)
        if stats.head_sumsq is not None:
            stats.head_sumsq += column_sumsq(x).to(stats.head_sumsq.device)

    def on_channels(_module, args):
        x = args[0]
        if stats.channel_gram is not None:
            stats.channel_gram += batch_gram(x).to(stats.channel_gram.device)
        if stats.channel_sumsq is not None:
            sumsq, active = column_sumsq_and_activity(x)
            stats.channel_sumsq += sumsq.to(stats.channel_sumsq.device)
            stats.channel_active += active.to(stats.channel_active.device)

    handles = [att.o.register_forward_pre_hook(on_heads), mlp.output.register_forward_pre_hook(on_channels)]
    outputs = []
    try:
        for call in calls:
            if needs.gradients:
                out = _gradient_pass(layer, call, stats, i, seed)
            else:
                with torch.no_grad():
                    out = call.run(layer)
            if stats.block_influence is not None:
                block_influence_accumulate_(stats.block_influence, call.hidden, out)
            stats.tokens += call.hidden.shape[:-1].numel()
            outputs.append(out)
    finally:
        for h in handles:
            h.remove()
    all_reduce_(stats.tensors())
    return stats, outputs


def probe_seed(seed: int, layer: int, batch: int) -> int:
    """The seed of the Gaussian probe of one layer on one calibration batch."""
    return ((seed * 1_000_003 + layer) * 1_000_003 + batch) % (2**63)


def _gradient_pass(layer: torch.nn.Module, call: LayerCall, stats: LayerStats, i: int, seed: int) -> torch.Tensor:
    """Forward with gradients for the unit weights only, backward of the probed output, per-unit |wg| and (wg)^2."""
    unit_params = {id(s.param) for s in stats.slices}
    before = {p: p.requires_grad for p in layer.parameters()}
    for p in layer.parameters():
        p.requires_grad_(id(p) in unit_params)
    try:
        with torch.enable_grad():
            out = call.run(layer)
            gen = torch.Generator(device=out.device).manual_seed(probe_seed(seed, i, call.index))
            probe = torch.randn(out.shape, generator=gen, device=out.device, dtype=torch.float32)
            (out.float() * probe).sum().backward()
        for s, acc in zip(stats.slices, stats.grad_sums, strict=True):
            head_taylor_accumulate_(acc, s.param.detach(), s.param.grad, dim=s.dim, group_size=s.group_size)
    finally:
        for p, flag in before.items():
            p.grad = None
            p.requires_grad_(flag)
    return out.detach()


def layer_scores(criterion: str, adapter: Adapter, i: int, stats: LayerStats, damping: float) -> dict:
    """Layer i's scores by a layer-local criterion: {kind: tensor} for heads / kv_heads / channels, and a float
    tensor under "layers" for criteria that score whole layers (on the CPU, where planning happens)."""
    return {kind: t.cpu() for kind, t in _layer_scores(criterion, adapter, i, stats, damping).items()}


def _layer_scores(criterion: str, adapter: Adapter, i: int, stats: LayerStats, damping: float) -> dict:
    d = adapter.head_dim
    att, mlp = adapter.attention(i), adapter.mlp(i)
    tokens = float(stats.tokens)
    if criterion.startswith("magnitude_l"):
        p = int(criterion[-1])
        tables = _zero_units(adapter, i, ("heads", "kv_heads", "channels"))
        for s in unit_slices(adapter, [i]):
            tables[s.kind] += group_power_sum(s.param, s.dim, s.group_size, p).cpu()
        return {kind: t.pow(1.0 / p) for kind, t in tables.items()}
    if criterion == "activation":
        return {
            "heads": per_head(stats.head_sumsq, d).div(tokens).sqrt(),
            "channels": stats.channel_sumsq.div(tokens).sqrt(),
        }
    if criterion == "activation_frequency":
        return {"channels": stats.channel_active / tokens}
    if criterion == "wanda":
        return {
            "heads": per_head(column_scores(att.o.weight, stats.head_sumsq), d),
            "channels": column_scores(mlp.output.weight, stats.channel_sumsq),
        }
    if criterion == "block_influence":
        s = stats.block_influence
        return {"layers": 1.0 - s[0] / s[1]}
    if criterion == "obs":
        kv = adapter.shape().layers[i].kv_heads
        return {  # (the greedy removal runs on the CPU)
            "heads": obs_group_scores(att.o.weight.cpu(), stats.head_gram.cpu(), d, 1, damping),
            "kv_heads": torch.zeros(kv, dtype=torch.float64),
            "channels": obs_group_scores(mlp.output.weight.cpu(), stats.channel_gram.cpu(), 1, CHANNEL_BLOCK, damping),
        }
    if criterion in ("taylor_local", "fisher_local"):
        row = 0 if criterion == "taylor_local" else 1
        tables = _zero_units(adapter, i, ("heads", "kv_heads", "channels"))
        for s, acc in zip(stats.slices, stats.grad_sums, strict=True):
            tables[s.kind] += acc[row].double().cpu()
        return {**tables, "layers": sum(t.sum() for t in tables.values())}
    raise ValueError(f"{criterion!r} is not a layer-local criterion")


def _zero_units(adapter: Adapter, i: int, kinds) -> dict[str, torch.Tensor]:
    s = adapter.shape().layers[i]
    return {kind: torch.zeros(getattr(s, kind), dtype=torch.float64) for kind in kinds}
