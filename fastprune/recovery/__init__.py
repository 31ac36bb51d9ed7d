"""Quality recovery after pruning: distillation from the dense model, fine-tuning, or LoRA merged back.

    import fastprune
    result = fastprune.recover(pruned, dense, windows, fastprune.RecoveryConfig(mode="distill"))
    result.model          # the same plain model class, best held-out weights; save it like any pruned model
    result.history        # per evaluation: step, train loss, held-out loss, lr, seconds

Modules: ``config`` (RecoveryConfig), ``objectives`` (losses), ``trainer`` (the loop, recover), ``lora`` (peft
wrapping and merging), ``checkpoint`` (atomic, resumable checkpoints).
"""

from fastprune.recovery.config import RecoveryConfig
from fastprune.recovery.trainer import EvalPoint, RecoveryResult, recover

__all__ = ["EvalPoint", "RecoveryConfig", "RecoveryResult", "recover"]
