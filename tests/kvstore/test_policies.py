import pytest

from kvtier.errors import ConfigError
from kvtier.kvstore.policies import POLICIES, CostAwarePolicy, LFUPolicy, LRUPolicy, S3FIFOPolicy, make_policy


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


def test_unknown_policy():
    with pytest.raises(ConfigError, match="unknown eviction policy 'fifo'"):
        make_policy("fifo", 10)
