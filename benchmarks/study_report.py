"""Tables and the plot of the study: ``study-<machine>.md`` / ``.json`` / ``.png``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

NO_LATENCY = "needs llama.cpp"


def _ratio(value, base, higher_is_better: bool) -> str:
    if value is None or base is None:
        return ""
    return f" ({value / base if higher_is_better else base / value:.2f}x)"


def models_table(rows: list[dict], texts: list[str], batches: list[int]) -> str:
    head = ["model", *[f"ppl {t}" for t in texts], "weights MB", "prefill ms"]
    head += [f"decode tok/s b{b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = rows[0]
    for r in rows:
        cells = [r["name"]]
        for t in texts:
            v = r["perplexity"].get(t)
            cells.append(
                "-" if v is None else f"{v:.2f}" + (_ratio(v, base["perplexity"].get(t), True) if r is not base else "")
            )
        cells.append(f"{r['weights_mb']:.0f}")
        if r["kind"] == "gguf":
            cells += [NO_LATENCY] * (1 + len(batches))
        else:
            p = r["prefill_ms"]
            cells.append(
                "-" if p is None else f"{p:.0f}" + (_ratio(p, base["prefill_ms"], False) if r is not base else "")
            )
            for b in batches:
                d = r["decode_tokens_per_s"].get(str(b))
                bd = base["decode_tokens_per_s"].get(str(b))
                cells.append("-" if d is None else f"{d:.1f}" + (_ratio(d, bd, True) if r is not base else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_checks(data: dict) -> list[dict]:
    """The issue's bar, checked against the measured rows (a check whose rows were not run is left out)."""
    rows = {r["name"]: r for r in data.get("models", [])}
    texts = data["settings"]["texts"] if rows else []
    checks = []

    def add(check: str, value: str, met: bool) -> None:
        checks.append({"check": check, "value": value, "met": bool(met)})

    dense, wanda = rows.get("dense"), rows.get("2:4 (wanda)")
    paired = (
        list(zip(wanda.get("decode_rounds", {}).get("1", []), dense.get("decode_rounds", {}).get("1", []), strict=True))
        if dense and wanda
        else []
    )
    if paired:  # each round's ratio (the two models ran back to back), then the median over rounds
        ratios = sorted(w / d for w, d in paired)
        ratio = statistics.median(ratios)
        spread = f" (rounds {ratios[0]:.2f}x-{ratios[-1]:.2f}x)"
        add(
            "2:4 (wanda) decode at batch 1 >= 1.3x dense, median of round ratios", f"{ratio:.2f}x{spread}", ratio >= 1.3
        )
    if wanda and wanda.get("masked_dense_diff") is not None:
        d = wanda["masked_dense_diff"]
        add("2:4 (wanda) logits == masked dense model's (fp32, 1e-4 of the logits' scale)", f"{d:.1e}", d <= 1e-4)
    order = [rows.get(f"2:4 ({c})") for c in ("sparsegpt", "wanda", "magnitude")]
    for t in texts:
        if all(r and r["perplexity"].get(t) for r in order):
            v = [r["perplexity"][t] for r in order]
            add(f"ppl {t}: sparsegpt < wanda < magnitude", " < ".join(f"{x:.2f}" for x in v), v[0] < v[1] < v[2])
    pruned = next((r for n, r in rows.items() if r["kind"] == "structured" and n.startswith("structured 25%")), None)
    for n, r in rows.items():
        if pruned is None or r["kind"] != "gguf" or not n.startswith("structured 25%"):
            continue
        limit = 0.02 if "Q8" in n else 0.15
        for t in texts:
            if r["perplexity"].get(t) and pruned["perplexity"].get(t):
                change = r["perplexity"][t] / pruned["perplexity"][t] - 1
                add(f"{n}: ppl {t} within {limit:.0%} of unquantized", f"{change:+.1%}", abs(change) <= limit)
    return checks


def bar_table(checks: list[dict]) -> str:
    lines = ["| check | measured | met |", "|---|---|---|"]
    lines += [f"| {c['check']} | {c['value']} | {'yes' if c['met'] else 'no'} |" for c in checks]
    return "\n".join(lines) + "\n"


