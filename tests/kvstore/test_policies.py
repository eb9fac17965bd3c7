import typing

import pytest

from kvtier.config import TierConfig
from kvtier.errors import ConfigError
from kvtier.kvstore.policies import (POLICIES, CostAwarePolicy, HitDensityPolicy, LFUPolicy, LRUPolicy, S3FIFOPolicy,
                                    make_policy)


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def always(key: bytes) -> bool:
    return True


def evict(policy, n: int, evictable=always) -> list[int]:
    out = []
    for _ in range(n):
        key = policy.victim(evictable)
        if key is None:
            break
        policy.remove(key)
        out.append(int.from_bytes(key, "little"))
    return out


def test_lru_order_and_skip():
    p = LRUPolicy()
    for i in range(4):
        p.insert(k(i), 1, 0)
    p.touch(k(0))
    assert evict(p, 4, lambda key: key != k(1)) == [2, 3, 0]


def test_lfu_keeps_frequent_and_ages():
    p = LFUPolicy()
    for i in range(3):
        p.insert(k(i), 1, 0)
    for _ in range(5):
        p.touch(k(0))
    p.touch(k(1))
    assert evict(p, 1) == [2]
    # aging: a new entry starts at the evicted priority, so old popularity does not last forever
    p.insert(k(3), 1, 0)
    assert evict(p, 2) == [1, 3]


def test_cost_aware_prefers_cheap_chunks():
    p = CostAwarePolicy(attn_share=0.5)
    p.insert(k(0), 100, 10)  # deep: expensive to recompute
    p.insert(k(1), 100, 0)
    p.insert(k(2), 1000, 10)  # deep but large: cost per byte is lowest
    assert evict(p, 3) == [2, 1, 0]


def test_s3fifo_filters_one_hit_wonders():
    p = S3FIFOPolicy(capacity_bytes=10)
    for i in range(10):
        p.insert(k(i), 1, 0)
    for i in range(5):
        p.touch(k(i))  # used twice
    victims = evict(p, 5)
    assert sorted(victims) == [5, 6, 7, 8, 9]
    # an evicted key that comes back goes to the main queue (ghost hit) and outlives new one-hit keys
    p.insert(k(5), 1, 0)
    for i in range(20, 24):
        p.insert(k(i), 1, 0)
    assert 5 not in evict(p, 4)


def test_victim_none_when_nothing_evictable():
    for name, cls in POLICIES.items():
        p = make_policy(name, 10)
        p.insert(k(0), 1, 0)
        assert p.victim(lambda key: False) is None
        assert p.victim(always) == k(0)


def test_the_config_accepts_exactly_the_registered_policies():
    """The config names its policies as a Literal (for a clear schema and error) without importing the store."""
    assert set(typing.get_args(TierConfig.model_fields["policy"].annotation)) == set(POLICIES)


def test_unknown_policy():
    with pytest.raises(ConfigError, match="unknown eviction policy 'fifo'"):
        make_policy("fifo", 10)


def test_hit_density_keeps_chunks_close_to_their_reuse_age():
    # Every chunk is used once, 40 bytes (inserts and touches) after its insertion, and then dropped: the
    # youngest chunks are the furthest from a hit, so they go first (LRU would evict 180 first).
    p = HitDensityPolicy(capacity_bytes=64)
    for i in range(200):
        p.insert(k(i), 1, 0)
        if i >= 20:
            p.touch(k(i - 20))
            p.remove(k(i - 20))
    assert sorted(evict(p, 4)) == [196, 197, 198, 199]


def test_hit_density_learns_from_evicted_chunks_that_come_back():
    # Chunks of both classes are evicted at the same young age; only the likely continued ones (reuse 0.9) are
    # inserted again later. The policy remembers them, counts the hits it missed, and then evicts the others
    # first, although LRU order interleaves them (1146, 2146, 1134, 1147, ...).
    p = HitDensityPolicy(capacity_bytes=64)
    hot, cold = 1000, 2000
    for i in range(150):
        p.insert(k(hot + i), 1, 0, reuse=0.9)
        p.insert(k(cold + i), 1, 0, reuse=0.1)
        if i >= 4:
            p.remove(k(hot + i - 4))
            p.remove(k(cold + i - 4))
        if i >= 12:
            p.insert(k(hot + i - 12), 1, 0, reuse=0.9)
        if i >= 16:
            p.remove(k(hot + i - 16))
    assert sorted(evict(p, 4)) == [2146, 2147, 2148, 2149]
    assert all(v < cold for v in evict(p, 10))


