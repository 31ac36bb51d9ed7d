"""The CNN job in one call: trace, score, plan, cut, and (optionally) measure and save."""

from __future__ import annotations

import copy
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import fastprune
from fastprune.cnn.config import CnnPruningConfig
from fastprune.cnn.costs import CostModel
from fastprune.cnn.criteria import score_units
from fastprune.cnn.data import ImageSet
from fastprune.cnn.evaluation import CnnEvalConfig, CnnReport, evaluate_cnn, measure_latency
from fastprune.cnn.graph import ChannelGraph, analyze
from fastprune.cnn.io import save_cnn
from fastprune.cnn.planning import CnnPlan, CnnPlanner, make_cnn_plan
from fastprune.cnn.recovery import recalibrate_bn
from fastprune.cnn.surgery import apply_keep
from fastprune.errors import CalibrationError, PlanError
from fastprune.io import INFO_FILE, PLAN_FILE, check_output_dir
from fastprune.latency import _nonnegative_lstsq

logger = logging.getLogger("fastprune")

#: A latency target is met within [1 - LATENCY_SLACK, 1] times the target (as on the transformer path).
LATENCY_SLACK = 0.10


@dataclass
class CnnPruneResult:
    """A pruned CNN with the plan that made it, the scores behind it and, if measured, the report."""

    model: nn.Module
    plan: CnnPlan
    scores: torch.Tensor | None
    report: CnnReport | None
    graph: dict  # ChannelGraph.describe(): groups, frozen units, operations not understood
    calibration: dict
    seconds: dict[str, float] = field(default_factory=dict)


def cut(model: nn.Module, graph: ChannelGraph, plan: CnnPlan, inplace: bool = False) -> nn.Module:
    """A copy of ``model`` (or ``model`` itself) with the plan's units removed."""
    pruned = model if inplace else copy.deepcopy(model)
    apply_keep(pruned, graph, plan.keep_mask(graph))
    return pruned


def prune_cnn(
    model: nn.Module,
    config: CnnPruningConfig,
    calibration: ImageSet | None = None,
    plan: CnnPlan | None = None,
    evaluation: CnnEvalConfig | None = None,
    eval_data: ImageSet | None = None,
    inplace: bool = False,
) -> CnnPruneResult:
    """Prune ``model``'s filters as ``config`` asks (or as ``plan`` says) and return the smaller dense model.

    ``calibration`` images (with labels, or the model's own predictions stand in) feed the taylor criterion. With
    ``evaluation`` the dense and pruned models are measured side by side (accuracy on ``eval_data``). The input
    model is untouched unless ``inplace``.
    """
    if inplace and evaluation is not None:
        raise PlanError("evaluation needs the original model, which inplace=True overwrites")
    if config.recalibrate_bn and calibration is None:
        raise CalibrationError("recalibrate_bn needs calibration images")
    if calibration is not None:
        calibration = calibration.head(config.samples)
    seconds: dict[str, float] = {}
    example = torch.zeros(1, *config.input_size)
    with _timed(seconds, "trace"):
        graph = analyze(model, example)
    if graph.unknown:
        logger.warning(
            "%d operations not understood; their channels are kept: %s",
            len(graph.unknown),
            "; ".join(graph.unknown[:5]),
        )
    costs = CostModel(model, graph)
    scores = None
    if plan is None:
        batches = calibration.batches(config.batch_size) if calibration is not None else None
        with _timed(seconds, "score"):
            scores = score_units(model, graph, config.criterion, batches, config.seed)
        with _timed(seconds, "plan"):
            if config.target_latency_ms is not None:
                plan = _plan_for_latency(model, graph, scores, config, costs, seconds)
            else:
                plan = make_cnn_plan(graph, scores, config, costs)
    with _timed(seconds, "surgery"):
        pruned = cut(model, graph, plan, inplace)
    if config.recalibrate_bn:
        with _timed(seconds, "recalibrate_bn"):
            recalibrate_bn(pruned, calibration, config.batch_size)
    plan.info["recalibrated_bn"] = config.recalibrate_bn
    plan.info["not_understood"] = graph.unknown
    report = None
    if evaluation is not None:
        with _timed(seconds, "evaluate"):
            report = evaluate_cnn({"dense": model, f"pruned ({config.criterion})": pruned}, eval_data, evaluation)
        report.info["not_understood"] = graph.unknown
    cal = calibration.describe() if calibration is not None else {}
    return CnnPruneResult(pruned, plan, scores, report, graph.describe(), cal, seconds)


