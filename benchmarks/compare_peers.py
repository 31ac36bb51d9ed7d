"""fastprune against other structured pruners, side by side, at equal parameter counts (issue 5, item 4).

    python benchmarks/compare_peers.py            # full run: 25% and 40%, recovery at 25%; writes benchmarks/results/
    python benchmarks/compare_peers.py --quick    # smoke test: one ratio, few windows, no recovery (a few minutes)

Every method prunes the bundled SmolLM2-135M-Instruct to the same fraction of its non-embedding parameters,
calibrating on the same windows of ``pydoc:calibration``:

- fastprune: ``target_params`` with granularities heads and channels, per-layer ranking, one run per criterion;
  then global ranking for the criterion with the best one-shot perplexity (geometric mean over the texts).
- Torch-Pruning 1.6.1, the recipe of its LLM example (examples/LLMs/prune_llm.py): MetaPruner, local ranking,
  GQA-aware head removal (``num_heads``, ``prune_num_heads``, no head-dim pruning) plus MLP channels, with
  GroupMagnitudeImportance(p=2) or GroupTaylorImportance (gradients of the causal-LM loss on the calibration
  windows). The hidden width is left alone (``embed_tokens`` and ``lm_head`` ignored), so the embeddings match
  every other method; the head ratio is the target fraction, as in the example, and the MLP ratio is solved so
  the non-embedding parameters removed come as close to the target as head and ``round_to`` granularity allow.
- ShortGPT-style depth pruning: drop the layers of lowest Block Influence until the target is met
  (fastprune's ``granularities=("layers",)``, no reconstruction: layers are only removed).

Each method runs in its own subprocess, which prunes (timed), records its peak memory (VmHWM, reset through
/proc/self/clear_refs just before pruning, minus the resident size at that moment), measures held-out perplexity
and saves the model. Recovery (``fastprune.recovery.recover``, distillation from the dense model on
``pydoc:calibration``) runs with one RecoveryConfig for every method it is given to. Prefill latency and decode
speed of every model of a ratio are then measured in one process, interleaved round by round with the dense
model (``fastprune.evaluate``). Results: compare_peers.{json,md,png} in the output directory.

Torch-Pruning and matplotlib are not fastprune dependencies: ``pip install torch-pruning==1.6.1 matplotlib``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import fastprune
from fastprune.data import read_text, token_windows

ROOT = Path(__file__).resolve().parent.parent
TP_VERSION = "1.6.1"


@dataclass
class Settings:
    """Everything that is the same for every method in one comparison."""

    model: str = "smollm2"
    ratios: tuple[float, ...] = (0.25, 0.4)
    criteria: tuple[str, ...] = ("obs", "taylor", "wanda", "magnitude_l2")
    global_best: bool = True
    peers: bool = True
    cal_samples: int = 32
    cal_seq_len: int = 256
    batch_size: int = 4
    eval_texts: tuple[str, ...] = ("pydoc:heldout", "licenses")
    eval_seq_len: int = 512
    eval_windows: int = 16
    rounds: int = 5
    prefill_tokens: int = 512
    decode_tokens: int = 32
    encoder_model: str = "minilm"
    encoder_ratios: tuple[float, ...] = (0.25,)
    encoder: bool = False  # also run the encoder section when Torch-Pruning prunes the decoder
    recovery_ratios: tuple[float, ...] = (0.25,)
    recover_all: bool = False
    recovery_minutes: float = 4.0
    recovery_steps: int = 40
    recovery_lr: float = 1e-4
    recovery_eval_every: int = 20
    recovery_seq_len: int = 256
    recovery_windows: int = 200
    tp_round_to: int = 4

    def recovery_config(self):
        """The one RecoveryConfig every recovered method gets."""
        from fastprune.recovery import RecoveryConfig  # lazily: recovery is optional for the one-shot arms

        return RecoveryConfig(
            mode="distill",
            lr=self.recovery_lr,
            max_steps=self.recovery_steps,
            eval_every=self.recovery_eval_every,
            batch_size=self.batch_size,
            time_budget_min=self.recovery_minutes,
            patience=0,
            seed=0,
        )

    def eval_config(self, texts=None, latency=False) -> fastprune.EvalConfig:
        return fastprune.EvalConfig(
            texts=self.eval_texts if texts is None else texts,
            seq_len=self.eval_seq_len,
            max_windows=self.eval_windows,
            batch_size=self.batch_size,
            latency=latency,
            prefill_tokens=self.prefill_tokens,
            rounds=self.rounds,
            decode_tokens=self.decode_tokens,
        )

    def calibration(self) -> fastprune.CalibrationConfig:
        return fastprune.CalibrationConfig(self.cal_samples, self.cal_seq_len, self.batch_size)


@dataclass
class Method:
    """One way of pruning: a tool and its settings."""

    label: str
    tool: str  # fastprune | torch_pruning | shortgpt
    criterion: str = ""  # fastprune criterion, or Torch-Pruning importance (magnitude | taylor)
    ranking: str = "per_layer"
    trace: str = "default"  # Torch-Pruning: attention implementation the dependency graph is traced with


# -- memory -------------------------------------------------------------------------------------------------------
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """Peak resident memory of this process inside a block, above the resident memory when it started (MB)."""

    def __enter__(self):
        self.method = "VmHWM reset by /proc/self/clear_refs"
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:  # no reset: the high-water mark of the whole process, which can only overstate the start
            self.method = "ru_maxrss delta"
        self.start_kb = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        self.mb = max(0, _status_kb("VmHWM") - self.start_kb) / 1024
        return False


# -- pruning methods (run inside a worker) ----------------------------------------------------------------------
def prune_fastprune(model, windows, method: Method, fraction: float, s: Settings, scores_in=None) -> dict:
    if method.tool == "shortgpt":
        config = fastprune.PruningConfig(
            granularities=("layers",),
            target_params=fraction,
            layer_criterion="block_influence",
            reconstruct=False,
            calibration=s.calibration(),
        )
    else:
        config = fastprune.PruningConfig(
            criterion=method.criterion,
            target_params=fraction,
            granularities=("heads", "channels"),
            ranking=method.ranking,
            calibration=s.calibration(),
        )
    plan = None
    if scores_in is not None:  # scores do not depend on the target or the ranking: plan from the saved ones
        from fastprune.adapters import adapter_for

        plan = fastprune.make_plan(torch.load(scores_in, weights_only=False), config, adapter_for(model).param_costs())
    result = fastprune.prune(model, config, windows, plan=plan, inplace=True)
    return {"counts": result.plan.counts(), "seconds": result.seconds, "scores": result.scores}


def tp_knobs(adapter, fraction: float, non_embedding: int, round_to: int) -> dict:
    """Torch-Pruning's head ratio (the target fraction, as its LLM example sets it, within what its GQA rule can
    do) and the MLP ratio that brings the removed non-embedding parameters closest to ``fraction``, given the
    heads its rules remove."""
    att, mlp, d = adapter.attention(0), adapter.mlp(0), adapter.head_dim
    heads, kv_heads = att.q.out_features // d, att.k.out_features // d
    width = mlp.output.in_features

    def rows(linear):  # parameters of one head's output rows
        return d * linear.in_features + (d if linear.bias is not None else 0)

    # A removed query head takes its q rows and o columns; with MHA its k and v rows go too (GQA keeps them).
    per_head = rows(att.q) + d * att.o.out_features + (rows(att.k) + rows(att.v) if heads == kv_heads else 0)
    per_channel = mlp.output.out_features + sum(m.in_features + (m.bias is not None) for m in mlp.inputs)
    # Local ranking removes ceil(ratio * heads) query heads per layer; under GQA that count is rounded up to a
    # multiple of the KV heads (the same number of query heads leaves every KV group).
    removed_heads = math.ceil(fraction * heads)
    head_ratio = fraction
    if heads != kv_heads:
        removed_heads = kv_heads * math.ceil(removed_heads / kv_heads)
        # Leaving a KV group one query head makes the layout look like MHA to Torch-Pruning, which then skips the
        # head pruning of the whole layer: remove at most group size - 2 heads per group, asked for exactly.
        removed_heads = min(removed_heads, kv_heads * max(0, heads // kv_heads - 2))
        head_ratio = min(fraction, max(0.0, (removed_heads - 0.5) / heads))
    left = fraction * non_embedding / len(adapter.layers) - removed_heads * per_head
    keep = max(round_to, round_to * round((width - max(0.0, left) / per_channel) / round_to))
    # Torch-Pruning keeps int(width * (1 - ratio)) channels: aim half a channel inside the count.
    ratio = (width - keep - 0.5) / width if keep < width else 0.0
    return {
        "head_pruning_ratio": head_ratio,
        "pruning_ratio": ratio,
        "expected_query_heads_removed_per_layer": removed_heads,
        "expected_mlp_channels_kept_per_layer": keep,
    }


def prune_torch_pruning(model, windows, method: Method, fraction: float, s: Settings, non_embedding: int) -> dict:
    import torch_pruning as tp

    from fastprune.adapters import adapter_for  # module names and couplings only: the pruning is Torch-Pruning's

    adapter = adapter_for(model)
    original_attention = model.config._attn_implementation
    if method.trace != "default":
        # transformers' sdpa path hands GQA to the kernel (enable_gqa); eager repeats the KV heads with
        # expand + reshape, which is what Torch-Pruning's graph tracing knows how to map.
        model.set_attn_implementation(method.trace)
    num_heads = {}
    for i in range(len(adapter.layers)):
        att = adapter.attention(i)
        num_heads[att.q] = att.q.out_features // adapter.head_dim
        num_heads[att.k] = num_heads[att.v] = att.k.out_features // adapter.head_dim
    # Leaving the embeddings (and a BERT pooler, as Torch-Pruning's BERT example does) out keeps the hidden width.
    ignored = adapter.embedding_modules() + [m for m in (getattr(model, "pooler", None),) if m is not None]
    knobs = tp_knobs(adapter, fraction, non_embedding, s.tp_round_to)
    if method.criterion == "taylor":
        # Gradients of the same calibration objective as fastprune's taylor (causal LM loss for decoders).
        importance = tp.importance.GroupTaylorImportance()
        model.zero_grad(set_to_none=True)
        for batch in windows.batches(s.batch_size):
            adapter.loss(batch).backward()
    else:
        importance = tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean")

    def forward(m, ids):
        out = m(input_ids=ids, use_cache=False) if adapter.causal else m(input_ids=ids)
        return out.logits if adapter.causal else out.last_hidden_state

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = tp.pruner.MetaPruner(
            model,
            example_inputs=windows.ids[:1, :16],
            forward_fn=forward,
            importance=importance,
            global_pruning=False,
            pruning_ratio=knobs["pruning_ratio"],
            ignored_layers=ignored,
            num_heads=num_heads,
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=knobs["head_pruning_ratio"],
            round_to=s.tp_round_to,
        )
        for group in pruner.step(interactive=True):
            group.prune()
    del pruner
    model.zero_grad(set_to_none=True)
    # As Torch-Pruning's examples do after pruning: give the attention modules and the config their new widths.
    widths = set()
    for i in range(len(adapter.layers)):
        att = adapter.attention(i)
        q, kv = att.q.out_features // adapter.head_dim, att.k.out_features // adapter.head_dim
        if q % kv:
            raise RuntimeError(f"Torch-Pruning left layer {i} with {q} query heads for {kv} KV heads")
        adapter.set_layer_widths(i, q, kv)
        widths.add((q, kv, adapter.mlp(i).output.in_features))
    adapter.write_config()
    if method.trace != "default":
        model.set_attn_implementation(original_attention)
    return {"knobs": knobs, "widths": sorted(widths), "traced_with": method.trace}


# -- workers -------------------------------------------------------------------------------------------------------
def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["settings"].items()})
    method = Method(**spec["method"])
    out = {
        "method": dataclasses.asdict(method),
        "fraction": spec["fraction"],
        "action": spec["action"],
        "model": spec["model"],
    }
    try:
        out.update(_prune_worker(spec, s, method) if spec["action"] == "prune" else _recover_worker(spec, s))
    except Exception as exc:  # the comparison records a method's failure and goes on
        out["error"] = _error(exc)
        out["traceback"] = traceback.format_exc()
    Path(spec["result"]).write_text(json.dumps(out, indent=1) + "\n")
    return 0


def _measure(model, label: str, tokenizer, s: Settings, source: str) -> dict:
    """Parameter counts and quality: perplexity for decoders; for encoders the cosine similarity of sentence
    embeddings with the dense model's (which is loaded again as the reference)."""
    from fastprune.adapters import adapter_for

    if adapter_for(model).causal:
        models = {label: model}
    else:
        models = {"dense": fastprune.load_source(source).model.eval(), label: model}
    report = fastprune.evaluate(models, tokenizer, s.eval_config())
    row = report.rows[-1]
    return {
        "params": row.params,
        "non_embedding_params": row.non_embedding_params,
        "quality": row.quality,
        "metric": report.quality_metric,
    }


