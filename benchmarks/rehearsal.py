"""Large-model rehearsal: write a Llama-shaped model with random weights (bf16 safetensors shards), stream-prune
it by a fraction of its non-embedding parameters, and report peak memory, time per layer, and the time the same
run would take for 8B and 70B shapes on this machine.

    python benchmarks/rehearsal.py                      # Llama-3.2-3B shape, 25%, results in benchmarks/results
    python benchmarks/rehearsal.py --shape 1b --samples 16 --work /tmp/rehearsal

The default criterion is wanda: obs's greedy removal over an 8192-wide MLP works on an 8192 x 8192 inverse that
it updates once per block of 8 channels (about n^3 memory traffic per layer, hours for a 3B model on 2 cores);
pass ``--criterion obs`` to measure it. With the default 32 windows of 256 tokens fastprune skips the refit (it
needs 4 tokens per input of the widest projection, 32768 here) and says so.

The prune runs as a child process (``python -m fastprune prune --stream``, niced) so that its peak resident
memory is measured alone; the pruned model is then reloaded with ``AutoModelForCausalLM.from_pretrained`` in
another child. Projections scale each measured phase of a layer by how its cost grows with the layer's shape
(see ``project``), with the same calibration text.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

#: Llama 3.x shapes (hidden, layers, query heads, KV heads, MLP width, vocabulary, tied embeddings).
SHAPES = {
    "test": dict(hidden=512, layers=4, heads=8, kv_heads=2, channels=1536, vocab=4096, tied=False),
    "1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, channels=8192, vocab=128256, tied=True),
    "3b": dict(hidden=3072, layers=28, heads=24, kv_heads=8, channels=8192, vocab=128256, tied=True),
    "8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, channels=14336, vocab=128256, tied=False),
    "70b": dict(hidden=8192, layers=80, heads=64, kv_heads=8, channels=28672, vocab=128256, tied=False),
}
BF16 = 2


def layer_params(s: dict) -> int:
    d, h = s["hidden"], s["hidden"] // s["heads"]
    attention = 2 * d * s["heads"] * h + 2 * d * s["kv_heads"] * h
    return attention + 3 * d * s["channels"] + 2 * d


def total_params(s: dict) -> int:
    embeddings = s["vocab"] * s["hidden"] * (1 if s["tied"] else 2)
    return s["layers"] * layer_params(s) + embeddings + s["hidden"]


def write_model(path: Path, s: dict, seed: int = 0) -> None:
    """A Llama with random bf16 weights (std 0.02, norms 1), two layers per shard, a byte-level tokenizer."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    path.mkdir(parents=True)
    d, h = s["hidden"], s["hidden"] // s["heads"]
    LlamaConfig(
        vocab_size=s["vocab"],
        hidden_size=d,
        intermediate_size=s["channels"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        head_dim=h,
        max_position_embeddings=8192,
        tie_word_embeddings=s["tied"],
        dtype="bfloat16",
    ).save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16)

    weight_map, shard, files = {}, {}, []

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)
        shard.clear()

    shard["model.embed_tokens.weight"] = rand(s["vocab"], d)
    flush()
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        shard[p + "input_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        shard[p + "post_attention_layernorm.weight"] = torch.ones(d, dtype=torch.bfloat16)
        shard[p + "self_attn.q_proj.weight"] = rand(s["heads"] * h, d)
        shard[p + "self_attn.k_proj.weight"] = rand(s["kv_heads"] * h, d)
        shard[p + "self_attn.v_proj.weight"] = rand(s["kv_heads"] * h, d)
        shard[p + "self_attn.o_proj.weight"] = rand(d, s["heads"] * h)
        shard[p + "mlp.gate_proj.weight"] = rand(s["channels"], d)
        shard[p + "mlp.up_proj.weight"] = rand(s["channels"], d)
        shard[p + "mlp.down_proj.weight"] = rand(d, s["channels"])
        if i % 2 == 1:
            flush()
    shard["model.norm.weight"] = torch.ones(d, dtype=torch.bfloat16)
    if not s["tied"]:
        shard["lm_head.weight"] = rand(s["vocab"], d)
    flush()
    index = {"metadata": {"total_size": total_params(s) * BF16}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def byte_tokenizer():
    """One token per UTF-8 byte: the random model's calibration text needs no trained vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def run_child(command: list[str], watch: Path | None = None) -> tuple[subprocess.CompletedProcess, dict, float]:
    """Run a command niced; return it, its peak resident memory and where the stream stood then (read from the
    progress file in ``watch``), and its wall time.

    The peak is the child's VmHWM, polled until it exits: the high-water mark of its own memory. (ru_maxrss of a
    child also counts the parent's memory, which the child shares from fork until exec: here the parent wrote
    the model and may be larger than the prune.)"""
    t0 = time.perf_counter()
    child = subprocess.Popen(["nice", "-n", "5", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"bytes": 0, "at": None}
    while child.poll() is None:
        hwm = max(_vm_hwm(pid) for pid in _process_tree(child.pid))  # (the prune may run under GNU time)
        if hwm > peak["bytes"]:
            progress = watch / "progress.json" if watch is not None else None
            at = progress.read_text().strip() if progress is not None and progress.is_file() else "start or end"
            peak = {"bytes": hwm, "at": at, "seconds": round(time.perf_counter() - t0, 1)}
        time.sleep(0.1)
    stdout, stderr = child.communicate()
    return subprocess.CompletedProcess(command, child.returncode, stdout, stderr), peak, time.perf_counter() - t0


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return [pid] + [p for c in children for p in _process_tree(int(c))]


def _vm_hwm(pid: int) -> int:
    """A process's peak resident memory in bytes (0 once it has exited)."""
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError):
        return 0


RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
with torch.no_grad():
    logits = model(torch.arange(4, 36)[None]).logits
assert torch.isfinite(logits).all()
print(sum(p.numel() for p in model.parameters()))
"""


def phase_means(layers: list[dict]) -> dict[str, dict[str, float]]:
    """Mean seconds per layer of every phase, per pass."""
    out: dict[str, dict[str, float]] = {}
    for name in ("score", "cut"):
        rows = [r for r in layers if r["pass"] == name]
        phases = sorted({k for r in rows for k in r} - {"pass", "layer"})
        out[name] = {p: sum(r.get(p, 0.0) for r in rows) / max(1, len(rows)) for p in phases}
    return out


def project(measured: dict, means: dict[str, dict[str, float]], target: dict, criterion: str) -> float:
    """Seconds for ``target``'s layers with the same calibration tokens: loading, running and writing a layer
    scale with its parameters, and so does scoring by sums over activations; obs's greedy removal and the refit's
    least-squares solves scale with the MLP width cubed plus hidden x width^2."""
    size = layer_params(target) / layer_params(measured)

    def cubic(s):
        return s["channels"] ** 3 + s["hidden"] * s["channels"] ** 2

    solve = cubic(target) / cubic(measured)
    cubic_phases = ("score", "refit") if criterion == "obs" else ("refit",)
    per_layer = 0.0
    for phases in means.values():
        for phase, seconds in phases.items():
            per_layer += seconds * (solve if phase in cubic_phases else size)
    return per_layer * target["layers"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="3b")
    parser.add_argument("--fraction", type=float, default=0.25, help="non-embedding parameters to remove")
    parser.add_argument("--criterion", default="wanda")
    parser.add_argument(
        "--samples", type=int, default=32, help="calibration windows (32 of 256 tokens: the committed results)"
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/fastprune-rehearsal"))
    parser.add_argument("--keep", action="store_true", help="keep the written and pruned models")
    args = parser.parse_args()
    s = SHAPES[args.shape]
    src, out = args.work / f"llama-{args.shape}", args.work / f"llama-{args.shape}-pruned"
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        t0 = time.perf_counter()
        write_model(src, s)
        seconds = time.perf_counter() - t0
        print(f"wrote a random {args.shape} Llama ({total_params(s) / 1e9:.2f}B params) to {src} in {seconds:.0f} s")
    shutil.rmtree(out, ignore_errors=True)
    load_before = os.getloadavg()
    # GNU time (when installed) reports the prune's maxrss independently of the polling below.
    timer = ["/usr/bin/time", "-f", "maxrss_kb %M"] if Path("/usr/bin/time").is_file() else []
    command = [*timer, sys.executable, "-m", "fastprune", "prune", "--model", str(src), "--stream"]
    command += ["--target-params", str(args.fraction), "--criterion", args.criterion]
    command += ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--out", str(out)]
    partial = out.parent / f".{out.name}.stream-partial" / "work"
    done, peak, seconds = run_child(command, partial)
    if done.returncode != 0:
        sys.exit(f"the streamed prune failed:\n{done.stderr[-4000:]}")
    info = json.loads((out / "fastprune.json").read_text())
    timed = [line for line in done.stderr.splitlines() if line.startswith("maxrss_kb ")]
    if timed:
        peak["gnu_time_maxrss_bytes"] = int(timed[-1].split()[1]) * 1024
    reload, _, _ = run_child([sys.executable, "-c", RELOAD, str(out)])
    reloaded = int(reload.stdout.split()[-1]) if reload.returncode == 0 else None

    layer_fp32 = layer_params(s) * 4
    embeddings = s["vocab"] * s["hidden"] * BF16 * (1 if s["tied"] else 2)
    activations = 2 * args.samples * args.seq_len * s["hidden"] * 4  # a layer's input and output, float32
    bound = 3 * layer_fp32 + embeddings + activations
    means = phase_means(info["stream"]["layers"])
    per_layer = {name: sum(p.values()) for name, p in means.items()}
    result = {
        "shape": args.shape,
        "params": total_params(s),
        "reloaded_params": reloaded,
        "fraction": args.fraction,
        "criterion": args.criterion,
        "calibration": info["calibration"],
        "refit": info["config"]["reconstruct"],
        "removed_fraction": json.loads((out / "plan.json").read_text())["info"]["removed_fraction"],
        # The child's VmHWM as last polled, or as the prune recorded it after its last layer, if higher.
        "peak_rss_bytes": max(peak["bytes"], info["stream"]["peak_rss_bytes"]),
        "peak_rss_at": peak["at"],
        "peak_rss_gnu_time_bytes": peak.get("gnu_time_maxrss_bytes"),
        "bound_bytes": {
            "largest_layer_fp32_x3": 3 * layer_fp32,
            "embeddings_bf16": embeddings,
            "activations_fp32": activations,
            "total": bound,
        },
        "seconds": {"total": seconds, **info["seconds"]},
        "seconds_per_layer": per_layer,
        "phase_seconds_per_layer": means,
        "projected_seconds": {n: project(s, means, SHAPES[n], args.criterion) for n in ("8b", "70b")},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "torch": torch.__version__,
            "commit": git_commit(),
        },
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"rehearsal-{args.shape}.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / f"rehearsal-{args.shape}.md").write_text(to_markdown(result))
    print(to_markdown(result))
    if not args.keep:
        shutil.rmtree(args.work)


def git_commit() -> str:
    git = ["git", "rev-parse", "--short", "HEAD"]
    return subprocess.run(git, cwd=ROOT, capture_output=True, text=True).stdout.strip()


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def duration(seconds: float) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{int(hours)} h {math.ceil(rest / 60)} min" if hours else f"{math.ceil(seconds / 60)} min"


def to_markdown(r: dict) -> str:
    b, m = r["bound_bytes"], r["machine"]
    ok = "below" if r["peak_rss_bytes"] < b["total"] else "ABOVE"
    cal = r["calibration"]
    refit = "on" if r["refit"] else "skipped (too few tokens)"
    lines = [
        f"# Rehearsal: stream-pruning a random {r['shape']} Llama ({r['params'] / 1e9:.2f}B parameters, bf16)",
        "",
        f"{r['criterion']}, {r['removed_fraction']:.1%} of non-embedding parameters removed, calibration "
        f"{cal['windows']} windows x {cal['seq_len']} tokens, refit {refit};"
        f" {m['cpus']} CPUs, load average {m['load_average_before'][0]:.1f} before / {m['load_average_after'][0]:.1f}"
        f" after, torch {m['torch']}, commit {m['commit']}.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| peak resident memory of the prune | {gib(r['peak_rss_bytes'])} ({ok} the bound) |",
        f"| reached at | {r['peak_rss_at']} |",
        f"| the same by GNU time (maxrss) | {gib(r['peak_rss_gnu_time_bytes'] or 0)} |",
        f"| bound: 3 x largest layer (float32, as held) | {gib(b['largest_layer_fp32_x3'])} |",
        f"| + embeddings (bf16) | {gib(b['embeddings_bf16'])} |",
        f"| + calibration activations (a layer's input and output, float32) | {gib(b['activations_fp32'])} |",
        f"| = bound | {gib(b['total'])} |",
        f"| wall time | {duration(r['seconds']['total'])} |",
        f"| seconds per layer, scoring pass | {r['seconds_per_layer']['score']:.1f} |",
        f"| seconds per layer, cutting pass | {r['seconds_per_layer']['cut']:.1f} |",
        f"| projected, Llama 8B shape | {duration(r['projected_seconds']['8b'])} |",
        f"| projected, Llama 70B shape | {duration(r['projected_seconds']['70b'])} |",
        f"| reloaded with from_pretrained | {r['reloaded_params'] / 1e9:.2f}B parameters |"
        if r["reloaded_params"]
        else "| reloaded with from_pretrained | FAILED |",
        "",
        "Phase seconds per layer: "
        + "; ".join(
            f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items())
            for name, phases in r["phase_seconds_per_layer"].items()
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
