"""SparseGPT for 2:4: choose the 2 kept weights of every group of 4 inputs and update the kept weights so that the
layer's output on the calibration inputs changes as little as possible (Frantar & Alistarh, 2023).

With H = X^T X (+ ridge) the Gram matrix of the layer's input, columns are processed left to right. Column i's
pruned weights w (in its rows) leave the error err = w / [H_i^-1]_00, where H_i is H restricted to columns i and
after; the Optimal Brain Surgeon update W[:, i:] -= err [H_i^-1]_0,: spreads it over the columns not yet
processed. The rows [H_i^-1]_0,: / sqrt([H_i^-1]_00) are the rows of the upper Cholesky factor of H^-1, so one
factorisation serves every column. The 2:4 choice for a group of 4 columns is made when its first column is
reached, by the OBS saliency w_j^2 / [H_j^-1]_00 (j: the group's columns) of the already updated weights.
Updates are applied within ``block_size`` columns at once and to the columns beyond in one matrix product ("lazy
batch" updates).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastprune.ops import sparse24_mask


def inverse_cholesky(gram: Tensor, damping: float) -> Tensor:
    """Upper Cholesky factor of (gram + damping * mean(diag) I)^-1, in float64."""
    h = gram.double()
    ridge = damping * h.diagonal().mean().clamp_min(1e-12)
    h = h + ridge * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def sparsegpt_24(weight: Tensor, gram: Tensor, damping: float = 0.01, block_size: int = 128) -> tuple[Tensor, Tensor]:
    """(updated weight with zeros at the pruned positions, bool keep mask), both [out, in], weight in float32.

    ``gram``: X^T X of the layer's input over the calibration tokens, [in, in]. Inputs that were never nonzero
    (zero diagonal) get weight 0, as nothing constrains them.
    """
    threads = torch.get_num_threads()
    # The column loop is thousands of small operations; a second thread costs more to wake than it saves there,
    # and on a loaded machine each parallel region can wait a scheduler tick for it.
    torch.set_num_threads(1)
    try:
        return _sparsegpt_24(weight, gram, damping, block_size)
    finally:
        torch.set_num_threads(threads)


def _sparsegpt_24(weight: Tensor, gram: Tensor, damping: float, block_size: int) -> tuple[Tensor, Tensor]:
    w = weight.detach().float().clone()
    rows, cols = w.shape
    gram = gram.double().clone()
    dead = gram.diagonal() == 0
    gram[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = inverse_cholesky(gram, damping).float()
    keep = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        block = w[:, b0:b1].clone()
        hinv_block = hinv[b0:b1, b0:b1]
        diag = hinv_block.diagonal()
        errors = torch.empty_like(block)
        for i in range(b1 - b0):
            if i % 4 == 0:
                saliency = block[:, i : i + 4].pow(2) / diag[i : i + 4].pow(2)
                keep[:, b0 + i : b0 + i + 4] = sparse24_mask(block[:, i : i + 4], saliency)
            col = block[:, i]
            err = torch.where(keep[:, b0 + i], 0.0, col) / diag[i]
            block[:, i:] -= err[:, None] * hinv_block[i, i:][None, :]  # column i becomes its pruned value
            errors[:, i] = err
        w[:, b0:b1] = block
        w[:, b1:] -= errors @ hinv[b0:b1, b1:]
    return w.masked_fill_(~keep, 0.0), keep
