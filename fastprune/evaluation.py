"""Measure models side by side: perplexity, parameters, prefill latency, decode speed, memory -> a Report.

Latencies of the models being compared are measured in the same run, interleaved round by round, so machine
noise hits them alike; each number is a median over rounds.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastprune.adapters import adapter_for
from fastprune.data import TokenWindows, read_text, token_windows
from fastprune.errors import ConfigError


@dataclass
class EvalConfig:
    """What to measure. Perplexity uses ``max_windows`` windows of ``seq_len`` tokens of each text."""

    texts: tuple[str, ...] = ("pydoc:heldout",)
    seq_len: int = 512
    max_windows: int = 16
    batch_size: int = 4
    latency: bool = True
    prefill_tokens: int = 512
    rounds: int = 5
    decode_tokens: int = 32

    def __post_init__(self):
        self.texts = tuple(self.texts)
        for name in ("seq_len", "max_windows", "batch_size", "prefill_tokens", "rounds", "decode_tokens"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"evaluation {name} must be a positive integer; got {getattr(self, name)!r}")


@dataclass
class Measurement:
    """One model's numbers. ``quality`` maps a text to perplexity (decoders) or to the mean cosine similarity of
    sentence embeddings with the first model's (encoders)."""

    name: str
    params: int
    non_embedding_params: int
    quality: dict[str, float] = field(default_factory=dict)
    prefill_ms: float | None = None
    decode_tokens_per_s: float | None = None
    weights_mb: float = 0.0
    kv_cache_mb: float | None = None  # at prefill_tokens of context


