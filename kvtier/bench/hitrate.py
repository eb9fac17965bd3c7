"""Prefix-cache hit rates: replay request traces through the real TieredStore in metadata-only mode.

Each request does what an engine does: ``lookup`` (counted: matched prefix tokens / input tokens), ``get``
of the cached prefix (touches it, promotes from lower tiers), ``put`` of the whole prompt (new full chunks
only). The index, capacity accounting and eviction policies are the production ones; only the tensors are
missing. Beside every policy: Belady's offline optimum (:mod:`kvtier.bench.belady`) at the same capacity
and the hit rate with infinite capacity.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.bench.belady import BeladyPolicy
from kvtier.bench.report import Report, progress
from kvtier.bench.traces import DEFAULT_MOONCAKE, Trace, load_mooncake, long_doc_qa, multi_round_qa
from kvtier.errors import CapacityError
from kvtier.kvstore.chunk import Chunk
from kvtier.kvstore.keys import chain_block_keys, root_key
from kvtier.kvstore.policies import POLICIES
from kvtier.kvstore.store import TieredStore
from kvtier.kvstore.tiers.meta import MetaTier
from kvtier.layout import KVLayout

INFINITE = "infinite"
BELADY = "belady"


def trace_layout(block_tokens: int) -> KVLayout:
    """The KV layout the replay accounts bytes for: Llama-3-8B in fp16 (32 layers, 8 KV heads, head_dim
    128: 128 KiB a token), chunks of the trace's block size."""
    return KVLayout("trace/llama-3-8b", num_layers=32, kv_heads=8, head_dim=128, dtype="float16",
                    chunk_tokens=block_tokens)


def trace_keys(trace: Trace, layout: KVLayout) -> list[list[bytes]]:
    """Every request's chained chunk keys (compute once, replay many times)."""
    root = root_key(layout.fingerprint)
    return [chain_block_keys(root, r.blocks) for r in trace.requests]


def chunk_nbytes(layout: KVLayout, codec: str = "raw") -> int:
    """Bytes one chunk takes in a metadata-only tier with ``codec`` (encoded KV plus its token ids)."""
    return MetaTier("probe", 0, codec).prepare(Chunk(b"", b"", None), layout).nbytes


@dataclass
class ReplayResult:
    """One replay. ``tier_hits``: chunks fetched from each tier; bytes as the tiers accounted them."""

    trace: str
    policy: str
    codec: str
    capacity_bytes: int
    capacity_tokens: int
    input_tokens: int
    hit_tokens: int
    tier_hits: dict[str, int] = field(default_factory=dict)
    bytes_written: int = 0
    bytes_evicted: int = 0
    seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.input_tokens if self.input_tokens else 0.0


def replay(trace: Trace, policy: str, capacity_tokens: int | None = None, capacity_bytes: int | None = None,
           codec: str = "raw", disk_tokens: int = 0, keys: list[list[bytes]] | None = None) -> ReplayResult:
    """Replay ``trace`` through a metadata-only TieredStore: a ``host`` tier of ``capacity_tokens`` (or
    ``capacity_bytes``) with ``codec``, plus a raw ``disk`` tier of ``disk_tokens`` when > 0.

    ``policy``: a name in :data:`POLICIES`, ``belady`` (the offline optimum, host tier only) or
    ``infinite`` (no capacity limit). ``keys``: :func:`trace_keys` of the trace, when already computed.
    """
    layout = trace_layout(trace.block_tokens)
    keys = trace_keys(trace, layout) if keys is None else keys
    per_chunk = chunk_nbytes(layout, codec)
    if policy == INFINITE:
        capacity_bytes = per_chunk * sum(len(k) for k in keys)
    elif capacity_bytes is None:
        if capacity_tokens is None:
            raise ValueError("give capacity_tokens or capacity_bytes")
        capacity_bytes = per_chunk * (capacity_tokens // trace.block_tokens)
    tiers = [MetaTier("host", capacity_bytes, codec)]
    if disk_tokens:
        if policy == BELADY:
            raise ValueError("the Belady replay models one tier")
        tiers.append(MetaTier("disk", chunk_nbytes(layout) * (disk_tokens // trace.block_tokens)))
    store_policy = "lru" if policy in (INFINITE, BELADY) else policy
    store = TieredStore(tiers, layout=layout, metadata_only=True, policy=store_policy)
    belady = None
    if policy == BELADY:
        belady = store.policies[0] = BeladyPolicy(keys)  # before anything is inserted
    root = root_key(layout.fingerprint)
    start = time.perf_counter()
    for i, (request, request_keys) in enumerate(zip(trace.requests, keys)):
        if belady is not None:
            belady.at(i)
        store.lookup_keys(request_keys, n_tokens=request.tokens)
        store.get_keys(request_keys, root)
        try:
            store.put_keys(request_keys, root)
        except CapacityError:
            pass  # the prompt alone is larger than the cache: nothing of it is stored
    seconds = time.perf_counter() - start
    stats = store.stats()
    return ReplayResult(
        trace=trace.name, policy=policy, codec=codec, capacity_bytes=capacity_bytes,
        capacity_tokens=capacity_bytes // per_chunk * trace.block_tokens,
        input_tokens=stats["lookup_tokens"], hit_tokens=stats["hit_tokens"],
        tier_hits={t["name"]: t["hits"] for t in stats["tiers"]},
        bytes_written=sum(t["bytes_written"] for t in stats["tiers"]),
        bytes_evicted=sum(t.stats.evictions * chunk_nbytes(layout, t.codec.name) for t in store.tiers),
        seconds=seconds,
    )