def _plan_for_latency(model, graph, scores, config: CnnPruningConfig, costs: CostModel, seconds) -> CnnPlan:
    """Fit latency = a + b * MACs on uniform cuts of this model measured here, plan the MACs that the target
    allows, then measure the pruned model and correct the fit until it lands within the slack."""
    planner = CnnPlanner(graph, scores, config, costs)
    shape, batch, target = config.input_size, config.latency_batch, config.target_latency_ms
    variants = {}
    for fraction in (0.0, 0.3, 0.6):
        counts = planner.counts_for(fraction, strict=False)
        variants[fraction] = (costs.macs(planner.keep_for(counts)), cut(model, graph, planner.plan(counts)))
    with _timed(seconds, "latency table"):
        ms = measure_latency({str(f): v[1] for f, v in variants.items()}, shape, (batch,), rounds=3)
    rows = torch.tensor([[1.0, float(v[0])] for v in variants.values()], dtype=torch.float64)
    times = torch.tensor([ms[str(f)][str(batch)] for f in variants], dtype=torch.float64)
    a, b = _nonnegative_lstsq(rows, times).tolist()
    logger.info("latency fit at batch %d: %.2f ms + %.3g ms/MAC (measured %s)", batch, a, b, times.tolist())
    dense_ms = float(times[0])
    if target >= dense_ms:
        raise PlanError(f"target_latency_ms={target:g} is not below the dense model's {dense_ms:.1f} ms")
    aim = (1 - LATENCY_SLACK / 2) * target
    fastest = a + b * costs.macs(planner.keep_for(planner.counts_for(0.999, strict=False)))
    if target < fastest:
        raise PlanError(
            f"target_latency_ms={target:g} cannot be met: the smallest model the protections and round_to allow is "
            f"predicted at {fastest:.1f} ms here (dense: {dense_ms:.1f} ms)"
        )
    check = {}
    for attempt in range(4):
        limit = (aim - a) / b if b > 0 else 0.0
        plan = make_cnn_plan(graph, scores, config, costs, limit=max(limit, 1.0))
        measured = measure_latency({"p": cut(model, graph, plan)}, shape, (batch,), rounds=3)["p"][str(batch)]
        check = {"measured_ms": measured, "target_ms": target, "batch": batch, "attempts": attempt + 1}
        logger.info("latency check %d: %.1f ms for a %.1f ms target", attempt + 1, measured, target)
        if (1 - LATENCY_SLACK) * target <= measured <= target:
            break
        predicted = a + b * plan.info["macs"][1]
        a, b = a * measured / predicted, b * measured / predicted  # put the fit to today's speed
    plan.info["latency_check"] = check
    if check["measured_ms"] > target:
        raise PlanError(f"target_latency_ms={target:g}: the best plan measures {check['measured_ms']:.1f} ms here")
    return plan


@contextmanager
def _timed(seconds: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t0


def save_cnn_result(
    result: CnnPruneResult,
    out: Path,
    source: str,
    config: CnnPruningConfig | None,
    inputs: list[Path] = (),
    overwrite: bool = False,
) -> Path:
    """Write the pruned model, plan.json, fastprune.json and the report (if any) to ``out`` in one atomic step."""
    check_output_dir(out, list(inputs), overwrite)
    info = {
        "fastprune_version": fastprune.__version__,
        "source_model": source,
        "criterion": result.plan.info.get("criterion"),
        "config": config.to_dict() if config is not None else None,
        "calibration": result.calibration,
        "counts": result.plan.counts(),
        "graph": {k: v for k, v in result.graph.items() if k != "groups"},
        "seconds": result.seconds,
        "torch": torch.__version__,
    }
    extra = {
        INFO_FILE: json.dumps(info, indent=1) + "\n",
        PLAN_FILE: json.dumps(result.plan.to_dict(), indent=1) + "\n",
    }
    if result.report is not None:
        extra.update(result.report.files())
    input_size = config.input_size if config is not None else result.graph["input_shape"][1:]
    return save_cnn(result.model, out, source, torch.zeros(1, *input_size), extra, overwrite)
