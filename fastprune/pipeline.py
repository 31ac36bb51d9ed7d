"""The whole job in one call: calibrate, score, plan, cut, and (optionally) measure and save."""

from __future__ import annotations

import copy
from contextlib import contextmanager
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
from fastprune.errors import CalibrationError, ConfigError
from fastprune.evaluation import EvalConfig, Report, evaluate
from fastprune.io import INFO_FILE, PLAN_FILE, check_output_dir, save_model
from fastprune.planning import Plan, check_feasible, make_plan
from fastprune.reconstruction import collect_grams, grams_for_plan, reconstruct
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

    The input model is left untouched unless ``inplace``. With a ``plan``, scoring and planning are skipped; the
    calibration text is then used only for ``config.reconstruct``. With ``evaluation`` the original and pruned
    models are measured side by side and the report is returned with the result.
    """
    if inplace and evaluation is not None:
        raise ConfigError("evaluation compares the pruned model with the original, which inplace=True overwrites")
    seconds: dict[str, float] = {}
    pruned = model if inplace else copy.deepcopy(model)
    adapter = adapter_for(pruned)
    scores, windows = None, None
    if plan is None:
        check_feasible(adapter.shape(), config, adapter.param_costs())
    else:
        plan.check_fits(adapter.shape())
    if plan is None or config.reconstruct:
        windows = calibration_windows(tokenizer, calibration, config, encoder=not adapter.causal)
        batches = windows.batches(config.calibration.batch_size)
    grams = None
    if plan is None:
        torch.manual_seed(config.seed)
        with _timed(seconds, "score"):
            if config.criterion == "obs":  # its statistics serve the reconstruction too
                layers = list(range(len(adapter.layers)))
                grams = collect_grams(adapter, batches, layers, layers)
            scores = score_for_config(adapter, batches, config, grams)
        with _timed(seconds, "plan"):
            plan = make_plan(scores, config, adapter.param_costs())
        plan.info["calibration"] = windows.describe()
    if config.reconstruct:
        with _timed(seconds, "reconstruct"):
            reconstruct(adapter, plan, grams or grams_for_plan(adapter, batches, plan), config.damping)
    with _timed(seconds, "surgery"):
        apply_plan(adapter, plan)
    report = None
    if evaluation is not None:
        with _timed(seconds, "evaluate"):
            report = evaluate({"dense": model, "pruned": pruned}, tokenizer, evaluation)
        report.info.update({"criterion": plan.info.get("criterion"), "counts": plan.counts()})
    cal_info = windows.describe() if windows is not None else {}
    return PruneResult(pruned, plan, scores, report, cal_info, seconds)


@contextmanager
def _timed(seconds: dict[str, float], name: str):
    t0 = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - t0


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
