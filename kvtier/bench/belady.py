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
import math
from collections.abc import Sequence

from kvtier.kvstore.policies import HeapPolicy


class BeladyPolicy(HeapPolicy):
    """``future[i]``: the chunk keys request ``i`` uses, in order. The replay calls :meth:`at` with the
    request's index before handing it to the store."""

    name = "belady"

    def __init__(self, future: Sequence[Sequence[bytes]]) -> None:
        super().__init__()  # priority: (-next use, -depth)
        self._uses: dict[bytes, list[int]] = {}
        for i, keys in enumerate(future):
            for key in keys:
                self._uses.setdefault(key, []).append(i)
        self._now = -1

    def at(self, request: int) -> None:
        """The store is now serving request ``request``."""
        self._now = request

    def next_use(self, key: bytes) -> float:
        """The index of the first request after now that uses ``key`` (``inf``: none)."""
        uses = self._uses.get(key, ())
        j = bisect.bisect_right(uses, self._now)
        return uses[j] if j < len(uses) else math.inf

    def _rank(self, key: bytes, depth: int) -> None:
        self._push(key, (-self.next_use(key), -depth), depth)

    def insert(self, key: bytes, nbytes: int, depth: int, reuse: float = 0.5) -> None:
        self._rank(key, depth)

    def touch(self, key: bytes, reuse: float = 0.5) -> None:
        old = self._entries.get(key)
        if old is not None:
            self._rank(key, old[4])
