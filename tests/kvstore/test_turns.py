"""Conversation turns: how the store counts them and learns which are continued, and the ``turn-lru`` policy."""

from __future__ import annotations

import pytest

from kvtier.bench.hitrate import chunk_nbytes, replay, trace_layout
from kvtier.bench.traces import Request, Trace
from kvtier.kvstore.keys import chain_block_keys, root_key
from kvtier.kvstore.policies import TurnLRUPolicy
from kvtier.kvstore.store import TieredStore
from kvtier.kvstore.tiers.meta import MetaTier

B = 4  # tokens per block
LAYOUT = trace_layout(B)
ROOT = root_key(LAYOUT.fingerprint)


def k(i: int) -> bytes:
    return i.to_bytes(16, "little")


def evict(policy: TurnLRUPolicy, n: int) -> list[int]:
    out = []
    for _ in range(n):
        key = policy.victim(lambda key: True)
        policy.remove(key)
        out.append(int.from_bytes(key, "little"))
    return out


def test_turn_lru_is_lru_at_equal_reuse_and_keeps_likely_continued_chunks_longer() -> None:
    p = TurnLRUPolicy(capacity_bytes=5, reuse_weight=1.0)
    for i in range(3):
        p.insert(k(i), 1, 0)
    p.touch(k(0))
    assert evict(p, 3) == [1, 2, 0]
    # reuse 0.75 against 0.5: log(3) capacities (5.5 bytes) more recent than the turn-0 chunks after it
    p.insert(k(10), 1, 0, reuse=0.75)
    for i in range(11, 21):
        p.insert(k(i), 1, 0)
    assert evict(p, 11) == [11, 12, 13, 14, 15, 10, 16, 17, 18, 19, 20]


def test_a_touch_never_lowers_priority() -> None:
    p = TurnLRUPolicy(capacity_bytes=4)
    p.insert(k(0), 1, 0, reuse=0.9)  # a long conversation's prefix...
    p.insert(k(1), 1, 0)
    p.touch(k(0), reuse=0.1)  # ...that a new conversation branches off
    p.insert(k(2), 1, 0)
    assert evict(p, 3) == [1, 2, 0]


def store(chunks: int) -> TieredStore:
    return TieredStore([MetaTier("host", chunks * chunk_nbytes(LAYOUT))], layout=LAYOUT, metadata_only=True)


def serve(s: TieredStore, blocks: list[int]) -> list[int]:
    """Get then put a prompt of these block ids; returns the turn of each of its chunks."""
    keys = chain_block_keys(ROOT, blocks)
    s.get_keys(keys, ROOT)
    s.put_keys(keys, ROOT)
    return [s.index.get(key).turn for key in keys if key in s.index]


def test_store_counts_turns() -> None:
    s = store(100)
    assert serve(s, [0, 1]) == [0, 0]  # a new conversation
    assert serve(s, [0, 1, 2]) == [1, 1, 1]  # extends the end of an earlier prompt
    assert serve(s, [0, 1, 2, 3]) == [2, 2, 2, 2]
    assert serve(s, [0, 1]) == [2, 2]  # a prompt inside the cached prefix is at its turn
    assert serve(s, [0, 9]) == [2, 0]  # branches off a prefix another prompt continues: starts afresh
    assert serve(s, [0, 1, 2, 3, 4]) == [3, 3, 3, 3, 3]
    # new prompts at turns 0, 1, 2, 0, 3; those at 0 (one of two), 1 and 2 were continued
    assert [s.continuation(t) for t in range(5)] == [2 / 4, 2 / 3, 2 / 3, 1 / 3, 1 / 2]


def test_a_repeated_prompt_is_its_next_turn() -> None:
    s = store(100)
    assert serve(s, [0, 1]) == [0, 0]
    assert serve(s, [0, 1]) == [1, 1]  # the same full chunks again: a next turn that added less than a chunk
    assert serve(s, [0, 1, 2]) == [2, 2, 2]
    assert serve(s, [0, 1]) == [2, 2]  # ends inside a prefix another prompt continues: at its turn, no new prompt
    # new prompts at turns 0, 1 and 2; those at 0 and 1 were continued
    assert [s.continuation(t) for t in range(3)] == [2 / 3, 2 / 3, 1 / 3]


