"""The recovery loop: warm-up, cosine decay, held-out evaluations, early stopping, time budget, checkpoints.

Determinism: the held-out split, each epoch's window order and every step's micro-batches follow from the seed
and the step number alone, and a checkpoint holds the torch RNG state as it was at the start of its step, so a
run that is interrupted and resumed takes exactly the steps an uninterrupted run takes (bit for bit on CPU).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from fastprune.adapters import Adapter, adapter_for
from fastprune.data import TokenWindows
from fastprune.distributed import all_reduce_mean
from fastprune.errors import CalibrationError, ConfigError
from fastprune.recovery.checkpoint import (
    deferred_interrupt,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastprune.recovery.config import RESUMABLE_CHANGES, RecoveryConfig
from fastprune.recovery.lora import add_lora, merge_lora
from fastprune.recovery.objectives import Objective, make_objective
from fastprune.recovery.precision import autocast_dtype, with_autocast
from fastprune.recovery.sharding import (
    agree_any,
    load_sharded,
    local_share,
    plain_copy,
    read_state,
    save_sharded,
    shard_model,
    sharding,
)
from fastprune.recovery.teacher_text import teacher_windows

logger = logging.getLogger("fastprune")


@dataclass
class EvalPoint:
    """One held-out evaluation, after ``step`` optimizer steps and ``seconds`` of wall time."""

    step: int
    train_loss: float | None  # mean training loss of the steps since the previous evaluation
    val_loss: float
    lr: float  # learning rate of the next step
    seconds: float


@dataclass
class RecoveryResult:
    """The recovered plain model (best held-out weights), its evaluations, and why training stopped."""

    model: nn.Module
    history: list[EvalPoint]
    best_val_loss: float
    best_step: int
    steps: int
    seconds: float
    stop_reason: str  # "completed", "early_stopping" or "time_budget"
    config: RecoveryConfig
    info: dict = field(default_factory=dict)

    @property
    def stopped_early(self) -> bool:
        return self.stop_reason == "early_stopping"

    @property
    def stopped_by_budget(self) -> bool:
        return self.stop_reason == "time_budget"

    def to_dict(self) -> dict:
        """Everything but the model, JSON-ready (for fastprune.json and reports)."""
        return {
            "config": self.config.to_dict(),
            "history": [asdict(p) for p in self.history],
            "best_val_loss": self.best_val_loss,
            "best_step": self.best_step,
            "steps": self.steps,
            "seconds": self.seconds,
            "stop_reason": self.stop_reason,
            **self.info,
        }


def recover(
    student: nn.Module,
    teacher: nn.Module | None,
    windows: TokenWindows | torch.Tensor,
    config: RecoveryConfig | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
) -> RecoveryResult:
    """Train a pruned ``student`` in place to recover quality and return it with its best held-out weights.

    ``windows`` (TokenWindows or [N, T] token ids) are split into training and held-out windows by
    ``config.val_fraction``. ``teacher`` is the dense model: required by ``distill``, optional for ``lora``
    (distils when given), ignored by ``finetune``. LoRA is merged into the dense weights, so the result is
    always a plain model. With ``checkpoint_dir`` a checkpoint is written every ``config.checkpoint_every``
    steps and on Ctrl-C; ``resume=True`` continues from it and ends with the weights an uninterrupted run
    would have.

    Under torch.distributed (torchrun) student and teacher are sharded with FSDP2 over the processes, each step's
    windows are split between them (``batch_size`` must be a multiple of the process count), checkpoints are
    sharded (torch.distributed.checkpoint; written every ``checkpoint_every`` steps, not on Ctrl-C) and may be
    resumed on another number of processes; the result's model is a plain copy on rank 0 and None on the others
    (fastprune.recovery.sharding).
    """
    config = config or RecoveryConfig()
    teacher = _teacher_for(config, teacher)
    if resume and checkpoint_dir is None:
        raise ConfigError("resume needs the checkpoint_dir of the interrupted run")
    ids = _window_ids(windows)
    train_ids, val_ids = split_windows(ids, config.val_fraction, config.seed)
    t0 = time.perf_counter()
    if config.teacher_text > 0:
        if teacher is None:
            raise ConfigError("teacher_text needs a teacher to write the text")
        k = max(1, round(config.teacher_text * len(train_ids)))  # held-out windows stay real text
        train_ids = torch.cat(
            [teacher_windows(teacher, train_ids[:k], config.seed, config.teacher_prompt), train_ids[k:]]
        )
    writing_seconds = time.perf_counter() - t0  # (part of the time budget)
    adapter = adapter_for(student)
    sharded, plain_class = sharding(), type(student)
    if sharded:
        if config.mode == "lora":
            raise ConfigError("LoRA recovery runs in one process; under torchrun use distill or finetune")
        local_share(torch.empty(config.batch_size))  # refuse a batch the processes cannot split, before loading
    torch.manual_seed(config.seed)
    with _training_shape(adapter, config), _eval_mode(teacher):
        if sharded:  # (fully_shard moves the weights to this process's device: its GPU under NCCL)
            shard_model(adapter)
            if teacher is not None:
                shard_model(adapter_for(teacher))
        device = next(student.parameters()).device
        peft_model = add_lora(adapter, config) if config.mode == "lora" else None
        try:
            dtype = autocast_dtype(config.precision, student)
            if dtype is not None:
                logger.info("recovery: forward passes under %s autocast (precision %s)", dtype, config.precision)
            objective = with_autocast(make_objective(adapter, teacher, config), device, dtype)
            run = _Run(student, objective, train_ids.to(device), val_ids.to(device), config, checkpoint_dir)
            state = run.read_checkpoint() if resume else None
            if state is not None:
                run.resume(state)
            else:
                run.progress.seconds = writing_seconds
                if resume:
                    logger.info("no recovery checkpoint in %s; starting from the beginning", checkpoint_dir)
            run.train()
        except BaseException:
            # Leave the student without adapters, as it came, so that an in-process resume can wrap it again.
            if peft_model is not None:
                peft_model.unload()
            raise
        run.restore_best()
        model = merge_lora(peft_model) if peft_model is not None else student
        if sharded:
            model = plain_copy(student, plain_class)
    result = run.result(model, distilled=teacher is not None)
    result.info["autocast"] = None if dtype is None else str(dtype).removeprefix("torch.")
    return result


def split_windows(ids: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(training, held-out) windows: a seeded random ``val_fraction`` of them, at least one, is held out."""
    n = ids.shape[0]
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise CalibrationError(f"recovery needs at least 2 windows (to train on and to hold out); got {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return ids[order[n_val:]], ids[order[:n_val]]


#: Steps timed before the schedule is fitted to a time budget (the first pays one-off costs and is not counted).
TIMED_STEPS = 3
#: Fraction of the time left that the fitted schedule plans to use (the rest absorbs timing noise).
BUDGET_USE = 0.97
#: A fitted schedule is fitted again at every held-out evaluation and after at most this many steps between them
#: (a 20-minute budget on a slow CPU holds fewer steps than one evaluation interval), or halfway through the steps
#: it planned if that comes first (a plan shorter than this would otherwise end before it is checked).
REFIT_STEPS = 8


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier of ``step``: linear warm-up for ``warmup`` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / (warmup + 1)  # never 0, so the first step already learns
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class _Progress:
    """Where a run stands; saved in checkpoints, so plain data only."""

    step: int = 0
    evaluated_step: int = -1
    best_val_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0
    loss_sum: float = 0.0
    loss_count: int = 0
    seconds: float = 0.0  # wall time spent by earlier (interrupted) runs
    planned_steps: int | None = None  # the step count fitted to the time budget, once measured
    stop_reason: str | None = None
    history: list[dict] = field(default_factory=list)


class _Run:
    """One recovery run: the optimizer, schedule and progress of training ``model`` on ``objective``."""

    def __init__(self, model, objective: Objective, train_ids, val_ids, config: RecoveryConfig, checkpoint_dir):
        self.model, self.objective, self.config = model, objective, config
        self.train_ids, self.val_ids = train_ids, val_ids
        self.checkpoint_dir = checkpoint_dir
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.batches_per_epoch = max(1, len(train_ids) // config.batch_size)  # a short last batch is dropped
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.grad_accum)
        total = config.epochs * self.steps_per_epoch
        self.total_steps = min(total, config.max_steps) if config.max_steps is not None else total
        self.warmup_steps = round(config.warmup * self.total_steps)
        # With a time budget and no step limit the schedule is fitted to the budget once steps are timed.
        self.fit_to_budget = config.time_budget_min is not None and config.max_steps is None
        self.timed_steps: list[float] = []
        self.refit_after = REFIT_STEPS  # timed steps after which a fitted schedule is fitted again
        # foreach=False keeps AdamW from allocating temporaries for all parameters at once (lean mode).
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=config.learning_rate, weight_decay=0.0, foreach=not config.lean
        )
        self.optimizer.zero_grad(set_to_none=True)  # a model interrupted mid-step may still hold gradients
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, self.warmup_steps)
        )
        n_val = len(val_ids)
        self.val_batches = torch.tensor_split(val_ids, math.ceil(n_val / config.batch_size))
        self.progress = _Progress()
        self.best: dict[str, torch.Tensor] = {}
        self.order: tuple[int, torch.Tensor] | None = None
        self.fingerprint = {
            "config": {k: v for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES},
            "trainable": [[n, list(p.shape)] for n, p in self.params.items()],
            "windows": _digest(torch.cat([train_ids, val_ids])),
        }
        self.t0 = time.perf_counter()
        self.recent_steps: deque[float] = deque(maxlen=REFIT_STEPS)  # the stop check's margin: the slowest of these
        self.eval_seconds = 0.0
        self.saved_step = 0
        self.rng = rng_state()
        self.postfix: dict[str, str] = {}

    # -- the loop -------------------------------------------------------------------------------------------
    def train(self) -> None:
        p, config = self.progress, self.config
        logger.info(
            "recovery (%s): %d training and %d held-out windows, %d steps, lr %.2g, %d trainable parameters",
            config.mode,
            len(self.train_ids),
            len(self.val_ids),
            self.total_steps,
            config.learning_rate,
            sum(t.numel() for t in self.params.values()),
        )
        bar = tqdm(total=self.total_steps, initial=p.step, desc=f"recover ({config.mode})", unit="step", disable=None)
        try:
            with bar:
                while True:
                    out_of_time = self._out_of_time()
                    due = p.step % config.eval_every == 0 or p.step >= self.total_steps or out_of_time
                    if due and p.evaluated_step != p.step:
                        self._evaluate()
                        self.postfix["val"] = f"{p.history[-1]['val_loss']:.4f}"
                    p.stop_reason = self._stop_reason(out_of_time)
                    if p.stop_reason is not None:
                        break
                    if self._refit_due(due):
                        self._fit_schedule_to_budget()
                        bar.total = self.total_steps
                    if self._checkpoint_due():
                        self.save()
                    self.postfix["loss"] = f"{self._step():.4f}"
                    if self.fit_to_budget and p.planned_steps is None and len(self.timed_steps) == TIMED_STEPS:
                        self._fit_schedule_to_budget()
                        bar.total = self.total_steps
                    bar.set_postfix(self.postfix, refresh=False)
                    bar.update(1)
        except KeyboardInterrupt:
            if self.checkpoint_dir is not None and not sharding():  # (a sharded save needs every process)
                path = self.save()
                logger.warning("recovery interrupted at step %d; resume=True continues from %s", p.step, path)
            raise
        logger.info(
            "recovery stopped (%s) after %d steps, %.0f s; best held-out loss %.4f at step %d",
            p.stop_reason,
            p.step,
            self._elapsed(),
            p.best_val_loss,
            p.best_step,
        )

    def _checkpoint_due(self) -> bool:
        step = self.progress.step
        return self.checkpoint_dir is not None and step % self.config.checkpoint_every == 0 and step != self.saved_step

    def _stop_reason(self, out_of_time: bool) -> str | None:
        p = self.progress
        if self.config.patience and p.bad_evals >= self.config.patience:
            return "early_stopping"
        if p.step >= self.total_steps:
            return "completed"
        return "time_budget" if out_of_time else None

    def _out_of_time(self) -> bool:
        if self.config.time_budget_min is None:
            return False
        # Stop while one more step and the final evaluation still fit in the budget (all processes together). The
        # next step may be slower than the last one (a busy host): allow for the slowest of the recent steps.
        next_step = max(self.recent_steps, default=0.0)
        return agree_any(self._elapsed() + next_step + self.eval_seconds > 60 * self.config.time_budget_min)

    def _elapsed(self) -> float:
        return self.progress.seconds + time.perf_counter() - self.t0

    def _step(self) -> float:
        t0 = time.perf_counter()
        self.model.train()
        batches = self._micro_batches(self.progress.step)
        total = 0.0
        for ids in batches:
            loss = self.objective(ids) / len(batches)
            loss.backward()
            total += loss.item()
        total = all_reduce_mean(total)  # the global batch's loss (each process had its share of the windows)
        with deferred_interrupt():
            if self.config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.config.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.progress.step += 1
            self.progress.loss_sum += total
            self.progress.loss_count += 1
            self.rng = rng_state()  # where the next step starts: what a checkpoint taken before it restores
        seconds = time.perf_counter() - t0
        self.timed_steps.append(seconds)
        self.recent_steps.append(seconds)
        return total

    def _refit_due(self, evaluated: bool) -> bool:
        """Whether to fit the schedule again (at an evaluation, or after ``refit_after`` steps, once a fitted run has
        timed steps of its own): steps slow down or speed up with the machine's load, and a schedule fitted once
        would then end after the budget stops it (its learning rate never decayed) or before the budget is spent."""
        timed = len(self.timed_steps)
        fitted = self.fit_to_budget and self.progress.planned_steps is not None
        return fitted and (timed >= self.refit_after or (evaluated and timed >= 2))

    def _fit_schedule_to_budget(self) -> None:
        """Set the step count (and so the warm-up and cosine decay) to what the rest of the time budget holds.

        A step's time is the mean of the steps timed since the last fit (the very first step pays one-off costs
        and is not counted), plus its share of the held-out evaluations; the final evaluation is kept out of the
        budget, and 3% is left as margin.
        """
        p, config = self.progress, self.config
        timed = self.timed_steps[1:] if p.planned_steps is None else self.timed_steps
        step_seconds = all_reduce_mean(sum(timed) / len(timed))
        self.timed_steps = []
        eval_seconds = all_reduce_mean(self.eval_seconds)
        left = 60 * config.time_budget_min - self._elapsed() - eval_seconds
        more = int(BUDGET_USE * left / (step_seconds + eval_seconds / config.eval_every))
        self._set_total_steps(max(p.step + 1, p.step + more))
        logger.log(
            logging.INFO if len(p.history) <= 1 else logging.DEBUG,
            "recovery: %.2f s per step measured; %d steps fill the %.4g-minute budget (%.1f epochs)",
            step_seconds,
            self.total_steps,
            config.time_budget_min,
            self.total_steps / self.steps_per_epoch,
        )

    def _set_total_steps(self, total: int) -> None:
        self.total_steps = self.progress.planned_steps = total
        self.warmup_steps = round(self.config.warmup * total)
        self.refit_after = max(2, min(REFIT_STEPS, (total - self.progress.step) // 2))

    def _micro_batches(self, step: int) -> list[torch.Tensor]:
        epoch, j = divmod(step, self.steps_per_epoch)
        order = self._epoch_order(epoch)
        size, accum = self.config.batch_size, self.config.grad_accum
        first, last = j * accum, min((j + 1) * accum, self.batches_per_epoch)
        return [local_share(self.train_ids[order[b * size : (b + 1) * size]]) for b in range(first, last)]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """Epoch e's window order: the (e+1)-th permutation drawn from a generator seeded with the seed."""
        if self.order is None or self.order[0] != epoch:
            gen = torch.Generator().manual_seed(self.config.seed)
            for _ in range(epoch + 1):
                perm = torch.randperm(len(self.train_ids), generator=gen)
            self.order = (epoch, perm.to(self.train_ids.device))
        return self.order[1]

    def _evaluate(self) -> None:
        t0 = time.perf_counter()
        self.model.eval()
        total = 0.0
        with torch.no_grad():
            for ids in self.val_batches:
                total += float(self.objective(ids)) * len(ids)
        val = total / len(self.val_ids)
        p = self.progress
        with deferred_interrupt():
            train_loss = p.loss_sum / p.loss_count if p.loss_count else None
            lr = self.optimizer.param_groups[0]["lr"]
            p.history.append(asdict(EvalPoint(p.step, train_loss, val, lr, self._elapsed())))
            p.loss_sum, p.loss_count, p.evaluated_step = 0.0, 0, p.step
            if val < p.best_val_loss:  # NaN never improves
                p.best_val_loss, p.best_step, p.bad_evals = val, p.step, 0
                self._remember_best()
            else:
                p.bad_evals += 1
        self.eval_seconds = time.perf_counter() - t0
        logger.info(
            "recovery step %d: train loss %s, held-out loss %.4f",
            p.step,
            "-" if train_loss is None else f"{train_loss:.4f}",
            val,
        )

    def _remember_best(self) -> None:
        with torch.no_grad():
            if not self.best:
                self.best = {n: t.detach().clone() for n, t in self.params.items()}
            for n, t in self.params.items():
                self.best[n].copy_(t)

    def restore_best(self) -> None:
        """Put the best evaluated weights back (unless the last evaluation was the best)."""
        p = self.progress
        if self.best and p.best_step != p.step:
            with torch.no_grad():
                for n, t in self.params.items():
                    t.copy_(self.best[n])
            logger.info("kept the weights of step %d (held-out loss %.4f)", p.best_step, p.best_val_loss)

    # -- checkpoints ----------------------------------------------------------------------------------------
    def save(self) -> Path:
        """Write a checkpoint of the state at the start of the current step."""
        progress = asdict(self.progress)
        progress["seconds"] = self._elapsed()
        if sharding():
            state = {
                "fingerprint": self.fingerprint,
                "progress": progress,
                "scheduler": self.scheduler.state_dict(),
            }
            path = save_sharded(self.checkpoint_dir, self.model, self.optimizer, self.best, state, self.rng)
            self.saved_step = self.progress.step
            logger.info("sharded recovery checkpoint at step %d written to %s", self.progress.step, path)
            return path
        payload = {
            "fingerprint": self.fingerprint,
            "progress": progress,
            "trainable": {n: t.detach() for n, t in self.params.items()},
            "best": self.best,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.rng,
        }
        path = save_checkpoint(self.checkpoint_dir, payload)
        self.saved_step = self.progress.step
        logger.info("recovery checkpoint at step %d written to %s", self.progress.step, path)
        return path

    def read_checkpoint(self) -> dict | None:
        """The checkpoint in ``checkpoint_dir`` (sharded under torch.distributed), or None."""
        return read_state(self.checkpoint_dir) if sharding() else load_checkpoint(self.checkpoint_dir)

    def resume(self, state: dict) -> None:
        """Continue from a checkpoint made by the same run (same model, windows and settings)."""
        differs = [k for k in self.fingerprint if state["fingerprint"].get(k) != self.fingerprint[k]]
        if differs:
            raise ConfigError(
                f"cannot resume from {self.checkpoint_dir}: its run had different {', '.join(differs)} "
                f"(only {', '.join(RESUMABLE_CHANGES)} may change)"
            )
        if sharding():
            self.best, state["rng"] = load_sharded(self.checkpoint_dir, state, self.model, self.optimizer, self.params)
        else:
            with torch.no_grad():
                for n, t in self.params.items():
                    t.copy_(state["trainable"][n])
            self.best = {n: t.to(self.params[n].device) for n, t in state["best"].items()}
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = _Progress(**state["progress"])
        if self.progress.planned_steps is not None:
            self._set_total_steps(self.progress.planned_steps)
        self.rng = state["rng"]
        set_rng_state(self.rng)
        self.t0 = time.perf_counter()
        self.saved_step = self.progress.step
        logger.info("resuming recovery at step %d of %d", self.progress.step, self.total_steps)

    def result(self, model: nn.Module, distilled: bool) -> RecoveryResult:
        p = self.progress
        info = {
            "train_windows": len(self.train_ids),
            "val_windows": len(self.val_ids),
            "seq_len": self.train_ids.shape[1],
            "planned_steps": self.total_steps,
            "trainable_params": sum(t.numel() for t in self.params.values()),
            "distilled": distilled,
        }
        history = [EvalPoint(**h) for h in p.history]
        return RecoveryResult(
            model,
            history,
            p.best_val_loss,
            p.best_step,
            p.step,
            self._elapsed(),
            p.stop_reason,
            self.config,
            info,
        )


def _teacher_for(config: RecoveryConfig, teacher: nn.Module | None) -> nn.Module | None:
    if config.mode == "distill" and teacher is None:
        raise ConfigError("mode distill needs a teacher (the dense model); use finetune or lora without one")
    if config.mode == "finetune":
        if teacher is not None:
            logger.info("mode finetune trains on the text alone; the teacher is not used")
        return None
    if teacher is None and config.hidden_weight > 0:
        raise ConfigError("hidden_weight compares hidden states with a teacher's; give a teacher or set it to 0")
    return teacher


def _window_ids(windows: TokenWindows | torch.Tensor) -> torch.Tensor:
    ids = windows.ids if isinstance(windows, TokenWindows) else windows
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.numel() == 0 or ids.is_floating_point():
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise CalibrationError(f"recovery windows must be a non-empty [N, T] tensor of token ids; got {shape}")
    return ids.long()


def _digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.cpu().contiguous().numpy().tobytes()).hexdigest() + f":{list(ids.shape)}"


@contextmanager
def _training_shape(adapter: Adapter, config: RecoveryConfig):
    """Make every weight trainable (lean: all but embeddings and norms), turn on gradient checkpointing, and
    put trainability, checkpointing and train/eval mode back as they were afterwards."""
    model = adapter.model
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    checkpointing = config.gradient_checkpointing and not _checkpointing_on(model)
    model.requires_grad_(True)
    if config.lean:
        for module in _lean_frozen(adapter):
            module.requires_grad_(False)
    if checkpointing:
        _set_checkpointing(model, True)
    try:
        yield
    finally:
        if checkpointing:
            _set_checkpointing(model, False)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        model.train(was_training)


def _lean_frozen(adapter: Adapter) -> list[nn.Module]:
    # Embeddings are most of a small model's parameters (and AdamW keeps two more copies of whatever trains);
    # norms have few parameters but are cheap to leave alone and sensitive to large updates.
    norms = [m for m in adapter.model.modules() if "norm" in type(m).__name__.lower()]
    return adapter.embedding_modules() + norms


def _checkpointing_on(model: nn.Module) -> bool:
    return any(getattr(m, "gradient_checkpointing", False) for m in model.modules())


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    # Newer transformers rename gradient_checkpointing_* to activation_checkpointing_* and warn on the old
    # names; older 5.x releases have only the old ones.
    prefix = "activation" if hasattr(model, "activation_checkpointing_enable") else "gradient"
    if on:
        # Non-reentrant checkpointing needs no input that requires grad (frozen embeddings, LoRA) and
        # replays dropout with the saved RNG state.
        getattr(model, f"{prefix}_checkpointing_enable")({"use_reentrant": False})
    else:
        getattr(model, f"{prefix}_checkpointing_disable")()
        # Some releases' enable also hooks the input embeddings to require grad (5.0 and the activation_* ones):
        # undo that, or inference after recovery would build autograd graphs.
        if getattr(model, "_require_grads_hook", None) is not None:
            model.disable_input_require_grads()
            model._require_grads_hook = None


@contextmanager
def _eval_mode(module: nn.Module | None):
    if module is None:
        yield
        return
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
