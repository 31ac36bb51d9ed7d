"""Look before you cut: importance maps and a predicted quality-vs-latency curve across pruning fractions.

For each fraction of non-embedding parameters the planner makes its plan from one set of scores; the plan's
removed score mass S (the sum of the removed units' scores) predicts the quality loss, and the latency table
predicts the latency. The quality predictor  log(ppl / ppl_dense) = b * S^p  is fitted to a few real prunes
(``check`` fractions, measured on held-out text) and the curve shows those measurements next to the prediction,
so the error of the prediction is in plain sight.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastprune.adapters import adapter_for
from fastprune.budget import param_counter
from fastprune.config import PruningConfig
from fastprune.data import read_text, token_windows
from fastprune.errors import ConfigError
from fastprune.evaluation import perplexity
from fastprune.io import atomic_dir
from fastprune.planning import Plan, make_plan
from fastprune.scoring.scores import Scores


@dataclass
class CurvePoint:
    fraction: float
    non_embedding_params: int
    removed_score: float
    predicted_ms: float | None = None
    predicted_ppl: float | None = None
    measured_ppl: float | None = None
    counts: dict = field(default_factory=dict)


@dataclass
class Analysis:
    criterion: str
    dense_ppl: float
    eval_text: str
    points: list[CurvePoint]
    fit: dict
    scores: Scores

    def to_markdown(self) -> str:
        lines = [
            f"criterion {self.criterion}; dense perplexity {self.dense_ppl:.2f} on {self.eval_text}; predictor "
            f"log(ppl/dense) = {self.fit['b']:.4g} * S^{self.fit['p']:.3g} fitted to the measured rows",
            "",
            "| removed | non-emb params | heads / channels removed | predicted prefill ms | predicted ppl "
            "| measured ppl |",
            "|---|---|---|---|---|---|",
        ]
        for p in self.points:
            ms = "-" if p.predicted_ms is None else f"{p.predicted_ms:.0f}"
            measured = "-" if p.measured_ppl is None else f"{p.measured_ppl:.2f}"
            lines.append(
                f"| {p.fraction:.0%} | {p.non_embedding_params / 1e6:.1f}M | {p.counts.get('heads', 0)} / "
                f"{p.counts.get('channels', 0)} | {ms} | {p.predicted_ppl:.2f} | {measured} |"
            )
        return "\n".join(lines) + "\n"

    def save(self, out: Path, overwrite: bool = False) -> None:
        """analysis.json/.md, scores.json, importance.png and curve.png, written as one atomic directory."""
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "scores"}
        with atomic_dir(out, overwrite) as tmp:
            (tmp / "analysis.json").write_text(json.dumps(data, indent=1) + "\n")
            (tmp / "analysis.md").write_text("# fastprune analysis\n\n" + self.to_markdown())
            (tmp / "scores.json").write_text(json.dumps(self.scores.to_dict()))
            plot_importance(self.scores, tmp / "importance.png")
            plot_curve(self, tmp / "curve.png")


def removed_score(scores: Scores, plan: Plan) -> float:
    """Sum of the scores of everything the plan removes (KV heads included)."""
    total = 0.0
    for i, cut in plan.cuts.items():
        for kind in ("heads", "kv_heads", "channels"):
            values = getattr(scores, kind)
            if values is not None and getattr(cut, kind):
                total += float(values[i][getattr(cut, kind)].sum())
    if plan.drop_layers and scores.layers is not None:
        total += float(scores.layers[plan.drop_layers].sum())
    return total


def fit_predictor(points: list[tuple[float, float]]) -> dict:
    """Fit log(ppl ratio) = b * S^p to (S, ppl ratio) pairs (p = 1 with a single pair)."""
    usable = [(s, math.log(r)) for s, r in points if s > 0 and r > 1]
    if not usable:
        return {"b": 0.0, "p": 1.0}
    if len(usable) == 1:
        s, y = usable[0]
        return {"b": y / s, "p": 1.0}
    x = torch.tensor([[1.0, math.log(s)] for s, _ in usable], dtype=torch.float64)
    y = torch.tensor([math.log(y) for _, y in usable], dtype=torch.float64)
    log_b, p = torch.linalg.lstsq(x, y[:, None]).solution.flatten().tolist()
    return {"b": math.exp(log_b), "p": p}


def analyze(
    model,
    tokenizer,
    scores: Scores,
    config: PruningConfig,
    fractions: list[float],
    check: list[float],
    eval_text: str = "pydoc:heldout",
    eval_windows: int = 8,
    latency_budget=None,
    prune_fn=None,
) -> Analysis:
    """Plan every fraction from one set of scores, prune and measure the ``check`` fractions, predict the rest.

    ``prune_fn(model, plan) -> pruned model`` does the real prunes (fastprune.prune with the plan, so the same
    reconstruction applies); ``latency_budget`` (a fastprune.budget.Budget) predicts latency when given.
    """
    if not set(check) <= set(fractions):
        raise ConfigError("every --check fraction must also be one of --fractions")
    adapter = adapter_for(model)
    costs = adapter.param_costs()
    windows = token_windows(tokenizer, read_text(eval_text), 512, eval_windows, eval_text, "evaluation")
    dense_ppl = perplexity(model, windows, 4)
    points, plans = [], {}
    for f in fractions:
        plan = make_plan(scores, dataclasses.replace(config, target_params=f), costs)
        plans[f] = plan
        shape = plan.result_shape()
        points.append(
            CurvePoint(
                f,
                int(param_counter(costs).of(shape)),
                removed_score(scores, plan),
                None if latency_budget is None else latency_budget.of(shape),
                counts=plan.counts(),
            )
        )
    for p in points:
        if p.fraction in check:
            p.measured_ppl = perplexity(prune_fn(model, plans[p.fraction]), windows, 4)
    fit = fit_predictor([(p.removed_score, p.measured_ppl / dense_ppl) for p in points if p.measured_ppl])
    for p in points:
        p.predicted_ppl = dense_ppl * math.exp(fit["b"] * max(p.removed_score, 0.0) ** fit["p"])
    return Analysis(scores.criterion, dense_ppl, eval_text, points, fit, scores)


def plot_importance(scores: Scores, path: Path) -> None:
    """Heat map of head scores (layers x heads) and per-layer channel score percentiles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5))
    if scores.heads is not None and len({t.numel() for t in scores.heads}) == 1:
        im = axes[0].imshow(torch.stack(scores.heads).float().numpy(), aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=axes[0])
        axes[0].set(title=f"head importance ({scores.criterion})", xlabel="query head", ylabel="layer")
    if scores.channels is not None:
        qs = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
        perc = torch.stack([torch.quantile(t.double(), qs) for t in scores.channels]).numpy()
        for k, label in enumerate(("10th", "median", "90th")):
            axes[1].plot(perc[:, k], label=f"{label} percentile")
        axes[1].set(title="MLP channel importance per layer", xlabel="layer", ylabel="score", yscale="log")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curve(analysis: Analysis, path: Path) -> None:
    """Predicted perplexity against predicted latency (or removed fraction), with the measured checks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = analysis.points
    use_ms = all(p.predicted_ms is not None for p in pts)
    x = [p.predicted_ms if use_ms else p.fraction for p in pts]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(x, [p.predicted_ppl for p in pts], "o-", label="predicted")
    measured = [(xi, p.measured_ppl) for xi, p in zip(x, pts, strict=True) if p.measured_ppl]
    if measured:
        ax.plot(*zip(*measured, strict=True), "s", color="C3", label="measured (real prune)")
    for xi, p in zip(x, pts, strict=True):
        ax.annotate(f"{p.fraction:.0%}", (xi, p.predicted_ppl), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(analysis.dense_ppl, color="gray", ls="--", label="dense")
    ax.set(
        xlabel="predicted prefill ms" if use_ms else "fraction removed",
        ylabel=f"perplexity ({analysis.eval_text})",
        yscale="log",
        title=f"quality vs {'latency' if use_ms else 'size'} ({analysis.criterion})",
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
