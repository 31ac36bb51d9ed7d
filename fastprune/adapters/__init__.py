"""Architecture adapters: the only code that knows module names. ``adapter_for(model)`` picks one."""

from __future__ import annotations

from torch import nn

from fastprune.adapters.base import Adapter, AttentionParts, LayerShape, MlpParts, ModelShape, ParamCosts
from fastprune.adapters.bert import BertAdapter
from fastprune.adapters.llama import LlamaAdapter
from fastprune.errors import UnsupportedModelError

ADAPTERS: tuple[type[Adapter], ...] = (LlamaAdapter, BertAdapter)


def supported_model_types() -> list[str]:
    return [t for a in ADAPTERS for t in a.model_types]


def adapter_class(model_type: str | None) -> type[Adapter]:
    """The adapter for a config's ``model_type``, or an error listing the supported ones."""
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r}: fastprune supports {', '.join(supported_model_types())}"
    )


def adapter_for(model: nn.Module) -> Adapter:
    """Wrap a loaded transformers model in its architecture's adapter."""
    config = getattr(model, "config", None)
    return adapter_class(getattr(config, "model_type", None))(model)


__all__ = [
    "ADAPTERS",
    "Adapter",
    "AttentionParts",
    "LayerShape",
    "MlpParts",
    "ModelShape",
    "ParamCosts",
    "adapter_class",
    "adapter_for",
    "supported_model_types",
]
