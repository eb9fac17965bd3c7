"""The tier contract.

A tier stores encoded chunks under their keys and accounts the bytes they take. Primitives:

- ``prepare(chunk, layout) -> Prepared``: encode the chunk with the tier's codec; changes nothing, and the
  result says how many bytes a commit will take here (``Prepared.nbytes``), and whether they are taken
  already (``Prepared.reserved``: the chunk lies in an extent a memory tier lent);
- ``can_fit(nbytes) -> bool``: whether a commit of that size succeeds now (the store evicts until it does);
- ``commit(prepared)``: store it;
- ``get(key, out, layers=None) -> Chunk | None``: decode the KV of ``layers`` (default all) into ``out``
  (``[len(layers), T, H, C, D]``) and return the chunk's key, parent and tokens for the caller to verify;
  None is a miss, also for a chunk found corrupt (then it is deleted and counted in ``stats.corrupt``) and for
  one that cannot be read just now (an I/O error, Redis unreachable: it is kept, ``contains`` still says so,
  and counted in ``stats.errors``);
- ``view(key, layers=None) -> Chunk | None``: like ``get`` without a copy, for a tier that can (a raw chunk in
  host memory): the chunk with its KV a view of the tier's own bytes, valid while the chunk stays (the store
  pins it meanwhile); None otherwise;
- ``summary(key) -> Tensor | None``: the chunk's key summary without its KV; a tier with
  ``summary_on_demand`` may hold a chunk whose summary comes later, through ``set_summary(key, summary)``
  (the store computes it when it is first needed); other tiers get it with the chunk when the store keeps
  summaries (``keep_summaries``, set by the store);
- ``lend(nbytes, layout) -> Tensor | None``, ``lend_nbytes(nbytes, layout)``, ``take_back(buffer)``,
  ``lent(tensor) -> bool``: a tier that can take a chunk over in place (a CPU memory tier storing raw KV)
  lends free bytes to receive a blob into (``lend_nbytes``: what lending them takes, 0 for a tier that
  lends nothing);
- ``contains(key)``, ``delete(key) -> bytes freed``, ``__len__``;
- ``scan() -> Iterator[(Chunk without KV, KVLayout)]``: for persistent tiers, what is there at start-up;
- batch forms ``get_many`` and ``commit_many`` (loops here; a networked tier pipelines them).

``used_bytes`` is exactly the sum of the footprints of what the tier holds; it never exceeds
``capacity_bytes``. Tiers are not thread-safe on their own: the TieredStore calls them only while it holds its
lock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.compression.codec import Codec, get_codec
from kvtier.kvstore.chunk import Chunk
from kvtier.layout import KVLayout


@dataclass
class Prepared:
    """A chunk encoded for one tier: ``nbytes`` is what it will take there."""

    key: bytes
    nbytes: int
    payload: Any = None
    reserved: bool = False


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    errors: int = 0  # reads that failed for now (the copy is kept)
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0


class Tier(ABC):
    persistent: bool = False
    summary_on_demand: bool = False
    keep_summaries: bool = False

    def __init__(self, name: str, capacity_bytes: int, codec: Codec | str = "raw") -> None:
        if capacity_bytes < 0:
            raise ValueError(f"tier {name!r}: capacity_bytes must be >= 0, got {capacity_bytes}")
        self.name = name
        self.capacity_bytes = int(capacity_bytes)
        self.codec = get_codec(codec) if isinstance(codec, str) else codec
        self.stats = TierStats()

    @property
    @abstractmethod
    def used_bytes(self) -> int: ...

    @abstractmethod
    def prepare(self, chunk: Chunk, layout: KVLayout) -> Prepared: ...

    def can_fit(self, nbytes: int) -> bool:
        return self.used_bytes + nbytes <= self.capacity_bytes

    @abstractmethod
    def commit(self, prepared: Prepared) -> None: ...

    @abstractmethod
    def get(self, key: bytes, out: torch.Tensor, layers: range | None = None) -> Chunk | None: ...

    def view(self, key: bytes, layers: range | None = None) -> Chunk | None:
        return None

    @abstractmethod
    def summary(self, key: bytes) -> torch.Tensor | None: ...

    def lend_nbytes(self, nbytes: int, layout: KVLayout) -> int:
        return 0

    def lend(self, nbytes: int, layout: KVLayout) -> torch.Tensor | None:
        return None

    def take_back(self, buffer: torch.Tensor) -> None:
        """Free the extent ``lend`` returned as ``buffer`` (that very object), unless a commit took it over."""

    def lent(self, t: torch.Tensor) -> bool:
        """Whether ``t`` lies in an extent this tier lent and no commit took over yet."""
        return False

    def set_summary(self, key: bytes, summary: torch.Tensor) -> None:
        raise NotImplementedError(f"tier {self.name!r} takes a chunk's summary with the chunk")

    @abstractmethod
    def contains(self, key: bytes) -> bool: ...

    @abstractmethod
    def delete(self, key: bytes) -> int: ...

    @abstractmethod
    def __len__(self) -> int: ...

    def scan(self) -> Iterator[tuple[Chunk, KVLayout]]:
        return iter(())

    def get_many(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor],
                 layers: range | None = None) -> list[Chunk | None]:
        return [self.get(k, o, layers) for k, o in zip(keys, outs)]

    def commit_many(self, prepared: Sequence[Prepared]) -> None:
        for p in prepared:
            self.commit(p)

    def close(self) -> None:
        """Release resources (connections, files)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.used_bytes}/{self.capacity_bytes} B, codec={self.codec.name})"
