"""The SmolLM2 rows of the study: build each variant (structured pruning, 2:4, both, GGUF quantization) with
fastprune's API, then measure held-out perplexity, weights and, interleaved round by round, latency."""

from __future__ import annotations

import copy
import dataclasses
import gc
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import fastprune
from fastprune.config import CalibrationConfig, PruningConfig
from fastprune.data import DEFAULT_CALIBRATION, read_text, token_windows
from fastprune.evaluation import _weights_mb, decode_tokens_per_second, perplexity, prefill_seconds
from fastprune.export import export_gguf
from fastprune.pipeline import prune
from fastprune.sparsity import SparsifyConfig, save_sparsified, sparsify
from fastprune.sparsity.modules import densify


@dataclass
class StudySettings:
    texts: tuple[str, ...] = ("pydoc:heldout", "licenses")
    windows: int = 4  # perplexity windows of seq_len tokens per text
    seq_len: int = 512
    # The default calibration mix, 32 windows of 256 tokens (a quarter of prune's default text: seven variants are
    # built, and the 2:4 criteria need only per-channel norms or one layer's Gram matrix), in batches of 8: the
    # same statistics as batches of 4 (sums over the same tokens) with half the calls.
    calibration: CalibrationConfig = field(
        default_factory=lambda: CalibrationConfig(num_samples=32, seq_len=256, batch_size=8)
    )
    calibration_text: str = DEFAULT_CALIBRATION
    prune_fractions: tuple[float, ...] = (0.25, 0.5)
    sparsify_criteria: tuple[str, ...] = ("magnitude", "wanda", "sparsegpt")
    combined_criterion: str = "sparsegpt"  # 2:4 on top of the 25% structured model
    gguf_types: tuple[str, ...] = ("q8_0", "q4_1")  # Q4_1 with searched scales: see fastprune.export.quantize
    prefill_tokens: int = 512
    decode_tokens: int = 32
    decode_batches: tuple[int, ...] = (1, 8)
    # Seven rounds: on a quiet 2-core VM one model's batch-1 decode speed alone wanders by +-20% from call to call
    # (27 to 19 tokens/s over a minute), so ratios are taken round by round, on back-to-back calls.
    rounds: int = 7
    quality: bool = True


@dataclass
class Row:
    """One variant: how it was made, what it weighs, its perplexities and (torch rows) latencies."""

    name: str
    kind: str  # dense, structured, 2:4, structured + 2:4, gguf
    weights_mb: float
    model: torch.nn.Module | None = field(default=None, repr=False)
    gguf: Path | None = None
    perplexity: dict[str, float] = field(default_factory=dict)
    prefill_ms: float | None = None
    decode_tokens_per_s: dict[int, float] = field(default_factory=dict)
    decode_rounds: dict[int, list[float]] = field(default_factory=dict)  # every round's tokens/s, in round order
    build_s: float = 0.0
    note: str = ""
    masked_dense_diff: float | None = None  # 2:4 rows: max |logit difference| from the masked dense model / max |logit|

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        d["gguf"] = None if self.gguf is None else self.gguf.name
        d["decode_tokens_per_s"] = {str(k): v for k, v in self.decode_tokens_per_s.items()}
        d["decode_rounds"] = {str(k): v for k, v in self.decode_rounds.items()}
        return d


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def build_rows(loaded, s: StudySettings, workdir: Path, progress=print) -> list[Row]:
    """Every variant of the study, made from the loaded dense model (GGUF files written into ``workdir``)."""
    dense, tok = loaded.model, loaded.tokenizer
    rows = [Row("dense", "dense", _weights_mb(dense), dense)]
    structured = {}
    grams = None
    for fraction in s.prune_fractions:
        # Widths in multiples of 32 so every matrix splits into whole GGUF quantization blocks.
        config = PruningConfig(criterion="obs", target_params=fraction, round_to=32, calibration=s.calibration)
        result, sec = _timed(lambda c=config, g=grams: prune(dense, c, s.calibration_text, tok, grams=g))
        grams = result.grams
        name = f"structured {fraction:.0%} (obs)"
        structured[fraction] = result.model
        rows.append(Row(name, "structured", _weights_mb(result.model), result.model, build_s=sec))
        progress(f"built {name} in {sec:.0f} s")
    for criterion in s.sparsify_criteria:
        config = SparsifyConfig(criterion=criterion, calibration=s.calibration)
        result, sec = _timed(lambda c=config: sparsify(dense, c, s.calibration_text, tok))
        model, note = _saved_and_loaded(result, tok, config, workdir / f"2-4-{criterion}")
        rows.append(Row(f"2:4 ({criterion})", "2:4", _weights_mb(model), model, build_s=sec, note=note))
        progress(f"built 2:4 ({criterion}) in {sec:.0f} s")
    base = structured[min(structured)]
    config = SparsifyConfig(criterion=s.combined_criterion, calibration=s.calibration)
    result, sec = _timed(lambda: sparsify(base, config, s.calibration_text, tok))
    model, note = _saved_and_loaded(result, tok, config, workdir / "structured-2-4")
    name = f"structured {min(structured):.0%} + 2:4 ({s.combined_criterion})"
    rows.append(Row(name, "structured + 2:4", _weights_mb(model), model, build_s=sec, note=note))
    progress(f"built {name} in {sec:.0f} s")
    for source_name, model in (("dense", dense), (f"structured {min(structured):.0%}", base)):
        for qtype in s.gguf_types:
            path = workdir / f"{source_name.replace(' ', '-').replace('%', '')}.{qtype}.gguf"
            _, sec = _timed(lambda m=model, p=path, q=qtype: export_gguf(m, tok, p, q))
            rows.append(
                Row(f"{source_name} GGUF {qtype.upper()}", "gguf", _gguf_weights_mb(path), gguf=path, build_s=sec)
            )
            progress(f"exported {rows[-1].name} in {sec:.0f} s")
    return rows


