"""Coupled channel groups of a convolutional network, found by tracing it with torch.fx.

Each traced tensor carries, along its channel dimension, a vector of *slots*. A convolution or linear layer
creates fresh slots for its outputs; channel-wise operations (BatchNorm, activations, pooling) pass their input's
slots on; tensors that are added or multiplied together share slots position by position (a residual stream is
one set of slots); concatenation along channels concatenates the vectors; flattening into a classifier repeats
each channel's slot once per spatial position. Grouped and depthwise convolutions *tie* the input and output
slots of each of their groups, so only whole groups go. A union-find over slots then gives the *units*: sets of
channels that must be removed together. Units that share a layer's output form a *group*, the planner's layer.

Any operation this module does not understand freezes the channels it touches (they are never removed) and is
listed in ``ChannelGraph.unknown``, so an unfamiliar model is pruned less, never broken.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from fastprune.errors import UnsupportedModelError

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
#: Leaf modules that act on every channel separately (their output channel i depends on input channel i only).
CHANNELWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
)
_F = torch.nn.functional
CHANNELWISE_FUNCTIONS = {
    _F.relu,
    _F.relu6,
    _F.leaky_relu,
    _F.elu,
    _F.selu,
    _F.gelu,
    _F.silu,
    _F.mish,
    _F.hardswish,
    _F.hardsigmoid,
    _F.hardtanh,
    _F.softplus,
    _F.sigmoid,
    _F.tanh,
    _F.dropout,
    _F.dropout2d,
    _F.max_pool1d,
    _F.max_pool2d,
    _F.max_pool3d,
    _F.avg_pool1d,
    _F.avg_pool2d,
    _F.avg_pool3d,
    _F.adaptive_avg_pool1d,
    _F.adaptive_avg_pool2d,
    _F.adaptive_avg_pool3d,
    _F.adaptive_max_pool2d,
    _F.interpolate,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    torch.clamp,
    torch.neg,
    torch.abs,
    operator.neg,
}
CHANNELWISE_METHODS = {
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "clamp",
    "clamp_",
    "contiguous",
    "clone",
    "float",
    "to",
    "detach",
    "abs",
    "neg",
}
BINARY_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
}
BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
CAT_FUNCTIONS = {torch.cat, torch.concat, torch.concatenate}
REDUCTIONS = {torch.mean, torch.sum, torch.amax}
REDUCTION_METHODS = {"mean", "sum", "amax"}
#: Results that are not tensors (shapes, sizes): nothing to track.
SHAPE_METHODS = {"size", "dim"}


@dataclass
class Site:
    """Where units sit in a module's parameters: ``role`` "out" (rows of a conv/linear weight and its bias),
    "in" (input channels of a conv/linear weight) or "norm" (BatchNorm channels); ``units[p]`` is the unit of
    position p along that dimension (a flattened input repeats a channel's unit once per spatial position)."""

    module: str
    role: str
    units: list[int]


@dataclass
class Layer:
    """A conv or linear layer as the cost model sees it: per call, multiply-accumulates per weight element."""

    module: str
    kind: str  # "conv" or "linear"
    groups: int
    kernel: int  # elements per (output, input-per-group) pair: kh*kw for a 2-d conv, 1 for linear
    bias: bool
    positions: list[int] = field(default_factory=list)  # output positions per sample, one entry per call


@dataclass
class Group:
    """Units coupled through the layers that produce them: the planner's "layer"."""

    name: str  # the first layer that produces its units
    units: list[int]
    modules: list[str]  # every module with a site on these units


@dataclass
class ChannelGraph:
    """The traced model's prunable structure: units, their sites, groups, and what was left alone."""

    num_units: int
    frozen: torch.Tensor  # bool per unit: never removed
    sites: list[Site]
    layers: list[Layer]
    norms: list[str]  # BatchNorm modules (2 parameters per channel when affine)
    groups: list[Group]
    unknown: list[str]  # operations not understood, whose channels were frozen
    tensors: dict[str, tuple[int, list[int]]]  # fx node name -> (channel dim, unit per channel position)
    input_shape: tuple[int, ...]
    gm: torch.fx.GraphModule | None = None

    def site_map(self) -> dict[tuple[str, str], Site]:
        return {(s.module, s.role): s for s in self.sites}

    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if not bool(self.frozen[g.units].all())]

    def describe(self) -> dict:
        """Counts and names, for plan.json and the report."""
        return {
            "units": self.num_units,
            "frozen_units": int(self.frozen.sum()),
            "groups": [{"name": g.name, "size": len(g.units), "modules": g.modules} for g in self.groups],
            "not_understood": self.unknown,
            "input_shape": list(self.input_shape),
        }


