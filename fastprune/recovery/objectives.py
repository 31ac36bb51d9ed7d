"""Recovery losses: what one batch of windows costs the student.

- Without a teacher: the adapter's own loss (causal LM for decoders; masked-LM or the in-batch contrastive
  loss for encoders), the same objective that scored the units.
- Decoders with a teacher: ``alpha * T^2 * KL(teacher || student)`` on the next-token distributions softened
  by temperature T, plus ``(1 - alpha) *`` the next-token cross-entropy on the text. The T^2 factor keeps
  gradient sizes comparable across temperatures (Hinton et al.). Both are computed together, fused and chunked
  (fastprune.recovery.fused_loss).
- Encoders with a teacher: there are no logits to match in general, so ``alpha`` weighs the relative MSE
  between the last hidden states plus ``1 - cos`` between the mean-pooled embeddings (the sentence embeddings
  that fastprune's evaluation compares), and ``1 - alpha`` the adapter's own loss.
- ``hidden_weight`` adds the relative MSE between hidden states at matching depths (see ``layer_pairs``).

The teacher runs under ``torch.no_grad``: its outputs are loss targets, and autograd refuses to save
inference-mode tensors for the backward pass, so inference mode would cost a copy of the logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fastprune.adapters import Adapter, adapter_for
from fastprune.errors import ConfigError
from fastprune.recovery.config import RecoveryConfig
from fastprune.recovery.fused_loss import distillation_loss

Objective = Callable[[torch.Tensor], torch.Tensor]


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over the teacher's mean square, so large activations do not dominate."""
    teacher = teacher.float()
    return (student.float() - teacher).pow(2).mean() / teacher.pow(2).mean().clamp_min(1e-12)


def layer_pairs(student_layers: int, teacher_layers: int) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices compared by the hidden-state loss.

    Index i is the output of layer i (0 is the embeddings, not compared). Student layer i of S is matched
    with teacher layer round(i * T / S), so the last layers always meet, a student that kept every layer is
    compared layer by layer, and a depth-pruned student is compared at proportional depths.
    """
    return [
        (i, (2 * i * teacher_layers + student_layers) // (2 * student_layers)) for i in range(1, student_layers + 1)
    ]


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Mean relative MSE over the ``layer_pairs`` of two models' hidden-state tuples (embeddings first)."""
    pairs = layer_pairs(len(student) - 1, len(teacher) - 1)
    return torch.stack([relative_mse(student[i], teacher[j]) for i, j in pairs]).mean()


def embedding_match(student_last: torch.Tensor, teacher_last: torch.Tensor) -> torch.Tensor:
    """Relative MSE of the last hidden states plus 1 - cosine of their mean-pooled sentence embeddings."""
    cos = F.cosine_similarity(student_last.float().mean(dim=1), teacher_last.float().mean(dim=1), dim=-1)
    return relative_mse(student_last, teacher_last) + (1 - cos).mean()


def make_objective(adapter: Adapter, teacher: nn.Module | None, config: RecoveryConfig) -> Objective:
    """The per-batch loss: the adapter's own without a teacher, else distillation from ``teacher``."""
    if teacher is None:
        return adapter.loss
    _check_teacher(adapter, teacher, config)
    if adapter.causal:
        return lambda ids: _causal_distillation(adapter.model, teacher, ids, config)
    return lambda ids: _encoder_distillation(adapter, teacher, ids, config)


def _causal_distillation(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, config: RecoveryConfig):
    hidden = config.hidden_weight > 0
    with torch.no_grad():
        t = teacher(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    s = student(input_ids=ids, use_cache=False, output_hidden_states=hidden)
    terms = [distillation_loss(s.logits, t.logits, ids, config.temperature, config.alpha)]
    if hidden:
        terms.append(config.hidden_weight * hidden_state_loss(s.hidden_states, t.hidden_states))
    return sum(terms)


def _encoder_distillation(adapter: Adapter, teacher: nn.Module, ids: torch.Tensor, config: RecoveryConfig):
    terms = []
    if config.alpha > 0 or config.hidden_weight > 0:
        with torch.no_grad():
            t = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        s = adapter.model(input_ids=ids, output_hidden_states=True).hidden_states
        if config.alpha > 0:
            terms.append(config.alpha * embedding_match(s[-1], t[-1]))
        if config.hidden_weight > 0:
            terms.append(config.hidden_weight * hidden_state_loss(s, t))
    if config.alpha < 1:
        terms.append((1 - config.alpha) * adapter.loss(ids))
    return sum(terms)


def _check_teacher(adapter: Adapter, teacher: nn.Module, config: RecoveryConfig) -> None:
    teacher_adapter = adapter_for(teacher)
    if teacher_adapter.causal != adapter.causal:
        raise ConfigError("the teacher must be the same kind of model as the student (both decoders or encoders)")
    s, t = adapter.config, teacher_adapter.config
    if adapter.causal and s.vocab_size != t.vocab_size:
        raise ConfigError(f"teacher vocabulary ({t.vocab_size}) differs from the student's ({s.vocab_size})")
    compares_hidden = config.hidden_weight > 0 or not adapter.causal
    if compares_hidden and s.hidden_size != t.hidden_size:
        raise ConfigError(f"teacher hidden size ({t.hidden_size}) differs from the student's ({s.hidden_size})")
