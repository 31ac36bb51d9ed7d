"""CNN filter pruning: measured speedup against the FLOP ratio, fastprune beside Torch-Pruning 1.6.1.

ResNet-18/50, MobileNetV2 and VGG-16-BN (torchvision, random weights: structure and speed only) pruned to 30% and
50% fewer multiply-accumulates at 224x224, L1 filter norms, the same ratio in every layer, widths multiples of 8.
Torch-Pruning's ratio is searched until its MACs match the same target. Every pruned model is timed at batch 1
and 8 interleaved with its dense model in one run; speedup / (dense MACs / pruned MACs) says how much of the
ideal FLOP speedup the smaller dense model delivers.

Needs torchvision and torch-pruning (``make bench-cnn`` sets up ``.venv-vision``). Writes
``benchmarks/results/bench_cnn-<device>.{json,md}``.

    python benchmarks/bench_cnn.py [--models resnet18,resnet50] [--ratios 0.3,0.5] [--rounds 5] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from fastprune.cnn import CnnPruningConfig, prune_cnn
from fastprune.cnn.costs import CostModel
from fastprune.cnn.graph import analyze

RESULTS = Path(__file__).parent / "results"


def macs_and_params(model, shape) -> tuple[int, int]:
    graph = analyze(model, torch.zeros(1, *shape))
    full = torch.ones(graph.num_units, dtype=torch.bool)
    costs = CostModel(model, graph)
    return costs.macs(full), costs.params(full)


def torch_pruning_to_target(model, shape, fraction: float, dense_macs: int, round_to: int):
    """Torch-Pruning's MetaPruner with L1 group magnitude, per-layer ratio searched to remove ``fraction`` of MACs."""
    import torch_pruning as tp

    example = torch.randn(1, *shape)
    classifier = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]

    def prune(ratio: float):
        m = copy.deepcopy(model)
        pruner = tp.pruner.MetaPruner(
            m,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=[dict(m.named_modules())[n] for n, x in model.named_modules() if x is classifier],
            round_to=round_to,
        )
        pruner.step()
        return m, macs_and_params(m, shape)[0]

    lo, hi, best = 0.0, 0.95, None
    for _ in range(12):
        mid = (lo + hi) / 2
        m, macs = prune(mid)
        if macs <= (1 - fraction) * dense_macs:
            hi, best = mid, (m, mid)
        else:
            lo = mid
    return best


def time_models(models: dict, shape, batches, rounds: int, device: str, layout=torch.contiguous_format):
    """Median and fastest ms per forward pass, interleaved: each round runs every model once per batch size. On a
    shared machine the fastest round is the one least disturbed by other work."""
    inputs = {b: torch.randn(b, *shape, device=device) for b in batches}
    out = {n: {b: [] for b in batches} for n in models}

    def once(m, x):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        m(x)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    with torch.inference_mode():
        for m in models.values():
            for x in inputs.values():
                once(m, x)
                once(m, x)
        for _ in range(rounds):
            for b, x in inputs.items():
                for n, m in models.items():
                    out[n][b].append(once(m, x))
    median = {n: {b: 1000 * statistics.median(v) for b, v in per.items()} for n, per in out.items()}
    return median, {n: {b: 1000 * min(v) for b, v in per.items()} for n, per in out.items()}


