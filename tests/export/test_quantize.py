"""Searched Q4_0 / Q4_1 blocks: standard blocks gguf reads back, never a block worse than gguf's
round-to-nearest, and lower error overall on weights with outliers."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from fastprune.export.quantize import BLOCK, dequantize_blocks, quantize_searched


def weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian weights with 1% outliers, a constant block, a zero block and a block of one sign."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    w[rng.random(w.shape) < 0.01] *= 10
    w[0, :BLOCK] = 0.0
    w[-1, :BLOCK] = 0.125
    w[1 % rows, -BLOCK:] = np.abs(w[1 % rows, -BLOCK:])
    return w


def block_sq_errors(blocks: np.ndarray, w: np.ndarray, kind) -> np.ndarray:
    return np.square(dequantize(blocks, kind).astype(np.float64) - w).reshape(-1, BLOCK).sum(1)


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1"])
@pytest.mark.parametrize(("rows", "cols", "seed"), [(1, 32, 0), (7, 96, 1), (64, 576, 2), (3, 4096 + 32, 3)])
def test_search_never_worse_than_round_to_nearest(qtype, rows, cols, seed):
    kind = getattr(GGMLQuantizationType, qtype.upper())
    w = weights(rows, cols, seed)
    searched, rtn = quantize_searched(w, qtype), quantize(w, kind)
    assert searched.shape == rtn.shape and searched.dtype == rtn.dtype == np.uint8
    got, base = block_sq_errors(searched, w, kind), block_sq_errors(rtn, w, kind)
    assert (got <= base).all()
    constant = (rows - 1) * (cols // BLOCK)  # the first block of the last row
    assert got[0] == 0 and (qtype == "q4_0" or got[constant] == 0)  # zero block; constant block (Q4_1: m = value)
    if rows * cols >= 1024:
        assert got.sum() < 0.97 * base.sum()  # the search finds better scales than the extreme values give


@pytest.mark.parametrize("qtype", ["q4_0", "q4_1"])
def test_own_dequantization_matches_gguf(qtype):
    """The error the search minimises is measured on exactly the weights gguf (and llama.cpp) decode."""
    kind = getattr(GGMLQuantizationType, qtype.upper())
    w = weights(5, 128, 4)
    blocks = quantize_searched(w, qtype)
    ours = dequantize_blocks(blocks.reshape(-1, blocks.shape[-1] // (128 // BLOCK)), qtype)
    assert np.array_equal(ours.reshape(w.shape), dequantize(blocks, kind))


def test_search_refuses_other_types():
    with pytest.raises(ValueError, match="q4_0, q4_1"):
        quantize_searched(np.zeros((1, 32), np.float32), "q5_0")
