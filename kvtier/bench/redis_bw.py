"""Redis tier bandwidth against redis-py itself: the same bytes, the same pipelining, in one run.

For the given chunks, ``measure_redis`` times:

- put: ``RedisTier.commit`` of one prepared chunk at a time, and ``commit_many`` of ``batch`` chunks, against a
  plain redis-py client (hiredis, default settings) doing ``SET`` of each chunk's blob bytes, one command at a
  time and in pipelines of ``batch``;
- get: ``RedisTier.get`` / ``get_many`` into preallocated buffers (every checksum verified), against ``GET`` of
  the same blobs the same way (bytes returned, nothing checked).

Tier and baseline rounds alternate, so both see the same machine load; the best round of each is reported.
Puts start from an empty server. Everything written is deleted afterwards. Bandwidth counts KV bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import redis
import torch

from kvtier.bench.report import Row
from kvtier.kvstore.chunk import Chunk, blob_bytes
from kvtier.kvstore.tiers.redis import RedisTier
from kvtier.layout import KVLayout

_PREFIX = "kvtier-bench:"


Fn = Callable[[], None]


def _best_pair(ours: Fn, base: Fn, setup: tuple[Fn, Fn] | None, repeat: int) -> tuple[float, float]:
    """Best time of each side over ``repeat`` alternating rounds (``setup`` runs untimed before each side)."""
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, fn in enumerate((ours, base)):
            if setup is not None:
                setup[i]()
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def measure_redis(url: str, layout: KVLayout, chunks: Sequence[Chunk], repeat: int = 5, label: str = "",
                  batch: int = 8) -> list[Row]:
    """Put/get GB/s of a RedisTier at ``url`` against raw redis-py SET/GET of the same blobs."""
    tier = RedisTier(url, 1 << 62, name="bench", prefix=_PREFIX)
    raw = redis.Redis.from_url(url)
    blobs = [blob_bytes(c, layout, tier.codec) for c in chunks]
    names = [f"{_PREFIX}raw:{i}".encode() for i in range(len(chunks))]
    outs = [torch.empty(layout.chunk_shape, dtype=layout.torch_dtype) for _ in chunks]
    groups = [range(i, min(len(chunks), i + batch)) for i in range(0, len(chunks), batch)]

    def tier_clear() -> None:
        for c in chunks:
            tier.delete(c.key)

    def raw_clear() -> None:
        raw.delete(*names)

    def tier_put() -> None:
        for c in chunks:
            tier.commit(tier.prepare(c, layout))

    def tier_put_many() -> None:
        for g in groups:
            tier.commit_many([tier.prepare(chunks[i], layout) for i in g])

    def tier_get() -> None:
        for c, o in zip(chunks, outs):
            if tier.get(c.key, o) is None:
                raise RuntimeError("redis tier: chunk missing during the benchmark")

    def tier_get_many() -> None:
        for g in groups:
            if None in tier.get_many([chunks[i].key for i in g], [outs[i] for i in g]):
                raise RuntimeError("redis tier: chunk missing during the benchmark")

    def raw_put() -> None:
        for name, blob in zip(names, blobs):
            raw.set(name, blob)

    def raw_put_many() -> None:
        for g in groups:
            pipe = raw.pipeline(transaction=False)
            for i in g:
                pipe.set(names[i], blobs[i])
            pipe.execute()

    def raw_get() -> None:
        for name in names:
            raw.get(name)

    def raw_get_many() -> None:
        for g in groups:
            pipe = raw.pipeline(transaction=False)
            for i in g:
                pipe.get(names[i])
            pipe.execute()

    gb = len(chunks) * layout.chunk_bytes / 1e9
    tag = f"redis tier {label}".strip()
    many = f"{batch} chunks a call"
    try:
        t_put, b_put = _best_pair(tier_put, raw_put, (tier_clear, raw_clear), repeat)
        t_put_many, b_put_many = _best_pair(tier_put_many, raw_put_many, (tier_clear, raw_clear), repeat)
        t_get, b_get = _best_pair(tier_get, raw_get, None, repeat)
        t_get_many, b_get_many = _best_pair(tier_get_many, raw_get_many, None, repeat)
        if not all(torch.equal(o, c.kv) for o, c in zip(outs, chunks)):
            raise RuntimeError("redis tier: a chunk read back differs from what was written")
    finally:
        tier_clear()
        raw_clear()
        tier.close()
        raw.close()
    return [
        Row(f"{tag} put", gb / t_put, "GB/s", "redis-py SET of the blobs", gb / b_put),
        Row(f"{tag} get", gb / t_get, "GB/s", "redis-py GET of the blobs", gb / b_get),
        Row(f"{tag} put, {many}", gb / t_put_many, "GB/s", f"redis-py SET, pipelines of {batch}", gb / b_put_many),
        Row(f"{tag} get, {many}", gb / t_get_many, "GB/s", f"redis-py GET, pipelines of {batch}", gb / b_get_many),
    ]