def _calibration_windows(tokenizer, model, seq_len: int, samples: int):
    from fastprune.adapters import adapter_for

    encoder = not adapter_for(model).causal
    text = read_text("pydoc:calibration")
    return token_windows(tokenizer, text, seq_len, samples, "pydoc:calibration", "calibration", encoder)


def _prune_worker(spec: dict, s: Settings, method: Method) -> dict:
    loaded = fastprune.load_source(spec["model"])
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    windows = _calibration_windows(tokenizer, model, s.cal_seq_len, s.cal_samples)
    dense_counts = fastprune.evaluate({"dense": model}, tokenizer, s.eval_config(texts=())).rows[0]
    info = {}
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        if method.tool == "torch_pruning":
            info = prune_torch_pruning(model, windows, method, spec["fraction"], s, dense_counts.non_embedding_params)
        else:
            info = prune_fastprune(model, windows, method, spec["fraction"], s, spec.get("scores_in"))
        seconds = time.perf_counter() - t0
    out = {"prune_seconds": seconds, "peak_mb": peak.mb, "peak_method": peak.method, "info": info}
    scores = info.pop("scores", None)
    if spec.get("scores_in"):
        # Count the reused scoring as if it had run here: its time, and its peak if that was higher.
        reused = spec["scores_from"]
        out.update(
            prune_seconds=seconds + reused["score_seconds"],
            peak_mb=max(peak.mb, reused["peak_mb"]),
            own_prune_seconds=seconds,
            scores_reused_from=reused["label"],
        )
    elif scores is not None and spec.get("scores_out"):
        torch.save(scores, spec["scores_out"])
        out["score_seconds"] = info["seconds"].get("score", 0.0)
    out.update(_measure(model, method.label, tokenizer, s, spec["model"]))
    out["dense_non_embedding_params"] = dense_counts.non_embedding_params
    torch.save(model, spec["model_out"])
    return out


