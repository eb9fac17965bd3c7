"""Redis tier bandwidth against redis-py itself: the same bytes, the same pipelining, in one run.

For ``n_chunks`` random chunks of a layout, ``measure_redis`` times:

- put: ``RedisTier.commit`` of one prepared chunk at a time, and ``commit_many`` of ``batch`` chunks, against a
  plain redis-py client (hiredis, default settings) doing ``SET`` of each chunk's blob bytes, one command at a
  time and in pipelines of ``batch``;
- get: ``RedisTier.get`` / ``get_many`` into a preallocated buffer (every checksum verified), against
  ``GET`` of the same blobs the same way (bytes returned, nothing checked).

Each figure is the median of ``repeats`` passes over all chunks, tier and baseline passes interleaved.
Everything written is deleted afterwards. Bandwidth counts KV bytes (the layout's chunk bytes).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import redis
import torch

from kvtier.bench.report import Row
from kvtier.kvstore.chunk import Chunk, blob_bytes, key_summary
from kvtier.kvstore.keys import chain_key, root_key
from kvtier.kvstore.tiers.redis import RedisTier
from kvtier.layout import KVLayout


def _time_gbps(nbytes: int, fn: Callable[[], None], times: list[float]) -> None:
    """Run ``fn`` and append its bandwidth over ``nbytes`` to ``times``."""
    start = time.perf_counter()
    fn()
    times.append(nbytes / (time.perf_counter() - start) / 1e9)


def measure_redis(url: str, layout: KVLayout, n_chunks: int, batch: int = 8, repeats: int = 5,
                  max_value_bytes: int = 4 << 20) -> list[Row]:
    """Put/get GB/s of a RedisTier at ``url`` against raw redis-py SET/GET of the same blobs."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    root = root_key(layout.fingerprint)
    chunks = []
    for _ in range(n_chunks):
        kv = torch.randn(layout.chunk_shape).to(layout.torch_dtype)
        tokens = rng.integers(0, 50_000, layout.chunk_tokens, dtype=np.int32)
        chunks.append(Chunk(chain_key(root, tokens.tobytes()), root, tokens, kv, key_summary(kv, layout.page_tokens)))
    tier = RedisTier(url, 1 << 62, name="bench", prefix="kvtier-bench:", max_value_bytes=max_value_bytes)
    raw = redis.Redis.from_url(url)
    blobs = [blob_bytes(c, layout, tier.codec) for c in chunks]
    names = [f"kvtier-bench-raw:{i}".encode() for i in range(n_chunks)]
    out = [torch.empty(layout.chunk_shape, dtype=layout.torch_dtype) for _ in range(batch)]
    groups = [list(range(i, min(n_chunks, i + batch))) for i in range(0, n_chunks, batch)]
    total = n_chunks * layout.chunk_bytes

    def tier_put_one() -> None:
        for c in chunks:
            tier.commit(tier.prepare(c, layout))

    def tier_put_many() -> None:
        for g in groups:
            tier.commit_many([tier.prepare(chunks[i], layout) for i in g])

    def tier_get_one() -> None:
        for c in chunks:
            if tier.get(c.key, out[0]) is None:
                raise RuntimeError("redis bench: a chunk just stored was not found")

    def tier_get_many() -> None:
        for g in groups:
            if None in tier.get_many([chunks[i].key for i in g], out[: len(g)]):
                raise RuntimeError("redis bench: a chunk just stored was not found")

    def raw_put_one() -> None:
        for name, blob in zip(names, blobs):
            raw.set(name, blob)

    def raw_put_many() -> None:
        for g in groups:
            pipe = raw.pipeline(transaction=False)
            for i in g:
                pipe.set(names[i], blobs[i])
            pipe.execute()

    def raw_get_one() -> None:
        for name in names:
            raw.get(name)

    def raw_get_many() -> None:
        for g in groups:
            pipe = raw.pipeline(transaction=False)
            for i in g:
                pipe.get(names[i])
            pipe.execute()

    def tier_clear() -> None:
        for c in chunks:
            tier.delete(c.key)

    def raw_clear() -> None:
        raw.delete(*names)

    cases = [  # puts start from an empty server; gets read what the last put pass wrote
        ("put, one chunk a call", tier_put_one, raw_put_one, "redis-py SET", True),
        (f"put, {batch} chunks a call", tier_put_many, raw_put_many, f"redis-py SET, pipelines of {batch}", True),
        ("get, one chunk a call", tier_get_one, raw_get_one, "redis-py GET", False),
        (f"get, {batch} chunks a call", tier_get_many, raw_get_many, f"redis-py GET, pipelines of {batch}", False),
    ]
    rows = []
    try:
        for metric, tier_fn, raw_fn, baseline, is_put in cases:
            tier_times: list[float] = []
            raw_times: list[float] = []
            for _ in range(repeats):
                for fn, clear, times in ((tier_fn, tier_clear, tier_times), (raw_fn, raw_clear, raw_times)):
                    if is_put:
                        clear()
                    _time_gbps(total, fn, times)
            size = f"{layout.chunk_bytes / 2**20:.1f} MiB chunks"
            rows.append(Row(f"redis tier {metric} ({size})", statistics.median(tier_times), "GB/s",
                            baseline, statistics.median(raw_times)))
    finally:
        tier_clear()
        raw_clear()
        tier.close()
        raw.close()
    return rows
