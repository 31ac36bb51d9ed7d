"""Latency on this machine as a linear function of a model's widths, fitted to a few measured variants.

The variants are copies of the model cut uniformly to other widths (fewer channels, fewer query heads, fewer KV
heads, fewer layers); their weights do not matter for timing. A least-squares fit with non-negative coefficients
gives a Budget: fixed cost (embeddings, head, the framework) plus costs per layer, query head, KV head and MLP
channel. Fits are cached per machine, model shape, latency kind and token count.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import platform
import statistics
from pathlib import Path

import torch
from tqdm.auto import tqdm

from fastprune.adapters import adapter_for
from fastprune.adapters.base import ModelShape
from fastprune.budget import Budget
from fastprune.evaluation import decode_tokens_per_second, prefill_seconds
from fastprune.io import atomic_write_text
from fastprune.planning import LayerCut, Plan
from fastprune.surgery import apply_plan

logger = logging.getLogger("fastprune")

COEFFICIENTS = ("fixed", "layer", "head", "kv_head", "channel")


def measure_ms(model, kind: str, tokens: int, repeats: int = 3) -> float:
    """Median milliseconds of a prefill of ``tokens`` tokens, or of one decode step after a ``tokens`` prompt."""
    vocab = model.config.vocab_size
    if kind == "prefill":
        prefill_seconds(model, tokens, vocab)  # warm-up
        return 1000 * statistics.median(prefill_seconds(model, tokens, vocab) for _ in range(repeats))
    decode_tokens_per_second(model, 4, vocab, prompt_tokens=tokens)
    return statistics.median(
        1000 / decode_tokens_per_second(model, 16, vocab, prompt_tokens=tokens) for _ in range(repeats)
    )


def _variant_plans(shape: ModelShape) -> list[Plan]:
    """Uniform cuts that move each coefficient independently (channels, query heads, KV heads, layers)."""
    s, n = shape.layers[0], shape.num_layers
    g = s.group_size

    def uniform(heads: int = 0, kv: int = 0, channels: int = 0, drop: int = 0) -> Plan:
        cut_heads = [h for k in range(s.kv_heads) for h in range(k * g + g - heads, (k + 1) * g)] if heads else []
        if kv:
            cut_heads = sorted(set(cut_heads) | {h for k in range(kv) for h in range(k * g, (k + 1) * g)})
        cut = LayerCut(cut_heads, list(range(kv)), list(range(channels)))
        kept = range(drop, n)
        return Plan(shape, {i: cut for i in kept} if not cut.is_empty() else {}, list(range(drop)))

    plans = [
        uniform(),
        uniform(channels=s.channels // 2),
        uniform(channels=3 * s.channels // 4),
        uniform(drop=n // 2),
        uniform(drop=n // 2, channels=s.channels // 2),
    ]
    if g > 1:
        plans.append(uniform(heads=g // 2 or 1))
    if s.kv_heads > 1:
        plans.append(uniform(kv=s.kv_heads // 2))
    elif g == 1 and s.heads > 1:
        plans.append(uniform(kv=s.heads // 2))
    return plans


def _measure_variants(model, plans: list[Plan], kind: str, tokens: int, rounds: int = 3) -> list[float]:
    """Median milliseconds of each variant, measured in interleaved rounds so that a burst of other work on the
    machine lands on one round of every variant instead of on all the repeats of one. One variant is in memory
    at a time (each is cut again every round: far cheaper than the measurement)."""
    times: list[list[float]] = [[] for _ in plans]
    for _ in tqdm(range(rounds), desc=f"latency table ({kind})", disable=None, leave=False):
        for plan, samples in zip(plans, times, strict=True):
            variant = copy.deepcopy(model)
            apply_plan(adapter_for(variant), plan)
            samples.append(measure_ms(variant, kind, tokens, repeats=1))
            del variant
    return [statistics.median(samples) for samples in times]


def _features(shape: ModelShape) -> list[float]:
    return [
        1.0,
        float(shape.num_layers),
        *(float(sum(getattr(s, k) for s in shape.layers)) for k in ("heads", "kv_heads", "channels")),
    ]


def _nonnegative_lstsq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Least squares with coefficients >= 0 (drop the most negative one and refit until none is)."""
    active = list(range(a.shape[1]))
    while True:
        x = torch.linalg.lstsq(a[:, active], b[:, None]).solution.flatten()
        if (x >= 0).all() or len(active) == 1:
            out = torch.zeros(a.shape[1], dtype=a.dtype)
            out[active] = x.clamp_min(0)
            return out
        active.pop(int(torch.argmin(x)))


def _cache_key(shape: ModelShape, kind: str, tokens: int, dtype: torch.dtype) -> str:
    machine = [platform.machine(), platform.processor(), torch.__version__, torch.get_num_threads()]
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        machine.append(next(line for line in lines if line.startswith("model name")))
    except (OSError, StopIteration):
        pass
    blob = json.dumps([shape.to_dict(), kind, tokens, str(dtype), machine], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def latency_budget(model, kind: str, tokens: int, limit_ms: float, cache_dir: Path | None = None) -> Budget:
    """A latency Budget for ``model``'s architecture on this machine (measured once, then cached)."""
    adapter = adapter_for(model)
    shape = adapter.shape()
    dtype = next(model.parameters()).dtype
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / "latency" / f"{_cache_key(shape, kind, tokens, dtype)}.json"
        if path.is_file():
            coefficients = json.loads(path.read_text())["coefficients"]
            return Budget(f"{kind}_ms", limit_ms, **coefficients)
    plans = _variant_plans(shape)
    rows = [_features(plan.result_shape()) for plan in plans]
    times = _measure_variants(model, plans, kind, tokens)
    a, b = torch.tensor(rows, dtype=torch.float64), torch.tensor(times, dtype=torch.float64)
    coefficients = dict(zip(COEFFICIENTS, _nonnegative_lstsq(a, b).tolist(), strict=True))
    fitted = a @ torch.tensor(list(coefficients.values()), dtype=torch.float64)
    logger.info(
        "latency table (%s, %d tokens): measured %s ms, fit %s ms",
        kind,
        tokens,
        [round(t, 1) for t in times],
        [round(float(t), 1) for t in fitted],
    )
    if path is not None:
        atomic_write_text(path, json.dumps({"coefficients": coefficients, "measured_ms": times, "features": rows}))
    return Budget(f"{kind}_ms", limit_ms, **coefficients)