def _recover_worker(spec: dict, s: Settings) -> dict:
    from fastprune.recovery import recover  # written alongside this benchmark; absent, the row records why

    loaded = fastprune.load_source(spec["model"])
    teacher, tokenizer = loaded.model.eval(), loaded.tokenizer
    student = torch.load(spec["model_in"], weights_only=False)
    windows = _calibration_windows(tokenizer, teacher, s.recovery_seq_len, s.recovery_windows)
    config = s.recovery_config()
    with PeakMemory() as peak:
        t0 = time.perf_counter()
        result = recover(student, teacher, windows, config)
        seconds = time.perf_counter() - t0
    model = result.model.eval()
    out = _measure(model, "recovered", tokenizer, s, spec["model"])
    torch.save(model, spec["model_out"])
    rec = {
        "steps": result.steps,
        "stop_reason": result.stop_reason,
        "best_step": result.best_step,
        "best_val_loss": result.best_val_loss,
        "config": config.to_dict(),
        **result.info,
    }
    return {**out, "recovery_seconds": seconds, "recovery_peak_mb": peak.mb, "recovery": rec}


def run_worker(spec: dict, workdir: Path) -> dict:
    """Run one prune or recover job in a fresh process and return its result (or why it failed)."""
    name = f"{spec['action']}-{len(list(workdir.glob('*.spec.json'))):02d}"
    spec_path, spec["result"] = workdir / f"{name}.spec.json", str(workdir / f"{name}.result.json")
    spec_path.write_text(json.dumps(spec, indent=1))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], capture_output=True, text=True)
    if proc.returncode != 0 or not Path(spec["result"]).is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {
            "method": spec["method"],
            "fraction": spec["fraction"],
            "action": spec["action"],
            "model": spec["model"],
            "error": f"worker exited with code {proc.returncode}: {' / '.join(tail)}",
        }
    out = json.loads(Path(spec["result"]).read_text())
    out["worker_seconds"] = time.perf_counter() - t0
    return out


