"""Recovery settings: one dataclass that the Python API takes and a command line can fill from flags.

Every field carries a one-line ``metadata["help"]`` (read it with ``dataclasses.fields(RecoveryConfig)``),
so a CLI can build its ``--help`` from this file instead of repeating the text.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from fastprune.errors import ConfigError
from fastprune.recovery.precision import PRECISIONS

MODES = ("distill", "finetune", "lora")
#: Learning rate when ``lr`` is None. Fine-tuning follows the usual guidance for pruned LLMs (1e-5 to 2e-5).
#: Distillation matches the teacher's whole distribution, a smoother target, and takes a larger step: swept on a
#: validation text that is neither calibration nor evaluation text (English man pages; 25%-pruned SmolLM2, 20
#: minutes on 2 CPU cores), 2e-4 beat 5e-5, 1e-4 and 4e-4 (quality-exploration.md). LoRA trains few,
#: zero-initialised parameters and needs a step about ten times larger than fine-tuning.
DEFAULT_LR = {"distill": 2e-4, "finetune": 2e-5, "lora": 2e-4}
#: Fields that may change between an interrupted run and its resumption (they do not alter the trajectory).
RESUMABLE_CHANGES = ("time_budget_min", "checkpoint_every")
INF = float("inf")


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class RecoveryConfig:
    """How to recover a pruned model's quality: the objective, the schedule, early stopping and budgets.

    ``mode``: ``distill`` trains every weight to match the dense teacher (KL on temperature-softened
    next-token distributions for decoders; last hidden states and mean-pooled embeddings for encoders), mixed
    with the model's own loss by ``alpha``; ``finetune`` trains every weight on the model's own loss (causal
    LM, or the adapter's encoder loss) and never uses a teacher; ``lora`` trains low-rank adapters on the
    attention and MLP projections and merges them into the dense weights at the end. ``lora`` distils when a
    teacher is given (the teacher's full distributions carry more signal per token than the text alone) and
    fine-tunes otherwise.

    The held-out loss used for early stopping and for choosing the weights returned is the training objective
    evaluated, without dropout, on a ``val_fraction`` split of the windows.
    """

    mode: str = _opt("distill", "recovery objective: distill (from the dense teacher), finetune, or lora")
    lr: float | None = _opt(None, "peak learning rate; default 2e-4 for distill and lora, 2e-5 for finetune")
    warmup: float = _opt(0.1, "fraction of the steps spent warming the learning rate up linearly")
    epochs: int = _opt(
        2, "passes over the training windows (then cosine decay ends at zero); a time budget replaces it"
    )
    max_steps: int | None = _opt(None, "stop after this many optimizer steps (the schedule ends there)")
    batch_size: int = _opt(4, "windows per micro-batch")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_grad_norm: float | None = _opt(1.0, "clip the gradient norm to this (None: no clipping)")
    val_fraction: float = _opt(0.1, "fraction of the windows held out for early stopping")
    eval_every: int = _opt(50, "evaluate the held-out loss every this many optimizer steps")
    patience: int = _opt(3, "stop after this many evaluations without improvement (0: never stop early)")
    temperature: float = _opt(2.0, "distillation temperature applied to student and teacher logits")
    alpha: float = _opt(0.5, "distillation weight: alpha * teacher-matching loss + (1 - alpha) * own loss")
    hidden_weight: float = _opt(0.0, "weight of the relative MSE between student and teacher hidden states")
    lora_rank: int = _opt(16, "LoRA rank")
    lora_alpha: float = _opt(32.0, "LoRA scaling numerator (updates are scaled by lora_alpha / lora_rank)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA branch's input")
    lora_targets: tuple[str, ...] | None = _opt(
        None, "module names (or name suffixes) that get LoRA; default: every attention and MLP projection"
    )
    teacher_text: float = _opt(
        0.0,
        "fraction of the training windows replaced by the teacher's own sampled continuations of their first "
        "teacher_prompt tokens (needs a teacher; cached in ~/.cache/fastprune/teacher-text)",
    )
    teacher_prompt: int = _opt(
        16, "tokens of each window the teacher continues (teacher_text); 0: it writes from its start token alone"
    )
    time_budget_min: float | None = _opt(
        None,
        "minutes of wall time to spend: without max_steps the step count (and so the warm-up and cosine decay) is "
        "fitted to the budget from the first steps' measured time, cycling the windows as often as it fits",
    )
    precision: str = _opt(
        "auto",
        "auto, bf16 or fp32: bf16 runs student and teacher under bfloat16 autocast (float32 weights and optimizer); "
        "auto picks it where bfloat16 products are native (a CPU with AMX, a CUDA GPU with bf16)",
    )
    gradient_checkpointing: bool = _opt(False, "recompute activations in the backward pass to save memory")
    lean: bool = _opt(False, "memory-lean CPU mode: freeze embeddings and norms, no multi-tensor optimizer")
    checkpoint_every: int = _opt(100, "write a resumable checkpoint every this many optimizer steps")
    seed: int = _opt(0, "seed for the held-out split, data order, dropout and LoRA initialisation")

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"recovery mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"recovery precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)
            if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
                raise ConfigError(f"recovery lora_targets must be non-empty module names; got {self.lora_targets!r}")
        for name in ("epochs", "batch_size", "grad_accum", "eval_every", "lora_rank", "checkpoint_every"):
            _check_int(name, getattr(self, name), 1)
        _check_int("patience", self.patience, 0)
        _check_int("seed", self.seed, 0)
        _check_int("teacher_prompt", self.teacher_prompt, 0)
        if self.max_steps is not None:
            _check_int("max_steps", self.max_steps, 1)
        for name in ("lr", "max_grad_norm", "time_budget_min", "temperature", "lora_alpha"):
            if getattr(self, name) is not None:
                _check_range(name, getattr(self, name), 0.0, INF, "a positive number", open_low=True)
        _check_range("hidden_weight", self.hidden_weight, 0.0, INF, "a non-negative number")
        _check_range("warmup", self.warmup, 0.0, 1.0, "in [0, 1)")
        _check_range("val_fraction", self.val_fraction, 0.0, 1.0, "in (0, 1)", open_low=True)
        _check_range("teacher_text", self.teacher_text, 0.0, 1.0, "in [0, 1]", open_high=False)
        if self.teacher_text > 0 and self.mode == "finetune":
            raise ConfigError("teacher_text needs a teacher to write it; mode finetune uses none")
        _check_range("lora_dropout", self.lora_dropout, 0.0, 1.0, "in [0, 1)")
        _check_range("alpha", self.alpha, 0.0, 1.0, "in [0, 1]", open_high=False)
        if self.mode == "finetune" and self.hidden_weight > 0:
            raise ConfigError("hidden_weight compares hidden states with a teacher's; mode finetune uses none")

    @property
    def learning_rate(self) -> float:
        """``lr``, or the mode's default when it is None."""
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data, with the learning rate actually used."""
        d = dataclasses.asdict(self)
        d["lr"] = self.learning_rate
        d["lora_targets"] = list(self.lora_targets) if self.lora_targets is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecoveryConfig:
        """Rebuild a config from ``to_dict`` output, refusing unknown keys."""
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown recovery settings: {', '.join(sorted(unknown))}")
        return cls(**data)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"recovery {name} must be an integer >= {minimum}; got {value!r}")


def _check_range(
    name: str, value: Any, low: float, high: float, what: str, open_low: bool = False, open_high: bool = True
) -> None:
    """Refuse ``value`` outside its bounds (each open or closed as asked); NaN and infinities never pass."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if open_low else value >= low) and (value < high if open_high else value <= high)
    if not ok:
        raise ConfigError(f"recovery {name} must be {what}; got {value!r}")
