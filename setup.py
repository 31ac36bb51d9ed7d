"""Build fastprune's native kernels.

- ``fastprune._cpu_<family>``: one torch C++ extension (OpenMP) per ``csrc/cpu/<family>.cpp``. Each file
  registers its ops in the ``fastprune_cpu`` torch library namespace (``torch.ops.fastprune_cpu.<op>``).
- ``fastprune._cuda_<family>``: one pybind11 module per ``csrc/cuda/<family>.cu``, compiled by ``nvcc`` with the
  CUDA runtime linked statically, so it imports on machines without a GPU. Skipped (with a message) when no
  ``nvcc`` is found. torch's CUDA headers are not used: the CPU build of torch cannot compile them.
- ``fastprune.kernels``: the Triton kernels in ``kernels/``.

Packages are found by setuptools' discovery (every ``fastprune/**/__init__.py``), so a wheel cannot miss a
module; tests/test_packaging.py builds one and compares it with the source tree.

A failed native build does not fail the install: fastprune then falls back to its PyTorch references and
warns once. Environment switches:

- ``FASTPRUNE_CUDA``: ``auto`` (default) builds the CUDA modules when nvcc is found and a GPU is visible,
  ``1`` whenever nvcc is found (CI does, to compile-check them), ``0`` never.
- ``FASTPRUNE_NATIVE=0``: no native modules at all (a pure-Python package using the references).
- ``FASTPRUNE_STRICT_BUILD=1``: build failures are fatal. ``FASTPRUNE_BUILD_ONLY=<family>``: build one family.
"""

import copy
import os
import shutil
import subprocess
import sysconfig
from glob import glob
from pathlib import Path

from setuptools import Extension, find_packages, setup

ROOT = Path(__file__).parent.resolve()
STRICT = os.environ.get("FASTPRUNE_STRICT_BUILD") == "1"
CUDA_ARCHS = os.environ.get("FASTPRUNE_CUDA_ARCHS", "80;90")
BUILD_ONLY = os.environ.get("FASTPRUNE_BUILD_ONLY")
NATIVE = os.environ.get("FASTPRUNE_NATIVE", "1") != "0"
CUDA = os.environ.get("FASTPRUNE_CUDA", "auto")


class NvccExtension(Extension):
    """A pybind11 module compiled from one .cu file by nvcc."""

    def __init__(self, name: str, source: str, depends: list[str]):
        # No sources for setuptools: torch's BuildExtension refuses any .cu source without a CUDA torch.
        super().__init__(name, sources=[], depends=depends)
        self.cu_source = source


def _nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _gpu_visible() -> bool:
    """Whether this machine has an NVIDIA GPU (its driver's device node or nvidia-smi)."""
    if Path("/dev/nvidiactl").exists():
        return True
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


def _build_cuda() -> bool:
    if CUDA == "0":
        return False
    if CUDA == "auto" and not _gpu_visible():
        print("fastprune: no GPU visible, skipping the CUDA modules (FASTPRUNE_CUDA=1 builds them anyway)")
        return False
    return True


def _extensions():
    if not NATIVE:
        return []
    from torch.utils.cpp_extension import CppExtension

    exts = []
    cpu_headers = sorted(glob("csrc/cpu/*.h"))  # shared by the .cpp files: editing one rebuilds them all
    for cpp in sorted(glob("csrc/cpu/*.cpp")):
        exts.append(
            CppExtension(
                f"fastprune._cpu_{Path(cpp).stem}",
                [cpp],
                include_dirs=[str(ROOT / "csrc" / "cpu")],
                depends=cpu_headers,
                extra_compile_args=["-O3", "-fopenmp", "-std=c++17"],
                extra_link_args=["-fopenmp"],
            )
        )
    cuda_headers = sorted(glob("csrc/cuda/*.cuh"))
    for cu in sorted(glob("csrc/cuda/*.cu")) if _build_cuda() else []:
        exts.append(NvccExtension(f"fastprune._cuda_{Path(cu).stem}", cu, cuda_headers))
    if BUILD_ONLY:
        exts = [e for e in exts if e.name.split("_", 2)[-1] == BUILD_ONLY]
    return exts


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension):
        """torch's BuildExtension for the C++ module, a direct nvcc call for the CUDA modules."""

        def build_extension(self, ext):
            try:
                if isinstance(ext, NvccExtension):
                    self._build_nvcc(ext)
                else:
                    # setup.cfg builds two extensions at once, and torch writes one build.ninja per build_temp:
                    # a shared one is overwritten mid-build (an object then goes missing), so each gets its own.
                    own = copy.copy(self)
                    own.build_temp = os.path.join(self.build_temp, ext.name)
                    BuildExtension.build_extension(own, ext)
            except Exception as exc:  # keep the pure-Python package installable
                if STRICT:
                    raise
                print(f"fastprune: WARNING: could not build {ext.name} ({exc}); the PyTorch reference is used")

        def _build_nvcc(self, ext: NvccExtension):
            nvcc = _nvcc()
            if nvcc is None:
                print(f"fastprune: nvcc not found, skipping {ext.name}")
                return
            import pybind11

            out = Path(self.get_ext_fullpath(ext.name))
            out.parent.mkdir(parents=True, exist_ok=True)
            gencode = []
            for arch in CUDA_ARCHS.split(";"):
                gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
            last = CUDA_ARCHS.split(";")[-1]
            gencode += ["-gencode", f"arch=compute_{last},code=compute_{last}"]
            cmd = [
                nvcc,
                "-O3",
                "-std=c++17",
                "-shared",
                "-Xcompiler",
                "-fPIC",
                "-cudart",
                "static",
                *gencode,
                f"-I{pybind11.get_include()}",
                f"-I{sysconfig.get_paths()['include']}",
                f"-I{ROOT / 'csrc' / 'cuda'}",
                f"-DFASTPRUNE_MODULE_NAME={ext.name.rsplit('.', 1)[1]}",
                str(ROOT / ext.cu_source),
                "-o",
                str(out),
            ]
            print(" ".join(cmd))
            subprocess.run(cmd, check=True)

    return BuildExt


setup(
    # The Triton kernels live in kernels/ and install as fastprune.kernels.
    packages=find_packages(include=["fastprune", "fastprune.*"]) + ["fastprune.kernels"],
    package_dir={"fastprune.kernels": "kernels"},
    include_package_data=True,  # non-Python files inside the packages (declared in MANIFEST.in) ship too
    ext_modules=_extensions(),
    cmdclass={"build_ext": _build_ext_class()},
    zip_safe=False,
)
