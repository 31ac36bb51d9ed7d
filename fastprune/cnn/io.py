"""Where CNNs come from and how pruned ones are saved and loaded back.

Sources: ``torchvision:NAME`` (random weights: nothing is downloaded; ``torchvision:NAME:num_classes=10`` passes
constructor arguments), a ``.pt`` file holding a pickled ``nn.Module``, or a directory written by ``save_cnn``.

A saved directory holds the weights (``model.safetensors``), ``architecture.json`` (the source and every conv,
linear and BatchNorm width: a torchvision model is rebuilt from its name and these widths), ``model.pt``
(``torch.save`` of the module: needs the model's code) and ``model.pt2`` (``torch.export``: needs no code).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from fastprune.cnn.graph import CONVS, NORMS
from fastprune.errors import ModelNotFoundError, UnsupportedModelError
from fastprune.io import atomic_dir

logger = logging.getLogger("fastprune")

ARCHITECTURE_FILE = "architecture.json"
WIDTH_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features")


def is_cnn_source(source: str | None) -> bool:
    """True for the sources this module loads (so the command line sends them to the CNN path)."""
    if not source:
        return False
    path = Path(source).expanduser()
    return source.startswith("torchvision:") or path.suffix in (".pt", ".pth") or (path / ARCHITECTURE_FILE).is_file()


def _torchvision(spec: str) -> nn.Module:
    try:
        import torchvision
    except Exception as exc:  # beside a torch it was not built for, the import fails with a RuntimeError
        raise ModelNotFoundError(
            f"{spec} needs torchvision (pip install 'fastprune[vision]'; see the README for a torch it imports with): "
            f"{exc}"
        ) from exc
    _, name, *args = spec.split(":")
    kwargs = {}
    for a in args:
        key, _, value = a.partition("=")
        kwargs[key] = int(value) if value.isdigit() else value
    try:
        return torchvision.models.get_model(name, weights=None, **kwargs)
    except (ValueError, TypeError) as exc:
        raise ModelNotFoundError(f"torchvision has no model {name!r} with {kwargs}: {exc}") from exc


def load_cnn_source(source: str, trust_pickle: bool = True) -> nn.Module:
    """A model from ``torchvision:NAME``, a pickled module (``.pt``) or a saved directory, in eval mode."""
    path = Path(source).expanduser()
    if source.startswith("torchvision:"):
        model = _torchvision(source)
    elif path.is_dir():
        model = load_cnn(path, trust_pickle)
    elif path.is_file():
        try:
            model = torch.load(path, weights_only=False, map_location="cpu")  # a user's own file: trusted
        except Exception as exc:
            raise ModelNotFoundError(f"cannot load {path} with torch.load: {exc}") from exc
        if not isinstance(model, nn.Module):
            raise UnsupportedModelError(
                f"{path} holds a {type(model).__name__}, not an nn.Module: save the whole model with torch.save(model)"
            )
    else:
        raise ModelNotFoundError(f"model not found: {source}")
    return model.eval()


def widths(model: nn.Module) -> dict[str, dict[str, int]]:
    """Every conv, linear and BatchNorm layer's widths, by module name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, CONVS + NORMS + (nn.Linear,)):
            out[name] = {a: getattr(m, a) for a in WIDTH_ATTRS if hasattr(m, a)}
    return out


def set_widths(model: nn.Module, target: dict[str, dict[str, int]]) -> None:
    """Resize layers of a freshly built model to ``target`` widths (their values are then loaded from a file)."""
    modules = dict(model.named_modules())
    for name, w in target.items():
        m = modules.get(name)
        if m is None:
            raise ModelNotFoundError(f"the rebuilt model has no module {name!r}; the architecture does not match")
        for attr, value in w.items():
            setattr(m, attr, value)
        if isinstance(m, CONVS):
            shape = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
            tensors = {"weight": shape, "bias": (m.out_channels,)}
        elif isinstance(m, nn.Linear):
            tensors = {"weight": (m.out_features, m.in_features), "bias": (m.out_features,)}
        else:
            n = (m.num_features,)
            tensors = {"weight": n, "bias": n, "running_mean": n, "running_var": n}
        for t, shape in tensors.items():
            old = getattr(m, t, None)
            if isinstance(old, nn.Parameter):
                setattr(m, t, nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad))
            elif old is not None:
                m._buffers[t] = old.new_empty(shape)


def save_cnn(
    model: nn.Module,
    out: Path,
    source: str,
    example: torch.Tensor,
    extra_files: dict[str, str],
    overwrite: bool = False,
) -> Path:
    """Write the model in its three forms plus ``extra_files`` (name -> text) to ``out``, atomically."""
    from safetensors.torch import save_model

    model = model.eval()
    with atomic_dir(out, overwrite) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        torch.save(model, tmp / "model.pt")
        exported = True
        try:
            batch = example.expand(2, *example.shape[1:]).contiguous()  # batch 1 would be specialised
            program = torch.export.export(model, (batch,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
            torch.export.save(program, tmp / "model.pt2")
        except Exception as exc:  # export is stricter than fx; the other two forms still load
            exported = False
            logger.warning("torch.export failed, model.pt2 not written: %s", str(exc).splitlines()[0])
        arch = {
            "source": source,
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "input_size": list(example.shape[1:]),
            "exported": exported,
            "widths": widths(model),
        }
        (tmp / ARCHITECTURE_FILE).write_text(json.dumps(arch, indent=1) + "\n")
        for name, text in extra_files.items():
            (tmp / name).write_text(text)
    return Path(out).resolve()


def load_cnn(path: str | Path, trust_pickle: bool = False) -> nn.Module:
    """Load a saved CNN: torchvision models are rebuilt from name + widths; others come from model.pt2
    (torch.export, no code runs), or from model.pt with ``trust_pickle`` (unpickling runs the file's code)."""
    from safetensors.torch import load_model

    path = Path(path)
    arch_file = path / ARCHITECTURE_FILE
    if not arch_file.is_file():
        raise ModelNotFoundError(f"no CNN at {path}: expected {ARCHITECTURE_FILE} and weights")
    arch = json.loads(arch_file.read_text())
    source = arch.get("source") or ""
    if source.startswith("torchvision:"):
        model = _torchvision(source)
        set_widths(model, arch["widths"])
        load_model(model, str(path / "model.safetensors"))
        return model.eval()
    if trust_pickle:
        return torch.load(path / "model.pt", weights_only=False, map_location="cpu").eval()
    if not arch.get("exported") or not (path / "model.pt2").is_file():
        raise ModelNotFoundError(f"{path} has no model.pt2; load model.pt with trust_pickle=True (runs its code)")
    return torch.export.load(path / "model.pt2").module()
