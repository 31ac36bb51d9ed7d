"""Which linear layers a sparsification touches: every block linear the adapter lists, minus the skip list."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fastprune.adapters.base import Adapter
from fastprune.errors import ConfigError
from fastprune.ops import Sparse24Linear


@dataclass
class Target:
    """One linear layer to sparsify: its module name, its layer, and its input group within the layer."""

    name: str
    layer: int
    group: int
    module: nn.Linear


def name_matches(name: str, entry: str) -> bool:
    """Whether a skip entry names this module: its dot-separated parts appear, in order and contiguous, in the
    module name (``layers.0`` matches ``model.layers.0.mlp.up_proj``, not ``model.layers.10.mlp.up_proj``)."""
    parts, want = name.split("."), entry.split(".")
    return any(parts[k : k + len(want)] == want for k in range(len(parts) - len(want) + 1))


def check_skip(model: nn.Module, skip: tuple[str, ...]) -> None:
    """Refuse a skip entry that names no module of the model (a typo would silently sparsify everything)."""
    names = [n for n, _ in model.named_modules() if n]
    for entry in skip:
        if not any(name_matches(n, entry) for n in names):
            linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise ConfigError(
                f"skip entry {entry!r} matches no module of this model; give module names or dot-separated parts "
                f"of them (this model's linear layers look like {', '.join(linears[:4])}, ...)"
            )


def find_targets(adapter: Adapter, skip: tuple[str, ...] = ()) -> list[Target]:
    """The block linears to sparsify, in forward order, after checking the skip list and their shapes."""
    check_skip(adapter.model, skip)
    names = {id(m): n for n, m in adapter.model.named_modules()}
    targets = []
    for i in range(len(adapter.layers)):
        for g, group in enumerate(adapter.block_linears(i)):
            for module in group:
                name = names[id(module)]
                if isinstance(module, Sparse24Linear):
                    raise ConfigError(f"{name} is already 2:4-sparse; sparsify the dense model it came from")
                if not any(name_matches(name, entry) for entry in skip):
                    targets.append(Target(name, i, g, module))
    bad = [f"{t.name} ({t.module.in_features})" for t in targets if t.module.in_features % 4]
    if bad:
        raise ConfigError(
            f"2:4 groups 4 consecutive inputs, but these layers' in_features are not divisible by 4: "
            f"{', '.join(bad)}; leave them dense with --skip"
        )
    if not targets:
        raise ConfigError("the skip list leaves no linear layer to sparsify")
    return targets


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` was."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)