LOADED = "saved 2:4-compressed, loaded with fastprune.load (2:4 kernels)"


def _saved_and_loaded(result, tokenizer, config: SparsifyConfig, path: Path) -> tuple[torch.nn.Module, str]:
    """The sparse model as users run it (written by ``save_sparsified``, read back by ``fastprune.load``) and the
    row's note: which layers fastprune.load runs through their masked dense weights (faster there)."""
    save_sparsified(result, tokenizer, path, [], config, "smollm2")
    model = fastprune.load(path)
    dense = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if getattr(m, "runs_dense", False)})
    return model, LOADED + (f"; {', '.join(dense)} run dense (measured faster at load)" if dense else "")


def masked_dense_difference(model: torch.nn.Module, tokenizer, s: StudySettings) -> float:
    """Largest |logit| difference between a 2:4 model on its kernels and the same model with masked dense
    ``nn.Linear`` layers, over one held-out window, as a fraction of the largest |logit| (both sum in fp32, in
    different orders)."""
    w = token_windows(tokenizer, read_text(s.texts[0]), s.seq_len, 1, s.texts[0], "evaluation")
    masked = densify(copy.deepcopy(model))
    with torch.inference_mode():
        got, expected = model(input_ids=w.ids).logits, masked(input_ids=w.ids).logits
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _gguf_weights_mb(path: Path) -> float:
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors) / 2**20


def load_gguf(path: Path, device: str) -> torch.nn.Module:
    """The GGUF model as transformers loads it (dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).to(device).eval()


def measure_quality(rows: list[Row], tokenizer, s: StudySettings, device: str, progress=print) -> None:
    """Perplexity of every row on the same token windows of each held-out text."""
    windows = {t: token_windows(tokenizer, read_text(t), s.seq_len, s.windows, t, "evaluation") for t in s.texts}
    for row in rows:
        model = row.model if row.gguf is None else load_gguf(row.gguf, device)
        for text, w in windows.items():
            w = dataclasses.replace(w, ids=w.ids.to(device))
            row.perplexity[text] = perplexity(model, w, 4)
        progress(f"perplexity {row.name}: " + ", ".join(f"{t} {v:.2f}" for t, v in row.perplexity.items()))
        if row.gguf is not None:
            del model
            gc.collect()


def measure_latency(rows: list[Row], vocab_size: int, s: StudySettings, progress=print) -> None:
    """Prefill (``prefill_tokens`` at batch 1) and decode speed at each batch, interleaved round by round."""
    timed = [r for r in rows if r.model is not None]
    prefill = {r.name: [] for r in timed}
    decode = {(r.name, b): [] for r in timed for b in s.decode_batches}
    for r in timed:  # warm-up: first calls allocate and pick kernels
        prefill_seconds(r.model, s.prefill_tokens, vocab_size)
        decode_tokens_per_second(r.model, 2, vocab_size)
    for k in range(s.rounds):
        for r in timed:
            prefill[r.name].append(prefill_seconds(r.model, s.prefill_tokens, vocab_size))
            for b in s.decode_batches:
                decode[(r.name, b)].append(decode_tokens_per_second(r.model, s.decode_tokens, vocab_size, batch=b))
        progress(f"latency round {k + 1}/{s.rounds} done")
    for r in timed:
        r.prefill_ms = 1000 * statistics.median(prefill[r.name])
        r.decode_rounds = {b: decode[(r.name, b)] for b in s.decode_batches}
        r.decode_tokens_per_s = {b: statistics.median(v) for b, v in r.decode_rounds.items()}


def make_workdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="fastprune-study-")
