"""Eviction policies: which chunk a full tier gives up next.

The contract (one policy object per tier):

- ``insert(key, nbytes, depth, reuse)``: the tier admitted a chunk;
- ``touch(key, reuse)``: a request fetched the chunk;
- ``remove(key)``: the chunk left the tier (evicted, demoted, promoted away or deleted);
- ``victim(evictable) -> key | None``: the next chunk to give up among those for which ``evictable(key)`` is
  true (the store excludes pinned chunks and chunks whose children it keeps there); the policy does not
  forget it until ``remove``.

``reuse`` is the store's estimate of the chance that a later prompt continues the request's prompt (the
fraction of earlier prompts at the same conversation turn that were continued; see
:meth:`kvtier.kvstore.store.TieredStore.continuation`); policies other than ``turn-lru`` ignore it.

The store inserts and touches a prompt's chunks from the deepest to the first, so a parent is never older
than its children and leaf-first eviction rarely has to skip anything. A put inserts only new chunks; a
get touches what it fetched.
"""

from __future__ import annotations

import heapq
import itertools
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from kvtier.errors import ConfigError

Evictable = Callable[[bytes], bool]


class EvictionPolicy(ABC):
    name: str

    @abstractmethod
    def insert(self, key: bytes, nbytes: int, depth: int, reuse: float = 0.5) -> None: ...

    @abstractmethod
    def touch(self, key: bytes, reuse: float = 0.5) -> None: ...

    @abstractmethod
    def remove(self, key: bytes) -> None: ...

    @abstractmethod
    def victim(self, evictable: Evictable) -> bytes | None: ...


class HeapPolicy(EvictionPolicy):
    """Base of the policies that give up the chunk of lowest priority: a heap of entries
    ``[priority, seq, key, valid, data]`` with lazy invalidation (a re-prioritised or removed chunk's old
    entry is marked invalid and dropped when it surfaces). ``seq`` breaks ties by age, oldest first."""

    def __init__(self) -> None:
        self._entries: dict[bytes, list[Any]] = {}
        self._heap: list[list[Any]] = []
        self._seq = itertools.count()

    def _push(self, key: bytes, priority: Any, data: Any = None) -> None:
        """Give ``key`` a new priority (and data), replacing its entry."""
        old = self._entries.get(key)
        if old is not None:
            old[3] = False
        entry = [priority, next(self._seq), key, True, data]
        self._entries[key] = entry
        heapq.heappush(self._heap, entry)

    def remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry[3] = False

    def victim(self, evictable: Evictable) -> bytes | None:
        """The lowest valid entry for which ``evictable`` is true; valid ones that cannot be evicted are put
        back."""
        skipped = []
        found = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            if not entry[3]:
                continue
            skipped.append(entry)
            if evictable(entry[2]):
                found = entry[2]
                break
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"

    def __init__(self, capacity_bytes: int = 0) -> None:
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes, nbytes: int, depth: int, reuse: float = 0.5) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: bytes, reuse: float = 0.5) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Evictable) -> bytes | None:
        return next((k for k in self._order if evictable(k)), None)


class GreedyDualPolicy(HeapPolicy):
    """GreedyDual-Size-Frequency: evict the lowest ``L + frequency * cost / size``, where ``L`` (the aging
    term) rises to each evicted chunk's priority, so chunks that were popular long ago age out.

    With unit cost and size this is LFU with dynamic aging (LFU-DA); with ``cost = recompute cost`` and
    ``size = bytes`` it is the cost-aware policy.
    """

    name = "greedy-dual"

    def __init__(self, cost: Callable[[int, int], float]) -> None:
        super().__init__()
        self._cost = cost
        self._age = 0.0  # entry data: (frequency, value per hit)

    def insert(self, key: bytes, nbytes: int, depth: int, reuse: float = 0.5) -> None:
        value = self._cost(nbytes, depth)
        self._push(key, self._age + value, (1, value))

    def touch(self, key: bytes, reuse: float = 0.5) -> None:
        old = self._entries.get(key)
        if old is not None:
            freq, value = old[4]
            self._push(key, self._age + (freq + 1) * value, (freq + 1, value))

    def remove(self, key: bytes) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            self._age = max(self._age, entry[0])
        super().remove(key)


class LFUPolicy(GreedyDualPolicy):
    """Least frequently used first, with dynamic aging (LFU-DA)."""

    name = "lfu"

    def __init__(self, capacity_bytes: int = 0) -> None:
        super().__init__(lambda nbytes, depth: 1.0)


