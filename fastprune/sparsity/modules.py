"""2:4 layers in a model: build them from masks, and convert between fastprune's kernels (``Sparse24Linear``), the
plain-PyTorch layers of the saved modeling file (``CompressedSparse24Linear``) and masked dense ``nn.Linear``."""

from __future__ import annotations

import time

import torch
from torch import nn

from fastprune.ops import Sparse24Linear, sparse24_compress
from fastprune.remote.modeling_fastprune import (
    PER_LAYER_SUFFIX,
    REMOTE_CLASSES,
    REMOTE_MODULE,
    SPARSE24_KEY,
    CompressedSparse24Linear,
    decompress_sparse24,
)
from fastprune.sparsity.targets import replace_module


def sparse_linear(linear: nn.Linear, weight: torch.Tensor, keep: torch.Tensor) -> Sparse24Linear:
    """A Sparse24Linear holding ``weight`` (cast to the layer's dtype) at exactly the ``keep`` positions."""
    values, meta = sparse24_compress(weight.to(linear.weight.dtype).contiguous(), keep.float())
    bias = None if linear.bias is None else linear.bias.detach().clone()
    return Sparse24Linear(values, meta, bias)


def sparse_module_names(model: nn.Module) -> list[str]:
    """Names of the model's 2:4 layers (either kind), in module order."""
    kinds = (Sparse24Linear, CompressedSparse24Linear)
    return [n for n, m in model.named_modules() if isinstance(m, kinds)]


def has_sparse24(config) -> bool:
    return bool(getattr(config, SPARSE24_KEY, None))


def mark_sparse24(config, names: list[str]) -> None:
    """Record the 2:4 layers in the config and point ``auto_map`` at the modeling file that builds them."""
    setattr(config, SPARSE24_KEY, list(names))
    auto_map = dict(getattr(config, "auto_map", None) or {})
    for auto_class, class_name in REMOTE_CLASSES[config.model_type].items():
        auto_map[auto_class] = f"{REMOTE_MODULE}.{class_name}"
    config.auto_map = auto_map


def unmark_sparse24(config) -> None:
    """Undo ``mark_sparse24`` (``auto_map`` stays where per-layer widths still need the modeling file)."""
    if hasattr(config, SPARSE24_KEY):
        delattr(config, SPARSE24_KEY)
    if any(k.endswith(PER_LAYER_SUFFIX) for k in config.to_dict()):
        return
    auto_map = {k: v for k, v in (getattr(config, "auto_map", None) or {}).items() if not v.startswith(REMOTE_MODULE)}
    if auto_map:
        config.auto_map = auto_map
    elif hasattr(config, "auto_map"):
        delattr(config, "auto_map")


def use_kernels(model: nn.Module) -> nn.Module:
    """Swap the modeling file's plain-PyTorch 2:4 layers for ``Sparse24Linear`` (fastprune's kernels), in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, CompressedSparse24Linear):
            bias = None if m.bias is None else m.bias.data
            replace_module(model, name, Sparse24Linear(m.values.data, m.meta, bias))
    return model


def densify(model: nn.Module) -> nn.Module:
    """Replace every 2:4 layer by an ``nn.Linear`` holding its masked dense weight, in place."""
    for name, m in list(model.named_modules()):
        if isinstance(m, Sparse24Linear | CompressedSparse24Linear):
            values = m.values.detach()
            linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=values.dtype)
            with torch.no_grad():
                dense = m.dense_weight() if isinstance(m, Sparse24Linear) else decompress_sparse24(values, m.meta)
                linear.weight.copy_(dense)
                if m.bias is not None:
                    linear.bias.copy_(m.bias)
            replace_module(model, name, linear.to(values.device))
    return model


def pick_faster_products(model: nn.Module, rounds: int = 7, calls: int = 5) -> list[str]:
    """Per shape of the model's CPU ``Sparse24Linear`` layers, time one token through the 2:4 kernel and through
    the masked dense weight (``rounds`` interleaved rounds of ``calls`` products; the fastest round of each, as
    other processes only ever add time); layers of the shapes where dense is faster run dense
    (``Sparse24Linear.run_dense``: same outputs, a dense copy of their weight).
    Returns the names of those layers.

    Small matrices are the case: on SmolLM2 the 2:4 kernel's fixed cost per call makes its 192x576 and 576x576
    attention projections slower than dense at batch 1 (0.70x and 0.93x) while its MLP matrices are 1.3x faster.
    """
    by_shape: dict[tuple, list[tuple[str, Sparse24Linear]]] = {}
    for name, m in model.named_modules():
        if isinstance(m, Sparse24Linear) and m.values.device.type == "cpu":
            by_shape.setdefault((m.out_features, m.in_features, m.values.dtype), []).append((name, m))
    dense_names = []
    for layers in by_shape.values():
        if _dense_is_faster(layers[0][1], rounds, calls):
            for name, m in layers:
                m.run_dense()
                dense_names.append(name)
    return dense_names


def _dense_is_faster(layer: Sparse24Linear, rounds: int, calls: int) -> bool:
    """Whether one token through ``layer`` takes less time with its masked dense weight than with the 2:4 kernel
    (both through the layer's own forward, as a model calls it); leaves the layer on the 2:4 kernel."""
    x = torch.randn(1, 1, layer.in_features, dtype=layer.values.dtype)
    layer.run_dense()
    dense = layer.dense_cache
    times: dict[str, list[float]] = {"2:4": [], "dense": []}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            for kind, cache in (("2:4", None), ("dense", dense)):
                layer.dense_cache = cache
                t0 = time.perf_counter()
                for _ in range(calls):
                    layer(x)
                times[kind].append(time.perf_counter() - t0)
    layer.run_dense(False)
    return min(times["dense"][1:]) < min(times["2:4"][1:])
