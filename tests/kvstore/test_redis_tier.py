"""RedisTier against a real redis-server: round trips, partial reads, corruption, accounting, restart, failures."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import torch

redis = pytest.importorskip("redis")

from kvtier.compression.codec import get_codec  # noqa: E402
from kvtier.errors import LayoutError  # noqa: E402
from kvtier.kvstore.chunk import Chunk, blob_bytes, key_summary  # noqa: E402
from kvtier.kvstore.keys import chain_key  # noqa: E402
from kvtier.kvstore.store import TieredStore  # noqa: E402
from kvtier.kvstore.tiers.memory import HostTier  # noqa: E402
from kvtier.kvstore.tiers.disk import DiskTier  # noqa: E402
from kvtier.kvstore.tiers.redis import RedisTier, RedisTierError  # noqa: E402
from kvtier.layout import KVLayout  # noqa: E402

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs a redis-server binary"),
]

LAYOUT = KVLayout("redis-test", num_layers=4, kv_heads=2, head_dim=16, chunk_tokens=32, page_tokens=8)
PREFIX = "kvtier-test:"


@pytest.fixture
def raw(redis_proc) -> Iterator[redis.Redis]:
    """A plain client of the same server, to inspect or damage what the tier wrote."""
    client = redis.Redis(host=redis_proc.host, port=redis_proc.port)
    yield client
    client.close()


@pytest.fixture
def url(redis_proc, raw) -> Iterator[str]:
    """A URL of pytest-redis's server, emptied after the test."""
    yield f"redis://{redis_proc.host}:{redis_proc.port}/0"
    raw.flushdb()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server on port {port} did not start")


@pytest.fixture
def own_server() -> Iterator[tuple[int, list[subprocess.Popen]]]:
    """A redis-server of this test's own, which the test may kill and restart: ``(port, processes)``."""
    port = _free_port()
    procs = [_start_server(port)]
    yield port, procs
    for proc in procs:
        proc.kill()
        proc.wait()


def make_chunk(seed: int, parent: bytes = b"\0" * 16, namespace: str = "") -> Chunk:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(LAYOUT.chunk_shape, generator=g).to(torch.float16)
    tokens = np.random.default_rng(seed).integers(0, 50_000, LAYOUT.chunk_tokens, dtype=np.int32)
    return Chunk(chain_key(parent, tokens.tobytes()), parent, tokens, kv, key_summary(kv, LAYOUT.page_tokens),
                 namespace)


def stored_bytes(raw: redis.Redis) -> int:
    return sum(raw.strlen(k) for k in raw.scan_iter(match=PREFIX + "*"))


def new_out(layers: int = LAYOUT.num_layers) -> torch.Tensor:
    return torch.full((layers,) + LAYOUT.chunk_shape[1:], float("nan"), dtype=torch.float16)