class CostAwarePolicy(GreedyDualPolicy):
    """Recompute cost saved per byte: a hit on a chunk at depth ``d`` saves prefilling its tokens, whose
    attention reads all ``d`` chunks before it, so its cost grows as ``1 + attn_share * (d + 0.5)``, where
    ``attn_share`` is the attention cost of one chunk of context relative to the rest of the chunk's prefill
    (about 0.01 for 256-token chunks of a 7B model: 4 * hidden * layers * 256 / (2 * params))."""

    name = "cost"

    def __init__(self, capacity_bytes: int = 0, attn_share: float = 0.01) -> None:
        super().__init__(lambda nbytes, depth: (1.0 + attn_share * (depth + 0.5)) / max(nbytes, 1))


class S3FIFOPolicy(EvictionPolicy):
    """S3-FIFO (Yang et al., SOSP'23): a small FIFO (10% of the bytes) that filters one-hit wonders, a main
    FIFO with up to 3 second chances, and a ghost FIFO of recently evicted keys that go straight to main."""

    name = "s3fifo"

    def __init__(self, capacity_bytes: int, small_share: float = 0.1) -> None:
        self._small: OrderedDict[bytes, None] = OrderedDict()  # oldest first
        self._main: OrderedDict[bytes, None] = OrderedDict()
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self._freq: dict[bytes, int] = {}
        self._size: dict[bytes, int] = {}
        self._small_bytes = 0
        self._small_limit = small_share * capacity_bytes
        self._pending_ghost: bytes | None = None

    def insert(self, key: bytes, nbytes: int, depth: int, reuse: float = 0.5) -> None:
        self.remove(key)
        self._freq[key] = 0
        self._size[key] = nbytes
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = None
        else:
            self._small[key] = None
            self._small_bytes += nbytes

    def touch(self, key: bytes, reuse: float = 0.5) -> None:
        if key in self._freq:
            self._freq[key] = min(self._freq[key] + 1, 3)

    def remove(self, key: bytes) -> None:
        if key not in self._freq:
            return
        del self._freq[key]
        nbytes = self._size.pop(key)
        if key in self._small:
            del self._small[key]
            self._small_bytes -= nbytes
            if key == self._pending_ghost:
                self._ghost[key] = None
                if len(self._ghost) > max(len(self._main), 1):
                    self._ghost.popitem(last=False)
        else:
            self._main.pop(key, None)
        self._pending_ghost = None

    def victim(self, evictable: Evictable) -> bytes | None:
        # Each entry moves at most a few times (small -> main, up to 3 second chances), so this ends.
        budget = 5 * (len(self._small) + len(self._main)) + 1
        while budget > 0 and (self._small or self._main):
            budget -= 1
            from_small = bool(self._small) and (self._small_bytes >= self._small_limit or not self._main)
            queue = self._small if from_small else self._main
            key = next(iter(queue))
            if from_small and self._freq[key] > 0:
                del self._small[key]
                self._small_bytes -= self._size[key]
                self._main[key] = None
                self._freq[key] = 0
            elif not from_small and self._freq[key] > 0:
                self._freq[key] -= 1
                queue.move_to_end(key)
            elif not evictable(key):
                queue.move_to_end(key)
            else:
                self._pending_ghost = key if from_small else None
                return key
        return None


class TurnLRUPolicy(HeapPolicy):
    """LRU that keeps the chunks of prompts likely to be continued longer.

    Recency is measured in bytes inserted or touched since a chunk's last use, and a use by a request whose
    prompt is continued with probability ``reuse`` counts ``reuse_weight * logit(reuse)`` cache capacities
    more recent: the chunk with the lowest ``bytes at last use + bonus`` goes first. (If a prompt is
    continued with probability ``p`` after a gap with survival ``exp(-age / tau)``, the log-odds that it still
    will be is ``logit(p) - age / tau``: ordering by it is this with ``tau = reuse_weight * capacity``.) A use
    never lowers a chunk's priority: a prefix is worth what its most promising prompt is. With the same
    ``reuse`` for every request this is LRU.
    """

    name = "turn-lru"

    def __init__(self, capacity_bytes: int, reuse_weight: float = 6.0) -> None:
        super().__init__()
        self._scale = reuse_weight * capacity_bytes
        self._clock = 0  # bytes inserted or touched so far; entry data: the chunk's bytes

    def _used(self, nbytes: int, reuse: float) -> float:
        self._clock += nbytes
        return self._clock + self._scale * math.log(reuse / (1 - reuse))

    def insert(self, key: bytes, nbytes: int, depth: int, reuse: float = 0.5) -> None:
        self._push(key, self._used(nbytes, reuse), nbytes)

    def touch(self, key: bytes, reuse: float = 0.5) -> None:
        old = self._entries.get(key)
        if old is not None:
            self._push(key, max(old[0], self._used(old[4], reuse)), old[4])


POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "s3fifo": S3FIFOPolicy,
    "cost": CostAwarePolicy,
    "turn-lru": TurnLRUPolicy,
}


def make_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    """Build a policy by name for a tier of ``capacity_bytes``."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown eviction policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return cls(capacity_bytes)
