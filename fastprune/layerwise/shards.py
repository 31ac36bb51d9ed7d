"""Safetensors files read one tensor at a time through memory maps, and written one layer at a time.

The format is simple (an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and
byte range, then the data), so a tensor is a view of a memory-mapped file: reading a layer touches only that
layer's bytes, and the map is closed again when the tensor is converted, so the pages do not accumulate in the
process's memory.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from fastprune.errors import CheckpointError, ModelNotFoundError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype, shape and absolute byte range."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsCheckpoint:
    """The tensors of a model directory's safetensors files (one file or an index of shards), read lazily."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index, single = self.directory / INDEX_FILE, self.directory / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index} is not a safetensors index: {exc}") from exc
            files = sorted({self.directory / f for f in weight_map.values()})
        elif single.is_file():
            files = [single]
        else:
            others = sorted(p.name for p in self.directory.glob("*.bin")) + sorted(
                p.name for p in self.directory.glob("*.pt*")
            )
            hint = f" (found {', '.join(others)}: convert them with save_pretrained(safe_serialization=True))"
            raise ModelNotFoundError(
                f"no safetensors weights in {self.directory}: streaming reads {SINGLE_FILE} or {INDEX_FILE} "
                f"with its shards{hint if others else ''}"
            )
        self.entries: dict[str, TensorEntry] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"the safetensors index of {self.directory} names {f.name}, which is missing")
            for name, entry in read_header(f).items():
                if name in self.entries:
                    raise CheckpointError(f"tensor {name} is stored twice ({self.entries[name].file.name}, {f.name})")
                self.entries[name] = entry
        self.files = files

    def names(self) -> list[str]:
        return list(self.entries)

    def load(self, names: list[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Copies of the named tensors (converted to ``dtype`` if given), read through short-lived memory maps."""
        out = {}
        by_file: dict[Path, list[str]] = {}
        for n in names:
            by_file.setdefault(self.entries[n].file, []).append(n)
        for path, group in by_file.items():
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
                for n in group:
                    e = self.entries[n]
                    view = torch.frombuffer(mapped, dtype=e.dtype, count=numel(e.shape), offset=e.start)
                    view = view.view(e.shape)
                    # A copy (or conversion), so that nothing refers to the map once it is closed.
                    out[n] = view.to(dtype) if dtype is not None and dtype != e.dtype else view.clone()
                    del view
        return out

    def rows(self, name: str, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows ``index`` of a 2-D tensor (an embedding lookup) without reading the others."""
        e = self.entries[name]
        with open(e.file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
            view = torch.frombuffer(mapped, dtype=e.dtype, count=numel(e.shape), offset=e.start).view(e.shape)
            picked = view[index]
            del view
        return picked.to(dtype) if dtype is not None else picked


def numel(shape: tuple[int, ...]) -> int:
    """Elements of a tensor of this shape."""
    n = 1
    for s in shape:
        n *= s
    return n


def read_header(path: Path) -> dict[str, TensorEntry]:
    """The tensors one safetensors file holds, checked against its size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(f.read(length))
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file: {exc}") from exc
    base = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path.name}: tensor {name} has dtype {info.get('dtype')}, which is not supported")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if base + end > size or end - begin != numel(shape) * dtype.itemsize:
            raise CheckpointError(f"{path.name}: tensor {name} lies outside the file or has the wrong size")
        entries[name] = TensorEntry(path, dtype, shape, base + begin, base + end)
    return entries


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write CPU tensors as one safetensors file, atomically (a temporary name, then renamed), one tensor at a
    time (no copy of the whole file's bytes in memory)."""
    _write(path, {n: (t.dtype, tuple(t.shape), t.numel() * t.element_size()) for n, t in tensors.items()},
           lambda name, f: f.write(tensors[name].contiguous().view(-1).view(torch.uint8).numpy()))  # fmt: skip


def copy_tensors(path: Path, checkpoint: SafetensorsCheckpoint, names: list[str]) -> None:
    """Write the named tensors of ``checkpoint`` unchanged as one safetensors file, copying their bytes from file
    to file in chunks (so even an embedding matrix is never held in memory)."""

    def copy(name: str, f) -> None:
        e = checkpoint.entries[name]
        with open(e.file, "rb") as src:
            src.seek(e.start)
            left = e.end - e.start
            while left:
                chunk = src.read(min(left, COPY_CHUNK))
                f.write(chunk)
                left -= len(chunk)

    _write(path, {n: (e.dtype, e.shape, e.end - e.start) for n in names for e in [checkpoint.entries[n]]}, copy)


#: Bytes copied at a time by ``copy_tensors``.
COPY_CHUNK = 64 * 2**20


def _write(path: Path, layout: dict[str, tuple[torch.dtype, tuple[int, ...], int]], write_data) -> None:
    names = {torch_dtype: name for name, torch_dtype in DTYPES.items()}
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, (dtype, shape, nbytes) in layout.items():
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name in layout:
            write_data(name, f)
    tmp.replace(path)


def write_index(directory: Path, files: list[Path]) -> None:
    """The ``model.safetensors.index.json`` that maps every tensor of ``files`` to its file."""
    weight_map, total = {}, 0
    for f in sorted(files):
        for name, entry in read_header(f).items():
            weight_map[name] = f.name
            total += entry.end - entry.start
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