@pytest.mark.parametrize("codec, max_value_bytes", [("raw", 4 << 20), ("raw", 4096), ("int8", 4096)])
def test_round_trip(url, raw, codec, max_value_bytes):
    tier = RedisTier(url, 1 << 30, codec, prefix=PREFIX, max_value_bytes=max_value_bytes)
    chunk = make_chunk(1, namespace="tenant")
    prepared = tier.prepare(chunk, LAYOUT)
    tier.commit(prepared)
    n_parts = -(-len(blob_bytes(chunk, LAYOUT, get_codec(codec))) // max_value_bytes)
    assert max_value_bytes > 4096 or n_parts > 1
    assert len(list(raw.scan_iter(match=PREFIX + "*"))) == n_parts + 1
    assert tier.contains(chunk.key) and len(tier) == 1
    assert tier.used_bytes == prepared.nbytes == stored_bytes(raw)

    want = chunk.kv
    if codec != "raw":
        c = get_codec(codec)
        want = torch.empty_like(chunk.kv)
        c.decode(c.encode(chunk.kv), want)
    out = new_out()
    got = tier.get(chunk.key, out)
    assert got is not None and got.kv is out and torch.equal(out, want)
    assert (got.key, got.parent, got.namespace) == (chunk.key, chunk.parent, "tenant")
    assert np.array_equal(got.tokens, chunk.tokens)
    # a non-contiguous buffer (a slice of a wider one, as the store passes) takes the decode path
    wide = torch.zeros(LAYOUT.chunk_shape[:3] + (3 * LAYOUT.chunk_tokens, LAYOUT.head_dim), dtype=torch.float16)
    assert tier.get(chunk.key, wide[:, :, :, 32:64]) is not None
    assert torch.equal(wide[:, :, :, 32:64], want) and not wide[:, :, :, :32].any()
    assert torch.equal(tier.summary(chunk.key), chunk.summary)
    assert (tier.stats.hits, tier.stats.misses, tier.stats.corrupt) == (2, 0, 0)
    tier.close()


def test_layer_subset_reads_only_those_layers(url):
    tier = RedisTier(url, 1 << 30, prefix=PREFIX, max_value_bytes=4096)
    chunk = make_chunk(2)
    tier.commit(tier.prepare(chunk, LAYOUT))
    out = new_out(2)
    got = tier.get(chunk.key, out, range(1, 3))
    assert got is not None and torch.equal(out, chunk.kv[1:3])
    assert tier.stats.bytes_read < chunk.kv.nbytes * 2 / 3  # two of four layers, plus header and tokens
    [last] = tier.get_many([chunk.key], [new_out(1)], range(3, 4))
    assert last is not None and torch.equal(last.kv, chunk.kv[3:])
    with pytest.raises(LayoutError, match="layers"):
        tier.get(chunk.key, new_out(2), range(3, 5))
    with pytest.raises(LayoutError, match="out buffer"):
        tier.get(chunk.key, new_out(3), range(0, 2))
    assert tier.contains(chunk.key) and tier.stats.corrupt == 0  # a caller's mistake deletes nothing


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing part"])
def test_damaged_chunk_is_a_miss_deleted_and_counted(url, raw, damage):
    tier = RedisTier(url, 1 << 30, prefix=PREFIX, max_value_bytes=4096)
    chunk, other = make_chunk(3), make_chunk(4)
    tier.commit_many([tier.prepare(chunk, LAYOUT), tier.prepare(other, LAYOUT)])
    part = f"{PREFIX}{chunk.key.hex()}:1"
    if damage == "garbage":  # same length: only the checksums can tell
        raw.set(part, np.random.default_rng(0).bytes(raw.strlen(part)))
    elif damage == "truncated":
        raw.set(part, raw.getrange(part, 0, 99))
    else:
        raw.delete(part)
    got = tier.get_many([chunk.key, other.key], [new_out(), new_out()])
    assert got[0] is None and got[1] is not None and torch.equal(got[1].kv, other.kv)
    assert (tier.stats.corrupt, tier.stats.misses, tier.stats.hits) == (1, 1, 1)
    assert not tier.contains(chunk.key) and len(tier) == 1
    assert not list(raw.scan_iter(match=f"{PREFIX}{chunk.key.hex()}:*"))
    assert tier.used_bytes == stored_bytes(raw)


def test_capacity_accounting_is_exact(url, raw):
    chunks = [make_chunk(i) for i in range(3)]
    tier = RedisTier(url, 1 << 20, prefix=PREFIX, max_value_bytes=8192)
    prepared = [tier.prepare(c, LAYOUT) for c in chunks]
    assert tier.can_fit(sum(p.nbytes for p in prepared))
    assert not RedisTier(url, 1000, prefix=PREFIX).can_fit(prepared[0].nbytes)
    tier.commit_many(prepared)
    assert tier.used_bytes == sum(p.nbytes for p in prepared) == stored_bytes(raw)
    tier.commit(tier.prepare(chunks[0], LAYOUT))  # storing a chunk again replaces it
    assert tier.used_bytes == sum(p.nbytes for p in prepared) == stored_bytes(raw)
    assert tier.delete(chunks[1].key) == prepared[1].nbytes and tier.delete(chunks[1].key) == 0
    assert tier.used_bytes == prepared[0].nbytes + prepared[2].nbytes == stored_bytes(raw)
    again = RedisTier(url, 1 << 20, prefix=PREFIX)  # a restart counts the same bytes
    assert again.used_bytes == tier.used_bytes and len(again) == 2
    assert {c.key for c, _ in again.scan()} == {chunks[0].key, chunks[2].key}


def test_unreadable_index_entry_is_deleted_at_start_up(url, raw):
    tier = RedisTier(url, 1 << 30, prefix=PREFIX, max_value_bytes=4096)
    good, bad = make_chunk(5), make_chunk(6)
    tier.commit_many([tier.prepare(good, LAYOUT), tier.prepare(bad, LAYOUT)])
    raw.set(f"{PREFIX}{bad.key.hex()}:m", b"KVTM not an index entry")
    again = RedisTier(url, 1 << 30, prefix=PREFIX)
    assert [c.key for c, _ in again.scan()] == [good.key]
    assert again.stats.corrupt == 1 and again.used_bytes == stored_bytes(raw)
    assert not list(raw.scan_iter(match=f"{PREFIX}{bad.key.hex()}:*"))


def prompt(seed: int, n_chunks: int) -> tuple[np.ndarray, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = n_chunks * LAYOUT.chunk_tokens
    tokens = np.random.default_rng(seed).integers(0, 50_000, n, dtype=np.int32)
    kv = torch.randn(LAYOUT.chunk_shape[:3] + (n, LAYOUT.head_dim), generator=g).to(torch.float16)
    return tokens, kv


def test_store_restart_recovers_chunks_from_redis(url):
    tokens, kv = prompt(7, 3)
    store = TieredStore([HostTier(1 << 20), RedisTier(url, 1 << 30, prefix=PREFIX)], LAYOUT,
                        write_through=[False, True])
    assert store.put(tokens, kv).stored == 3
    assert all(ref.tiers == ["host", "redis"] for ref in store.lookup(tokens).chunks)
    store.close()

    store = TieredStore([HostTier(1 << 20), RedisTier(url, 1 << 30, prefix=PREFIX)], LAYOUT,
                        write_through=[False, True])
    found = store.lookup(tokens)
    assert found.tokens == len(tokens) and all(ref.tiers == ["redis"] for ref in found.chunks)
    got = store.get(tokens)
    assert got.tokens == len(tokens) and got.tiers == ["redis"] * 3 and torch.equal(got.kv, kv)
    assert all(ref.tiers == ["host", "redis"] for ref in store.lookup(tokens).chunks)  # promoted
    store.close()


def test_store_demotes_from_host_to_redis(url):
    host_room = 2 * HostTier(1 << 20, prefault=False).prepare(make_chunk(0), LAYOUT).nbytes
    store = TieredStore([HostTier(host_room), RedisTier(url, 1 << 30, prefix=PREFIX)], LAYOUT)
    first, first_kv = prompt(8, 2)
    second, second_kv = prompt(9, 2)
    store.put(first, first_kv)
    store.put(second, second_kv)  # the host holds two chunks: the first prompt's go down to Redis
    assert all(ref.tiers == ["redis"] for ref in store.lookup(first).chunks)
    assert store.stats()["demotions"] == 2
    got = store.get(first)
    assert got.tiers == ["redis", "redis"] and torch.equal(got.kv, first_kv)
    assert torch.equal(store.get(second).kv, second_kv)
    store.close()


def test_server_failures_are_misses_or_errors_and_close_never_hangs(own_server):
    port, procs = own_server
    url = f"redis://127.0.0.1:{port}/0"
    tier = RedisTier(url, 1 << 30, prefix=PREFIX, timeout_s=1.0)
    kept, lost = make_chunk(10), make_chunk(11)
    tier.commit_many([tier.prepare(kept, LAYOUT), tier.prepare(lost, LAYOUT)])
    procs[0].kill()
    procs[0].wait()

    assert tier.summary(kept.key) is None and tier.contains(kept.key)  # a summary that failed keeps the chunk
    assert tier.get(lost.key, new_out()) is None
    assert tier.stats.errors == 2 and tier.stats.misses == 1 and tier.stats.corrupt == 0
    assert tier.contains(lost.key) and len(tier) == 2  # a read that failed is no reason to drop the chunk
    prepared = tier.prepare(make_chunk(12), LAYOUT)
    with pytest.raises(RedisTierError, match="storing 1 chunk"):
        tier.commit(prepared)
    assert len(tier) == 2 and tier.used_bytes == 2 * tier.prepare(kept, LAYOUT).nbytes
    assert tier.delete(kept.key) > 0 and len(tier) == 1  # never raises: retried with the next write

    procs.append(_start_server(port))  # the server is back (empty): the tier reconnects
    assert tier.get(lost.key, new_out()) is None and not tier.contains(lost.key)  # now gone for good: dropped
    assert tier.stats.corrupt == 1 and tier.used_bytes == 0
    tier.commit(tier.prepare(kept, LAYOUT))
    assert torch.equal(tier.get(kept.key, new_out()).kv, kept.kv)
    procs[1].kill()
    procs[1].wait()
    tier.close()  # never hangs (the suite's timeout would catch it): one try, within the timeout
    with pytest.raises(RedisTierError, match="cannot read its chunks"):
        RedisTier(url, 1 << 30, prefix=PREFIX, timeout_s=1.0)


def test_store_keeps_working_while_redis_is_down(own_server):
    port, procs = own_server
    host = HostTier(2 * HostTier(1 << 20, prefault=False).prepare(make_chunk(0), LAYOUT).nbytes)
    store = TieredStore([host, RedisTier(f"redis://127.0.0.1:{port}/0", 1 << 30, prefix=PREFIX, timeout_s=1.0)],
                        LAYOUT, write_through=[False, True])
    procs[0].kill()
    procs[0].wait()
    first, first_kv = prompt(13, 2)
    second, second_kv = prompt(14, 2)
    assert store.put(first, first_kv).stored == 2  # the write-through copies fail: the host keeps the chunks
    assert [ref.tiers for ref in store.lookup(first).chunks] == [["host"], ["host"]]
    assert torch.equal(store.get(first).kv, first_kv)
    assert store.put(second, second_kv).stored == 2  # no demotion possible: the first prompt is dropped
    assert store.lookup(first).tokens == 0 and torch.equal(store.get(second).kv, second_kv)
    assert len(host) == 2 and host.used_bytes == host.capacity_bytes


def test_a_full_redis_refuses_writes_without_piling_up_deletes(own_server):
    """maxmemory with noeviction: every write fails; the names queued for deletion stay those of the last failed
    write (each commit's DEL of them succeeds), and once there is room again nothing is left behind."""
    port, _ = own_server
    raw = redis.Redis(port=port)
    raw.config_set("maxmemory", "2mb")
    raw.config_set("maxmemory-policy", "noeviction")
    with pytest.raises(redis.ResponseError):
        for i in range(10_000):
            raw.set(f"filler:{i}", b"x" * 4096)
    tier = RedisTier(f"redis://127.0.0.1:{port}/0", 1 << 30, prefix=PREFIX)
    for seed in range(50):
        prepared = tier.prepare(make_chunk(100 + seed), LAYOUT)
        with pytest.raises(RedisTierError, match="storing 1 chunk"):
            tier.commit(prepared)
    assert len(tier._stale) <= 2 and len(tier) == 0  # the names of one chunk: its data and its metadata
    raw.flushdb()
    chunk = make_chunk(7)
    tier.commit(tier.prepare(chunk, LAYOUT))
    names = set(tier._names(chunk.key, tier._entries[chunk.key]))
    assert set(raw.scan_iter(match=PREFIX + "*")) == names  # no key of the failed writes is left
    raw.close()


def test_a_redis_server_that_stalls_during_a_get_loses_nothing(own_server, tmp_path):
    """A real stall (SIGSTOP for one get, longer than the tier's timeout) is a miss for that get only: the chunk
    stays in Redis and the chunks below it on disk stay too; once the server answers, the whole prompt is served."""
    port, procs = own_server
    url = f"redis://127.0.0.1:{port}/0"
    one = RedisTier(url, 1 << 30, prefix=PREFIX).prepare(make_chunk(0), LAYOUT).nbytes
    store = TieredStore([RedisTier(url, one, prefix=PREFIX, timeout_s=0.5), DiskTier(tmp_path, 1 << 30)], LAYOUT)
    tokens, kv = prompt(15, 3)
    store.put(tokens, kv)  # room for one chunk in Redis: the deeper two are demoted to disk
    assert [ref.tiers for ref in store.lookup(tokens).chunks] == [["redis"], ["disk"], ["disk"]]
    procs[0].send_signal(signal.SIGSTOP)
    try:
        assert store.get(tokens).tokens == 0  # a miss, not a drop
    finally:
        procs[0].send_signal(signal.SIGCONT)
    assert store.lookup(tokens).tokens == 3 * LAYOUT.chunk_tokens and store.counters.drops == 0
    assert torch.equal(store.get(tokens).kv, kv)


def test_a_delete_that_missed_the_server_is_sent_by_close(own_server, monkeypatch):
    """A delete whose command never reaches the server (a connection lost: injected, since a stalled server still
    runs the command once it wakes) is done here and queued; the close sends it, so the chunk does not come back
    at the next start."""
    port, _ = own_server
    url = f"redis://127.0.0.1:{port}/0"
    tier = RedisTier(url, 1 << 30, prefix=PREFIX)
    gone, kept = make_chunk(20), make_chunk(21)
    tier.commit_many([tier.prepare(gone, LAYOUT), tier.prepare(kept, LAYOUT)])
    real = redis.client.Pipeline.execute

    def lost(self, *args, **kwargs):
        monkeypatch.setattr(redis.client.Pipeline, "execute", real)
        raise redis.ConnectionError("connection lost (injected)")

    monkeypatch.setattr(redis.client.Pipeline, "execute", lost)
    assert tier.delete(gone.key) > 0 and tier.stats.errors == 1
    tier.close()
    again = RedisTier(url, 1 << 30, prefix=PREFIX)
    assert {c.key for c, _ in again.scan()} == {kept.key} and len(again) == 1


class CuttingProxy:
    """A TCP proxy to a redis-server on ``port`` that, once :meth:`cut_after` is called, forwards that many more
    bytes of what its clients send and then closes both ends: a connection really lost in the middle of a
    command stream (no mock: the server sees exactly that)."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.allow: int | None = None  # bytes still to forward once armed
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def cut_after(self, nbytes: int) -> None:
        self.allow = nbytes

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._forward, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._forward, args=(server, client, False), daemon=True).start()

    def _forward(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if upstream and self.allow is not None and len(data) >= self.allow:
                    dst.sendall(data[: self.allow])
                    break
                if upstream and self.allow is not None:
                    self.allow -= len(data)
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            s.close()


def test_a_commit_cut_off_midway_leaves_nothing_in_redis(own_server):
    """A commit is one transaction: a connection lost after some of its parts reached the server (and this process
    gone before any retry) leaves no part behind, where parts without their index entry would never be deleted."""
    port, _ = own_server
    proxy = CuttingProxy(port)
    raw = redis.Redis(port=port)
    try:
        tier = RedisTier(f"redis://127.0.0.1:{proxy.port}/0", 1 << 30, prefix=PREFIX, max_value_bytes=4096)
        prepared = tier.prepare(make_chunk(30), LAYOUT)
        parts = prepared.payload[1]
        assert len(parts) >= 4
        proxy.cut_after(3 * len(parts[0]))  # the first two parts' commands arrive whole, the rest and EXEC never
        with pytest.raises(RedisTierError, match="storing 1 chunk"):
            tier.commit(prepared)
        time.sleep(0.2)  # the server has read what arrived and seen the connection close
        assert raw.dbsize() == 0
        assert len(RedisTier(f"redis://127.0.0.1:{port}/0", 1 << 30, prefix=PREFIX)) == 0
    finally:
        proxy.close()
        raw.close()


def test_a_commit_after_deletes_that_did_not_reach_the_server(own_server):
    """Deletes that failed are sent before the next commit, on their own; while they cannot be sent, the commit is
    refused too (else a chunk stored again could be deleted by them later). Connections really cut by a proxy."""
    port, _ = own_server
    proxy = CuttingProxy(port)
    try:
        tier = RedisTier(f"redis://127.0.0.1:{proxy.port}/0", 1 << 30, prefix=PREFIX, max_value_bytes=4096)
        again, other = make_chunk(50), make_chunk(51)
        tier.commit_many([tier.prepare(again, LAYOUT), tier.prepare(other, LAYOUT)])
        proxy.cut_after(0)
        assert tier.delete(again.key) > 0 and tier._stale  # its DEL never arrived: queued
        with pytest.raises(RedisTierError, match="deletes queued before"):
            tier.commit(tier.prepare(again, LAYOUT))
        assert not tier.contains(again.key)
        proxy.allow = None  # the network is back
        tier.commit(tier.prepare(again, LAYOUT))  # the queued DEL first, then the chunk
        assert not tier._stale and tier.delete(other.key) > 0
        assert torch.equal(tier.get(again.key, new_out()).kv, again.kv) and tier.stats.corrupt == 0
    finally:
        proxy.close()


def test_a_user_denied_transactions_still_stores(own_server, caplog):
    """An ACL that denies MULTI/EXEC: the tier warns and commits with plain pipelines."""
    port, _ = own_server
    raw = redis.Redis(port=port)
    raw.acl_setuser("plain", enabled=True, passwords=["+pw"], keys=[PREFIX + "*"],
                    commands=["+@read", "+@write", "+ping", "+hello", "+scan", "-multi", "-exec"])
    try:
        tier = RedisTier(f"redis://plain:pw@127.0.0.1:{port}/0", 1 << 30, prefix=PREFIX)
        assert "transactions are refused" in caplog.text
        chunk = make_chunk(60)
        tier.commit(tier.prepare(chunk, LAYOUT))
        assert torch.equal(tier.get(chunk.key, new_out()).kv, chunk.kv)
        tier.close()
    finally:
        raw.close()


def test_a_prefix_followed_by_hex_digits_is_another_tiers(url, raw):
    """``kvtier-test:`` lists ``kvtier-test:*:m``, which also matches the keys of a tier on ``kvtier-test:ab``: they
    are not this tier's chunks (their keys would be 17 bytes), so they are neither counted nor deleted."""
    other = RedisTier(url, 1 << 30, prefix=PREFIX + "ab")
    chunk = make_chunk(70)
    other.commit(other.prepare(chunk, LAYOUT))
    mine = RedisTier(url, 1 << 30, prefix=PREFIX)
    assert len(mine) == 0 and mine.stats.corrupt == 0
    assert RedisTier(url, 1 << 30, prefix=PREFIX + "ab").contains(chunk.key)
