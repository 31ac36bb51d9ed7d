"""2:4 sparsification of a whole model in one call: pick the layers, calibrate layer after layer, swap in
``Sparse24Linear``, and (optionally) measure and save."""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import fastprune
from fastprune.adapters import adapter_for
from fastprune.adapters.base import Adapter
from fastprune.data import TokenWindows
from fastprune.errors import ConfigError
from fastprune.evaluation import EvalConfig, Report, evaluate
from fastprune.io import INFO_FILE, check_output_dir, save_model
from fastprune.ops import Sparse24Linear
from fastprune.sparsity.config import SparsifyConfig
from fastprune.sparsity.modules import densify, mark_sparse24, sparse_linear, unmark_sparse24
from fastprune.sparsity.sequential import LayerInputs, input_hooks
from fastprune.sparsity.sparsegpt import sparsegpt_24
from fastprune.sparsity.targets import Target, find_targets, replace_module

logger = logging.getLogger("fastprune")


@dataclass
class SparsifyResult:
    """A 2:4-sparse model, which layers were made sparse, and (if measured) the report."""

    model: torch.nn.Module
    modules: list[str]  # the Sparse24Linear layers, by module name
    skipped: list[str]  # block linears left dense by the skip list
    report: Report | None
    calibration: dict
    seconds: dict[str, float] = field(default_factory=dict)


def sparsify(
    model: torch.nn.Module,
    config: SparsifyConfig | None = None,
    calibration="pydoc:calibration",
    tokenizer=None,
    evaluation: EvalConfig | None = None,
    inplace: bool = False,
) -> SparsifyResult:
    """Make every linear layer of every block of ``model`` 2:4-sparse as ``config`` says (a copy unless
    ``inplace``). The layers become ``Sparse24Linear``; ``calibration`` (a text source, a file, token windows or a
    [N, T] id tensor) feeds wanda and sparsegpt. With ``evaluation`` the dense and sparse models are measured side
    by side."""
    from fastprune.pipeline import calibration_windows

    config = config or SparsifyConfig()
    if inplace and evaluation is not None:
        raise ConfigError("evaluation needs the original model, which inplace=True overwrites")
    find_targets(adapter_for(model), config.skip)  # bad input fails before any copy or calibration
    seconds: dict[str, float] = {}
    sparse = model if inplace else copy.deepcopy(model)
    adapter = adapter_for(sparse)
    targets = find_targets(adapter, config.skip)
    names = [t.name for t in targets]
    skipped = [n for n in _block_linear_names(adapter) if n not in set(names)]
    windows = None
    t0 = time.perf_counter()
    if config.needs_calibration:
        windows = calibration_windows(tokenizer, calibration, config, encoder=not adapter.causal)
        torch.manual_seed(config.seed)
        _sparsify_sequentially(adapter, targets, windows, config)
    else:
        for t in tqdm(targets, desc="sparsify", unit="layer", disable=None, leave=False):
            replace_module(sparse, t.name, Sparse24Linear.from_linear(t.module))
    seconds["sparsify"] = time.perf_counter() - t0
    sparse.eval()
    report = None
    if evaluation is not None:
        t0 = time.perf_counter()
        report = evaluate({"dense": model, f"2:4 ({config.criterion})": sparse}, tokenizer, evaluation)
        report.info.update({"criterion": config.criterion, "sparse_layers": len(names), "skipped": skipped})
        seconds["evaluate"] = time.perf_counter() - t0
    cal = windows.describe() if windows is not None else {}
    logger.info("made %d linear layers 2:4-sparse (%s), left %d dense", len(names), config.criterion, len(skipped))
    return SparsifyResult(sparse, names, skipped, report, cal, seconds)


def _block_linear_names(adapter: Adapter) -> list[str]:
    names = {id(m): n for n, m in adapter.model.named_modules()}
    return [names[id(m)] for i in range(len(adapter.layers)) for group in adapter.block_linears(i) for m in group]