def test_hit_density_sets_aside_chunks_that_are_not_evictable():
    # With nothing learned yet, the deepest goes first. A chunk found not evictable comes back when a chunk one
    # deeper leaves, or when nothing else is left.
    p = HitDensityPolicy(capacity_bytes=64)
    for i, depth in enumerate([3, 1, 2, 4]):
        p.insert(k(i), 1, depth)
    assert p.victim(lambda key: key not in (k(0), k(3))) == k(2)
    p.remove(k(2))
    p.remove(k(3))  # depth 4: chunk 0 (depth 3) is back in the running
    assert p.victim(always) == k(0)
    assert p.victim(lambda key: key == k(1)) == k(1)  # chunk 0 set aside again
    p.remove(k(1))
    assert p.victim(always) == k(0)  # nothing else is left


def test_s3fifo_evicts_from_main_when_nothing_in_small_can_go():
    """The small queue holds its share, but its one chunk is not evictable (pinned, or a parent): the victim
    comes from the main queue rather than none at all."""
    p = S3FIFOPolicy(capacity_bytes=10)
    p.insert(k(1), 1, 0)
    p.touch(k(1))
    assert p.victim(lambda key: key != k(1)) is None  # only chunk: promoted to main, not evictable
    p.insert(k(2), 2, 0)  # the small queue's 2 bytes are over its 10% share
    assert p.victim(lambda key: key == k(1)) == k(1)


@pytest.mark.parametrize("policy", [LFUPolicy(), CostAwarePolicy()], ids=["lfu", "cost"])
def test_greedy_dual_ages_on_evictions_only(policy):
    """A delete is not an eviction: it leaves the aging term alone, so a hot chunk deleted does not make every
    other chunk look old."""
    policy.insert(k(1), 1, 0)
    for _ in range(9):
        policy.touch(k(1))  # used 10 times
    policy.insert(k(2), 1, 0)
    for _ in range(50):
        policy.touch(k(2))
    policy.remove(k(2))  # deleted, nothing evicted
    policy.insert(k(3), 1, 0)  # used once
    assert evict(policy, 2) == [3, 1]


@pytest.mark.parametrize("name", ["lfu", "cost", "turn-lru", "hit-density"])
def test_heaps_stay_within_twice_the_chunks_held(name):
    p = make_policy(name, capacity_bytes=1000)
    for i in range(10):
        p.insert(k(i), 1, 0)
    for step in range(20_000):
        p.touch(k(step % 10))
        p.insert(k(100 + step), 1, 0)
        p.remove(k(100 + step))
    assert len(p._heap) <= 2 * len(p._entries) + 64
    assert sorted(evict(p, 20)) == list(range(10))


class _HeldByChildren:
    """An Evictable that names the chunks held only by their children (as the store's is)."""

    def __init__(self, held: set[bytes], refused: set[bytes] = frozenset()) -> None:
        self.held, self.refused = held, refused

    def __call__(self, key: bytes) -> bool:
        return key not in self.held and key not in self.refused

    def held_by_children(self, key: bytes) -> bool:
        return key in self.held


def test_hit_density_sets_aside_only_chunks_held_by_children():
    """A chunk refused for another reason (pinned, failed) is the victim again once it may go; one held by a
    child returns when a chunk one deeper leaves."""
    p = HitDensityPolicy(capacity_bytes=1 << 20)
    for depth in range(4):
        p.insert(k(depth), 1, depth)  # a chain; equal density: the deepest goes first
    assert p.victim(_HeldByChildren(set(), refused={k(3)})) == k(2)
    assert p.victim(_HeldByChildren(set())) == k(3)  # no longer refused: first again
    assert p.victim(_HeldByChildren({k(3), k(2)})) == k(1)  # both set aside (as if children held them)
    assert p.victim(_HeldByChildren(set(), refused={k(3)})) == k(1)  # k(2) still aside: nothing one deeper left
    p.remove(k(3))
    assert p.victim(_HeldByChildren(set())) == k(2)  # its child left: back
