"""The hit-rate replay: hand-made traces per policy, and equality with a real tensor store."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from kvtier.bench.hitrate import BELADY, INFINITE, drive, replay, trace_keys
from kvtier.bench.traces import Request, Trace, load_mooncake, long_doc_qa, multi_round_qa
from kvtier.kvstore.policies import POLICIES
from kvtier.kvstore.store import TieredStore
from kvtier.kvstore.tiers.memory import HostTier
from kvtier.kvstore.tiers.meta import MetaTier
from kvtier.layout import KVLayout

B = 4  # tokens per block in the hand-made traces


def trace(*requests: list[int], tails: int = 0) -> Trace:
    return Trace("hand", B, [Request(tuple(r), len(r) * B + tails) for r in requests])


def hit_rate(t: Trace, policy: str, blocks: int) -> float:
    return replay(t, policy, capacity_tokens=blocks * B).hit_rate


# Capacity 2: block 1 is used three times, then 2 and 3 arrive once each, then 1 again. LRU has forgotten 1
# (2 and 3 are newer); the frequency-aware policies keep it, and so does Belady. turn-lru is not frequency-aware:
# the repeats of [1] are its next turns, so by the time 2 arrives the one prompt seen at turn 0 was continued and
# new prompts look as promising as 1 is: it keeps the newer ones, as LRU does. hit-density has seen too few
# reuses by then to prefer 1: it evicts it, as LRU does.
FREQUENCY = trace([1], [1], [1], [2], [3], [1])
FREQUENCY_HITS = {"lru": 2, "lfu": 3, "s3fifo": 3, "cost": 3, "turn-lru": 2, "hit-density": 2, BELADY: 3,
                  INFINITE: 3}


@pytest.mark.parametrize("policy", sorted(POLICIES) + [BELADY, INFINITE])
def test_frequency_trace(policy: str) -> None:
    assert policy in FREQUENCY_HITS, f"add the expected hits of the new policy {policy!r}"
    assert hit_rate(FREQUENCY, policy, 2) == pytest.approx(FREQUENCY_HITS[policy] / 6)


@pytest.mark.parametrize("policy", sorted(POLICIES) + [BELADY])
def test_prefix_trace_evicts_leaves_only(policy: str) -> None:
    # Capacity 3: [a b c], [a d], [a b c], [a d]. Each put must evict, and the only evictable chunk is the
    # other branch's leaf (a and b have a child or are in use), so every policy hits a, a b, a: 4 blocks.
    t = trace([0, 1, 2], [0, 3], [0, 1, 2], [0, 3], tails=2)
    assert hit_rate(t, policy, 3) == pytest.approx(4 * B / (10 * B + 4 * 2))


def test_loop_defeats_lru_but_not_belady() -> None:
    t = trace([1], [2], [3], [1], [2], [3])
    assert hit_rate(t, "lru", 2) == 0
    assert hit_rate(t, BELADY, 2) == pytest.approx(2 / 6)
    assert hit_rate(t, INFINITE, 2) == pytest.approx(3 / 6)


def test_partial_tails_count_as_input_but_never_hit() -> None:
    t = trace([7, 8], [7, 8], tails=3)
    r = replay(t, "lru", capacity_tokens=10 * B)
    assert (r.hit_tokens, r.input_tokens) == (2 * B, 2 * (2 * B + 3))


def test_generators_are_seeded_and_shaped() -> None:
    a, b = multi_round_qa(users=6, rounds=3, concurrent=2, seed=1), multi_round_qa(users=6, rounds=3, concurrent=2, seed=1)
    assert a.requests == b.requests and len(a.requests) == 18
    assert a.requests != multi_round_qa(users=6, rounds=3, concurrent=2, seed=2).requests
    # every round after a user's first extends an earlier prompt; all share the system prompt's blocks
    extending = sum(any(r.blocks[: len(e.blocks)] == e.blocks for e in a.requests[:i]) for i, r in enumerate(a.requests))
    assert extending == 6 * 2
    shared = 1000 // 256
    assert all(r.blocks[:shared] == a.requests[0].blocks[:shared] for r in a.requests)
    tile = long_doc_qa(documents=3, repeats=2, mode="tile")
    inter = long_doc_qa(documents=3, repeats=2, mode="interleave")
    first = [r.blocks[0] for r in tile.requests]
    assert first[:3] == first[3:] and len(set(first)) == 3
    assert [r.blocks[0] for r in inter.requests][::2] == [r.blocks[0] for r in inter.requests][1::2]
    assert replay(inter, INFINITE).hit_rate == pytest.approx(replay(inter, "lru", capacity_tokens=20_000).hit_rate)


def test_mooncake_loader(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 1100, "output_length": 5, "hash_ids": [0, 1, 2]}\n'
                    '{"timestamp": 1, "input_length": 1024, "output_length": 5, "hash_ids": [0, 1]}\n')
    t = load_mooncake(path)
    assert [r.blocks for r in t.requests] == [(0, 1), (0, 1)] and t.input_tokens == 2124
    assert replay(t, "lru", capacity_tokens=4096).hit_tokens == 1024


@pytest.mark.parametrize(("line", "why"), [
    ("not json", "JSONDecodeError"), ('{"input_length": 10}', "hash_ids"),
    ('{"input_length": 2000, "hash_ids": [1]}', "2000 tokens has 1 blocks"),
    ('{"input_length": Infinity, "hash_ids": [1]}', "input_length must be an integer"),
    ('{"input_length": 1024.9, "hash_ids": [1, 2, 3]}', "input_length must be an integer"),
    ('{"input_length": "1024", "hash_ids": [1, 2]}', "input_length must be an integer"),
    ('{"input_length": true, "hash_ids": [1]}', "input_length must be an integer"),
    ('{"input_length": 1024, "hash_ids": "12"}', "hash_ids must be a list of integers"),
    ('{"input_length": 1024, "hash_ids": [1, 2.0]}', "hash_ids must be a list of integers"),
    ('{"input_length": 1024, "hash_ids": [1, %d]}' % 2**63, "hash_ids must be a list of integers"),
    ('{"input_length": 1024, "hash_ids": [1, %d]}' % (-2**63 - 1), "hash_ids must be a list of integers"),
    ('{"input_length": 512, "hash_ids": [1], "timestamp": "5"}', "timestamp must be a finite number"),
    ('{"input_length": 512, "hash_ids": [1], "timestamp": NaN}', "timestamp must be a finite number"),
    ("[600, [0, 1]]", "must be a JSON object"),
])
def test_a_bad_trace_line_is_named(tmp_path, line, why) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"input_length": 600, "hash_ids": [0, 1]}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=f"t.jsonl:3: .*{why}"):
        load_mooncake(path)
    with pytest.raises(ValueError, match="cannot read the trace"):
        load_mooncake(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(("options", "why"), [
    (["--limit", "0"], "--limit: 0 is less than 1"), (["--capacities", "3G"], "not a token count"),
    (["--capacities", "100"], "holds no 512-token block"), (["--headline", "5M"], "not one of --capacities"),
    (["--trace", "/no/such/trace"], "cannot read the trace"), (["--codecs", "int3"], "'int3' is not one of"),
    (["--policies", "lru,fifo"], "'fifo' is not one of"),
])
def test_bad_options_are_clear_errors(tmp_path, capsys, options, why) -> None:
    from kvtier.cli import main

    trace = tmp_path / "t.jsonl"
    trace.write_text('{"input_length": 600, "hash_ids": [0, 1]}\n')
    with pytest.raises(SystemExit) as exit_:
        main(["bench", "hitrate", "--trace", str(trace), "--no-generated", "--codecs", "none", *options])
    assert why in str(exit_.value.code) + capsys.readouterr().err


def test_ids_at_the_ends_of_64_bits_are_ids(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"input_length": 1024, "hash_ids": [-2**63, 2**63 - 1]}) + "\n")
    assert replay(load_mooncake(path), INFINITE).input_tokens == 1024


def test_timestamps_that_go_back_are_refused_by_line(tmp_path) -> None:
    """The replay follows file order: a trace out of time order would give another hit rate than it describes."""
    path = tmp_path / "t.jsonl"
    rows = [(0, [1]), (2000, [1]), (2000, [2]), (1000, [2])]
    path.write_text("".join(json.dumps({"timestamp": t, "input_length": 512, "hash_ids": ids}) + "\n"
                            for t, ids in rows))
    with pytest.raises(ValueError, match="t.jsonl:4: timestamp 1000 is before an earlier line's 2000"):
        load_mooncake(path)
    assert len(load_mooncake(path, limit=3).requests) == 3  # equal timestamps are in order


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_a_trace_without_requests_is_an_error(tmp_path, content) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="empty.jsonl: the trace has no requests"):
        load_mooncake(path)
    out = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "hitrate", "--trace", str(path),
                          "--no-generated", "--codecs", "none", "--policies", "lru", "--capacities", "1M"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "" and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == f"kvtier bench hitrate: error: {path}: the trace has no requests"


def test_replay_time_has_no_made_up_baseline(tmp_path, capsys) -> None:
    """Every ratio compares with something measured in the run: the replay time has nothing to compare with."""
    from kvtier.cli import main

    path = tmp_path / "t.jsonl"
    path.write_text('{"input_length": 1024, "hash_ids": [0, 1]}\n{"input_length": 1024, "hash_ids": [0, 1]}\n')
    main(["bench", "hitrate", "--trace", str(path), "--capacities", "2k", "--no-generated", "--codecs", "none",
          "--policies", "lru", "--json"])
    rows = {r["metric"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    timed = rows["t @2000 lru replay time (2 requests)"]
    assert timed["value"] > 0 and timed["baseline"] is None and timed["baseline_value"] is None
    assert timed["ratio"] is None
    assert rows["t @2000 lru hit rate"]["value"] == 0.5


def _token_blocks(t: Trace) -> list[np.ndarray]:
    """Token ids for each request: block id b becomes B copies of b; the tail gets fresh ids."""
    out = []
    fresh = 10**6
    for r in t.requests:
        ids = [np.full(B, b, dtype=np.int32) for b in r.blocks]
        tail = r.tokens - len(r.blocks) * B
        ids.append(np.arange(fresh, fresh + tail, dtype=np.int32))
        fresh += tail
        out.append(np.concatenate(ids))
    return out


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_replay_matches_a_tensor_store(policy: str) -> None:
    layout = KVLayout("tiny", num_layers=2, kv_heads=1, head_dim=64, dtype="float32", chunk_tokens=B, page_tokens=B)
    t = multi_round_qa(users=12, rounds=4, concurrent=5, system_tokens=8, history_tokens=10, question_tokens=3,
                       answer_tokens=5, block_tokens=B, seed=3)
    # The same capacity for both, as policies scale with it (hit-density's age buckets), a multiple of the tensor
    # tier's alignment (256) that holds 9 chunks in either: 4096 bytes of KV, plus 16 of token ids when
    # metadata-only
    capacity = 145 * 256
    meta = TieredStore([MetaTier("host", capacity)], layout=layout, metadata_only=True, policy=policy)
    drive(meta, t, trace_keys(t, layout))
    real = TieredStore([HostTier(capacity)], layout=layout, policy=policy, summaries=False)
    gen = torch.Generator().manual_seed(0)
    for tokens in _token_blocks(t):
        real.lookup(tokens)
        real.get(tokens)
        real.put(tokens, torch.randn(2, 2, 1, len(tokens), 64, generator=gen))
    m, r = meta.stats(), real.stats()
    assert m["hit_tokens"] > 0 and r["tiers"][0]["evictions"] > 0
    for field in ("lookup_tokens", "hit_tokens", "get_tokens", "put_chunks", "chunks"):
        assert m[field] == r[field], field
    assert [(x["hits"], x["evictions"], x["chunks"]) for x in m["tiers"]] == \
        [(x["hits"], x["evictions"], x["chunks"]) for x in r["tiers"]]


def test_with_a_disk_tier_belady_gets_both_tiers_capacity(capsys) -> None:
    """A host + disk store is compared with Belady at host + disk tokens: no policy beats the optimum."""
    from kvtier.cli import main

    main(["bench", "hitrate", "--limit", "1000", "--capacities", "100k,300k", "--disk-tokens", "3M",
          "--no-generated", "--codecs", "none", "--policies", "lru", "--json"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    ratios = [r["ratio"] for r in rows if r["metric"].endswith("lru hit rate")]
    assert len(ratios) == 2 and all(0 < r <= 1 for r in ratios)
