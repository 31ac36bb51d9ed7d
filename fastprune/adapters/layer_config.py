"""How per-layer widths are written into a Hugging Face config.

Uniform widths go into the config's own scalar keys, so plain ``from_pretrained`` loads the model. Widths that
differ per layer go into lists named ``<key>_per_layer`` plus an ``auto_map`` entry that points at
``modeling_fastprune.py``, the small modeling file saved beside the weights (see ``fastprune/remote``).
"""

from __future__ import annotations

from collections.abc import Callable

from fastprune.adapters.base import ModelShape
from fastprune.remote.modeling_fastprune import PER_LAYER_SUFFIX, REMOTE_CLASSES, REMOTE_MODULE


def write_layer_widths(
    config,
    shape: ModelShape,
    heads_key: str,
    kv_key: str | None,
    channels_key: str,
    heads_scalar_ok: Callable[[int], bool],
) -> None:
    """Record ``shape``'s widths in ``config``. ``heads_scalar_ok(n)`` says whether the config's own heads key may
    hold n (transformers validates it against hidden_size; BERT also derives its head size from it)."""
    per_layer = {
        heads_key: [s.heads for s in shape.layers],
        channels_key: [s.channels for s in shape.layers],
    }
    if kv_key is not None:
        per_layer[kv_key] = [s.kv_heads for s in shape.layers]
    needs_lists = False
    for key, values in per_layer.items():
        list_key = key + PER_LAYER_SUFFIX
        scalar_ok = key != heads_key or heads_scalar_ok(values[0])
        if len(set(values)) <= 1 and scalar_ok:
            if values:
                setattr(config, key, values[0])
            if hasattr(config, list_key):
                delattr(config, list_key)
        else:
            setattr(config, list_key, values)
            needs_lists = True
    auto_map = dict(getattr(config, "auto_map", None) or {})
    for auto_class in ("AutoModel", "AutoModelForCausalLM"):
        auto_map.pop(auto_class, None)
    if needs_lists:
        for auto_class, class_name in REMOTE_CLASSES[config.model_type].items():
            auto_map[auto_class] = f"{REMOTE_MODULE}.{class_name}"
    if auto_map:
        config.auto_map = auto_map
    elif hasattr(config, "auto_map"):
        delattr(config, "auto_map")