# -- the comparison ------------------------------------------------------------------------------------------------
def fastprune_methods(s: Settings) -> list[Method]:
    return [Method(f"fastprune {c}", "fastprune", c) for c in s.criteria]


def badness(row: dict) -> float:
    """Lower is better: the geometric mean of the perplexities, or minus the mean embedding cosine."""
    values = list(row.get("quality", {}).values())
    if not values:
        return math.inf
    if row.get("metric") == "embedding cosine":
        return -statistics.fmean(values)
    return math.exp(statistics.fmean(math.log(v) for v in values))


def _say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _describe(row: dict) -> str:
    if "error" in row:
        return f"FAILED: {row['error'][:200]}"
    q = ", ".join(f"{k} {v:.2f}" for k, v in row["quality"].items())
    return f"{row['non_embedding_params'] / 1e6:.2f}M non-embedding params, ppl {q}"


class Comparison:
    """One comparison run: every method at every ratio, each in its own worker, then latencies per ratio."""

    def __init__(self, s: Settings, workdir: Path):
        self.s, self.workdir = s, workdir
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self.dense: dict[str, dict] = {}
        self.tp_trace = "default"  # switched to eager if Torch-Pruning cannot trace the default attention
        self.scores: dict[tuple[str, str], tuple[str, dict]] = {}  # (model, criterion) -> (saved scores, origin)

    def section(self, model_name: str, ratios: tuple[float, ...], recovery_ratios: tuple[float, ...]) -> None:
        """Every method on one model: its dense numbers, then each ratio."""
        loaded = fastprune.load_source(model_name)
        dense, tokenizer = loaded.model.eval(), loaded.tokenizer
        _say(f"{model_name}: dense model")
        report = fastprune.evaluate({"dense": dense}, tokenizer, self.s.eval_config())
        row = report.rows[0]
        self.dense[model_name] = {
            "params": row.params,
            "non_embedding_params": row.non_embedding_params,
            "quality": row.quality,
            "metric": report.quality_metric,
        }
        for fraction in ratios:
            first = len(self.rows)
            self.ratio(model_name, fraction, fraction in recovery_ratios)
            rows = self.rows[first:]
            measure_latency(self.s, dense, tokenizer, rows, f"{model_name} at {fraction:.0%}")
            for r in rows:
                if r.get("model_path"):
                    Path(r["model_path"]).unlink(missing_ok=True)

    def ratio(self, model_name: str, fraction: float, recovery: bool) -> None:
        first = len(self.rows)
        s = self.s
        per_layer = [self.run(model_name, m, fraction) for m in fastprune_methods(s)]
        ok = [r for r in per_layer if "error" not in r]
        if s.global_best and ok:
            c = min(ok, key=badness)["method"]["criterion"]
            self.run(model_name, Method(f"fastprune {c} (global)", "fastprune", c, ranking="global"), fraction)
        if s.peers:
            for importance in ("magnitude", "taylor"):
                self.torch_pruning(model_name, importance, fraction)
            self.run(model_name, Method("ShortGPT (block influence)", "shortgpt", "block_influence"), fraction)
        if recovery:
            self.recover(model_name, self.rows[first:], fraction)

    def run(self, model_name: str, method: Method, fraction: float, model_in: str | None = None) -> dict:
        """Prune (or, given ``model_in``, recover) in a worker; record and return the row."""
        action = "recover" if model_in else "prune"
        label = method.label + (" + recovery" if model_in else "")
        tag = f"{model_name}: {label} @ {fraction:.0%}"
        _say(f"{tag} ...")
        n = len(list(self.workdir.glob("*.spec.json")))
        spec = {
            "action": action,
            "model": model_name,
            "method": dataclasses.asdict(method),
            "fraction": fraction,
            "settings": dataclasses.asdict(self.s),
            "model_out": str(self.workdir / f"model-{n:02d}.pt"),
        }
        key = (model_name, method.criterion)
        if model_in:
            spec["model_in"] = model_in
        elif method.tool == "fastprune":
            if key in self.scores:
                spec["scores_in"], spec["scores_from"] = self.scores[key]
            else:
                spec["scores_out"] = str(self.workdir / f"scores-{model_name}-{method.criterion}.pt")
        out = run_worker(spec, self.workdir)
        out["label"] = label
        if "error" not in out:
            out["model_path"] = spec["model_out"]
            if spec.get("scores_out") and Path(spec["scores_out"]).is_file():
                origin = {
                    "label": f"{method.label} @ {fraction:.0%}",
                    "score_seconds": out["score_seconds"],
                    "peak_mb": out["peak_mb"],
                }
                self.scores[key] = (spec["scores_out"], origin)
        _say(f"{tag}: {_describe(out)}")
        self.rows.append(out)
        return out

    def torch_pruning(self, model_name: str, importance: str, fraction: float) -> None:
        label = f"Torch-Pruning {importance}"
        missing = _tp_missing()
        if missing:
            method = dataclasses.asdict(Method(label, "torch_pruning", importance))
            self.rows.append(
                {
                    "label": label,
                    "model": model_name,
                    "method": method,
                    "fraction": fraction,
                    "action": "prune",
                    "error": missing,
                }
            )
            _say(f"{model_name}: {label} @ {fraction:.0%}: FAILED: {missing}")
            return
        out = self.run(model_name, Method(label, "torch_pruning", importance, trace=self.tp_trace), fraction)
        if "error" in out and self.tp_trace == "default" and model_name == "smollm2":
            out["label"] += " (traced with sdpa attention)"
            self.notes.append(
                f"Torch-Pruning traced with transformers' default (sdpa) attention fails on SmolLM2's GQA layout "
                f"(9 query / 3 KV heads): `{out['error']}`. sdpa hands the KV heads to the kernel (enable_gqa), so "
                "the trace couples q, k and v channels one to one. The other Torch-Pruning rows are traced with "
                "eager attention (KV heads repeated by expand + reshape, which Torch-Pruning maps) and run with "
                "sdpa again after pruning."
            )
            self.tp_trace = "eager"
            self.run(model_name, Method(label, "torch_pruning", importance, trace=self.tp_trace), fraction)

    def recover(self, model_name: str, rows: list[dict], fraction: float) -> None:
        try:
            self.s.recovery_config()
        except ImportError as exc:
            self.notes.append(f"recovery rows not run: fastprune.recovery is not importable ({_error(exc)})")
            return
        done = [r for r in rows if "error" not in r and r["action"] == "prune"]
        if not self.s.recover_all:  # the best fastprune one-shot model (per-layer or global) and every peer
            ours = [r for r in done if r["method"]["tool"] == "fastprune"]
            done = ([min(ours, key=badness)] if ours else []) + [r for r in done if r["method"]["tool"] != "fastprune"]
        for r in done:
            self.run(model_name, Method(**r["method"]), fraction, model_in=r["model_path"])


