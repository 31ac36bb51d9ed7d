"""Kernel entry points. Each family: a PyTorch reference, a torch custom op, and per-device dispatch."""

from fastprune.ops.block_influence import (
    block_influence,
    block_influence_accumulate_,
    reference_block_influence,
)
from fastprune.ops.gather_slice import gather_slice, reference_gather_slice
from fastprune.ops.head_taylor import head_taylor, head_taylor_accumulate_, reference_head_taylor

__all__ = [
    "block_influence",
    "block_influence_accumulate_",
    "gather_slice",
    "head_taylor",
    "head_taylor_accumulate_",
    "reference_block_influence",
    "reference_gather_slice",
    "reference_head_taylor",
]
