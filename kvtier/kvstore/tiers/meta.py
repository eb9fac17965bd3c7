"""MetaTier: accounts capacity like a real tier but stores no bytes (trace replay at millions of chunks)."""

from __future__ import annotations

import torch

from kvtier.compression.codec import Codec
from kvtier.kvstore.chunk import Chunk
from kvtier.kvstore.tiers.base import Prepared, Tier
from kvtier.layout import KVLayout


class MetaTier(Tier):
    """A tier of ``capacity_bytes`` where a chunk takes what its codec would make of it, with no data."""

    def __init__(self, name: str, capacity_bytes: int, codec: Codec | str = "raw") -> None:
        super().__init__(name, capacity_bytes, codec)
        self._sizes: dict[bytes, int] = {}
        self._used = 0
        self._size_of: dict[str, int] = {}

    @property
    def used_bytes(self) -> int:
        return self._used

    def prepare(self, chunk: Chunk, layout: KVLayout) -> Prepared:
        nbytes = self._size_of.get(layout.fingerprint)
        if nbytes is None:
            nbytes = self.codec.encoded_nbytes(layout.chunk_shape, layout.torch_dtype) + 4 * layout.chunk_tokens
            self._size_of[layout.fingerprint] = nbytes
        return Prepared(chunk.key, nbytes)

    def commit(self, prepared: Prepared) -> None:
        self._sizes[prepared.key] = prepared.nbytes
        self._used += prepared.nbytes
        self.stats.bytes_written += prepared.nbytes

    def get(self, key: bytes, out: torch.Tensor, layers: range | None = None) -> Chunk | None:
        """There is no KV to return: the store's metadata-only mode never fetches."""
        raise RuntimeError(f"tier {self.name!r} is metadata-only and holds no KV")

    def summary(self, key: bytes) -> torch.Tensor | None:
        return None

    def contains(self, key: bytes) -> bool:
        return key in self._sizes

    def delete(self, key: bytes) -> int:
        nbytes = self._sizes.pop(key, 0)
        self._used -= nbytes
        return nbytes

    def __len__(self) -> int:
        return len(self._sizes)
