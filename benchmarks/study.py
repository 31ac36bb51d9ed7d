"""The study users ask for: at equal quality, what is fastest on this machine, structured pruning, 2:4 sparsity,
8/4-bit quantization, or a combination? Run: ``make study`` (``python benchmarks/study.py``).

- SmolLM2-135M rows: dense; structured 25% and 50% of non-embedding parameters (obs, widths in multiples of 32);
  2:4 by magnitude, wanda and sparsegpt; structured 25% + 2:4 (sparsegpt); GGUF Q8_0 / Q4_1 of dense and
  of structured 25%. Held-out perplexity on two texts, weights MB, prefill ms, decode tokens/s at batch 1 and 8.
- One Llama-3-8B-shaped decoder layer, fp32 and bf16 (fp16 and bf16 on a GPU): dense vs structured at 2:4's
  weight count vs 2:4, prefill and decode latency, decode against the memory-bandwidth bound.

Writes ``benchmarks/results/study-<machine>.{md,json,png}`` (``-quick`` with ``--quick``: small settings to check
that everything runs). 13.5 minutes on 2 quiet CPU cores (the committed run; 39 on cores shared with other jobs).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import study_layers  # noqa: E402
import study_models  # noqa: E402
import study_report  # noqa: E402

import fastprune  # noqa: E402
from fastprune.config import CalibrationConfig  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small settings, to check the study runs (a few minutes)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--skip-models", action="store_true", help="no SmolLM2 rows")
    p.add_argument("--skip-quality", action="store_true", help="SmolLM2 rows without perplexity (latency only)")
    p.add_argument("--skip-gguf", action="store_true", help="no GGUF rows")
    p.add_argument("--skip-layers", action="store_true", help="no Llama-3-8B-shaped layer rows")
    p.add_argument(
        "--gpu-rows",
        action="store_true",
        help="SmolLM2 rows for latency on a GPU: dense, structured 25%% and 50%%, 2:4 and structured + 2:4 (wanda)",
    )
    p.add_argument("--suffix", default="", help="appended to the results' file names")
    p.add_argument("--out", type=Path, default=RESULTS, help="results directory (default benchmarks/results)")
    return p.parse_args(argv)


def settings(args) -> tuple[study_models.StudySettings, dict]:
    s = study_models.StudySettings()
    layer = {"shape": study_layers.LLAMA3_8B, "prefill_tokens": 512, "context": 512, "rounds": 3}
    if args.quick:
        s = dataclasses.replace(
            s,
            windows=2,
            seq_len=256,
            calibration=CalibrationConfig(8, 128, 4),
            gguf_types=("q8_0",),
            decode_tokens=8,
            rounds=1,
            prune_fractions=(0.25,),
            sparsify_criteria=("magnitude", "wanda"),
        )
        layer = {"shape": study_layers.LLAMA3_8B.scaled(4), "prefill_tokens": 64, "context": 64, "rounds": 1}
    if args.gpu_rows:
        s = dataclasses.replace(s, sparsify_criteria=("wanda",), combined_criterion="wanda")
    if args.skip_quality:
        s = dataclasses.replace(s, quality=False)
    if args.skip_gguf:
        s = dataclasses.replace(s, gguf_types=())
    return s, layer


def device_name(device: str) -> str:
    """The machine's name as the kernel benchmarks write it (benchmarks/conftest.py, loaded by path: tests have a
    conftest module of their own)."""
    spec = importlib.util.spec_from_file_location("benchmarks_conftest", Path(__file__).parent / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.device_name(device)


def machine_info(device: str) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "machine": device_name(device),
        "device": torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads",
        "fastprune": fastprune.__version__,
        "commit": commit,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_1min_start": os.getloadavg()[0],
    }


def run_models(args, s, info, progress) -> tuple[list[dict], dict]:
    loaded = fastprune.load_source("smollm2")
    seconds = info.setdefault("seconds", {})
    with study_models.make_workdir() as tmp:
        t0 = time.perf_counter()
        rows = study_models.build_rows(loaded, s, Path(tmp), progress)
        for r in rows:
            if "2:4" in r.kind:
                r.masked_dense_diff = study_models.masked_dense_difference(r.model, loaded.tokenizer, s)
                progress(
                    f"{r.name}: logits vs the masked dense model, max |diff| / max |logit| {r.masked_dense_diff:.1e}"
                )
        seconds["build"] = round(time.perf_counter() - t0)
        if args.device != "cpu":
            for r in rows:
                if r.model is not None:
                    r.model.to(args.device)
        if s.quality:
            t0 = time.perf_counter()
            study_models.measure_quality(rows, loaded.tokenizer, s, args.device, progress)
            seconds["perplexity"] = round(time.perf_counter() - t0)
        t0 = time.perf_counter()
        study_models.measure_latency(rows, loaded.model.config.vocab_size, s, progress)
        seconds["latency"] = round(time.perf_counter() - t0)
        out = [r.to_dict() for r in rows]
    settings_dict = dataclasses.asdict(s)
    settings_dict["calibration"] = dataclasses.asdict(s.calibration)
    return out, settings_dict


def run_layers(args, layer, progress) -> tuple[list[dict], dict]:
    on_gpu = args.device.startswith("cuda")
    dtypes = (
        {"fp16": torch.float16, "bf16": torch.bfloat16} if on_gpu else {"fp32": torch.float32, "bf16": torch.bfloat16}
    )
    shape = layer["shape"]
    results, bandwidth = study_layers.measure(
        shape,
        args.device,
        dtypes,
        study_layers.default_variants(shape, args.device),
        layer["prefill_tokens"],
        layer["context"],
        layer["rounds"],
        progress,
    )
    info = {**layer, "shape": dataclasses.asdict(shape), "bandwidth_gbps": bandwidth / 1e9}
    return study_layers.to_rows(results), info


def main(argv=None) -> int:
    args = parse_args(argv)
    s, layer = settings(args)
    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    info = machine_info(args.device)
    data = {"info": info}
    if not args.skip_models:
        data["models"], data["settings"] = run_models(args, s, info, progress)
    if not args.skip_layers:
        t_layers = time.perf_counter()
        data["layers"], data["layers_info"] = run_layers(args, layer, progress)
        info.setdefault("seconds", {})["layers"] = round(time.perf_counter() - t_layers)
    info["load_1min_end"] = os.getloadavg()[0]
    info["wall_s"] = round(time.perf_counter() - t0)
    stem = f"study-{info['machine']}" + ("-quick" if args.quick else "") + args.suffix
    for path in study_report.write(args.out, stem, data):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
