"""The whole job in one call: calibrate, score, plan, cut, and (optionally) measure and save."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fastprune
from fastprune.adapters import adapter_for
from fastprune.allocation import weigh_layers
from fastprune.budget import Budget, memory_budget
from fastprune.config import PruningConfig
from fastprune.data import DEFAULT_CALIBRATION, TokenWindows, text_windows
from fastprune.errors import CalibrationError, ConfigError, PlanError
from fastprune.evaluation import EvalConfig, Report, evaluate
from fastprune.io import INFO_FILE, PLAN_FILE, check_output_dir, save_model
from fastprune.latency import latency_budget, measure_ms
from fastprune.models import cache_dir
from fastprune.ops import Sparse24Linear
from fastprune.planning import Plan, check_feasible, make_plan
from fastprune.reconstruction import (
    MIN_TOKENS_PER_INPUT,
    InputGrams,
    collect_grams,
    grams_for_plan,
    layers_for_plan,
    reconstruct,
    tokens_needed,
)
from fastprune.recovery import RecoveryConfig, recover
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
    recovery: dict | None = None  # RecoveryResult.to_dict() when the model was recovered
    steps: list[dict] = field(default_factory=list)  # per-step numbers of an iterative prune
    plans: list[Plan] = field(default_factory=list)  # every step's plan (each applies to the previous result)
    grams: InputGrams | None = None  # the input Gram matrices it collected (reusable by prune(grams=...))


def calibration_windows(tokenizer, calibration, config: PruningConfig, encoder: bool = False) -> TokenWindows:
    """Token windows from a text source (a built-in text, a file path, or a mix ``a+b``) or [N, T] token ids."""
    cal = config.calibration
    if isinstance(calibration, TokenWindows):
        return calibration
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.numel() == 0:
            raise CalibrationError(
                f"calibration token ids must be a non-empty [N, T] tensor; got {tuple(calibration.shape)}"
            )
        ids = calibration[: cal.num_samples].long()
        return TokenWindows(ids, "tensor", "", ids.numel())
    if tokenizer is None:
        raise CalibrationError("calibration text needs a tokenizer")
    return text_windows(tokenizer, calibration, cal.seq_len, cal.num_samples, "calibration", encoder)


def prune(
    model: torch.nn.Module,
    config: PruningConfig,
    calibration=DEFAULT_CALIBRATION,
    tokenizer=None,
    plan: Plan | None = None,
    evaluation: EvalConfig | None = None,
    inplace: bool = False,
    recovery: RecoveryConfig | None = None,
    teacher: torch.nn.Module | None = None,
    grams: InputGrams | None = None,
) -> PruneResult:
    """Prune ``model`` as ``config`` asks (or as a given ``plan`` says) and return the smaller dense model.

    The input model is left untouched unless ``inplace``. With a ``plan``, scoring and planning are skipped; the
    calibration text is then used only for ``config.reconstruct``. A latency target is planned against a latency
    table measured on this machine and then checked by measuring the pruned model (re-planned if it misses the
    budget or undershoots it by more than ``LATENCY_SLACK``). With ``recovery`` the pruned model is then trained
    (fastprune.recovery) on every window of the calibration text, distilling from ``teacher`` (default: the input
    model). With ``evaluation`` the original and pruned models are measured side by side and the report is
    returned with the result. ``grams``, the ``result.grams`` of an earlier prune of the same model on the same
    calibration windows (another criterion or target), saves collecting them again.
    """
    if inplace and (evaluation is not None or config.target_latency_ms is not None):
        raise ConfigError("evaluation and latency targets need the original model, which inplace=True overwrites")
    seconds: dict[str, float] = {}
    if any(isinstance(m, Sparse24Linear) for m in model.modules()):
        raise ConfigError("this model is 2:4-sparse; prune the dense model first, then sparsify the pruned one")
    adapter = adapter_for(model)
    costs = adapter.param_costs()
    scores, windows, budget = None, None, None
    if plan is None:
        with _timed(seconds, "budget"):
            budget = _budget(model, adapter, config)
        check_feasible(adapter.shape(), config, costs, budget)
    else:
        plan.check_fits(adapter.shape())
    if plan is None or config.reconstruct:
        windows = calibration_windows(tokenizer, calibration, config, encoder=not adapter.causal)
        batches = windows.batches(config.calibration.batch_size)
        config = fit_to_calibration(adapter, windows, config)
    scoring_needs_all = config.criterion == "obs" or config.ranking == "loss_weighted" and config.reconstruct
    needs_all = plan is None and scoring_needs_all or config.target_latency_ms is not None and config.reconstruct
    layers = list(range(len(adapter.layers)))  # obs, loss_weighted's refits, latency re-planning: every layer
    if needs_all and not (grams is not None and grams.has(layers, layers)):
        with _timed(seconds, "statistics"):
            grams = collect_grams(adapter, batches, layers, layers)
    if plan is None:
        torch.manual_seed(config.seed)
        with _timed(seconds, "score"):
            scores = score_for_config(adapter, batches, config, grams)
        if config.ranking == "loss_weighted":
            with _timed(seconds, "layer sensitivity"):
                scores = weigh_layers(adapter, scores, config, costs, budget, batches, grams)
        with _timed(seconds, "plan"):
            plan = make_plan(scores, config, costs, budget)
        plan.info["calibration"] = windows.describe()
    sequential = config.sequential and windows is not None  # (a given plan without refit calibrates nothing)
    if config.reconstruct and not sequential and (grams is None or not grams.has(*layers_for_plan(plan))):
        with _timed(seconds, "statistics"):
            grams = grams_for_plan(adapter, batches, plan)
    cutting = _Cutting(config, grams, batches if sequential else None, scores)
    pruned, plan = cutting.cut(model, plan, inplace, seconds)
    if config.target_latency_ms is not None:
        pruned, plan = _meet_latency(model, pruned, plan, scores, config, costs, budget, cutting, seconds)
    recovered = None
    if recovery is not None:
        train = recovery_windows(tokenizer, calibration, config, encoder=not adapter.causal)
        with _timed(seconds, "recover"):
            recovered = recover(pruned, teacher if teacher is not None else model, train, recovery).to_dict()
    report = None
    if evaluation is not None:
        with _timed(seconds, "evaluate"):
            report = evaluate({"dense": model, "pruned": pruned}, tokenizer, evaluation)
        report.info.update({"criterion": plan.info.get("criterion"), "counts": plan.counts()})
    cal_info = windows.describe() if windows is not None else {}
    return PruneResult(pruned, plan, scores, report, cal_info, seconds, recovered, plans=[plan], grams=grams)


def recovery_windows(tokenizer, calibration, config: PruningConfig, encoder: bool = False) -> TokenWindows:
    """Up to ``recovery_samples`` windows of the calibration text (recovery needs more text than scoring)."""
    if isinstance(calibration, TokenWindows | torch.Tensor):
        return calibration_windows(tokenizer, calibration, config, encoder)
    cal = config.calibration
    return text_windows(tokenizer, calibration, cal.seq_len, cal.recovery_samples, "recovery", encoder)


#: A latency target is met when the pruned model's measured latency is within the budget and above
#: (1 - LATENCY_SLACK) times it, so it is not pruned further than asked.
LATENCY_SLACK = 0.10


def _budget(model, adapter, config: PruningConfig) -> Budget | None:
    """The memory or latency budget the config asks for (parameter targets are planned from costs directly)."""
    if config.target_memory_mb is not None:
        embedding = adapter.count_parameters()["total"] - adapter.count_parameters()["non_embedding"]
        itemsize = next(model.parameters()).element_size()
        return memory_budget(
            adapter.shape(),
            adapter.param_costs(),
            embedding,
            itemsize,
            config.memory_context,
            config.target_memory_mb,
        )
    if config.target_latency_ms is not None:
        kind, tokens = config.latency_kind, config.latency_tokens
        budget = latency_budget(model, kind, tokens, config.target_latency_ms, cache_dir())
        # The (cached) table gives relative costs; the machine's speed right now comes from the dense model.
        return budget.scaled(measure_ms(model, kind, tokens) / budget.of(adapter.shape()))
    return None


def fit_to_calibration(adapter, windows: TokenWindows, config: PruningConfig) -> PruningConfig:
    """Warn when the calibration text is too short for least-squares fits, and skip the refit then."""
    tokens, needed = windows.ids.numel(), tokens_needed(adapter)
    if tokens >= needed:
        return config
    short = (
        f"{tokens} calibration tokens are fewer than the {needed} that least-squares fits need "
        f"({MIN_TOKENS_PER_INPUT} per input of the widest projection)"
    )
    more = "give more text with --samples / --seq-len (CalibrationConfig)"
    if config.criterion == "obs":
        logger.warning("%s: obs scores will fit the calibration text; %s, or use taylor", short, more)
    if not config.reconstruct:
        return config
    logger.warning(
        "%s: skipping the refit, which would fit the calibration text rather than the model; %s", short, more
    )
    return dataclasses.replace(config, reconstruct=False)


@dataclass
class _Cutting:
    """How plans are applied in this run: all at once from the dense model's Gram matrices, or (``batches`` given:
    sequential calibration) one layer at a time on the activations of the layers already cut."""

    config: PruningConfig
    grams: InputGrams | None
    batches: list[torch.Tensor] | None
    scores: Scores | None

    def cut(self, model, plan: Plan, inplace: bool, seconds: dict) -> tuple[torch.nn.Module, Plan]:
        """Reconstruct (if asked) and slice a copy of the model (or the model itself when ``inplace``); return it
        with the plan applied (sequential calibration may choose other units of the same widths)."""
        config = self.config
        pruned = model if inplace else copy.deepcopy(model)
        adapter = adapter_for(pruned)
        if self.batches is not None:
            from fastprune.layerwise import cut_sequentially

            with _timed(seconds, "sequential cut"):
                return pruned, cut_sequentially(adapter, plan, self.scores, config, self.batches)
        if config.reconstruct:
            with _timed(seconds, "reconstruct"):
                reconstruct(adapter, plan, self.grams, config.damping)
        plan.info["reconstructed"] = config.reconstruct
        with _timed(seconds, "surgery"):
            apply_plan(adapter, plan)
        return pruned, plan


def _meet_latency(model, pruned, plan, scores, config, costs, budget, cutting, seconds, attempts: int = 4):
    """Measure the pruned model; while it misses the budget (or undershoots it by more than the slack), correct
    the latency table's limit by the measured/predicted ratio and re-plan."""
    target = config.target_latency_ms
    for attempt in range(attempts):
        with _timed(seconds, f"latency check {attempt + 1}"):
            measured = measure_ms(pruned, config.latency_kind, config.latency_tokens)
        plan.info["latency_check"] = {"measured_ms": measured, "target_ms": target, "attempts": attempt + 1}
        logger.info("latency check %d: %.1f ms for a %.1f ms target", attempt + 1, measured, target)
        if (1 - LATENCY_SLACK) * target <= measured <= target or scores is None:
            break
        # Put the table to this plan's measurement and aim at the middle of the accepted band.
        predicted = budget.of(plan.result_shape())
        budget = dataclasses.replace(budget.scaled(measured / predicted), limit=(1 - LATENCY_SLACK / 2) * target)
        new_plan = make_plan(scores, config, costs, budget)
        new_plan.info["calibration"] = plan.info.get("calibration")
        if new_plan.cuts == plan.cuts and new_plan.drop_layers == plan.drop_layers:
            break
        pruned, plan = cutting.cut(model, new_plan, False, seconds)
    check = plan.info["latency_check"]
    if check["measured_ms"] > target:
        raise PlanError(
            f"target_latency_ms={target:g}: the best plan measures {check['measured_ms']:.1f} ms on this machine "
            f"({config.latency_kind}, {config.latency_tokens} tokens); relax the target or allow more granularities"
        )
    return pruned, plan