def main() -> None:
    import torchvision

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,vgg16_bn")
    p.add_argument("--ratios", default="0.3,0.5")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--round-to",
        default="8",
        help="kept widths are multiples of this; a list compares several "
        "(AVX-512 kernels work in blocks of 16 channels)",
    )
    p.add_argument("--tag", default="", help="suffix of the results files")
    p.add_argument("--no-peer", action="store_true", help="skip Torch-Pruning")
    p.add_argument("--channels-last", action="store_true", help="time every model in channels-last memory format")
    args = p.parse_args()
    shape, batches = (3, 224, 224), (1, 8)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        dense = torchvision.models.get_model(name, weights=None).eval()
        dense_macs, dense_params = macs_and_params(dense, shape)
        variants, meta = {"dense": dense}, {"dense": (dense_macs, dense_params, None)}
        for fraction in (float(r) for r in args.ratios.split(",")):
            for round_to in (int(r) for r in args.round_to.split(",")):
                suffix = f"{fraction:.0%}" + (f" r{round_to}" if "," in args.round_to else "")
                t0 = time.perf_counter()
                config = CnnPruningConfig(criterion="l1", target_flops=fraction, input_size=shape, round_to=round_to)
                model = prune_cnn(dense, config).model
                variants[f"fastprune {suffix}"] = model
                meta[f"fastprune {suffix}"] = (*macs_and_params(model, shape), time.perf_counter() - t0)
                if not args.no_peer:
                    t0 = time.perf_counter()
                    model, _ = torch_pruning_to_target(dense, shape, fraction, dense_macs, round_to)
                    variants[f"torch-pruning {suffix}"] = model
                    meta[f"torch-pruning {suffix}"] = (*macs_and_params(model, shape), time.perf_counter() - t0)
        layout = torch.channels_last if args.channels_last else torch.contiguous_format
        variants = {k: v.to(args.device, memory_format=layout).eval() for k, v in variants.items()}
        load = os.getloadavg()[0]
        ms, fastest = time_models(variants, shape, batches, args.rounds, args.device, layout)
        for key, (macs, params, seconds) in meta.items():
            row = {
                "model": name,
                "variant": key,
                "macs": macs,
                "params": params,
                "prune_seconds": seconds,
                "ms": {str(b): ms[key][b] for b in batches},
                "fastest_ms": {str(b): fastest[key][b] for b in batches},
                "load_before": load,
            }
            row["ideal_speedup"] = dense_macs / macs
            for b in batches:
                row[f"speedup_b{b}"] = ms["dense"][b] / ms[key][b]
                row[f"fastest_speedup_b{b}"] = fastest["dense"][b] / fastest[key][b]
                row[f"of_ideal_b{b}"] = row[f"speedup_b{b}"] / row["ideal_speedup"]
            rows.append(row)
            print(
                f"{name:13s} {key:18s} MACs {macs / dense_macs:6.1%} ideal {row['ideal_speedup']:.2f}x  "
                f"b1 {row['speedup_b1']:.2f}x ({row['of_ideal_b1']:.0%})  b8 {row['speedup_b8']:.2f}x "
                f"({row['of_ideal_b8']:.0%})",
                flush=True,
            )
    write(rows, args)


def write(rows: list[dict], args) -> None:
    from importlib.metadata import version

    threads = torch.get_num_threads()
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"{platform.machine()}-{threads}thread"
    device = device.replace(" ", "-") + (f"-{args.tag}" if args.tag else "")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    info = {
        "device": device,
        "torch": torch.__version__,
        "torch_pruning": version("torch-pruning"),
        "threads": torch.get_num_threads(),
        "commit": commit,
        "rounds": args.rounds,
        "channels_last": args.channels_last,
        "loadavg_after": os.getloadavg(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"bench_cnn-{device}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# CNN pruning speed ({device})",
        "",
        "".join(f"- {k}: {v}\n" for k, v in info.items()),
        "Speedups from the median of the interleaved rounds; in brackets, the share of the ideal (dense MACs / "
        "pruned MACs). Last column: batch 8 from the fastest round of each model.",
        "",
        "| model | variant | MACs | params | ideal | batch 1 ms | speedup b1 | batch 8 ms | speedup b8 | fastest b8 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(x for x in rows if x["model"] == r["model"] and x["variant"] == "dense")
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['macs'] / 1e9:.2f}G ({r['macs'] / base['macs']:.0%}) | "
            f"{r['params'] / 1e6:.1f}M | {r['ideal_speedup']:.2f}x | {r['ms']['1']:.1f} | {r['speedup_b1']:.2f}x "
            f"({r['of_ideal_b1']:.0%}) | {r['ms']['8']:.1f} | {r['speedup_b8']:.2f}x ({r['of_ideal_b8']:.0%}) | "
            + (f"{fast:.2f}x ({fast / r['ideal_speedup']:.0%}) |" if (fast := r.get("fastest_speedup_b8")) else "- |")
        )
    (RESULTS / f"bench_cnn-{device}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}/bench_cnn-{device}.md")


if __name__ == "__main__":
    main()