@dataclass
class Report:
    """Measurements of several models (the first is the reference) and how they were taken."""

    rows: list[Measurement]
    quality_metric: str
    info: dict = field(default_factory=dict)

    def ratios(self) -> dict[str, dict[str, float]]:
        """Each later row relative to the first: parameter fraction, quality ratio, speedups."""
        base = self.rows[0]
        out = {}
        for row in self.rows[1:]:
            r = {"non_embedding_params_fraction": row.non_embedding_params / base.non_embedding_params}
            for text, value in row.quality.items():
                if text in base.quality:
                    r[f"quality_ratio[{text}]"] = value / base.quality[text]
            if row.prefill_ms and base.prefill_ms:
                r["prefill_speedup"] = base.prefill_ms / row.prefill_ms
            if row.decode_tokens_per_s and base.decode_tokens_per_s:
                r["decode_speedup"] = row.decode_tokens_per_s / base.decode_tokens_per_s
            out[row.name] = r
        return out

    def to_dict(self) -> dict:
        return {
            "rows": [asdict(r) for r in self.rows],
            "quality_metric": self.quality_metric,
            "ratios": self.ratios(),
            "info": self.info,
        }

    def to_markdown(self) -> str:
        texts = list(dict.fromkeys(t for r in self.rows for t in r.quality))
        metric = self.quality_metric
        head = ["model", "params", "non-emb params"] + [f"{metric} {t}" for t in texts]
        head += ["prefill ms", "decode tok/s", "weights MB"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        base = self.rows[0]
        for row in self.rows:
            cells = [row.name, f"{row.params / 1e6:.1f}M", f"{row.non_embedding_params / 1e6:.1f}M"]
            if row is not base:
                cells[2] += f" ({row.non_embedding_params / base.non_embedding_params:.0%})"
            for t in texts:
                v = row.quality.get(t)
                cell = "-" if v is None else f"{v:.3f}" if metric == "embedding cosine" else f"{v:.2f}"
                if v is not None and row is not base and t in base.quality:
                    cell += f" ({v / base.quality[t]:.2f}x)"
                cells.append(cell)
            for value, base_value, speedup in (
                (row.prefill_ms, base.prefill_ms, lambda a, b: b / a),
                (row.decode_tokens_per_s, base.decode_tokens_per_s, lambda a, b: a / b),
            ):
                cell = "-" if value is None else f"{value:.1f}"
                if value and base_value and row is not base:
                    cell += f" ({speedup(value, base_value):.2f}x)"
                cells.append(cell)
            cells.append(f"{row.weights_mb:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def files(self) -> dict[str, str]:
        """report.json and report.md, by file name."""
        md = "# fastprune report\n\n" + self.to_markdown() + "\n" + _info_markdown(self.info)
        return {"report.json": json.dumps(self.to_dict(), indent=1) + "\n", "report.md": md}

    def save(self, directory: Path) -> None:
        from fastprune.io import atomic_write_text

        for name, text in self.files().items():
            atomic_write_text(Path(directory) / name, text)


def _info_markdown(info: dict) -> str:
    return "".join(f"- {k}: {v}\n" for k, v in info.items() if not isinstance(v, dict | list))


def perplexity(model, windows: TokenWindows, batch_size: int) -> float:
    """exp(mean next-token loss) over all predicted tokens of the windows."""
    total_nll, total_tokens = 0.0, 0
    with torch.inference_mode():
        for batch in tqdm(windows.batches(batch_size), desc="perplexity", disable=None, leave=False):
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
            total_nll += float(nll)
            total_tokens += batch[:, 1:].numel()
    return math.exp(total_nll / total_tokens)


def sentence_embeddings(model, windows: TokenWindows, batch_size: int) -> torch.Tensor:
    """Mean-pooled, L2-normalised last hidden states (the sentence-transformers recipe for MiniLM)."""
    out = []
    with torch.inference_mode():
        for batch in windows.batches(batch_size):
            out.append(F.normalize(model(input_ids=batch).last_hidden_state.mean(dim=1).float(), dim=-1))
    return torch.cat(out)


def prefill_seconds(model, tokens: int, vocab_size: int) -> float:
    """Wall time of one forward pass over ``tokens`` tokens at batch 1 (what a prompt costs before decoding)."""
    ids = torch.randint(0, vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0)).to(_device(model))
    with torch.inference_mode():
        _sync(ids.device)
        t0 = time.perf_counter()
        model(input_ids=ids)
        _sync(ids.device)
        return time.perf_counter() - t0


def decode_tokens_per_second(model, new_tokens: int, vocab_size: int, prompt_tokens: int = 32, batch: int = 1) -> float:
    """Greedy generation speed with the KV cache, prompt processing excluded: tokens generated per second over all
    ``batch`` sequences."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (batch, prompt_tokens), generator=gen).to(_device(model))
    kwargs = {"do_sample": False, "pad_token_id": 0}
    with torch.inference_mode():
        _sync(ids.device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        _sync(ids.device)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, **kwargs)
        _sync(ids.device)
        t2 = time.perf_counter()
    return batch * new_tokens / max((t2 - t1) - (t1 - t0), 1e-9)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall times include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kv_cache_mb(adapter, tokens: int) -> float:
    """MB of keys and values that ``tokens`` positions of one sequence keep in the cache, in the weights' dtype."""
    shape = adapter.shape()
    itemsize = next(adapter.model.parameters()).element_size()
    return 2 * sum(s.kv_heads for s in shape.layers) * shape.head_dim * tokens * itemsize / 2**20


def _weights_mb(model) -> float:
    """Parameters (tied ones once) and saved buffers, such as the positions of 2:4 layers' kept weights."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    for module in model.modules():
        for name, b in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                total += b.numel() * b.element_size()
    return total / 2**20


def evaluate(models: dict[str, torch.nn.Module], tokenizer, config: EvalConfig | None = None) -> Report:
    """Measure every model on the same texts and, interleaved, the same latency runs. The first is the reference."""
    config = config or EvalConfig()
    names = list(models)
    adapters = {n: adapter_for(m) for n, m in models.items()}
    causal = adapters[names[0]].causal
    rows = {}
    for name, adapter in adapters.items():
        counts = adapter.count_parameters()
        rows[name] = Measurement(name, counts["total"], counts["non_embedding"], weights_mb=_weights_mb(adapter.model))
        if causal:
            rows[name].kv_cache_mb = kv_cache_mb(adapter, config.prefill_tokens)
        adapter.model.eval()
    for source in config.texts:
        text = read_text(source)
        windows = token_windows(tokenizer, text, config.seq_len, config.max_windows, source, "evaluation", not causal)
        if causal:
            for name in names:
                rows[name].quality[source] = perplexity(models[name], windows, config.batch_size)
        else:
            reference = sentence_embeddings(models[names[0]], windows, config.batch_size)
            for name in names:
                emb = sentence_embeddings(models[name], windows, config.batch_size)
                rows[name].quality[source] = float((emb * reference).sum(-1).mean())
    if config.latency:
        _measure_latency(models, rows, config, causal)
    info = {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "eval_seq_len": config.seq_len,
        "eval_windows": config.max_windows,
        "prefill_tokens": config.prefill_tokens,
        "latency_rounds": config.rounds,
    }
    metric = "perplexity" if causal else "embedding cosine"
    return Report([rows[n] for n in names], metric, info)


def _measure_latency(models, rows, config: EvalConfig, causal: bool) -> None:
    vocab = {n: m.config.vocab_size for n, m in models.items()}
    prefill = {n: [] for n in models}
    decode = {n: [] for n in models}
    for n, m in models.items():  # warm-up: first calls allocate and pick kernels
        prefill_seconds(m, config.prefill_tokens, vocab[n])
    for _ in tqdm(range(config.rounds), desc="latency", disable=None, leave=False):
        for n, m in models.items():
            prefill[n].append(prefill_seconds(m, config.prefill_tokens, vocab[n]))
            if causal:
                decode[n].append(decode_tokens_per_second(m, config.decode_tokens, vocab[n]))
    for n in models:
        rows[n].prefill_ms = 1000 * statistics.median(prefill[n])
        if causal:
            rows[n].decode_tokens_per_s = statistics.median(decode[n])