def compare(s: Settings, workdir: Path) -> dict:
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    run = Comparison(s, workdir)
    run.section(s.model, s.ratios, s.recovery_ratios)
    tp_rows = [r for r in run.rows if r["method"]["tool"] == "torch_pruning"]
    if s.encoder_ratios and (s.encoder or (tp_rows and all("error" in r for r in tp_rows))):
        # Where Torch-Pruning cannot prune the decoder at all, a model it can prune: the MHA BERT encoder
        # (quality: cosine similarity of sentence embeddings to the dense model's), one-shot.
        run.section(s.encoder_model, s.encoder_ratios, ())
    return {
        "settings": dataclasses.asdict(s),
        "dense": run.dense,
        "rows": run.rows,
        "notes": run.notes,
        "machine": _machine(load_start),
        "wall_seconds": time.perf_counter() - t_start,
    }


def measure_latency(s: Settings, dense, tokenizer, rows: list[dict], tag: str) -> None:
    """Prefill and decode of every model of one ratio and the dense model, interleaved round by round."""
    models = {"dense": dense}
    keyed = {}
    for i, r in enumerate(rows):
        if r.get("model_path") and Path(r["model_path"]).is_file():
            key = f"{i}:{r['label']}"
            models[key] = torch.load(r["model_path"], weights_only=False).eval()
            keyed[key] = r
    if len(models) == 1:
        return
    _say(f"latency, {tag}: {len(models)} models, {s.rounds} interleaved rounds")
    report = fastprune.evaluate(models, tokenizer, s.eval_config(texts=(), latency=True))
    base = report.rows[0]
    for row in report.rows[1:]:
        keyed[row.name].update(
            prefill_ms=row.prefill_ms,
            decode_tokens_per_s=row.decode_tokens_per_s,
            dense_prefill_ms=base.prefill_ms,
            dense_decode_tokens_per_s=base.decode_tokens_per_s,
        )