def layers_table(rows: list[dict]) -> str:
    head = [
        "dtype",
        "layer",
        "weights MB",
        "prefill ms",
        "prefill speedup",
        "decode ms",
        "decode speedup",
        "decode bound ms",
        "% of bound",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['variant']} | {r['weights_mb']:.0f} | {r['prefill_ms']:.1f} | "
            f"{r['prefill_speedup']:.2f}x | {r['decode_ms']:.2f} | {r['decode_speedup']:.2f}x | "
            f"{r['decode_bound_ms']:.2f} | {r['pct_of_bound']:.0f}% |"
        )
    return "\n".join(lines) + "\n"


def write(out: Path, stem: str, data: dict) -> list[Path]:
    """Write the JSON, the markdown and (when there are model rows) the scatter plot; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.json", out / f"{stem}.md"]
    if data.get("models"):
        data = {**data, "bar": bar_checks(data)}
    paths[0].write_text(json.dumps(data, indent=1) + "\n")
    paths[1].write_text(markdown(data, f"{stem}.png"))
    if data.get("models"):
        paths.append(out / f"{stem}.png")
        plot(data, paths[-1])
    return paths


def markdown(data: dict, png: str) -> str:
    info = data["info"]
    parts = [f"# Structured vs 2:4 vs quantized: {info['machine']}\n"]
    parts.append("".join(f"- {k}: {v}\n" for k, v in info.items() if not isinstance(v, dict | list)))
    if info.get("seconds"):
        parts.append("- seconds per part: " + ", ".join(f"{k} {v}" for k, v in info["seconds"].items()) + "\n")
    if data.get("models"):
        s = data["settings"]
        parts.append(
            f"\n## SmolLM2-135M ({info['device']})\n\n"
            f"Perplexity: {s['windows']} windows of {s['seq_len']} tokens per text. Prefill: {s['prefill_tokens']} "
            f"tokens at batch 1. Decode: {s['decode_tokens']} new tokens after a 32-token prompt, tokens per second "
            f"over the batch. Latencies: medians of {s['rounds']} rounds, every model measured in each round. "
            f"Ratios are against the dense model. 2:4 rows were saved 2:4-compressed and loaded back with "
            f"fastprune.load, so their layers run fastprune's 2:4 kernels. GGUF rows were reloaded with transformers "
            f"(gguf_file=), which dequantizes to float32: their perplexity is the quantized model's, but transformers "
            f"cannot run them quantized, so their speed is llama.cpp's to measure and is not given.\n\n"
        )
        parts.append(models_table(data["models"], list(s["texts"]), list(s["decode_batches"])))
        parts.append(f"\n![perplexity against decode speed and weights]({png})\n")
        if data.get("bar"):
            parts.append("\n### The issue's bar\n\n" + bar_table(data["bar"]))
    if data.get("layers"):
        lay = data["layers_info"]
        parts.append(
            f"\n## One Llama-3-8B-shaped decoder layer ({info['device']})\n\n"
            f"Shape {lay['shape']}, random weights. Structured: half the query heads, KV heads and MLP channels (as "
            f"many weights as 2:4 keeps). Prefill: {lay['prefill_tokens']} tokens. Decode: one token against a "
            f"{lay['context']}-token KV cache. Bound: the bytes a decode step must read (weights, 2:4 positions, KV "
            f"cache) at the measured read bandwidth ({lay['bandwidth_gbps']:.1f} GB/s, one pass over a 1 GiB "
            f"buffer). Medians of {lay['rounds']} interleaved rounds.\n\n"
        )
        parts.append(layers_table(data["layers"]))
    return "".join(parts)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["models"]
    text = data["settings"]["texts"][0]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {
        "dense": "black",
        "structured": "tab:blue",
        "2:4": "tab:orange",
        "structured + 2:4": "tab:green",
        "gguf": "tab:purple",
    }
    for r in rows:
        ppl = r["perplexity"].get(text)
        if ppl is None:
            continue
        c = colors.get(r["kind"], "gray")
        speed = r["decode_tokens_per_s"].get("1")
        if speed is not None:
            a.scatter(speed, ppl, color=c)
            a.annotate(r["name"], (speed, ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
        b.scatter(r["weights_mb"], ppl, color=c)
        b.annotate(r["name"], (r["weights_mb"], ppl), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for ax in (a, b):
        ax.set_yscale("log")
        ax.set_ylabel(f"perplexity, {text} (lower is better)")
        ax.grid(alpha=0.3)
    a.set_xlabel("decode tokens/s at batch 1 (higher is better)")
    a.set_title("quality vs decode speed (PyTorch)")
    b.set_xlabel("weights MB (GGUF: tensor data)")
    b.set_title("quality vs weights")
    fig.suptitle(f"SmolLM2-135M, {data['info']['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
