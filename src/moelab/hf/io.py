"""Safetensors in bounded memory: a lazy reader over one file or a sharded folder, and a writer that streams.

The reader opens each shard with `safe_open`, which memory-maps it, and hands out one tensor (or one
expert's slice of a stacked tensor) at a time. The writer lays out the header from the tensors' names,
dtypes and shapes first and then writes each tensor's bytes as its producer yields them, so a file larger
than RAM is written holding one chunk at a time. Files follow the safetensors format: an 8-byte
little-endian header length, a JSON header with `data_offsets`, then the raw little-endian bytes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from moelab.config import MoelabError

INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


class TensorReader:
    """Tensors of a safetensors file, or of a folder holding one (or shards listed in an index)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        files = self._files()
        self._where: dict[str, Path] = {}
        self._handles = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises several types for a truncated or foreign file
                text = str(e).strip().splitlines()
                raise MoelabError(f"cannot read {file}: not a complete safetensors file "
                                  f"({text[0] if text else type(e).__name__})") from None
            self._handles[file] = handle
            for name in handle.keys():
                self._where.setdefault(name, file)

    def _files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        index = self.path / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as e:  # also bytes that are not UTF-8
                raise MoelabError(f"{index} is not a safetensors index: {e}") from None
            files = sorted({self.path / f for f in weight_map.values()})
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise MoelabError(f"{index} lists {missing[0].name}, which is not in {self.path}")
            return files
        if (self.path / "model.safetensors").is_file():  # other .safetensors (e.g. Mistral's
            return [self.path / "model.safetensors"]      # consolidated.safetensors) are other layouts
        return safetensors_files(self.path)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name: str):
        if name not in self._where:
            raise MoelabError(f"{self.path}: no tensor named {name}")
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        code = self._slice(name).get_dtype()
        if code not in DTYPES:
            raise MoelabError(f"{self.path}: tensor {name} has dtype {code}, which moelab cannot convert")
        return DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        self._slice(name)  # names the file when the tensor is absent
        return self._handles[self._where[name]].get_tensor(name)

    def row(self, name: str, i: int) -> torch.Tensor:
        """tensor[i] read alone: one expert of a stacked [E, ...] tensor."""
        return self._slice(name)[i]


@dataclasses.dataclass
class Entry:
    """One tensor to write: its bytes come from `chunks()`, row-major pieces that concatenate to `shape`."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    chunks: Callable[[], Iterable[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _header(entries: list[Entry], metadata: dict[str, str] | None) -> bytes:
    head: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for e in entries:
        if e.dtype not in DTYPE_NAMES:
            raise MoelabError(f"cannot write tensor {e.name} of dtype {e.dtype} to safetensors")
        head[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape),
                        "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned


def _bytes_of(t: torch.Tensor) -> memoryview:
    flat = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_streaming(path: str | Path, entries: list[Entry], metadata: dict[str, str] | None = None) -> None:
    """Write `entries` to one safetensors file, holding one chunk in memory at a time."""
    path = Path(path)
    header = _header(entries, metadata)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for e in entries:
            written = 0
            for chunk in e.chunks():
                if chunk.dtype != e.dtype:
                    chunk = chunk.to(e.dtype)
                written += f.write(_bytes_of(chunk))
            if written != e.nbytes:
                raise MoelabError(f"tensor {e.name}: wrote {written} bytes, expected {e.nbytes} "
                                  f"for shape {e.shape}")
    os.replace(tmp, path)


def shard_groups(entries: list[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Consecutive entries cut into groups of at most max_shard_bytes (a larger tensor goes alone)."""
    groups: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if groups[-1] and size + e.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    return [g for g in groups if g]


def write_sharded(folder: str | Path, entries: list[Entry], max_shard_bytes: int,
                  metadata: dict[str, str] | None = None) -> list[str]:
    """Transformers' layout: model.safetensors, or model-0000i-of-0000n.safetensors plus the index."""
    folder = Path(folder)
    groups = shard_groups(entries, max_shard_bytes)
    if len(groups) <= 1:
        write_streaming(folder / "model.safetensors", entries, metadata)
        return ["model.safetensors"]
    names, weight_map = [], {}
    for i, group in enumerate(groups):
        name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_streaming(folder / name, group, metadata)
        names.append(name)
        weight_map.update({e.name: name for e in group})
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries)}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names


def one(t: Callable[[], torch.Tensor]) -> Callable[[], Iterator[torch.Tensor]]:
    """A producer of a single chunk, computed only when the writer reaches it."""
    return lambda: iter([t()])


def safetensors_files(folder: Path) -> list[Path]:
    """The folder's .safetensors files; none is one line naming the .bin or .pt found instead (a pickle,
    which moelab never loads, not even through torch's restricted unpickler)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        extra = f" (found {found[0]}: convert it to safetensors first)" if found else ""
        raise MoelabError(f"{folder} holds no .safetensors weights{extra}")
    return files
