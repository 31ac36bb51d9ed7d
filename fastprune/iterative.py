"""Iterative pruning: cut a share of the target, recover, re-score the smaller model, repeat.

Aggressive ratios lose less quality this way than in one shot, because each round's scores see the model as the
previous rounds left it. Step k of N keeps ``total - k/N * (total - final)`` non-embedding parameters of the
original model; recovery always distils from the original (dense) model.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from fastprune.adapters import adapter_for
from fastprune.config import PruningConfig
from fastprune.data import DEFAULT_CALIBRATION, read_text, token_windows
from fastprune.errors import ConfigError
from fastprune.evaluation import EvalConfig, perplexity
from fastprune.pipeline import PruneResult, prune
from fastprune.recovery import RecoveryConfig

logger = logging.getLogger("fastprune")


def prune_iteratively(
    model: torch.nn.Module,
    config: PruningConfig,
    steps: int,
    calibration=DEFAULT_CALIBRATION,
    tokenizer=None,
    recovery: RecoveryConfig | None = None,
    evaluation: EvalConfig | None = None,
) -> PruneResult:
    """Reach ``config.target_params`` in ``steps`` rounds of prune (+ recover); the result lists every step.

    Each step's numbers (parameters, units removed, perplexity on ``evaluation.texts``, recovery outcome) are in
    ``result.steps``; ``result.plans[k]`` applies to the model left by step k - 1.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer; got {steps!r}")
    if config.target_params is None:
        raise ConfigError("iterative pruning (steps > 1) needs target_params")
    total = adapter_for(model).count_parameters()["non_embedding"]
    final = total * (1 - config.target_params) if config.target_params < 1 else config.target_params
    current, plans, rows, seconds = model, [], [], {}
    result = None
    for k in range(1, steps + 1):
        keep = round(total - k / steps * (total - final))
        step_config = dataclasses.replace(config, target_params=float(keep))
        result = prune(current, step_config, calibration, tokenizer, recovery=recovery, teacher=model)
        current = result.model
        plans.append(result.plan)
        row = {
            "step": k,
            "non_embedding_params": adapter_for(current).count_parameters()["non_embedding"],
            "counts": result.plan.counts(),
            "seconds": result.seconds,
        }
        if result.recovery is not None:
            row["recovery"] = {key: result.recovery[key] for key in ("best_val_loss", "steps", "stop_reason")}
        if evaluation is not None and adapter_for(current).causal:
            row["quality"] = _quality(current, tokenizer, evaluation)
        logger.info("step %d/%d: %s", k, steps, row)
        rows.append(row)
        for name, value in result.seconds.items():
            seconds[name] = seconds.get(name, 0.0) + value
    return dataclasses.replace(result, plans=plans, steps=rows, seconds=seconds)


def _quality(model, tokenizer, evaluation: EvalConfig) -> dict[str, float]:
    out = {}
    for source in evaluation.texts:
        windows = token_windows(
            tokenizer, read_text(source), evaluation.seq_len, evaluation.max_windows, source, "evaluation"
        )
        out[source] = perplexity(model, windows, evaluation.batch_size)
    return out
