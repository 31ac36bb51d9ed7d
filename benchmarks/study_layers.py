"""One Llama-3-8B-shaped decoder layer (hidden 4096, MLP 14336, 32 query heads, 8 KV heads of 128), random weights:
prefill and decode latency of the dense layer, of a structured-pruned layer with as many weights as a 2:4 one
(half the heads, KV heads and MLP channels), and of the 2:4 layer (fastprune's kernels; on a GPU also torch's
semi-structured sparse tensors), each against the memory-bandwidth bound for decode.

The layer is written out here (RMSNorm, rotary embeddings, GQA attention with a KV cache, SwiGLU MLP) rather than
taken from transformers, so the benchmark runs with any torch >= 2.1 and any transformers. Decode is one new
token attending to a ``context``-token KV cache; prefill is ``prefill_tokens`` tokens at batch 1.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fastprune.ops import Sparse24Linear


@dataclass(frozen=True)
class LayerShape:
    hidden: int = 4096
    channels: int = 14336
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128

    def halved(self) -> LayerShape:
        """Half the heads, KV heads and channels: half the weights, as 2:4 keeps."""
        if self.kv_heads % 2 or self.heads % 2 or self.channels % 2:
            raise ValueError(f"{self} does not halve into whole heads, KV heads and channels")
        return LayerShape(self.hidden, self.channels // 2, self.heads // 2, self.kv_heads // 2, self.head_dim)

    def scaled(self, factor: int) -> LayerShape:
        """A smaller layer of the same proportions (quick runs)."""
        return LayerShape(
            self.hidden // factor,
            self.channels // factor,
            self.heads // factor,
            max(1, self.kv_heads // factor),
            self.head_dim,
        )


LLAMA3_8B = LayerShape()


class Layer(nn.Module):
    """A Llama decoder layer; ``linear(out, in)`` makes each projection."""

    def __init__(self, shape: LayerShape, linear):
        super().__init__()
        d, hd = shape.hidden, shape.head_dim
        self.shape = shape
        self.q, self.k = linear(shape.heads * hd, d), linear(shape.kv_heads * hd, d)
        self.v, self.o = linear(shape.kv_heads * hd, d), linear(d, shape.heads * hd)
        self.gate, self.up, self.down = linear(shape.channels, d), linear(shape.channels, d), linear(d, shape.channels)
        self.norm1 = nn.RMSNorm(d) if hasattr(nn, "RMSNorm") else None
        self.norm2 = nn.RMSNorm(d) if hasattr(nn, "RMSNorm") else None

    def _norm(self, norm, x):
        return norm(x) if norm is not None else x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        s, hd = self.shape, self.shape.head_dim
        h = self._norm(self.norm1, x)
        q = self.q(h).view(b, t, s.heads, hd).transpose(1, 2)
        k = self.k(h).view(b, t, s.kv_heads, hd).transpose(1, 2)
        v = self.v(h).view(b, t, s.kv_heads, hd).transpose(1, 2)
        start = 0 if cache is None else cache[0].shape[2]
        q, k = rotary(q, start), rotary(k, start)
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        group = s.heads // s.kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, s.heads * hd))
        h = self._norm(self.norm2, x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


def rotary(x: torch.Tensor, start: int, theta: float = 500000.0) -> torch.Tensor:
    """Rotate-half rotary embedding of positions start.. (Llama's layout)."""
    t, hd = x.shape[2], x.shape[3]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=x.device, dtype=torch.float32) / hd)
    ang = torch.arange(start, start + t, device=x.device, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def dense_linear(device, dtype, gen):
    def make(out: int, inp: int) -> nn.Linear:
        lin = nn.Linear(inp, out, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(out, inp, generator=gen, device="cpu").mul_(inp**-0.5))
        return lin

    return make


def sparse24_linear(device, dtype, gen):
    dense = dense_linear(device, dtype, gen)
    return lambda out, inp: Sparse24Linear.from_linear(dense(out, inp))


class VendorSparseLinear(nn.Module):
    """torch's semi-structured sparse weight (cuSPARSELt / CUTLASS 2:4 kernels), 2:4-pruned by magnitude."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        from fastprune.ops import sparse24_compress
        from fastprune.ops.sparse24 import to_vendor_sparse

        values, meta = sparse24_compress(linear.weight.detach())
        self.weight = nn.Parameter(to_vendor_sparse(values, meta), requires_grad=False)

    def forward(self, x):
        shape = x.shape
        return F.linear(x.reshape(-1, shape[-1]), self.weight).reshape(*shape[:-1], -1)


def vendor_linear(device, dtype, gen):
    dense = dense_linear(device, dtype, gen)
    return lambda out, inp: VendorSparseLinear(dense(out, inp))


def weight_bytes(layer: nn.Module) -> int:
    """Bytes a decode step reads for the weights: parameters and buffers (2:4 metadata)."""
    total = sum(p.numel() * p.element_size() for p in layer.parameters())
    return total + sum(b.numel() * b.element_size() for b in layer.buffers())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def read_bandwidth(device: str, nbytes: int = 1 << 30) -> float:
    """Bytes per second of reading a large buffer once (a sum over it): the bound for streaming weights."""
    buf = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        buf.sum()
        sync(device)
        times.append(time.perf_counter() - t0)
    del buf
    return nbytes / min(times)


@dataclass
class LayerResult:
    dtype: str
    variant: str
    weights_mb: float
    prefill_ms: float
    decode_ms: float
    decode_bound_ms: float

    @property
    def pct_of_bound(self) -> float:
        return 100 * self.decode_bound_ms / self.decode_ms


def _seconds(fn, reps: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / reps


def measure(
    shape: LayerShape,
    device: str,
    dtypes: dict[str, torch.dtype],
    variants: dict,
    prefill_tokens: int,
    context: int,
    rounds: int,
    progress=print,
) -> tuple[list[LayerResult], float]:
    """Build every variant in every dtype and time them interleaved round by round (medians)."""
    bandwidth = read_bandwidth(device)
    results = []
    for dname, dtype in dtypes.items():
        results += _measure_dtype(
            shape, device, dname, dtype, variants, prefill_tokens, context, rounds, bandwidth, progress
        )
    return results, bandwidth


def _measure_dtype(shape, device, dname, dtype, variants, prefill_tokens, context, rounds, bandwidth, progress):
    layers = {}
    for vname, (layer_shape, make) in variants.items():
        try:
            gen = torch.Generator().manual_seed(0)
            with torch.no_grad():
                layers[vname] = Layer(layer_shape, make(device, dtype, gen)).to(device=device, dtype=dtype).eval()
        except (RuntimeError, NotImplementedError, ValueError) as exc:  # e.g. vendor 2:4 on this GPU or dtype
            progress(f"  {dname} {vname}: unavailable ({str(exc).splitlines()[0][:100]})")
    gen = torch.Generator().manual_seed(1)
    x_prefill = torch.randn(1, prefill_tokens, shape.hidden, generator=gen).to(device=device, dtype=dtype)
    x_decode = x_prefill[:, :1].contiguous()
    caches = {}
    for v, layer in layers.items():
        kv = torch.randn(1, layer.shape.kv_heads, context, layer.shape.head_dim, generator=gen)
        caches[v] = (kv.to(device=device, dtype=dtype), kv.to(device=device, dtype=dtype))
    prefill = {v: [] for v in layers}
    decode = {v: [] for v in layers}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            for v, layer in layers.items():
                prefill[v].append(_seconds(lambda layer=layer: layer(x_prefill), 1, device))
                decode[v].append(_seconds(lambda layer=layer, c=caches[v]: layer(x_decode, c), 5, device))
    results = []
    for v, layer in layers.items():
        nbytes = weight_bytes(layer) + sum(c.numel() * c.element_size() for c in caches[v])
        results.append(
            LayerResult(
                dname,
                v,
                weight_bytes(layer) / 2**20,
                1000 * statistics.median(prefill[v][1:]),
                1000 * statistics.median(decode[v][1:]),
                1000 * nbytes / bandwidth,
            )
        )
        progress(f"  {dname} {v}: prefill {results[-1].prefill_ms:.1f} ms, decode {results[-1].decode_ms:.2f} ms")
    return results


def default_variants(shape: LayerShape, device: str) -> dict:
    variants = {
        "dense": (shape, dense_linear),
        "structured (half the units)": (shape.halved(), dense_linear),
        "2:4 (fastprune)": (shape, sparse24_linear),
    }
    if device.startswith("cuda"):
        variants["2:4 (torch semi-structured)"] = (shape, vendor_linear)
    return variants


def to_rows(results: list[LayerResult]) -> list[dict]:
    """Rows with speedups over the dense layer of the same dtype."""
    dense = {r.dtype: r for r in results if r.variant == "dense"}
    rows = []
    for r in results:
        base = dense.get(r.dtype)
        rows.append(
            {
                **asdict(r),
                "pct_of_bound": r.pct_of_bound,
                "prefill_speedup": base.prefill_ms / r.prefill_ms if base else math.nan,
                "decode_speedup": base.decode_ms / r.decode_ms if base else math.nan,
            }
        )
    return rows
