"""The decoder distillation loss (temperature KL to the teacher plus next-token cross-entropy), fused and chunked.

Written with autograd, the loss makes a dozen passes over [tokens, vocabulary] tensors (casts, softmaxes, the KL's
products) and as many again backwards: for SmolLM2's 49k-word vocabulary and 4 windows of 512 tokens, 400 MB per
pass and about a quarter of a CPU training step. Here the loss and its gradient with respect to the student's
logits are computed together, a few rows at a time (the rows' temporaries stay in cache), and the gradient is kept
for the backward pass: the same values in about a third of the time.

With ``p(z)`` the softmax and ``T`` the temperature, the gradients with respect to the student's logits ``z`` are
``d/dz T^2 KL(p(t/T) || p(z/T)) = T (p(z/T) - p(t/T))`` and ``d/dz CE = p(z) - onehot(target)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: Rows (token positions) per chunk: 32 rows of a 49k vocabulary are 6 MB of float32 per temporary.
CHUNK_ROWS = 32


def _chunk(s, t, target, temperature: float, scale: tuple[float, float], want_grad: bool):
    """One chunk of float32 rows: its KL sum and CE sum, and (if ``want_grad``) their gradient, each term scaled by
    its factor in ``scale`` (else None). A term whose factor is zero is skipped."""
    kl = ce = torch.zeros((), dtype=torch.float64)
    grad = None
    if scale[0] > 0:
        log_s = F.log_softmax(s / temperature, dim=-1)
        log_t = F.log_softmax(t / temperature, dim=-1)
        p_t = log_t.exp()
        flat = p_t.view(-1)
        kl = torch.dot(flat, log_t.view(-1)) - torch.dot(flat, log_s.view(-1))
        if want_grad:
            grad = log_s.exp_().sub_(p_t).mul_(temperature * scale[0])
    if scale[1] > 0:
        log_p = F.log_softmax(s, dim=-1)
        rows = (target >= 0).nonzero().flatten()
        ce = -log_p[rows, target[rows]].sum()
        if want_grad:
            g_ce = log_p.exp_()
            g_ce[rows, target[rows]] -= 1.0
            g_ce[(target < 0).nonzero().flatten()] = 0.0
            grad = g_ce.mul_(scale[1]) if grad is None else grad.add_(g_ce, alpha=scale[1])
    return kl, ce, grad


class _DistillationLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, targets, temperature: float, alpha: float):
        positions, predicted = student.shape[0], max(1, int((targets >= 0).sum()))
        scale = (alpha / positions, (1 - alpha) / predicted)  # each term's weight over the count it averages
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(student) if want_grad else None
        kl_sum = ce_sum = 0.0
        for start in range(0, positions, CHUNK_ROWS):
            part = slice(start, start + CHUNK_ROWS)
            s, t = student[part].float(), teacher[part].float()
            kl, ce, g = _chunk(s, t, targets[part], temperature, scale, want_grad)
            kl_sum, ce_sum = kl_sum + kl.double(), ce_sum + ce.double()
            if want_grad:
                grad[part] = g
        if want_grad:
            ctx.save_for_backward(grad)
        loss = temperature**2 * scale[0] * kl_sum + scale[1] * ce_sum
        return loss.float()

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None, None


def distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, ids: torch.Tensor, temperature: float, alpha: float
) -> torch.Tensor:
    """``alpha * T^2 * KL(teacher || student)`` on the distributions softened by ``T`` (mean over positions) plus
    ``(1 - alpha) *`` the mean next-token cross-entropy of ``ids``; logits are [batch, length, vocabulary]. Only
    the student's logits get a gradient."""
    vocab = student_logits.shape[-1]
    targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], dim=1)  # the last position predicts nothing
    return _DistillationLoss.apply(
        student_logits.reshape(-1, vocab),
        teacher_logits.detach().reshape(-1, vocab),
        targets.reshape(-1),
        temperature,
        alpha,
    )
