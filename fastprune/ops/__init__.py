"""Kernel entry points. Each family: a PyTorch reference, a torch custom op, and per-device dispatch."""

from fastprune.ops.gather_slice import gather_slice, reference_gather_slice

__all__ = ["gather_slice", "reference_gather_slice"]
