"""Measure CNNs side by side: top-1 accuracy, parameters, multiply-accumulates, latency at several batch sizes.

Latencies of the compared models are measured in interleaved rounds (every model once per round), so a burst of
other work on the machine lands on all of them alike; each number is a median over rounds.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from fastprune.cnn.costs import CostModel
from fastprune.cnn.data import ImageSet
from fastprune.cnn.graph import analyze
from fastprune.errors import ConfigError


@dataclass
class CnnEvalConfig:
    """What to measure: accuracy on ``data`` (if given), latency of a forward pass at each of ``batch_sizes``
    for inputs of ``input_size``, medians of ``rounds`` interleaved rounds."""

    input_size: tuple[int, ...] = (3, 224, 224)
    batch_sizes: tuple[int, ...] = (1, 8)
    rounds: int = 5
    latency: bool = True
    batch_size: int = 64  # for accuracy

    def __post_init__(self):
        self.input_size, self.batch_sizes = tuple(self.input_size), tuple(self.batch_sizes)
        if not self.batch_sizes or any(not isinstance(b, int) or b < 1 for b in self.batch_sizes):
            raise ConfigError(f"batch sizes must be positive integers; got {self.batch_sizes}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"rounds must be a positive integer; got {self.rounds!r}")


@dataclass
class CnnMeasurement:
    name: str
    params: int
    macs: int
    top1: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)  # batch size -> median ms per forward pass


@dataclass
class CnnReport:
    """Rows of measurements (the first is the reference) and how they were taken."""

    rows: list[CnnMeasurement]
    info: dict = field(default_factory=dict)

    def ratios(self) -> dict[str, dict[str, float]]:
        base, out = self.rows[0], {}
        for row in self.rows[1:]:
            r = {"params_fraction": row.params / base.params, "macs_fraction": row.macs / base.macs}
            r["ideal_speedup"] = base.macs / row.macs
            for b, ms in row.latency_ms.items():
                if b in base.latency_ms:
                    r[f"speedup_b{b}"] = base.latency_ms[b] / ms
                    r[f"speedup_b{b}_of_ideal"] = r[f"speedup_b{b}"] / r["ideal_speedup"]
            out[row.name] = r
        return out

    def to_dict(self) -> dict:
        return {"rows": [asdict(r) for r in self.rows], "ratios": self.ratios(), "info": self.info}

    def to_markdown(self) -> str:
        batches = list(dict.fromkeys(b for r in self.rows for b in r.latency_ms))
        head = ["model", "top-1", "params", "GMACs", *[f"ms batch {b}" for b in batches]]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base = self.rows[0]
        for row in self.rows:
            first = row is base
            cells = [row.name, "-" if row.top1 is None else f"{100 * row.top1:.2f}%"]
            cells.append(f"{row.params / 1e6:.3f}M" + ("" if first else f" ({row.params / base.params:.0%})"))
            cells.append(f"{row.macs / 1e9:.3f}" + ("" if first else f" ({row.macs / base.macs:.0%})"))
            for b in batches:
                ms = row.latency_ms.get(b)
                cell = "-" if ms is None else f"{ms:.1f}"
                if ms and not first and base.latency_ms.get(b):
                    cell += f" ({base.latency_ms[b] / ms:.2f}x)"
                cells.append(cell)
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def files(self) -> dict[str, str]:
        info = "".join(f"- {k}: {v}\n" for k, v in self.info.items() if not isinstance(v, dict | list))
        unknown = self.info.get("not_understood") or []
        if unknown:
            info += "\nOperations not understood (the channels they touch were kept):\n\n"
            info += "".join(f"- {u}\n" for u in unknown)
        return {
            "report.json": json.dumps(self.to_dict(), indent=1) + "\n",
            "report.md": "# fastprune report (CNN)\n\n" + self.to_markdown() + "\n" + info,
        }


def top1(model: nn.Module, data: ImageSet, batch_size: int = 64) -> float:
    """Fraction of ``data`` whose highest logit is the label."""
    if data.labels is None:
        raise ConfigError(f"top-1 accuracy needs labelled images; {data.source} has no labels")
    model.eval()
    correct = 0
    with torch.inference_mode():
        for images, labels in data.batches(batch_size):
            correct += int((model(images).argmax(-1) == labels).sum())
    return correct / len(data.images)


def forward_seconds(model: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        t0 = time.perf_counter()
        model(x)
        return time.perf_counter() - t0


def measure_latency(models: dict[str, nn.Module], input_size, batch_sizes, rounds: int) -> dict[str, dict[str, float]]:
    """Median ms of a forward pass per model and batch size, interleaved round by round."""
    inputs = {b: torch.randn(b, *input_size, generator=torch.Generator().manual_seed(b)) for b in batch_sizes}
    samples = {n: {b: [] for b in batch_sizes} for n in models}
    for m in models.values():
        m.eval()
        for x in inputs.values():  # warm-up: first calls allocate and pick kernels
            forward_seconds(m, x)
    for _ in tqdm(range(rounds), desc="latency", disable=None, leave=False):
        for b, x in inputs.items():
            for n, m in models.items():
                samples[n][b].append(forward_seconds(m, x))
    return {n: {str(b): 1000 * statistics.median(s) for b, s in per.items()} for n, per in samples.items()}


def evaluate_cnn(models: dict[str, nn.Module], data: ImageSet | None, config: CnnEvalConfig) -> CnnReport:
    """Measure every model (the first is the reference) on the same images and interleaved latency runs."""
    example = torch.zeros(1, *config.input_size)
    rows = {}
    for name, m in models.items():
        graph = analyze(m, example)
        costs = CostModel(m, graph)
        full = torch.ones(graph.num_units, dtype=torch.bool)
        rows[name] = CnnMeasurement(name, costs.params(full), costs.macs(full))
        if data is not None and data.labels is not None:
            rows[name].top1 = top1(m, data, config.batch_size)
    if config.latency:
        for name, per in measure_latency(models, config.input_size, config.batch_sizes, config.rounds).items():
            rows[name].latency_ms = per
    info = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "input_size": "x".join(map(str, config.input_size)),
        "latency_rounds": config.rounds,
        "accuracy_on": data.source if data is not None else None,
    }
    return CnnReport(list(rows.values()), info)
