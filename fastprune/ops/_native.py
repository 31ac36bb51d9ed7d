"""Find fastprune's compiled backends once, and say once when one is missing."""

import functools
import importlib
import logging
import os
from types import ModuleType

logger = logging.getLogger("fastprune")


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
