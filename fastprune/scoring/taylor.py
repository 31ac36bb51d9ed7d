"""First-order Taylor |w*g| and Fisher (w*g)^2, summed per unit over calibration batches.

Gradients are reduced per unit the moment they are accumulated (a post-accumulate-grad hook per weight) and then
freed, so a full copy of all gradients never exists; only the unit weights take gradients at all.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch

from fastprune.adapters.base import Adapter
from fastprune.errors import ScoreError
from fastprune.ops import head_taylor_accumulate_
from fastprune.scoring.scores import Scores
from fastprune.scoring.tables import batches_with_progress, zero_tables
from fastprune.scoring.units import unit_slices


@contextmanager
def _only_these_require_grad(model: torch.nn.Module, params: set[int]):
    before = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in params)
    try:
        yield
    finally:
        for p, flag in before.items():
            p.requires_grad_(flag)
            p.grad = None


def taylor_fisher_scores(adapter: Adapter, batches: list[torch.Tensor]) -> tuple[Scores, Scores]:
    """Per unit, sum over batches of sum |w*g| (Taylor) and sum (w*g)^2 (Fisher); layers get their units' sum."""
    shape = adapter.shape()
    slices = list(unit_slices(adapter))
    by_param: dict[int, list[int]] = defaultdict(list)
    for k, s in enumerate(slices):
        by_param[id(s.param)].append(k)
    accum = [torch.zeros(2, s.param.shape[s.dim] // s.group_size, dtype=torch.float32) for s in slices]

    def reduce_grad(param: torch.nn.Parameter) -> None:
        for k in by_param[id(param)]:
            s = slices[k]
            head_taylor_accumulate_(accum[k], param.detach(), param.grad, dim=s.dim, group_size=s.group_size)
        param.grad = None

    params = {id(s.param): s.param for s in slices}
    model = adapter.model
    with _only_these_require_grad(model, set(params)), torch.enable_grad():
        handles = [p.register_post_accumulate_grad_hook(reduce_grad) for p in params.values()]
        try:
            for step, batch in enumerate(batches_with_progress(batches, "taylor/fisher")):
                loss = adapter.loss(batch)
                if not torch.isfinite(loss):
                    raise ScoreError(f"calibration loss is {loss.item()} on batch {step}: cannot score by gradients")
                loss.backward()
        finally:
            for h in handles:
                h.remove()

    tables = {name: zero_tables(shape, ("heads", "kv_heads", "channels")) for name in ("taylor", "fisher")}
    for s, acc in zip(slices, accum, strict=True):
        tables["taylor"][s.kind][s.layer] += acc[0].double()
        tables["fisher"][s.kind][s.layer] += acc[1].double()
    results = []
    for name in ("taylor", "fisher"):
        t = tables[name]
        layers = torch.stack([sum(t[k][i].sum() for k in t) for i in range(shape.num_layers)])
        results.append(Scores(name, shape, **t, layers=layers))
    return results[0], results[1]
