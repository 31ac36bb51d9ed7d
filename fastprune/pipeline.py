"""The whole job in one call: calibrate, score, plan, cut, and (optionally) measure and save."""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fastprune
from fastprune.adapters import adapter_for
from fastprune.config import PruningConfig
from fastprune.data import TokenWindows, read_text, token_windows
from fastprune.errors import CalibrationError
from fastprune.evaluation import EvalConfig, Report, evaluate
from fastprune.io import INFO_FILE, PLAN_FILE, check_output_dir, save_model
from fastprune.planning import Plan, check_feasible, make_plan
from fastprune.scoring import Scores, score_for_config
from fastprune.surgery import apply_plan

logger = logging.getLogger("fastprune")


@dataclass
class PruneResult:
    """A pruned model with the plan that made it, the scores behind the plan, and (if measured) the report."""

    model: torch.nn.Module
    plan: Plan
    scores: Scores | None
    report: Report | None
    calibration: dict
    seconds: dict[str, float]


def calibration_windows(tokenizer, calibration, config: PruningConfig, encoder: bool = False) -> TokenWindows:
    """Token windows from a text source (``pydoc:calibration``, a file path) or a [N, T] tensor of token ids."""
    cal = config.calibration
    if isinstance(calibration, TokenWindows):
        return calibration
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.numel() == 0:
            raise CalibrationError(f"calibration token ids must be a non-empty [N, T] tensor; got {tuple(calibration.shape)}")
        ids = calibration[: cal.num_samples].long()
        return TokenWindows(ids, "tensor", "", ids.numel())
    if tokenizer is None:
        raise CalibrationError("calibration text needs a tokenizer")
    source = str(calibration)
    return token_windows(tokenizer, read_text(source), cal.seq_len, cal.num_samples, source, "calibration", encoder)


def prune(
    model: torch.nn.Module,
    config: PruningConfig,
    calibration="pydoc:calibration",
    tokenizer=None,
    plan: Plan | None = None,
    evaluation: EvalConfig | None = None,
    inplace: bool = False,
) -> PruneResult:
    """Prune ``model`` as ``config`` asks (or as a given ``plan`` says) and return the smaller dense model.

    The input model is left untouched unless ``inplace``; with ``evaluation`` the original and pruned models are
    measured side by side and the report is returned with the result.
    """
    seconds = {}
    pruned = model if inplace else copy.deepcopy(model)
    adapter = adapter_for(pruned)
    scores = None
    cal_info: dict = {}
    if plan is None:
        check_feasible(adapter.shape(), config, adapter.param_costs())
        windows = calibration_windows(tokenizer, calibration, config, encoder=not adapter.causal)
        cal_info = windows.describe()
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        scores = score_for_config(adapter, windows.batches(config.calibration.batch_size), config)
        seconds["score"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        plan = make_plan(scores, config, adapter.param_costs())
        seconds["plan"] = time.perf_counter() - t0
        plan.info["calibration"] = cal_info
    t0 = time.perf_counter()
    apply_plan(adapter, plan)
    seconds["surgery"] = time.perf_counter() - t0
    report = None
    if evaluation is not None and tokenizer is not None:
        t0 = time.perf_counter()
        report = evaluate({"dense": model, "pruned": pruned}, tokenizer, evaluation)
        seconds["evaluate"] = time.perf_counter() - t0
        report.info.update({"criterion": plan.info.get("criterion"), "counts": plan.counts()})
    return PruneResult(pruned, plan, scores, report, cal_info, seconds)


def provenance(result: PruneResult, config: PruningConfig | None, source: str) -> dict:
    """What fastprune.json records: how the model was made, enough to reproduce it."""
    return {
        "fastprune_version": fastprune.__version__,
        "source_model": source,
        "criterion": result.plan.info.get("criterion"),
        "config": config.to_dict() if config is not None else None,
        "seed": config.seed if config is not None else None,
        "calibration": result.calibration or result.plan.info.get("calibration"),
        "counts": result.plan.counts(),
        "seconds": result.seconds,
        "torch": torch.__version__,
    }


def save_result(
    result: PruneResult, tokenizer, out: Path, inputs: list[Path], config: PruningConfig | None, source: str,
    overwrite: bool = False,
) -> Path:
    """Write the pruned model, plan, provenance and report (if any) to ``out`` in one atomic step."""
    check_output_dir(out, inputs, overwrite)
    extra = {
        INFO_FILE: json.dumps(provenance(result, config, source), indent=1) + "\n",
        PLAN_FILE: json.dumps(result.plan.to_dict(), indent=1) + "\n",
    }
    if result.report is not None:
        extra.update(result.report.files())
    path = save_model(result.model, tokenizer, out, extra, overwrite)
    logger.info("saved pruned model to %s", path)
    return path
