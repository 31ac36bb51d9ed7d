"""Saving and loading models: atomic writes, safe output locations, and loading pruned models back.

A pruned model is written to a hidden temporary directory beside the output and renamed into place only when
complete, so an interrupted run leaves either nothing or the previous output, never half a model; the input
model's directory is never written to.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fastprune.adapters import adapter_class
from fastprune.errors import ModelNotFoundError, OutputError
from fastprune.remote import modeling_fastprune
from fastprune.remote.modeling_fastprune import PER_LAYER_SUFFIX, REMOTE_CLASSES, REMOTE_MODULE, SPARSE24_KEY

INFO_FILE = "fastprune.json"
PLAN_FILE = "plan.json"


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file so that readers see the old content or the new, never a partial file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new, never a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_output_dir(out: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse an output that exists (unless overwrite) or that overlaps an input model's directory."""
    out = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or src in out.parents:
            raise OutputError(f"output {out} is inside the input model's directory {src}; choose another location")
        if out in src.parents:
            raise OutputError(f"output {out} contains the input model {src}; choose another location")
    if out.exists() and not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory")


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``out`` to fill; it becomes ``out`` only if the block completes."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        _replace_dir(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model, tokenizer, out: Path, extra_files: dict[str, str], overwrite: bool = False) -> Path:
    """Save model (safetensors + config), tokenizer and ``extra_files`` (name -> text) to ``out`` atomically."""
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if _uses_remote_code(model.config):
            shutil.copyfile(modeling_fastprune.__file__, tmp / f"{REMOTE_MODULE}.py")
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
    return Path(out).resolve()


def publish_dir(tmp: Path, out: Path, overwrite: bool = False) -> None:
    """Move a completely written directory ``tmp`` into place as ``out`` (replacing it only when ``overwrite``)."""
    _replace_dir(Path(tmp), Path(out).resolve(), overwrite)


def _replace_dir(new: Path, out: Path, overwrite: bool) -> None:
    if not out.exists():
        os.replace(new, out)
        return
    if not overwrite:
        raise OutputError(f"output {out} already exists; pass --overwrite (overwrite=True) to replace it")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "previous")
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def _uses_remote_code(config) -> bool:
    return any(v.startswith(f"{REMOTE_MODULE}.") for v in (getattr(config, "auto_map", None) or {}).values())


def has_per_layer_widths(config) -> bool:
    return any(k.endswith(PER_LAYER_SUFFIX) for k in config.to_dict())


def model_class(config):
    """The class that loads this config: fastprune's modeling class for per-layer widths or 2:4 layers, else the
    Auto class."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    adapter = adapter_class(config.model_type)
    if has_per_layer_widths(config) or getattr(config, SPARSE24_KEY, None):
        names = REMOTE_CLASSES[config.model_type]
        return getattr(modeling_fastprune, next(iter(names.values())))
    if adapter.causal:
        return AutoModelForCausalLM
    if any(a.endswith("ForMaskedLM") for a in (config.architectures or [])):
        return AutoModelForMaskedLM
    return AutoModel


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Load a model directory (plain, fastprune-pruned with per-layer widths, or 2:4-sparse: its layers then run
    fastprune's 2:4 kernels, except on CPU the layers of the shapes where one token measures faster through the
    masked dense weight: see ``fastprune.sparsity.modules.pick_faster_products``); no remote code is executed."""
    from transformers import AutoConfig

    from fastprune.sparsity.modules import pick_faster_products, use_kernels

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"no model at {path}: expected a directory with config.json and weights")
    config = AutoConfig.from_pretrained(path)
    model = model_class(config).from_pretrained(path, config=config, dtype=dtype)
    model = use_kernels(model).to(device).eval()
    pick_faster_products(model)
    return model


def read_info(path: str | Path) -> dict | None:
    """How a fastprune output was made (its fastprune.json), or None for other models."""
    info = Path(path) / INFO_FILE
    return json.loads(info.read_text()) if info.is_file() else None
