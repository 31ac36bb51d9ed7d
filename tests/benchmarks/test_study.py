"""The study's pieces that run in seconds: the layer benchmark's layer against a direct computation, its
speedups and bound, the report tables, and gpu-check's commands against the study's own options."""

import os
import statistics
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402
import study  # noqa: E402
import study_layers  # noqa: E402
import study_report  # noqa: E402

SMALL = study_layers.LayerShape(hidden=64, channels=96, heads=4, kv_heads=2, head_dim=16)


def reference_layer(layer, x, cache=None):
    """The same layer computed head by head, with explicit GQA and causal masks."""
    s, hd = layer.shape, layer.shape.head_dim

    def norm(t):
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) if layer.norm1 is None else None

    h = layer.norm1(x) if layer.norm1 is not None else norm(x)
    start = 0 if cache is None else cache[0].shape[2]
    q = study_layers.rotary(layer.q(h).view(1, -1, s.heads, hd).transpose(1, 2), start)
    k = study_layers.rotary(layer.k(h).view(1, -1, s.kv_heads, hd).transpose(1, 2), start)
    v = layer.v(h).view(1, -1, s.kv_heads, hd).transpose(1, 2)
    if cache is not None:
        k, v = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
    outs = []
    for head in range(s.heads):
        kv = head // (s.heads // s.kv_heads)
        scores = q[0, head] @ k[0, kv].T / hd**0.5
        if cache is None:
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
        outs.append(scores.softmax(-1) @ v[0, kv])
    x = x + layer.o(torch.cat(outs, -1)[None])
    h = layer.norm2(x) if layer.norm2 is not None else norm(x)
    return x + layer.down(F.silu(layer.gate(h)) * layer.up(h))


