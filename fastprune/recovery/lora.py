"""LoRA through peft: projections chosen by the adapter, wrapped, then merged back into dense weights."""

from __future__ import annotations

import warnings

from torch import nn

from fastprune.adapters import Adapter
from fastprune.errors import ConfigError
from fastprune.recovery.config import RecoveryConfig


def default_targets(adapter: Adapter) -> list[str]:
    """Full names of every layer's attention (q, k, v, o) and MLP projections, as the adapter finds them."""
    names = {id(module): name for name, module in adapter.model.named_modules()}
    targets = []
    for i in range(len(adapter.layers)):
        att, mlp = adapter.attention(i), adapter.mlp(i)
        targets += [names[id(m)] for m in (att.q, att.k, att.v, att.o, *mlp.inputs, mlp.output)]
    return targets


def add_lora(adapter: Adapter, config: RecoveryConfig):
    """Inject LoRA into ``adapter.model`` in place (peft freezes all other weights); return the peft model."""
    from peft import LoraConfig, get_peft_model

    targets = list(config.lora_targets) if config.lora_targets is not None else default_targets(adapter)
    _check_targets(adapter.model, targets)
    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        bias="none",
    )
    with warnings.catch_warnings():
        # peft asks transformers 5 for is_gradient_checkpointing, which warns of its own deprecation.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(adapter.model, lora)


def merge_lora(peft_model) -> nn.Module:
    """Fold the LoRA updates into the dense weights and return the plain model, with no peft module left."""
    return peft_model.merge_and_unload()


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    # peft's rule: a target names a module exactly or is a dotted suffix of its name.
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise ConfigError(f"lora_targets name no linear module of this model: {', '.join(missing)}")