@contextmanager
def _timed(seconds: dict[str, float], name: str):
    """Add the wall time of the block to ``seconds[name]`` (a phase may run more than once)."""
    t0 = time.perf_counter()
    yield
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0


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
        "recovery": result.recovery,
        "steps": result.steps,
        "torch": torch.__version__,
    }


def save_result(
    result: PruneResult,
    tokenizer,
    out: Path,
    inputs: list[Path],
    config: PruningConfig | None,
    source: str,
    overwrite: bool = False,
) -> Path:
    """Write the pruned model, plan, provenance and report (if any) to ``out`` in one atomic step."""
    check_output_dir(out, inputs, overwrite)
    extra = {INFO_FILE: json.dumps(provenance(result, config, source), indent=1) + "\n"}
    if len(result.plans) > 1:  # iterative: each step's plan applies to the previous step's model
        for k, plan in enumerate(result.plans, 1):
            extra[f"plan-step{k}.json"] = json.dumps(plan.to_dict(), indent=1) + "\n"
    else:
        extra[PLAN_FILE] = json.dumps(result.plan.to_dict(), indent=1) + "\n"
    if result.report is not None:
        extra.update(result.report.files())
    path = save_model(result.model, tokenizer, out, extra, overwrite)
    logger.info("saved pruned model to %s", path)
    return path