def _sparsify_sequentially(adapter: Adapter, targets: list[Target], windows: TokenWindows, config: SparsifyConfig):
    """Layer after layer: statistics of each layer's inputs (the outputs of the already sparse layers before it),
    then its 2:4 layers, then its outputs for the next layer."""
    batches = windows.batches(config.calibration.batch_size)
    inputs = LayerInputs(adapter, batches)
    by_layer: dict[int, list[Target]] = defaultdict(list)
    for t in targets:
        by_layer[t.layer].append(t)
    last = max(by_layer)
    for i in tqdm(range(last + 1), desc=f"sparsify ({config.criterion})", unit="layer", disable=None, leave=False):
        layer = adapter.layers[i]
        if by_layer[i]:
            groups: dict[int, list[Target]] = defaultdict(list)
            for t in by_layer[i]:
                groups[t.group].append(t)
            stats = _input_stats(inputs, layer, [g[0].module for g in groups.values()], config.criterion)
            for (_, group), stat in zip(groups.items(), stats, strict=True):
                _sparsify_group(adapter.model, group, stat, config)
        if i < last:
            inputs.advance(layer)


def _input_stats(inputs: LayerInputs, layer, modules: list, criterion: str) -> list[torch.Tensor]:
    """Per module, over every calibration token of its input: the sum of squares per input feature (wanda) or
    the Gram matrix X^T X (sparsegpt), summed in float64 (each batch's product in float32)."""
    stats: list = [None] * len(modules)

    def accumulate(k: int, x: torch.Tensor) -> None:
        x = x.float()
        s = (x.pow(2).sum(0) if criterion == "wanda" else x.T @ x).double()
        stats[k] = s if stats[k] is None else stats[k] + s

    handles = input_hooks(modules, accumulate)
    try:
        inputs.run(layer)
    finally:
        for h in handles:
            h.remove()
    return stats


def _sparsify_group(model, group: list[Target], stat: torch.Tensor, config: SparsifyConfig) -> None:
    """2:4 layers for linears that read one input: wanda scores |W| * ||X||; sparsegpt solves their rows together
    (rows are independent, and they share one Gram matrix)."""
    if config.criterion == "wanda":
        norm = stat.sqrt().float().to(group[0].module.weight.device)
        for t in group:
            replace_module(model, t.name, Sparse24Linear.from_linear(t.module, act_norm=norm))
        return
    weights = [t.module.weight for t in group]
    weight, keep = sparsegpt_24(torch.cat(weights), stat.to(weights[0].device), config.damping, config.block_size)
    rows = [w.shape[0] for w in weights]
    for t, w, k in zip(group, weight.split(rows), keep.split(rows), strict=True):
        replace_module(model, t.name, sparse_linear(t.module, w, k))


def provenance(result: SparsifyResult, config: SparsifyConfig, source: str, dense: bool) -> dict:
    """What fastprune.json records for a sparsified model."""
    return {
        "fastprune_version": fastprune.__version__,
        "source_model": source,
        "sparsity": {
            "pattern": config.pattern,
            "criterion": config.criterion,
            "format": "dense (masked weights)" if dense else "2:4 compressed (values + 4-bit positions)",
            "layers": result.modules,
            "skipped": result.skipped,
        },
        "config": config.to_dict(),
        "seed": config.seed,
        "calibration": result.calibration,
        "seconds": result.seconds,
        "torch": torch.__version__,
    }


def save_sparsified(
    result: SparsifyResult,
    tokenizer,
    out: Path,
    inputs: list[Path],
    config: SparsifyConfig,
    source: str,
    dense: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write the sparse model (2:4-compressed, or with ``dense`` the masked weights as a plain checkpoint),
    provenance and report (if any) to ``out`` in one atomic step."""
    check_output_dir(out, inputs, overwrite)
    model = copy.deepcopy(result.model)
    if dense:
        densify(model)
        unmark_sparse24(model.config)
    else:
        mark_sparse24(model.config, result.modules)
    extra = {INFO_FILE: json.dumps(provenance(result, config, source, dense), indent=1) + "\n"}
    if result.report is not None:
        extra.update(result.report.files())
    path = save_model(model, tokenizer, out, extra, overwrite)
    logger.info("saved the 2:4-sparse model to %s", path)
    return path
