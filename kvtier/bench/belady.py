"""Belady's offline optimum for a prefix cache, as an eviction policy that is given the future.

The victim is the evictable chunk whose next use lies farthest ahead (never again counts as infinitely
far); ties go to the deepest chunk. It is prefix-aware through the store: a chunk is evictable only when
no child of it is cached (a block is useful only while its whole prefix is cached), and a request that
uses a chunk uses all its ancestors, so a child is never needed before its parent and the farthest chunk
is always a leaf. Like every policy in the store it admits each block a request brings (demand paging);
among policies that do, it is optimal (checked against brute force in ``tests/bench``).
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Sequence
from typing import Any

from kvtier.kvstore.policies import Evictable, EvictionPolicy, heap_victim


class BeladyPolicy(EvictionPolicy):
    """``future[i]``: the chunk keys request ``i`` uses, in order. The replay calls :meth:`at` with the
    request's index before handing it to the store."""

    name = "belady"

    def __init__(self, future: Sequence[Sequence[bytes]]) -> None:
        self._uses: dict[bytes, list[int]] = {}
        for i, keys in enumerate(future):
            for key in keys:
                self._uses.setdefault(key, []).append(i)
        self._now = -1
        self._entries: dict[bytes, list[Any]] = {}  # key -> [-next_use, -depth, seq, key, valid]
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()

    def at(self, request: int) -> None:
        """The store is now serving request ``request``."""
        self._now = request

    def next_use(self, key: bytes) -> float:
        """The index of the first request after now that uses ``key`` (``inf``: none)."""
        uses = self._uses.get(key, ())
        j = bisect.bisect_right(uses, self._now)
        return uses[j] if j < len(uses) else math.inf

    def _push(self, key: bytes, depth: int) -> None:
        old = self._entries.get(key)
        if old is not None:
            old[4] = False
        entry = [-self.next_use(key), -depth, next(self._seq), key, True]
        self._entries[key] = entry
        heapq.heappush(self._heap, entry)

    def insert(self, key: bytes, nbytes: int, depth: int, reuse: float = 0.5) -> None:
        self._push(key, depth)

    def touch(self, key: bytes, reuse: float = 0.5) -> None:
        old = self._entries.get(key)
        if old is not None:
            self._push(key, -old[1])

    def remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry[4] = False

    def victim(self, evictable: Evictable) -> bytes | None:
        return heap_victim(self._heap, evictable, key_at=3, valid_at=4)