def _tp_missing() -> str | None:
    try:
        import torch_pruning  # noqa: F401  (importable, not only installed)
    except ImportError:
        return f"torch-pruning is not installed (pip install torch-pruning=={TP_VERSION})"
    installed = _version("torch-pruning")  # its __version__ says 1.6.0 in the 1.6.1 wheel
    if installed != TP_VERSION:
        return f"torch-pruning {installed} is installed; this comparison pins {TP_VERSION}"
    return None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _machine(load_start) -> dict:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "torch_pruning": _version("torch-pruning"),
        "fastprune": fastprune.__version__,
        "commit": commit + ("+dirty" if dirty else ""),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
    }


# -- output --------------------------------------------------------------------------------------------------------
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "minilm": "all-MiniLM-L6-v2"}


def _median(values) -> float | None:
    values = [v for v in values if v]
    return statistics.median(values) if values else None


def table(results: dict, model: str) -> str:
    """The markdown table of one model: the dense model, then every row in the order it ran."""
    dense, texts = results["dense"][model], list(results["settings"]["eval_texts"])
    cosine = dense["metric"] == "embedding cosine"
    rows = [r for r in results["rows"] if r["model"] == model]
    head = ["method", "removed", "non-emb params"] + [f"{'cosine' if cosine else 'ppl'} {t}" for t in texts]
    head += ["prefill ms"] + ([] if cosine else ["decode tok/s"]) + ["prune s", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cells = ["dense", "-", f"{dense['non_embedding_params'] / 1e6:.2f}M"]
    cells += [f"{dense['quality'][t]:.3f}" if cosine else f"{dense['quality'][t]:.2f}" for t in texts]
    cells.append(_fmt(_median(r.get("dense_prefill_ms") for r in rows), ".0f"))
    if not cosine:
        cells.append(_fmt(_median(r.get("dense_decode_tokens_per_s") for r in rows), ".1f"))
    lines.append("| " + " | ".join(cells + ["-", "-"]) + " |")
    for r in rows:
        cells = [r["label"], f"{r['fraction']:.0%}"]
        if "error" in r:
            reason = " ".join(r["error"].replace("|", "/").split())
            cells += [f"**failed**: {reason[:400]}"] + ["-"] * (len(head) - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        n = r["non_embedding_params"]
        cells.append(f"{n / 1e6:.2f}M (-{1 - n / dense['non_embedding_params']:.1%})")
        for t in texts:
            v = r["quality"][t]
            cells.append(f"{v:.3f}" if cosine else f"{v:.2f} ({v / dense['quality'][t]:.2f}x)")
        pre, dec = r.get("prefill_ms"), r.get("decode_tokens_per_s")
        cells.append("-" if pre is None else f"{pre:.0f} ({r['dense_prefill_ms'] / pre:.2f}x)")
        if not cosine:
            cells.append("-" if dec is None else f"{dec:.1f} ({dec / r['dense_decode_tokens_per_s']:.2f}x)")
        if r["action"] == "recover":
            rec = r["recovery"]
            cells += [f"+{r['recovery_seconds']:.0f} ({rec['steps']} steps)", f"{r['recovery_peak_mb']:.0f}"]
        else:
            cells += [f"{r['prune_seconds']:.1f}", f"{r['peak_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def to_markdown(results: dict) -> str:
    s, m = results["settings"], results["machine"]
    out = [
        "# fastprune vs Torch-Pruning vs ShortGPT-style depth pruning, at equal parameter counts",
        "",
        f"Each row removes the fraction `removed` of the non-embedding parameters (the count it reached is in the "
        f"third column). Quality on {s['eval_windows']} windows of {s['eval_seq_len']} tokens of each text, with "
        f"the ratio to the dense model in brackets. Prefill: {s['prefill_tokens']} tokens at batch 1; decode: "
        f"greedy, {s['decode_tokens']} new tokens with the KV cache; medians of {s['rounds']} rounds interleaved "
        "with the dense model and every other model of the same ratio (speedup over the dense model in brackets; "
        "the dense row gives the median over the ratio groups). `prune s`: wall time of the pruning call, or of "
        "the recovery for `+ recovery` rows; `peak MB`: peak resident memory during that call above the resident "
        "memory before it.",
        "",
    ]
    for model in results["dense"]:
        out += [f"## {MODEL_NAMES.get(model, model)}", "", table(results, model)]
    out += ["## Settings", ""]
    out.append(
        f"- calibration: pydoc:calibration, {s['cal_samples']} windows of {s['cal_seq_len']} tokens, batch "
        f"{s['batch_size']}, the same windows for every method; held-out texts: {', '.join(s['eval_texts'])}"
    )
    rec = next((r["recovery"] for r in results["rows"] if r.get("recovery")), None)
    if rec:
        c = rec["config"]
        out.append(
            f"- recovery, the same for every `+ recovery` row: fastprune.recovery.recover, mode {c['mode']} from "
            f"the dense model, {rec['train_windows']} training and {rec['val_windows']} held-out windows of "
            f"{rec['seq_len']} tokens of pydoc:calibration, lr {c['lr']:g}, batch {c['batch_size']}, at most "
            f"{c['max_steps']} steps and {c['time_budget_min']:g} minutes (best held-out weights kept)"
        )
    for r in results["rows"]:
        info = r.get("info") or {}
        if r["method"]["tool"] == "torch_pruning" and "knobs" in info:
            k = info["knobs"]
            widths = ", ".join(f"{q} query / {kv} KV heads and {c} MLP channels" for q, kv, c in info["widths"])
            out.append(
                f"- {r['label']} on {r['model']} at {r['fraction']:.0%}: head_pruning_ratio "
                f"{k['head_pruning_ratio']:g}, pruning_ratio {k['pruning_ratio']:.4f}, traced with "
                f"{info['traced_with']} attention -> {widths} per layer"
            )
        if r.get("scores_reused_from"):
            out.append(
                f"- {r['label']} on {r['model']} at {r['fraction']:.0%}: scores computed once by "
                f"`{r['scores_reused_from']}` and planned again (their scoring time and peak are included)"
            )
    out.append(
        f"- machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads; python {m['python']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, torch-pruning {m['torch_pruning']}, "
        f"fastprune {m['fastprune']} at {m['commit']}"
    )
    busy = max(*m["loadavg_start"], *m["loadavg_end"]) > m["cores"]
    out.append(
        f"- load average (1/5/15 min) at start {tuple(round(x, 1) for x in m['loadavg_start'])}, at end "
        f"{tuple(round(x, 1) for x in m['loadavg_end'])}"
        + (
            f": above {m['cores']}, other jobs shared the cores, which slows every time and adds noise "
            "(latencies are interleaved so that the noise hits all alike)"
            if busy
            else ""
        )
    )
    peak = next((r["peak_method"] for r in results["rows"] if r.get("peak_method")), "-")
    out.append(f"- memory: {peak}, one subprocess per method")
    out.append(f"- wall time of the whole comparison: {results['wall_seconds'] / 60:.1f} min")
    out += [f"- {note}" for note in results["notes"]]
    return "\n".join(out) + "\n"


def plot(results: dict, path: Path) -> None:
    """Perplexity against prefill latency (relative to the dense model measured in the same rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, s = results["settings"]["model"], results["settings"]
    texts, dense = list(s["eval_texts"]), results["dense"][model]
    rows = [r for r in results["rows"] if r["model"] == model and "error" not in r and r.get("prefill_ms")]
    fig, axes = plt.subplots(1, len(texts), figsize=(7 * len(texts), 6), squeeze=False)
    markers = {"fastprune": "o", "torch_pruning": "s", "shortgpt": "^"}
    palette = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")
    colors = {f: palette[i % len(palette)] for i, f in enumerate(s["ratios"])}
    for ax, text in zip(axes[0], texts, strict=True):
        top = 30 * dense["quality"][text]  # beyond this a model is useless: clip, and say so in its label
        ax.scatter([1.0], [dense["quality"][text]], marker="*", s=250, c="black", zorder=3)
        ax.annotate("dense", (1.0, dense["quality"][text]), fontsize=7, xytext=(5, -10), textcoords="offset points")
        for r in rows:
            x, y = r["prefill_ms"] / r["dense_prefill_ms"], r["quality"][text]
            color = colors.get(r["fraction"], "gray")
            label = f"{r['label'].replace('fastprune ', 'fp ').replace('Torch-Pruning', 'TP')} {r['fraction']:.0%}"
            if y > top:
                label, y = f"{label} (ppl {y:.3g})", top
            ax.scatter(
                [x],
                [y],
                marker=markers[r["method"]["tool"]],
                s=55,
                zorder=3,
                edgecolors=color,
                facecolors="none" if r["action"] == "recover" else color,
            )
            ax.annotate(label, (x, y), fontsize=6, xytext=(4, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_xlabel("prefill latency relative to the dense model (batch 1, interleaved rounds)")
        ax.set_ylabel(f"perplexity on {text} (log scale, clipped at 30x dense)")
        ax.set_title(text)
        ax.grid(True, which="both", alpha=0.3)
    handles = [plt.Line2D([], [], marker=mk, ls="", color="gray", label=t) for t, mk in markers.items()]
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=f"{f:.0%} removed") for f, c in colors.items()]
    handles.append(plt.Line2D([], [], marker="o", ls="", mfc="none", color="gray", label="+ recovery"))
    axes[0][0].legend(handles=handles, fontsize=7, loc="upper right")
    fig.suptitle(f"{MODEL_NAMES.get(model, model)} pruned to equal non-embedding parameter counts")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def print_table(results: dict) -> None:
    for model in results["dense"]:
        print(f"{MODEL_NAMES.get(model, model)}\n{table(results, model)}")


# -- command line --------------------------------------------------------------------------------------------------
def quick_settings() -> Settings:
    return Settings(
        ratios=(0.25,), recovery_ratios=(), cal_samples=8, cal_seq_len=128, eval_windows=2, rounds=2, decode_tokens=16
    )


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Compare fastprune's criteria with Torch-Pruning's LLM recipe and ShortGPT-style depth pruning "
        "on the bundled SmolLM2 at equal non-embedding parameter counts; write a table and a plot.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 25%% only, 8 calibration windows of 128 tokens, 2 evaluation windows, "
        "2 latency rounds, no recovery (writes to runs/compare_peers-quick unless --out)",
    )
    p.add_argument(
        "--out", type=Path, default=None, help="directory for compare_peers.{json,md,png} (default benchmarks/results)"
    )
    p.add_argument("--ratios", type=float, nargs="+", help="fractions of non-embedding parameters to remove")
    p.add_argument("--criteria", nargs="*", help="fastprune criteria to run with per-layer ranking (none: skip)")
    p.add_argument("--no-global", action="store_true", help="skip global ranking for the best criterion")
    p.add_argument("--no-peers", action="store_true", help="skip Torch-Pruning and ShortGPT")
    p.add_argument(
        "--encoder",
        action="store_true",
        help="also compare on the MiniLM encoder (done anyway when Torch-Pruning cannot prune SmolLM2)",
    )
    p.add_argument(
        "--recovery-ratios",
        type=float,
        nargs="*",
        help="ratios whose models also get recovery (default 0.25; none: no recovery)",
    )
    p.add_argument(
        "--recover-all", action="store_true", help="recover every method, not only the best fastprune one and the peers"
    )
    p.add_argument("--recovery-minutes", type=float, help="recovery time budget per model")
    p.add_argument("--recovery-steps", type=int, help="recovery optimizer steps per model")
    p.add_argument("--eval-windows", type=int, help="perplexity windows of 512 tokens per text")
    p.add_argument("--rounds", type=int, help="interleaved latency rounds")
    p.add_argument("--workdir", type=Path, default=None, help="where pruned models are kept meanwhile (temp dir)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    s = quick_settings() if args.quick else Settings()
    for name in ("ratios", "criteria", "recovery_ratios"):
        if getattr(args, name) is not None:
            setattr(s, name, tuple(getattr(args, name)))
    for name in ("recovery_minutes", "recovery_steps", "eval_windows", "rounds"):
        if getattr(args, name) is not None:
            setattr(s, name, getattr(args, name))
    s.recover_all = s.recover_all or args.recover_all
    s.global_best = s.global_best and not args.no_global
    s.peers = s.peers and not args.no_peers
    s.encoder = s.encoder or args.encoder
    return s


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    s = settings_from(args)
    # Ending on SIGTERM as on Ctrl-C lets the running worker be killed and the pruned models be deleted.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    out = args.out or (ROOT / "runs" / "compare_peers-quick" if args.quick else Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="compare_peers-", dir=args.workdir) as tmp:
        results = compare(s, Path(tmp))
    for r in results["rows"]:
        r.pop("model_path", None)
    (out / "compare_peers.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "compare_peers.md").write_text(to_markdown(results))
    try:
        plot(results, out / "compare_peers.png")
    except ImportError as exc:
        print(f"no plot: {_error(exc)} (pip install matplotlib)")
    print()
    print_table(results)
    print(f"\nwrote {out / 'compare_peers.md'}, .json, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
