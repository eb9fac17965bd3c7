"""Belady's prefix-aware optimum against brute force over every eviction choice, on tiny traces."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from kvtier.bench.belady import BeladyPolicy
from kvtier.bench.hitrate import BELADY, chunk_nbytes, drive, replay, trace_keys, trace_layout
from kvtier.bench.traces import Request, Trace
from kvtier.kvstore.policies import POLICIES, Evictable, EvictionPolicy
from kvtier.kvstore.store import TieredStore
from kvtier.kvstore.tiers.meta import MetaTier

B = 4


class ScriptedPolicy(EvictionPolicy):
    """Evicts the ``choices[n]``-th evictable chunk (in insertion order) at its n-th decision (0 beyond the
    script) and records how many options each decision had."""

    name = "scripted"

    def __init__(self, choices: list[int]) -> None:
        self.choices = choices
        self.options: list[int] = []
        self._order: OrderedDict[bytes, None] = OrderedDict()

    def insert(self, key: bytes, nbytes: int, depth: int, reuse: float = 0.5) -> None:
        self._order[key] = None

    def touch(self, key: bytes, reuse: float = 0.5) -> None:
        pass

    def remove(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Evictable) -> bytes | None:
        options = [k for k in self._order if evictable(k)]
        if not options:
            return None
        n = len(self.options)
        self.options.append(len(options))
        return options[self.choices[n] if n < len(self.choices) else 0]


def hits_with(t: Trace, blocks: int, policy_for_keys) -> tuple[int, EvictionPolicy]:
    layout = trace_layout(B)
    keys = trace_keys(t, layout)
    store = TieredStore([MetaTier("host", blocks * chunk_nbytes(layout))], layout=layout, metadata_only=True)
    policy = store.policies[0] = policy_for_keys(keys)
    drive(store, t, keys, policy if isinstance(policy, BeladyPolicy) else None)
    return store.stats()["hit_tokens"], policy


def brute_force(t: Trace, blocks: int) -> int:
    """The most hit tokens any sequence of eviction choices gets."""
    best, runs = 0, 0
    stack: list[list[int]] = [[]]
    while stack:
        choices = stack.pop()
        hits, policy = hits_with(t, blocks, lambda keys: ScriptedPolicy(choices))
        runs += 1
        assert runs < 50_000, "trace too large for brute force"
        best = max(best, hits)
        for j in range(len(choices), len(policy.options)):
            for alt in range(1, policy.options[j]):
                stack.append(choices + [0] * (j - len(choices)) + [alt])
    return best


def random_trace(seed: int, requests: int = 9) -> Trace:
    """Conversations that branch and grow: each request extends, or shares a prefix with, an earlier one."""
    rng = random.Random(seed)
    prompts: list[tuple[int, ...]] = []
    next_id = 0
    out = []
    for _ in range(requests):
        if prompts and rng.random() < 0.6:
            base = rng.choice(prompts)
            base = base[: rng.randint(1, len(base))]
        else:
            base = ()
        new = rng.randint(0 if base else 1, 2)
        blocks = base + tuple(range(next_id, next_id + new))
        next_id += new
        prompts.append(blocks)
        out.append(Request(blocks, len(blocks) * B + rng.randint(0, B - 1)))
    return Trace(f"random-{seed}", B, out)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("blocks", [2, 3])
def test_belady_equals_brute_force(seed: int, blocks: int) -> None:
    t = random_trace(seed)
    best = brute_force(t, blocks)
    belady, _ = hits_with(t, blocks, BeladyPolicy)
    assert belady == best
    assert belady == replay(t, BELADY, capacity_tokens=blocks * B).hit_tokens
    for name in POLICIES:
        assert replay(t, name, capacity_tokens=blocks * B).hit_tokens <= best


def test_the_brute_force_traces_have_choices_that_matter() -> None:
    worse = sum(replay(random_trace(s), "lru", capacity_tokens=b * B).hit_tokens < brute_force(random_trace(s), b)
                for s in range(30) for b in (2, 3))
    assert worse >= 5


def test_next_use_follows_the_clock() -> None:
    policy = BeladyPolicy([[b"a"], [b"b"], [b"a"]])
    policy.at(0)
    assert policy.next_use(b"a") == 2 and policy.next_use(b"b") == 1
    policy.at(2)
    assert policy.next_use(b"a") == float("inf")
