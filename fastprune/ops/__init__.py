"""Kernel entry points. Each family: a PyTorch reference, a torch custom op, and per-device dispatch."""

from fastprune.ops.block_influence import (
    block_influence,
    block_influence_accumulate_,
    reference_block_influence,
)
from fastprune.ops.gather_slice import gather_slice, reference_gather_slice
from fastprune.ops.head_taylor import head_taylor, head_taylor_accumulate_, reference_head_taylor
from fastprune.ops.sparse24 import (
    Sparse24Linear,
    reference_sparse24_compress,
    reference_sparse24_decompress,
    reference_sparse24_mask,
    reference_sparse24_matmul,
    sparse24_compress,
    sparse24_decompress,
    sparse24_mask,
    sparse24_matmul,
)

__all__ = [
    "block_influence",
    "block_influence_accumulate_",
    "gather_slice",
    "head_taylor",
    "head_taylor_accumulate_",
    "reference_block_influence",
    "reference_gather_slice",
    "reference_head_taylor",
    "reference_sparse24_compress",
    "reference_sparse24_decompress",
    "reference_sparse24_mask",
    "reference_sparse24_matmul",
    "Sparse24Linear",
    "sparse24_compress",
    "sparse24_decompress",
    "sparse24_mask",
    "sparse24_matmul",
]
