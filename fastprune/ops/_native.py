"""Find fastprune's compiled backends once, say once when one is missing, and pick one per device."""

import functools
import importlib
import logging
import os
from types import ModuleType

import torch

logger = logging.getLogger("fastprune")

# dtype codes understood by the CUDA modules
CUDA_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@functools.cache
def cpu_extension(family: str) -> bool:
    """True when ``fastprune._cpu_<family>`` (C++ CPU kernels, ops in ``torch.ops.fastprune_cpu``) is loaded."""
    if os.environ.get("FASTPRUNE_DISABLE_EXT") == "1":
        return False
    try:
        importlib.import_module(f"fastprune._cpu_{family}")
    except ImportError as exc:
        logger.warning(
            "fastprune: C++ CPU kernels for %s are not built (%s); using the PyTorch reference. "
            "Reinstall with `pip install --no-build-isolation -e .` to build them.",
            family,
            exc,
        )
        return False
    return True


@functools.cache
def cuda_module(family: str) -> ModuleType | None:
    """The pybind11 CUDA module of one kernel family (``fastprune._cuda_<family>``), or None if not built."""
    if os.environ.get("FASTPRUNE_DISABLE_EXT") == "1":
        return None
    try:
        return importlib.import_module(f"fastprune._cuda_{family}")
    except ImportError as exc:
        logger.warning("fastprune: CUDA kernels for %s are not built (%s); using another backend", family, exc)
        return None


@functools.cache
def triton_available() -> bool:
    """True when Triton imports (GPU, or CPU under ``TRITON_INTERPRET=1``)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def use_triton_on_cpu() -> bool:
    """Triton kernels run on CPU tensors only in interpreter mode, which tests use on small shapes."""
    return os.environ.get("TRITON_INTERPRET") == "1" and triton_available()


def require_cpu_extension(family: str) -> None:
    """Raise RuntimeError unless the C++ CPU kernels of ``family`` are loaded."""
    if not cpu_extension(family):
        raise RuntimeError(f"fastprune: the C++ CPU kernels for {family} are not built")


def require_cuda_module(family: str) -> ModuleType:
    """The CUDA module of ``family``; RuntimeError if it is not built."""
    module = cuda_module(family)
    if module is None:
        raise RuntimeError(f"fastprune: the CUDA kernels for {family} are not built")
    return module


def require_triton() -> None:
    """Raise RuntimeError unless Triton imports."""
    if not triton_available():
        raise RuntimeError("fastprune: triton is not installed")


def cuda_device_index(device: torch.device) -> int:
    """The index of a CUDA device, the current one when ``device`` has none (``"cuda"``)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_stream(device: torch.device) -> int:
    """The current stream of a CUDA device, as the integer handle the CUDA modules take."""
    return torch.cuda.current_stream(device).cuda_stream


def pick_backend(family: str, device: torch.device, *, triton: bool = True) -> str:
    """The backend of ``family`` for tensors on ``device`` (``triton``: whether the op has a Triton kernel).

    CPU -> Triton when ``TRITON_INTERPRET=1`` (tests), else C++, else the reference. CUDA -> the CUDA module,
    else Triton, else the reference.
    """
    if device.type == "cpu":
        if triton and use_triton_on_cpu():
            return "triton"
        return "cpu" if cpu_extension(family) else "reference"
    if device.type == "cuda":
        # Unmeasured preference (no GPU when written): confirm with benchmarks/bench_<family>.py on a GPU.
        if cuda_module(family) is not None:
            return "cuda"
        if triton and triton_available():
            return "triton"
    return "reference"
