"""What the kernel-family tests share: skip markers, and running a test file's tests in a fresh process."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
# The C++ kernels pick AVX2/F16C code at run time; FASTPRUNE_CPU_BASELINE=1 keeps them on the baseline-ISA
# code, which test_cpu_baseline_isa checks in a fresh process (the choice is made once per process).
BASELINE = os.environ.get("FASTPRUNE_CPU_BASELINE") == "1"
# Triton runs on CPU tensors only when TRITON_INTERPRET=1 is set before triton is first imported (its standard
# library is decorated at import), so the interpreted tests run in a fresh process: test_triton_interpreted.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
interpreted_only = pytest.mark.skipif(not INTERPRETING, reason="runs in test_triton_interpreted's subprocess")


def run_tests_in_subprocess(test_file: str, selection: str, **env: str) -> None:
    """Run the tests of ``test_file`` matching ``-k selection`` in a fresh process with extra environment variables."""
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test_file, "-k", selection],
        env={**os.environ, **env},
        # Not the repository root: `-m pytest` puts the working directory first on sys.path, and there the source
        # tree's fastprune (without the installed fastprune.kernels) would shadow a non-editable install.
        cwd=Path(test_file).parent,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