def test_store_remembers_turns_of_dropped_chunks() -> None:
    s = store(4)
    serve(s, [0, 1])
    serve(s, [0, 1, 2])  # turn 1
    for other in range(10, 13):  # LRU evicts the conversation's chunks 2 and 1
        serve(s, [0, other, other + 10])
    assert chain_block_keys(ROOT, [0, 1])[-1] not in s.index
    assert serve(s, [0, 1, 2, 3]) == [2, 2, 2, 2]  # still recognised as its third turn


def test_a_prompt_continued_through_several_dropped_chunks_stays_a_probability() -> None:
    """Prompts that each hold a different dropped chunk of one earlier prompt all count it as continued: the
    estimate stays below 1 and turn-lru, which takes its logit, keeps working."""
    s = TieredStore([MetaTier("host", 100 * chunk_nbytes(LAYOUT))], layout=LAYOUT, metadata_only=True,
                    policy="turn-lru")
    serve(s, [0, 3])
    s.delete_namespace("")  # the whole prompt is dropped; its turns are remembered
    serve(s, [0, 1])  # holds the dropped chunk 0
    serve(s, [0, 3, 4])  # holds the dropped chunk 3 of the same prompt
    assert 0 < s.continuation(0) < 1
    assert len(serve(s, [0, 2])) == 2  # its get touches chunk 0 at turn 0: a finite priority


# Capacity 6 blocks; block 0 is a system prompt every prompt starts with. A conversation goes on turn after
# turn while one-off prompts (never continued) go by: by the last request the store has seen that prompts at
# turn 0 are seldom continued, and turn-lru evicts the one-off prompts' chunks among themselves. LRU has
# evicted the conversation's third turn by then. Hits per request at most: 0 1 1 2 1 3 1 1 1 4.
CONVERSATION = [[0, 1], [0, 20], [0, 21], [0, 1, 2], [0, 22], [0, 1, 2, 3], [0, 23, 24], [0, 25, 26], [0, 27, 28],
                [0, 1, 2, 3, 4]]


@pytest.mark.parametrize(("policy", "hit_blocks"), [("lru", 12), ("turn-lru", 15)])
def test_turn_lru_keeps_a_conversation_through_one_off_prompts(policy: str, hit_blocks: int) -> None:
    trace = Trace("conversation", B, [Request(tuple(r), len(r) * B) for r in CONVERSATION])
    r = replay(trace, policy, capacity_tokens=6 * B)
    assert r.hit_tokens == hit_blocks * B


# Capacity 5 blocks; block 0 starts every prompt. Twenty one-off prompts teach the store that prompts at turn 0
# are seldom continued. A conversation then repeats its prompt at once (its next turn added less than a chunk,
# so it is at turn 1, a turn of unknown odds) and comes back twice, after four one-off prompts each time:
# turn-lru keeps it through them, LRU evicts it both times.
def _one_offs(first: int, n: int) -> list[list[int]]:
    return [[0, first + 2 * i, first + 2 * i + 1] for i in range(n)]


REPEATS = _one_offs(10, 20) + [[0, 1, 2], [0, 1, 2]] + _one_offs(50, 4) + [[0, 1, 2]] + _one_offs(60, 4) + [[0, 1, 2]]


@pytest.mark.parametrize(("policy", "hit_blocks"), [("lru", 31 + 2), ("turn-lru", 31 + 6)])
def test_turn_lru_keeps_a_conversation_that_repeats_its_prompt(policy: str, hit_blocks: int) -> None:
    trace = Trace("repeats", B, [Request(tuple(r), len(r) * B) for r in REPEATS])
    r = replay(trace, policy, capacity_tokens=5 * B)
    assert r.hit_tokens == hit_blocks * B  # block 0 in every prompt but the first; 1 2 in each repeat kept
