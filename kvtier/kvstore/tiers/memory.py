"""Memory tiers: chunks packed into one preallocated buffer (host RAM, or device memory).

The buffer is allocated (and its pages touched) once; chunks take extents of it from a first-fit
allocator that coalesces freed neighbours, so a put or get is a plain copy into or out of the pool.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.compression.codec import Codec
from kvtier.kvstore.chunk import Chunk
from kvtier.kvstore.tiers.base import Prepared, Tier
from kvtier.layout import KVLayout

ALIGN = 256


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class ExtentAllocator:
    """First-fit allocation of ``[offset, offset + size)`` extents in ``[0, capacity)``; sizes are multiples
    of ALIGN. Free extents are kept sorted by offset and merged with their neighbours on free."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity // ALIGN * ALIGN
        self._starts: list[int] = [0] if self.capacity else []
        self._sizes: list[int] = [self.capacity] if self.capacity else []

    def can_alloc(self, size: int) -> bool:
        return any(s >= size for s in self._sizes)

    def alloc(self, size: int) -> int | None:
        for i, free in enumerate(self._sizes):
            if free >= size:
                start = self._starts[i]
                if free == size:
                    del self._starts[i], self._sizes[i]
                else:
                    self._starts[i] += size
                    self._sizes[i] -= size
                return start
        return None

    def free(self, start: int, size: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        if i > 0 and self._starts[i - 1] + self._sizes[i - 1] == start:  # merge with the left neighbour
            i -= 1
            self._sizes[i] += size
        else:
            self._starts.insert(i, start)
            self._sizes.insert(i, size)
        if i + 1 < len(self._starts) and self._starts[i] + self._sizes[i] == self._starts[i + 1]:
            self._sizes[i] += self._sizes.pop(i + 1)
            del self._starts[i + 1]


@dataclass
class _Entry:
    offset: int
    nbytes: int
    parts: dict[str, tuple[torch.dtype, tuple[int, ...], int]]  # name -> (dtype, shape, offset in extent)
    summary: tuple[torch.dtype, tuple[int, ...], int] | None
    parent: bytes
    tokens: np.ndarray


class MemoryTier(Tier):
    """Chunks in a preallocated buffer on ``device``."""

    def __init__(self, name: str, capacity_bytes: int, codec: Codec | str = "raw",
                 device: str | torch.device = "cpu", pin: bool = False, prefault: bool = True) -> None:
        super().__init__(name, capacity_bytes, codec)
        self.device = torch.device(device)
        self._alloc = ExtentAllocator(capacity_bytes)
        self.capacity_bytes = self._alloc.capacity
        self.pool = torch.empty(self.capacity_bytes, dtype=torch.uint8, device=self.device, pin_memory=pin)
        if prefault:
            self.pool.zero_()  # touch every page now, not on the first puts
        self._entries: dict[bytes, _Entry] = {}
        self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def prepare(self, chunk: Chunk, layout: KVLayout) -> Prepared:
        parts = self.codec.encode(chunk.kv)
        tensors = dict(parts)
        if chunk.summary is not None:
            tensors["\0summary"] = chunk.summary
        nbytes = sum(_aligned(t.numel() * t.element_size()) for t in tensors.values())
        return Prepared(chunk.key, nbytes, (chunk, tensors))

    def can_fit(self, nbytes: int) -> bool:
        return self._alloc.can_alloc(nbytes)

    def _view(self, entry: _Entry, spec: tuple[torch.dtype, tuple[int, ...], int]) -> torch.Tensor:
        dtype, shape, rel = spec
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        start = entry.offset + rel
        return self.pool[start : start + n].view(dtype).view(shape)

    def commit(self, prepared: Prepared) -> None:
        chunk, tensors = prepared.payload
        offset = self._alloc.alloc(prepared.nbytes)
        if offset is None:
            raise MemoryError(f"tier {self.name!r}: no free extent of {prepared.nbytes} bytes")
        specs = {}
        rel = 0
        for name, t in tensors.items():
            specs[name] = (t.dtype, tuple(t.shape), rel)
            rel += _aligned(t.numel() * t.element_size())
        summary = specs.pop("\0summary", None)
        entry = _Entry(offset, prepared.nbytes, specs, summary, chunk.parent, np.array(chunk.tokens, dtype=np.int32))
        for name, t in tensors.items():
            self._view(entry, specs[name] if name in specs else summary).copy_(t)
        self._entries[chunk.key] = entry
        self._used += prepared.nbytes
        self.stats.bytes_written += prepared.nbytes

    def get(self, key: bytes, out: torch.Tensor, layers: range | None = None) -> Chunk | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        parts = {name: self._view(entry, spec) for name, spec in entry.parts.items()}
        if layers is not None:
            parts = {name: p[layers.start : layers.stop : layers.step] for name, p in parts.items()}
        self.codec.decode(parts, out)
        self.stats.hits += 1
        self.stats.bytes_read += entry.nbytes
        return Chunk(key, entry.parent, entry.tokens, out)

    def summary(self, key: bytes) -> torch.Tensor | None:
        entry = self._entries.get(key)
        if entry is None or entry.summary is None:
            return None
        return self._view(entry, entry.summary).clone()

    def contains(self, key: bytes) -> bool:
        return key in self._entries

    def delete(self, key: bytes) -> int:
        entry = self._entries.pop(key, None)
        if entry is None:
            return 0
        self._alloc.free(entry.offset, entry.nbytes)
        self._used -= entry.nbytes
        return entry.nbytes

    def __len__(self) -> int:
        return len(self._entries)


class HostTier(MemoryTier):
    """CPU memory from a preallocated pool, pinned when CUDA is present (for fast device copies)."""

    def __init__(self, capacity_bytes: int, codec: Codec | str = "raw", name: str = "host", prefault: bool = True) -> None:
        super().__init__(name, capacity_bytes, codec, device="cpu", pin=torch.cuda.is_available(), prefault=prefault)


class DeviceTier(MemoryTier):
    """Accelerator memory (the first CUDA device, or the CPU device when there is none)."""

    def __init__(self, capacity_bytes: int, codec: Codec | str = "raw", name: str = "device",
                 device: str | None = None, prefault: bool = True) -> None:
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        super().__init__(name, capacity_bytes, codec, device=device, pin=False, prefault=prefault)