@pytest.mark.parametrize("make", [study_layers.dense_linear, study_layers.sparse24_linear])
def test_layer_matches_a_head_by_head_computation(make):
    layer = study_layers.Layer(SMALL, make("cpu", torch.float32, torch.Generator().manual_seed(0))).eval()
    x = torch.randn(1, 7, SMALL.hidden, generator=torch.Generator().manual_seed(1))
    cache = (torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_layer(layer, x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            layer(x[:, :1], cache), reference_layer(layer, x[:, :1], cache), atol=1e-5, rtol=1e-5
        )


def test_layer_rows_speedups_bound_and_weights():
    variants = study_layers.default_variants(SMALL, "cpu")
    results, bandwidth = study_layers.measure(SMALL, "cpu", {"fp32": torch.float32}, variants, 8, 8, 1, lambda m: None)
    rows = {r["variant"]: r for r in study_layers.to_rows(results)}
    dense, half, sparse = rows["dense"], rows["structured (half the units)"], rows["2:4 (fastprune)"]
    linear = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 96  # q, o, k, v, gate, up, down
    assert dense["weights_mb"] * 2**20 == 4 * (linear + 2 * 64)  # plus two norms
    assert half["weights_mb"] * 2**20 == 4 * (linear // 2 + 2 * 64)
    assert sparse["weights_mb"] * 2**20 == 4 * (linear // 2 + 2 * 64) + linear // 8  # + 4-bit positions
    assert dense["prefill_speedup"] == 1.0 and sparse["decode_speedup"] == dense["decode_ms"] / sparse["decode_ms"]
    cache_bytes = 2 * 2 * 8 * 16 * 4
    assert dense["decode_bound_ms"] == pytest.approx(1000 * (dense["weights_mb"] * 2**20 + cache_bytes) / bandwidth)
    assert sparse["pct_of_bound"] == pytest.approx(100 * sparse["decode_bound_ms"] / sparse["decode_ms"])


def test_models_table_marks_gguf_latency_as_unmeasured():
    base = {
        "name": "dense",
        "kind": "dense",
        "perplexity": {"a": 10.0},
        "weights_mb": 100.0,
        "prefill_ms": 50.0,
        "decode_tokens_per_s": {"1": 20.0},
    }
    sparse = {
        **base,
        "name": "2:4",
        "kind": "2:4",
        "perplexity": {"a": 15.0},
        "prefill_ms": 40.0,
        "decode_tokens_per_s": {"1": 30.0},
    }
    gguf = {**base, "name": "dense GGUF Q8_0", "kind": "gguf", "prefill_ms": None, "decode_tokens_per_s": {}}
    table = study_report.models_table([base, sparse, gguf], ["a"], [1])
    assert "| 2:4 | 15.00 (1.50x) | 100 | 40 (1.25x) | 30.0 (1.50x) |" in table
    assert f"| dense GGUF Q8_0 | 10.00 (1.00x) | 100 | {study_report.NO_LATENCY} | {study_report.NO_LATENCY} |" in table


def test_gpu_check_steps_use_options_the_study_has(tmp_path):
    env = {"capability": "90", "gpu": "H100"}
    for dry_run in (False, True):
        for step in gpu_check.plan(env, dry_run, tmp_path):
            if step.command[1] == "benchmarks/study.py":
                study.parse_args(step.command[2:])  # exits on an unknown option
            env = gpu_check._environment(step)
            assert env["PYTHONPATH"].split(os.pathsep)[0] == str(BENCHMARKS.parent)  # this tree's fastprune first
            assert all(env[k] == v for k, v in step.env.items())
            if step.command[1:3] == ["-m", "pytest"]:
                files = [a for a in step.command if a.startswith(("tests/", "benchmarks/"))]
                assert files and all((BENCHMARKS.parent / f).exists() for f in files)
                assert "benchmarks/bench_cnn.py" not in files  # a script, not a pytest-benchmark file


def _row(name, kind, ppl, rounds=None, diff=None):
    return {
        "name": name,
        "kind": kind,
        "perplexity": ppl,
        "decode_tokens_per_s": {"1": statistics.median(rounds)} if rounds else {},
        "decode_rounds": {"1": rounds} if rounds else {},
        "masked_dense_diff": diff,
    }


def test_bar_checks_follow_the_numbers():
    rows = [
        _row("dense", "dense", {"a": 10.0, "b": 20.0}, [20.0, 30.0, 18.0]),
        _row("structured 25% (obs)", "structured", {"a": 12.0, "b": 30.0}, [24.0, 24.0, 24.0]),
        _row("2:4 (magnitude)", "2:4", {"a": 40.0, "b": 90.0}, [27.0, 27.0, 27.0]),
        # Round by round 1.30x, 1.03x, 1.50x: the median ratio is 1.30x (the ratio of the medians would be 1.35x).
        _row("2:4 (wanda)", "2:4", {"a": 20.0, "b": 95.0}, [26.0, 31.0, 27.0], diff=3e-5),
        _row("2:4 (sparsegpt)", "2:4", {"a": 15.0, "b": 50.0}, [25.0, 25.0, 25.0]),
        _row("structured 25% GGUF Q8_0", "gguf", {"a": 12.3, "b": 30.3}),
        _row("structured 25% GGUF Q4_0", "gguf", {"a": 13.7, "b": 35.0}),
        _row("dense GGUF Q4_0", "gguf", {"a": 99.0, "b": 99.0}),  # not a row of the bar
    ]
    checks = {
        c["check"]: (c["value"], c["met"])
        for c in study_report.bar_checks({"models": rows, "settings": {"texts": ["a", "b"]}})
    }
    assert checks == {
        "2:4 (wanda) decode at batch 1 >= 1.3x dense, median of round ratios": ("1.30x (rounds 1.03x-1.50x)", True),
        "2:4 (wanda) logits == masked dense model's (fp32, 1e-4 of the logits' scale)": ("3.0e-05", True),
        "ppl a: sparsegpt < wanda < magnitude": ("15.00 < 20.00 < 40.00", True),
        "ppl b: sparsegpt < wanda < magnitude": ("50.00 < 95.00 < 90.00", False),
        "structured 25% GGUF Q8_0: ppl a within 2% of unquantized": ("+2.5%", False),
        "structured 25% GGUF Q8_0: ppl b within 2% of unquantized": ("+1.0%", True),
        "structured 25% GGUF Q4_0: ppl a within 15% of unquantized": ("+14.2%", True),
        "structured 25% GGUF Q4_0: ppl b within 15% of unquantized": ("+16.7%", False),
    }
    table = study_report.bar_table(study_report.bar_checks({"models": rows[:1], "settings": {"texts": ["a"]}}))
    assert table.count("\n") == 2  # the header only: nothing to check without the 2:4 and GGUF rows
