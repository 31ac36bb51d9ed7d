"""Argument checks shared by the kernel families, and whether an eager call may skip its custom op."""

from collections.abc import Callable

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the arithmetic kernels take


def check(cond: bool, message: Callable[[], str]) -> None:
    """``torch._check``, minus its cost (about 1 us a call) when the condition is a plain True."""
    if cond is not True:
        torch._check(cond, message)


def check_tensors(op: str, **tensors: object) -> None:
    """TypeError naming the first argument that is not a Tensor."""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")


def direct_call_ok(*tensors: Tensor) -> bool:
    """Whether an eager call may skip the custom op and run the backend itself.

    The op's dispatch costs about 15 us a call, as much as the kernel on SmolLM2-sized inputs; it is only
    needed when something must see the op: torch.compile, a dispatch or function mode, a tensor subclass.
    """
    return no_dispatch_hooks() and all(type(t) is Tensor for t in tensors)


def no_dispatch_hooks() -> bool:
    """Whether nothing must see an op called eagerly: no torch.compile, no dispatch or function mode."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )
