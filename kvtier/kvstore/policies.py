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
:meth:`kvtier.kvstore.store.TieredStore.continuation`); policies other than ``turn-lru`` and ``hit-density``
ignore it.

The store inserts and touches a prompt's chunks from the deepest to the first, so a parent is never older
than its children and leaf-first eviction rarely has to skip anything. A put inserts only new chunks; a
get touches what it fetched.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from kvtier.errors import ConfigError

_EPS = 1e-6  # how close to 0 or 1 a reuse probability may come

Evictable = Callable[[bytes], bool]
"""Whether a chunk may be evicted now. It may also have ``held_by_children(key) -> bool``: the chunk is not
evictable only because children of it are in the tier (it becomes evictable once they leave)."""


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
    entry is marked invalid and dropped when it surfaces, or when invalid entries outnumber the valid ones
    and the heap is rebuilt). ``seq`` breaks ties by age, oldest first."""

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
        self._compact()

    def remove(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            entry[3] = False
            self._compact()

    def _compact(self) -> None:
        """Rebuild the heap from the valid entries once invalid ones make up most of it (touches and removes
        leave one each), so its size stays within twice the chunks held."""
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._rebuild()

    def _rebuild(self) -> None:
        """The heap of exactly the valid entries."""
        self._heap = list(self._entries.values())
        heapq.heapify(self._heap)

    def victim(self, evictable: Evictable) -> bytes | None:
        """The lowest valid entry for which ``evictable`` is true; valid ones that cannot be evicted are put
        back, unless :meth:`_set_aside` keeps them."""
        skipped = []
        found = None
        while self._heap:
            entry = heapq.heappop(self._heap)
            if not entry[3]:
                continue
            if evictable(entry[2]):
                found = entry[2]
                skipped.append(entry)
                break
            if not self._set_aside(entry, evictable):
                skipped.append(entry)
        for entry in skipped:
            heapq.heappush(self._heap, entry)
        return found

    def _set_aside(self, entry: list[Any], evictable: Evictable) -> bool:
        """Whether to keep ``entry`` (found not evictable) out of the heap instead of putting it back."""
        return False


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
        self._victim: bytes | None = None  # the last victim named: its removal is an eviction

    def insert(self, key: bytes, nbytes: int, depth: int, reuse: float = 0.5) -> None:
        value = self._cost(nbytes, depth)
        self._push(key, self._age + value, (1, value))

    def touch(self, key: bytes, reuse: float = 0.5) -> None:
        old = self._entries.get(key)
        if old is not None:
            freq, value = old[4]
            self._push(key, self._age + (freq + 1) * value, (freq + 1, value))

    def remove(self, key: bytes) -> None:
        """Forget ``key``; ``L`` rises only when it is the victim just named (a delete is not an eviction)."""
        entry = self._entries.get(key)
        if entry is not None and key == self._victim:
            self._age = max(self._age, entry[0])
            self._victim = None
        super().remove(key)

    def victim(self, evictable: Evictable) -> bytes | None:
        self._victim = super().victim(evictable)
        return self._victim


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
        """Evict from the small FIFO while it holds its share of the bytes, else from the main one; a queue whose
        every chunk was found not evictable in this call gives way to the other. None only when no chunk in
        either queue is evictable."""
        stuck_small: set[bytes] = set()  # found not evictable in this call
        stuck_main: set[bytes] = set()
        # Each entry moves at most a few times (small -> main, up to 3 second chances, stuck once), so this ends.
        budget = 6 * (len(self._small) + len(self._main)) + 1
        while budget > 0:
            budget -= 1
            small_open, main_open = len(stuck_small) < len(self._small), len(stuck_main) < len(self._main)
            if not (small_open or main_open):
                break
            small_due = self._small_bytes >= self._small_limit or not self._main
            from_small = small_open and (small_due or not main_open)
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
                (stuck_small if from_small else stuck_main).add(key)
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
        reuse = min(max(reuse, _EPS), 1 - _EPS)  # a probability strictly inside (0, 1): the logit is finite
        return self._clock + self._scale * math.log(reuse / (1 - reuse))

    def insert(self, key: bytes, nbytes: int, depth: int, reuse: float = 0.5) -> None:
        self._push(key, self._used(nbytes, reuse), nbytes)

    def touch(self, key: bytes, reuse: float = 0.5) -> None:
        old = self._entries.get(key)
        if old is not None:
            self._push(key, max(old[0], self._used(old[4], reuse)), old[4])


class HitDensityPolicy(HeapPolicy):
    """Hit density, after LHD (Beckmann et al., NSDI'18): evict the chunk expected to earn the fewest hits per
    byte and per unit of time it would still occupy, as learned online from how chunks like it were reused.

    - **Age**: bytes inserted or touched since the chunk's last use, in half-octave buckets of
      ``capacity / 64``.
    - **Class**: the last user's chance of being continued (``reuse``, in ``reuse_bins`` equal bins), times
      how the chunk was last used: inserted (not used since), used again after a short gap (under
      ``capacity / 64``) or after a longer one. A conversation's next turn tends to come as quickly as its
      last one did.
    - **Counts**, per class and age bucket, of how each interval between uses ended: with a use at that age (a
      hit, or the re-insertion of an evicted chunk the policy still remembers: the hit it missed) or with none
      (a remembered chunk forgotten; it remembers ``ghosts`` times as many as it holds). Remembering evicted
      chunks shows it the reuses that come later than it kept chunks.
    - Every ``capacity / 8`` bytes the counts decay (half weight after ``half_life`` capacities) and, for each
      class and age ``a``, the **density** is recomputed: the uses at ages past ``a`` over the time that the
      intervals reaching ``a`` went on past it (each ending in its bucket's middle). Every chunk is then ranked
      by its density at its age over its bytes (ties: the deepest, then the least recently used first); chunks
      used in between are ranked at age 0.

    The victim is the lowest-ranked evictable chunk. When ``evictable`` says which chunks only their children
    in the tier hold (``held_by_children``), those leave the heap until a chunk one deeper is removed, the next
    reranking, or a call that finds nothing else.
    """

    name = "hit-density"

    def __init__(self, capacity_bytes: int, reuse_bins: int = 4, ghosts: float = 2.0, half_life: float = 8.0) -> None:
        super().__init__()
        self._reuse_bins = reuse_bins
        self._ghost_factor = ghosts
        self._unit = max(capacity_bytes / 64, 1.0)
        self._edges = [self._unit * (2 ** (b / 2) - 1) for b in range(_AGE_BUCKETS + 1)]
        self._period = max(capacity_bytes / 8, 1.0)
        self._decay = 0.5 ** (1 / (8 * half_life))
        classes = reuse_bins * 3
        self._uses = [[0.0] * _AGE_BUCKETS for _ in range(classes)]
        self._ends = [[0.0] * _AGE_BUCKETS for _ in range(classes)]
        self._density = [[0.0] * _AGE_BUCKETS for _ in range(classes)]
        self._ghosts: OrderedDict[bytes, tuple[int, int]] = OrderedDict()  # evicted key -> (class, last use)
        self._blocked: dict[int, list[list[Any]]] = {}  # depth -> entries of chunks held by their children
        self._clock = 0  # bytes inserted or touched so far; entry data: (bytes, depth, class, clock at last use)
        self._next_update = self._period

    def _bucket(self, age: float) -> int:
        return min(bisect.bisect_right(self._edges, age) - 1, _AGE_BUCKETS - 1)

    def _class(self, reuse: float, gap: float | None) -> int:
        use = 0 if gap is None else 1 if gap < self._unit else 2
        return min(int(reuse * self._reuse_bins), self._reuse_bins - 1) * 3 + use

    def _priority(self, data: tuple[int, int, int, int]) -> tuple[float, int, int]:
        nbytes, depth, cls, used = data
        return self._density[cls][self._bucket(self._clock - used)] / nbytes, -depth, used

    def _use(self, key: bytes, nbytes: int, depth: int, reuse: float, gap: float | None) -> None:
        self._clock += nbytes
        data = (nbytes, depth, self._class(reuse, gap), self._clock)
        self._push(key, self._priority(data), data)
        if self._clock >= self._next_update:
            self._next_update = self._clock + self._period
            self._update()

    def insert(self, key: bytes, nbytes: int, depth: int, reuse: float = 0.5) -> None:
        ghost = self._ghosts.pop(key, None)
        gap = None
        if ghost is not None:
            gap = self._clock - ghost[1]
            self._uses[ghost[0]][self._bucket(gap)] += 1
        self._use(key, nbytes, depth, reuse, gap)

    def touch(self, key: bytes, reuse: float = 0.5) -> None:
        old = self._entries.get(key)
        if old is not None:
            nbytes, depth, cls, used = old[4]
            gap = self._clock - used
            self._uses[cls][self._bucket(gap)] += 1
            self._use(key, nbytes, depth, reuse, gap)

    def remove(self, key: bytes) -> None:
        old = self._entries.get(key)
        super().remove(key)
        if old is None:
            return
        _, depth, cls, used = old[4]
        self._unblock(depth - 1)  # its parent may have become evictable
        self._ghosts[key] = (cls, used)
        while len(self._ghosts) > self._ghost_factor * max(len(self._entries), 1):
            cls, used = self._ghosts.popitem(last=False)[1]
            self._ends[cls][self._bucket(self._clock - used)] += 1

    def victim(self, evictable: Evictable) -> bytes | None:
        """The lowest-ranked evictable chunk (see the class docstring for the chunks set aside)."""
        found = super().victim(evictable)
        if found is None and self._blocked:  # a child may have left without this tier seeing it
            for depth in list(self._blocked):
                self._unblock(depth)
            found = super().victim(evictable)
        return found

    def _set_aside(self, entry: list[Any], evictable: Evictable) -> bool:
        held = getattr(evictable, "held_by_children", None)
        if held is None or not held(entry[2]):
            return False
        self._blocked.setdefault(entry[4][1], []).append(entry)  # by depth
        return True

    def _unblock(self, depth: int) -> None:
        """Put the entries of chunks at ``depth`` set aside back in the heap."""
        for entry in self._blocked.pop(depth, ()):
            if entry[3]:
                heapq.heappush(self._heap, entry)

    def _rebuild(self) -> None:
        super()._rebuild()
        self._blocked.clear()  # every valid entry is back in the heap

    def _update(self) -> None:
        """Decay the counts, recompute the densities and rerank every chunk."""
        for uses, ends, density in zip(self._uses, self._ends, self._density):
            above = intervals = occupancy = 0.0
            for b in reversed(range(_AGE_BUCKETS)):
                uses[b] *= self._decay
                ends[b] *= self._decay
                width = self._edges[b + 1] - self._edges[b]
                here = uses[b] + ends[b]
                occupancy += intervals * width + here * width / 2
                above += uses[b]
                intervals += here
                density[b] = above / occupancy if occupancy else 0.0
        for key, entry in self._entries.items():
            self._entries[key] = [self._priority(entry[4]), next(self._seq), key, True, entry[4]]
        self._rebuild()


_AGE_BUCKETS = 32
"""Half-octave age buckets of :class:`HitDensityPolicy`: up to 2**16 times its unit (1,024 capacities)."""


POLICIES: dict[str, type[EvictionPolicy]] = {
    "lru": LRUPolicy,
    "lfu": LFUPolicy,
    "s3fifo": S3FIFOPolicy,
    "cost": CostAwarePolicy,
    "turn-lru": TurnLRUPolicy,
    "hit-density": HitDensityPolicy,
}


def make_policy(name: str, capacity_bytes: int) -> EvictionPolicy:
    """Build a policy by name for a tier of ``capacity_bytes``."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ConfigError(f"unknown eviction policy {name!r}; known: {', '.join(sorted(POLICIES))}")
    return cls(capacity_bytes)