class _UnionFind:
    def __init__(self):
        self.parent: list[int] = []
        self.frozen: list[bool] = []

    def new(self, n: int, frozen: bool = False) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        self.frozen.extend([frozen] * n)
        return list(range(start, start + n))

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            self.frozen[ra] = self.frozen[ra] or self.frozen[rb]

    def freeze(self, slots: list[int]) -> None:
        for s in slots:
            self.frozen[self.find(s)] = True


@dataclass
class _Chan:
    """A traced tensor's channel dimension and its slots."""

    dim: int
    slots: list[int]


class _Tracer(torch.fx.Tracer):
    """fx's default tracer that remembers which module it was inside when tracing failed."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.failed_in: list[str] | None = None

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = list(self.stack)
            raise
        finally:
            self.stack.pop()


def trace(model: nn.Module) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` (torch.nn layers as leaves); an UnsupportedModelError names the failing module."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = tracer.failed_in[-1] if tracer.failed_in else type(model).__name__
        path = " > ".join(tracer.failed_in or [])
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"cannot trace the model with torch.fx: module {where!r} ({path or 'top level'}) failed: {first}. "
            f"Make its forward traceable (no Python control flow on tensor values) or wrap it in a leaf module"
        ) from exc
    return torch.fx.GraphModule(tracer.root, graph)


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, torch.fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


class _Analysis:
    def __init__(self, gm: torch.fx.GraphModule):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.uf = _UnionFind()
        self.chan: dict[str, _Chan] = {}
        self.sites: dict[tuple[str, str], list[int]] = {}  # (module, role) -> slots; first call defines them
        self.layers: dict[str, Layer] = {}
        self.norms: list[str] = []
        self.unknown: list[str] = []
        self.order: list[tuple[str, str]] = []

    # -- helpers ---------------------------------------------------------------------------------------------
    def fresh(self, node, frozen: bool = False) -> _Chan | None:
        shape = _shape(node)
        if shape is None or len(shape) < 2:
            return None
        return _Chan(1, self.uf.new(shape[1], frozen))

    def chan_of(self, arg, dim: int = 1) -> _Chan:
        """The tracked channels of ``arg``, or fresh frozen ones if it is untracked (a constant, an unknown op)."""
        if isinstance(arg, torch.fx.Node) and arg.name in self.chan:
            return self.chan[arg.name]
        shape = _shape(arg)
        return _Chan(dim, self.uf.new(shape[dim] if shape and len(shape) > dim else 0, frozen=True))

    def unify(self, a: list[int], b: list[int]) -> None:
        for x, y in zip(a, b, strict=True):
            self.uf.union(x, y)

    def not_understood(self, node, reason: str) -> None:
        for arg in node.all_input_nodes:
            if arg.name in self.chan:
                self.uf.freeze(self.chan[arg.name].slots)
        self.unknown.append(f"{node.name} ({_describe(node)}): {reason}")

    def site(self, module: str, role: str, slots: list[int]) -> None:
        key = (module, role)
        if key in self.sites:  # a module called twice: both calls read and write the same weights
            self.unify(self.sites[key], slots)
        else:
            self.sites[key] = slots
            self.order.append(key)

    # -- nodes -----------------------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                c = self.fresh(node, frozen=True)
                if c is not None:
                    self.chan[node.name] = c
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    if arg.name in self.chan:
                        self.uf.freeze(self.chan[arg.name].slots)
            elif node.op == "call_module":
                self.call_module(node)
            elif node.op in ("call_function", "call_method"):
                self.call_function(node)
            # get_attr: a parameter or buffer used directly; untracked (binary ops check its shape)

    def call_module(self, node) -> None:
        m = self.modules[node.target]
        x = node.args[0] if node.args else None
        shape_in = _shape(x)
        if isinstance(m, CONVS):
            c = self.chan_of(x)
            if c.dim != 1 or len(c.slots) != m.in_channels:
                return self.not_understood(node, "convolution input channels not tracked on dim 1")
            out = self.uf.new(m.out_channels)
            g = m.groups
            if g > 1:
                m_in, n_out = m.in_channels // g, m.out_channels // g
                for j in range(g):
                    tied = c.slots[j * m_in : (j + 1) * m_in] + out[j * n_out : (j + 1) * n_out]
                    for s in tied[1:]:
                        self.uf.union(tied[0], s)
            self.site(node.target, "in", c.slots)
            self.site(node.target, "out", out)
            layer = self.layers.setdefault(
                node.target, Layer(node.target, "conv", g, math.prod(m.kernel_size), m.bias is not None)
            )
            layer.positions.append(math.prod(_shape(node)[2:]))
            self.chan[node.name] = _Chan(1, out)
        elif isinstance(m, nn.Linear):
            if shape_in is None:
                return self.not_understood(node, "input shape unknown")
            last = len(shape_in) - 1
            c = self.chan_of(x, last)
            if c.dim != last:
                return self.not_understood(node, "linear layer over a dimension that is not the channels")
            out = self.uf.new(m.out_features)
            self.site(node.target, "in", c.slots)
            self.site(node.target, "out", out)
            layer = self.layers.setdefault(node.target, Layer(node.target, "linear", 1, 1, m.bias is not None))
            layer.positions.append(math.prod(_shape(node)[1:-1]))
            self.chan[node.name] = _Chan(last, out)
        elif isinstance(m, NORMS):
            c = self.chan_of(x)
            if c.dim != 1:
                return self.not_understood(node, "batch norm over a dimension that is not the channels")
            if m.weight is not None or m.running_mean is not None:
                self.site(node.target, "norm", c.slots)
                if node.target not in self.norms:
                    self.norms.append(node.target)
            self.chan[node.name] = c
        elif isinstance(m, CHANNELWISE_MODULES):
            self.pass_through(node, x)
        elif isinstance(m, nn.Flatten):
            self.flatten(node, x, m.start_dim, m.end_dim)
        elif isinstance(m, nn.Softmax | nn.LogSoftmax):
            c = self.chan.get(x.name) if isinstance(x, torch.fx.Node) else None
            if c is not None and shape_in and m.dim is not None and m.dim % len(shape_in) == c.dim:
                return self.not_understood(node, "softmax over the channels")
            self.pass_through(node, x)
        else:
            self.not_understood(node, f"module {type(m).__name__} is not understood")

    def pass_through(self, node, x) -> None:
        if isinstance(x, torch.fx.Node) and x.name in self.chan:
            self.chan[node.name] = self.chan[x.name]

    def call_function(self, node) -> None:
        target, args = node.target, node.args
        is_method = node.op == "call_method"
        if (not is_method and target in CHANNELWISE_FUNCTIONS) or (is_method and target in CHANNELWISE_METHODS):
            if target is _F.interpolate or not any(
                isinstance(a, torch.fx.Node) and a.name in self.chan for a in args[1:]
            ):
                return self.pass_through(node, args[0])
            return self.not_understood(node, "channel-wise op with a second tensor")
        if (not is_method and target in BINARY_FUNCTIONS) or (is_method and target in BINARY_METHODS):
            return self.binary(node, list(args[:2]))
        if not is_method and target in CAT_FUNCTIONS:
            tensors = args[0] if args else node.kwargs["tensors"]
            dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
            return self.cat(node, list(tensors), dim)
        if (not is_method and target is torch.flatten) or (is_method and target == "flatten"):
            start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else node.kwargs.get("end_dim", -1)
            return self.flatten(node, args[0], start, end)
        if is_method and target in ("view", "reshape") or not is_method and target is torch.reshape:
            return self.reshape(node)
        if (not is_method and target in REDUCTIONS) or (is_method and target in REDUCTION_METHODS):
            return self.reduction(node)
        if is_method and target in ("permute", "transpose") or not is_method and target is torch.transpose:
            return self.permute(node)
        if not is_method and target is _F.pad:
            pad = args[1] if len(args) > 1 else node.kwargs["pad"]
            shape = _shape(args[0])
            if shape and len(pad) <= 2 * (len(shape) - 2):
                return self.pass_through(node, args[0])
            return self.not_understood(node, "padding of the channel dimension")
        if (is_method and target in ("squeeze", "unsqueeze")) or target in (torch.squeeze, torch.unsqueeze):
            return self.ones(node, args[0])
        if (is_method and target in SHAPE_METHODS) or (not is_method and target is getattr):
            return
        if (
            target is operator.getitem
            and isinstance(args[1], tuple)
            and all(i is None or i is Ellipsis or i == slice(None) for i in args[1])
        ):
            return self.ones(node, args[0])
        if not is_method and target is operator.getitem and not isinstance(args[0], torch.fx.Node):
            return
        if not is_method and target is operator.getitem and _shape(args[0]) is None:
            return  # indexing a tuple or a shape, not a tensor
        self.not_understood(node, "operation not understood")

    def binary(self, node, operands) -> None:
        out_shape = _shape(node)
        if out_shape is None:
            return self.not_understood(node, "output shape unknown")
        ndim = len(out_shape)
        at: dict[int, list[_Chan]] = {}
        for a in operands:
            shape = _shape(a)
            if shape is None:
                continue  # a Python number
            offset = ndim - len(shape)
            if isinstance(a, torch.fx.Node) and a.name in self.chan:
                c = self.chan[a.name]
                if len(c.slots) > 1:
                    at.setdefault(c.dim + offset, []).append(c)
        if len(at) > 1:
            return self.not_understood(node, "operands with channels on different dimensions")
        if not at:
            return
        dim, chans = next(iter(at.items()))
        for a in operands:  # an untracked tensor (a parameter, a constant) must broadcast over the channels
            shape = _shape(a)
            tracked = isinstance(a, torch.fx.Node) and a.name in self.chan
            if shape is not None and not tracked:
                k = dim - (ndim - len(shape))
                if 0 <= k < len(shape) and shape[k] != 1:
                    return self.not_understood(node, "a tensor that is not traced varies along the channels")
        for c in chans[1:]:
            self.unify(chans[0].slots, c.slots)
        self.chan[node.name] = _Chan(dim, chans[0].slots)

    def cat(self, node, tensors, dim: int) -> None:
        shape = _shape(node)
        if shape is None:
            return self.not_understood(node, "output shape unknown")
        dim %= len(shape)
        chans = [self.chan_of(t, dim) for t in tensors]
        if any(c.dim != chans[0].dim for c in chans):
            return self.not_understood(node, "concatenated tensors have channels on different dimensions")
        if dim == chans[0].dim:
            self.chan[node.name] = _Chan(dim, [s for c in chans for s in c.slots])
            return
        for c in chans[1:]:
            self.unify(chans[0].slots, c.slots)
        self.chan[node.name] = chans[0]

    def flatten(self, node, x, start: int, end: int) -> None:
        shape = _shape(x)
        if shape is None or not isinstance(x, torch.fx.Node) or x.name not in self.chan:
            return
        c = self.chan[x.name]
        start, end = start % len(shape), end % len(shape)
        if c.dim < start:
            self.chan[node.name] = c
        elif c.dim > end:
            self.chan[node.name] = _Chan(c.dim - (end - start), c.slots)
        else:
            inner = math.prod(shape[c.dim + 1 : end + 1])
            outer = math.prod(shape[start : c.dim])
            slots = [s for _ in range(outer) for s in c.slots for _ in range(inner)]
            self.chan[node.name] = _Chan(start, slots)

    def reshape(self, node) -> None:
        x = node.args[0]
        shape_in = _shape(x)
        if not (isinstance(x, torch.fx.Node) and x.name in self.chan) or shape_in is None or _shape(node) is None:
            return
        sizes = node.args[1:] if node.op == "call_method" else node.args[1]
        if len(sizes) == 1 and isinstance(sizes[0], list | tuple):
            sizes = sizes[0]
        d = self.chan[x.name].dim
        # A flatten of the channel dimension with everything after it, written with -1 for the width that pruning
        # changes: view(n, -1). A literal channel count would no longer match the pruned model.
        if _shape(node) == shape_in[:d] + (math.prod(shape_in[d:]),) and len(sizes) == d + 1 and sizes[d] == -1:
            return self.flatten(node, x, d, len(shape_in) - 1)
        self.ones(node, x, sizes)

    def ones(self, node, x, sizes=None) -> None:
        """Reshapes that only add or drop dimensions of size 1 (view(n, c, 1, 1), x[:, :, None], squeeze)."""
        shape_in, shape_out = _shape(x), _shape(node)
        if not (isinstance(x, torch.fx.Node) and x.name in self.chan) or shape_in is None or shape_out is None:
            return
        c = self.chan[x.name]
        kept_in = [i for i, n in enumerate(shape_in) if n != 1 or i == c.dim]
        kept_out = [i for i, n in enumerate(shape_out) if n != 1]
        if shape_in[c.dim] == 1 or [shape_in[i] for i in kept_in] != [shape_out[i] for i in kept_out]:
            return self.not_understood(node, f"reshape {shape_in} -> {shape_out} of the channel dimension")
        new = kept_out[kept_in.index(c.dim)]
        if sizes is not None and not (isinstance(sizes[new], torch.fx.Node) or sizes[new] == -1):
            return self.not_understood(node, f"reshape with a literal channel count {sizes[new]}")
        self.chan[node.name] = _Chan(new, c.slots)

    def reduction(self, node) -> None:
        x = node.args[0]
        if not (isinstance(x, torch.fx.Node) and x.name in self.chan):
            return
        c, shape = self.chan[x.name], _shape(x)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None:
            return self.not_understood(node, "reduction over every dimension")
        dims = [d % len(shape) for d in (dims if isinstance(dims, list | tuple) else [dims])]
        if c.dim in dims:
            return self.not_understood(node, "reduction over the channels")
        self.chan[node.name] = _Chan(c.dim if keepdim else c.dim - sum(d < c.dim for d in dims), c.slots)

    def permute(self, node) -> None:
        x = node.args[0]
        if not (isinstance(x, torch.fx.Node) and x.name in self.chan):
            return
        c, ndim = self.chan[x.name], len(_shape(x))
        if node.target == "permute":
            order = node.args[1:] if not isinstance(node.args[1], list | tuple) else node.args[1]
            order = [d % ndim for d in order]
            self.chan[node.name] = _Chan(order.index(c.dim), c.slots)
            return
        a, b = (d % ndim for d in node.args[1:3])
        new = b if c.dim == a else a if c.dim == b else c.dim
        self.chan[node.name] = _Chan(new, c.slots)


def _describe(node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return str(node.target)


def analyze(model: nn.Module, example_input: torch.Tensor) -> ChannelGraph:
    """Trace ``model``, run it once on ``example_input`` for shapes, and find its coupled channel groups."""
    if not any(isinstance(m, CONVS) for m in model.modules()):
        raise UnsupportedModelError(
            f"{type(model).__name__} has no convolution (Conv1d/2d/3d): the CNN path prunes convolutional "
            f"networks' filters (transformers: give a Hugging Face model directory or a bundled model)"
        )
    gm = trace(model)
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError(
            f"{type(model).__name__} does not run on an input of shape {tuple(example_input.shape)}: {first} "
            f"(is it an image model? set the input size with --input-size / CnnPruningConfig.input_size)"
        ) from exc
    finally:
        for m, training in modes.items():
            m.training = training
    a = _Analysis(gm)
    a.run()
    return _finish(a, tuple(example_input.shape))


def _finish(a: _Analysis, input_shape: tuple[int, ...]) -> ChannelGraph:
    uf = a.uf
    unit_of: dict[int, int] = {}

    def units(slots: list[int]) -> list[int]:
        return [unit_of.setdefault(uf.find(s), len(unit_of)) for s in slots]

    # Producers first, so units are numbered in the order layers create them.
    order = [k for k in a.order if k[1] == "out"] + [k for k in a.order if k[1] != "out"]
    sites = [Site(module, role, units(a.sites[(module, role)])) for module, role in order]
    tensors = {name: (c.dim, units(c.slots)) for name, c in a.chan.items()}
    frozen = torch.zeros(len(unit_of), dtype=torch.bool)
    for root, u in unit_of.items():
        frozen[u] = uf.frozen[root]
    groups = _groups(sites, len(unit_of))
    return ChannelGraph(
        len(unit_of), frozen, sites, list(a.layers.values()), a.norms, groups, a.unknown, tensors, input_shape, a.gm
    )


def _groups(sites: list[Site], n: int) -> list[Group]:
    parent = list(range(n))

    def find(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for s in sites:
        if s.role == "out":
            for u in s.units[1:]:
                ru, r0 = find(u), find(s.units[0])
                if ru != r0:
                    parent[ru] = r0
    members: dict[int, set[int]] = {}
    names: dict[int, str] = {}
    modules: dict[int, dict[str, None]] = {}
    for s in sites:
        for u in set(s.units):
            r = find(u)
            members.setdefault(r, set()).add(u)
            modules.setdefault(r, {})[s.module] = None
        if s.role == "out" and s.units:
            names.setdefault(find(s.units[0]), s.module)
    return [Group(names[r], sorted(members[r]), list(modules[r])) for r in names]
