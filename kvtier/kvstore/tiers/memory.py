"""Memory tiers: chunks packed into one preallocated buffer (host RAM, or device memory).

The buffer is allocated (and its pages touched) once; chunks take extents of it from a first-fit
allocator that coalesces freed neighbours, so a put or get is a plain copy into or out of the pool.

A chunk can also arrive already in the pool: :meth:`MemoryTier.lend` hands out an extent as a byte buffer
(the service receives a blob straight into it), and a commit of a chunk whose parts lie in a lent extent
adopts the extent instead of copying. A chunk that carries the checksums of its layers (read from a verified
blob) keeps them here and a get hands them on: the bytes are not hashed again, and whoever reads a blob made of
them checks them against the checksums they came with. Key summaries are computed on demand
(``summary_on_demand``): when the store keeps them, every entry has a slot for its summary, filled by
:meth:`MemoryTier.set_summary`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np
import torch

from kvtier.compression.codec import Codec
from kvtier.kvstore.chunk import Chunk, carried_digests
from kvtier.kvstore.tiers.base import Prepared, Tier
from kvtier.layout import KVLayout

ALIGN = 256


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


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
    summary: tuple[torch.dtype, tuple[int, ...], int] | None  # the summary's slot
    parent: bytes
    tokens: np.ndarray
    summary_ready: bool  # whether the slot holds the summary yet
    layer_xxh3: tuple[str, ...] | None  # the checksums the chunk carried in, per layer (see Chunk.layer_xxh3)


class MemoryTier(Tier):
    """Chunks in a preallocated buffer on ``device``."""

    summary_on_demand = True

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
        self._lent: dict[int, tuple[int, torch.Tensor]] = {}  # offset -> (bytes, the buffer lent) until taken over/back
        self._used = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def prepare(self, chunk: Chunk, layout: KVLayout) -> Prepared:
        parts = self.codec.encode(chunk.kv)
        tensors = dict(parts)
        if chunk.summary is not None:
            tensors["\0summary"] = chunk.summary
        slot = None
        if chunk.summary is None and self.keep_summaries:
            slot = (layout.torch_dtype, layout.summary_shape)
        lent = self._lent_extent(list(parts.values()))
        if lent is not None:
            return Prepared(chunk.key, self._lent[lent][0], (chunk, tensors, slot, lent), reserved=True)
        nbytes = sum(_aligned(t.numel() * t.element_size()) for t in tensors.values())
        if slot is not None:
            nbytes += _aligned(_nbytes(*slot))
        return Prepared(chunk.key, nbytes, (chunk, tensors, slot, None))

    def can_fit(self, nbytes: int) -> bool:
        return self._alloc.can_alloc(nbytes)

    def lend_nbytes(self, nbytes: int, layout: KVLayout) -> int:
        if self.pool.device.type != "cpu" or self.codec.name != "raw":
            return 0  # a device pool is not written by the receiver; a lossy codec cannot take raw KV over
        slot = _aligned(_nbytes(layout.torch_dtype, layout.summary_shape)) + ALIGN if self.keep_summaries else 0
        return _aligned(nbytes) + slot

    def lend(self, nbytes: int, layout: KVLayout) -> torch.Tensor | None:
        """A free extent for a blob of ``nbytes`` of ``layout`` (and the summary slot after it), as a uint8 tensor
        ``[nbytes]``; None when no free extent is large enough or the tier lends nothing. A chunk committed with
        its parts in it takes the extent over; :meth:`take_back` frees one that is not. Lent bytes count as
        used."""
        size = self.lend_nbytes(nbytes, layout)
        offset = self._alloc.alloc(size) if size else None
        if offset is None:
            return None
        buffer = self.pool[offset : offset + nbytes]
        self._lent[offset] = (size, buffer)
        self._used += size
        return buffer

    def take_back(self, buffer: torch.Tensor) -> None:
        offset = buffer.data_ptr() - self.pool.data_ptr()
        size, lent = self._lent.get(offset, (0, None))
        if lent is buffer:  # not a later lend of the same bytes after a commit took this one over
            del self._lent[offset]
            self._alloc.free(offset, size)
            self._used -= size

    def lent(self, t: torch.Tensor) -> bool:
        return self._lent_extent([t]) is not None

    def _lent_extent(self, tensors: list[torch.Tensor]) -> int | None:
        """The offset of the lent extent that every one of ``tensors`` lies wholly in, contiguous, if any (KV
        strided over several chunks, or partly outside, is copied instead)."""
        if not self._lent or any(t.device != self.pool.device or not t.is_contiguous() for t in tensors):
            return None
        spans = [(t.data_ptr() - self.pool.data_ptr(), t.numel() * t.element_size()) for t in tensors]
        return next((o for o, (size, _) in self._lent.items() if all(o <= rel and rel + n <= o + size
                                                                      for rel, n in spans)), None)

    def _view(self, entry: _Entry, spec: tuple[torch.dtype, tuple[int, ...], int]) -> torch.Tensor:
        dtype, shape, rel = spec
        start = entry.offset + rel
        return self.pool[start : start + _nbytes(dtype, shape)].view(dtype).view(shape)

    def commit(self, prepared: Prepared) -> None:
        """Store the chunk: in the extent it was lent (its tensors that lie there stay where they are), or in a
        new one; the other tensors are copied in after them, then comes the summary slot. In a lent extent these
        go at its end: the bytes after the chunk's own may hold another chunk's KV, still to be copied out."""
        chunk, tensors, slot, lent = prepared.payload
        offset = lent if lent is not None else self._alloc.alloc(prepared.nbytes)
        if offset is None:
            raise MemoryError(f"tier {self.name!r}: no free extent of {prepared.nbytes} bytes")
        base = self.pool.data_ptr() + offset
        specs, copies, end = {}, [], 0
        for name, t in tensors.items():
            n = t.numel() * t.element_size()
            rel = t.data_ptr() - base
            if lent is not None and t.device == self.pool.device and t.is_contiguous() and 0 <= rel <= prepared.nbytes - n:
                specs[name] = (t.dtype, tuple(t.shape), rel)
                end = max(end, rel + n)
            else:
                copies.append((name, t))
        end = _aligned(end)
        if lent is not None:
            tail = sum(_aligned(t.numel() * t.element_size()) for _, t in copies) + (_aligned(_nbytes(*slot)) if slot else 0)
            end = max(end, prepared.nbytes - tail)
        for name, t in copies:
            specs[name] = (t.dtype, tuple(t.shape), end)
            end += _aligned(t.numel() * t.element_size())
        if slot is not None:
            specs["\0summary"] = (*slot, end)
            end += _aligned(_nbytes(*slot))
        if end > prepared.nbytes:
            raise MemoryError(f"tier {self.name!r}: the chunk needs {end} bytes, its extent has {prepared.nbytes}")
        summary = specs.pop("\0summary", None)
        entry = _Entry(offset, prepared.nbytes, specs, summary, chunk.parent, np.array(chunk.tokens, dtype=np.int32),
                       summary_ready=slot is None, layer_xxh3=carried_digests(chunk, self.codec))
        for name, t in copies:
            self._view(entry, specs[name] if name in specs else summary).copy_(t)
        if lent is not None:
            del self._lent[lent]
        else:
            self._used += prepared.nbytes
        self.delete(chunk.key)  # a chunk stored again replaces its old copy (and frees its extent)
        self._entries[chunk.key] = entry
        self.stats.bytes_written += prepared.nbytes

    def get(self, key: bytes, out: torch.Tensor, layers: range | None = None) -> Chunk | None:
        entry = self._entries.get(key)
        if entry is None:
            self.stats.misses += 1
            return None
        parts, digests = self._read(entry, layers)
        self.codec.decode(parts, out)
        return Chunk(key, entry.parent, entry.tokens, out, layer_xxh3=digests)

    def view(self, key: bytes, layers: range | None = None) -> Chunk | None:
        entry = self._entries.get(key)
        if entry is None or self.codec.name != "raw" or self.device.type != "cpu":
            return None
        parts, digests = self._read(entry, layers)
        return Chunk(key, entry.parent, entry.tokens, parts["kv"], layer_xxh3=digests)

    def _read(self, entry: _Entry, layers: range | None) -> tuple[dict[str, torch.Tensor], tuple[str, ...] | None]:
        """A read of ``entry``, counted: its parts' ``layers`` (views of the pool) and their checksums."""
        parts = {name: self._view(entry, spec) for name, spec in entry.parts.items()}
        digests = entry.layer_xxh3
        if layers is not None:
            parts = {name: p[layers.start : layers.stop : layers.step] for name, p in parts.items()}
            if digests is not None:
                digests = digests[layers.start : layers.stop : layers.step]
        self.stats.hits += 1
        self.stats.bytes_read += entry.nbytes
        return parts, digests

    def summary(self, key: bytes) -> torch.Tensor | None:
        entry = self._entries.get(key)
        if entry is None or entry.summary is None or not entry.summary_ready:
            return None
        return self._view(entry, entry.summary).clone()

    def set_summary(self, key: bytes, summary: torch.Tensor) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.summary is not None:
            self._view(entry, entry.summary).copy_(summary)
            entry.summary_ready = True

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
