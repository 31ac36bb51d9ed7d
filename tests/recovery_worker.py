"""One small recovery run, for tests/test_distributed.py: in-process, or as each process of ``torchrun``.

    torchrun --nproc_per_node 2 tests/recovery_worker.py OUT [--checkpoint-dir D] [--stop-after N] [--resume]

Rank 0 writes OUT (torch.save): the evaluation history, the final weights and the stop reason.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from tinymodels import tiny_decoder, token_batch  # noqa: E402

from fastprune.distributed import current, init_from_env, shutdown  # noqa: E402
from fastprune.recovery import RecoveryConfig, recover  # noqa: E402
from fastprune.recovery.trainer import _Run  # noqa: E402

CONFIG = RecoveryConfig(
    mode="distill",
    alpha=1.0,
    lr=1e-2,
    batch_size=4,
    grad_accum=2,
    eval_every=2,
    max_steps=6,
    checkpoint_every=2,
    patience=0,
    precision="fp32",  # one process vs two agree to float32 rounding; bfloat16 products would differ by more
)


def run(out: Path, checkpoint_dir: Path | None = None, stop_after: int | None = None, resume: bool = False):
    torch.manual_seed(0)
    teacher = tiny_decoder(layers=2, channels=40, seed=0)
    student = tiny_decoder(layers=2, channels=40, seed=1)
    windows = torch.cat([token_batch(batch=8, length=24, seed=s) for s in range(5)])
    if stop_after is not None:  # a crash (not a clean stop) after this many optimizer steps
        step = _Run._step

        def crashing(self):
            if self.progress.step >= stop_after:
                raise SystemExit(3)
            return step(self)

        _Run._step = crashing
    result = recover(student, teacher, windows, CONFIG, checkpoint_dir, resume)
    if current().is_main:
        weights = {n: p.detach().clone() for n, p in result.model.state_dict().items()}
        history = [(h.step, h.train_loss, h.val_loss) for h in result.history]
        torch.save({"history": history, "weights": weights, "stop": result.stop_reason}, out)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoint-dir", type=Path)
    parser.add_argument("--stop-after", type=int)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    init_from_env()
    try:
        run(args.out, args.checkpoint_dir, args.stop_after, args.resume)
    finally:
        shutdown()
