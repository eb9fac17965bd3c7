"""Prefix-cache hit rates: replay request traces through the real TieredStore in metadata-only mode.

Each request does what an engine does: ``lookup`` (counted: matched prefix tokens / input tokens), ``get``
of the cached prefix (touches it, promotes from lower tiers), ``put`` of the whole prompt (new full chunks
only). The index, capacity accounting and eviction policies are the production ones; only the tensors are
missing. Beside every policy: Belady's offline optimum (:mod:`kvtier.bench.belady`) at the same capacity
and the hit rate with infinite capacity.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvtier.bench.args import BenchInputError, at_least, listed, one_of, output_file, token_list, tokens
from kvtier.bench.belady import BeladyPolicy
from kvtier.bench.report import Report, progress
from kvtier.bench.traces import DEFAULT_MOONCAKE, Trace, load_mooncake, long_doc_qa, multi_round_qa
from kvtier.compression import available_codecs
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
                    chunk_tokens=block_tokens, page_tokens=math.gcd(32, block_tokens))


def trace_keys(trace: Trace, layout: KVLayout) -> list[list[bytes]]:
    """Every request's chained chunk keys (compute once, replay many times)."""
    root = root_key(layout.fingerprint)
    return [chain_block_keys(root, r.blocks) for r in trace.requests]


def chunk_nbytes(layout: KVLayout, codec: str = "raw") -> int:
    """Bytes one chunk takes in a metadata-only tier with ``codec`` (encoded KV plus its token ids)."""
    return MetaTier("probe", 0, codec).prepare(Chunk(b"", b"", None), layout).nbytes


def drive(store: TieredStore, trace: Trace, keys: list[list[bytes]], belady: BeladyPolicy | None = None) -> None:
    """Serve every request of ``trace`` from a metadata-only ``store`` as an engine would: lookup, get the
    cached prefix, put the whole prompt. ``belady``: the store's Belady policy, told each request's index."""
    root = root_key(store.layout.fingerprint)
    for i, (request, request_keys) in enumerate(zip(trace.requests, keys)):
        if belady is not None:
            belady.at(i)
        store.lookup_keys(request_keys, n_tokens=request.tokens)
        store.get_keys(request_keys, root)
        try:
            store.put_keys(request_keys, root)
        except CapacityError:
            pass  # the prompt alone is larger than the cache: nothing of it is stored


@dataclass
class ReplayResult:
    """One replay. ``tier_hits``: chunks fetched from each tier; bytes as the tiers accounted them."""

    trace: str
    requests: int
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
    start = time.perf_counter()
    drive(store, trace, keys, belady)
    seconds = time.perf_counter() - start
    stats = store.stats()
    return ReplayResult(
        trace=trace.name, requests=len(trace.requests), policy=policy, codec=codec, capacity_bytes=capacity_bytes,
        capacity_tokens=capacity_bytes // per_chunk * trace.block_tokens,
        input_tokens=stats["lookup_tokens"], hit_tokens=stats["hit_tokens"],
        tier_hits={t["name"]: t["hits"] for t in stats["tiers"]},
        bytes_written=sum(t["bytes_written"] for t in stats["tiers"]),
        bytes_evicted=sum(t.stats.evictions * chunk_nbytes(layout, t.codec.name) for t in store.tiers),
        seconds=seconds,
    )


# ---------------------------------------------------------------------------------------------- the benchmark

DEFAULT_POLICIES = "lru,lfu,s3fifo,turn-lru,hit-density"


@dataclass(frozen=True)
class Workload:
    """A trace, the capacities (tokens) to replay it at, and the one whose details the report lists."""

    trace: Trace
    capacities: list[int]
    headline: int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", default=str(DEFAULT_MOONCAKE), help="a Mooncake-format trace (JSON lines)")
    parser.add_argument("--limit", type=at_least(1), default=None, help="replay only the first N requests of --trace")
    parser.add_argument("--capacities", type=token_list, default="1M,2M,3M,6M,12M",
                        help="capacities in tokens for --trace (at least one block each)")
    parser.add_argument("--headline", type=tokens, default=None,
                        help="the capacity whose per-tier details are reported: one of --capacities (default: 3M "
                             "when listed, else the middle one)")
    parser.add_argument("--policies", type=listed(one_of(POLICIES)), default=DEFAULT_POLICIES,
                        help=f"comma-separated, from {sorted(POLICIES)} (cost is slow here: see docs/hitrate.md)")
    parser.add_argument("--disk-tokens", type=tokens, default=0,
                        help="add a raw disk tier of this many tokens (Belady then gets host + disk tokens)")
    parser.add_argument("--codecs", type=codec_list, default="all",
                        help="codecs for the fixed-byte-budget run ('all', 'none' or a list)")
    parser.add_argument("--no-generated", action="store_true", help="skip the generated LMCache-style workloads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated workloads")
    parser.add_argument("--plot", type=output_file, default=None,
                        help="write a PNG of hit rate against capacity here (its folder is made if missing)")


def codec_list(text: str) -> list[str]:
    """``all`` (every registered codec), ``none``, or comma-separated codec names."""
    if text in ("all", "none"):
        return available_codecs() if text == "all" else []
    return listed(one_of(available_codecs))(text)


def generated_workloads(seed: int = 0) -> list[Workload]:
    """LMCache-style workloads (256-token blocks) with capacities around their working sets."""
    mrq = multi_round_qa(seed=seed)
    out = [Workload(mrq, [75_000, 150_000, 300_000], 150_000)]
    for mode in ("tile", "interleave", "random"):
        out.append(Workload(long_doc_qa(mode=mode, seed=seed), [100_000, 200_000, 300_000], 200_000))
    return out


def run(args: argparse.Namespace) -> Report:
    """Replay every workload; a trace that cannot be loaded or a capacity that does not fit it is a ValueError,
    raised before any replay."""
    policies = args.policies
    trace = load_mooncake(args.trace, limit=args.limit)
    capacities = sorted(set(args.capacities))
    if capacities[0] < trace.block_tokens:
        raise BenchInputError(f"capacity {capacities[0]} holds no {trace.block_tokens}-token block")
    headline = args.headline
    if headline is None:
        headline = 3_000_000 if 3_000_000 in capacities else capacities[len(capacities) // 2]
    elif headline not in capacities:
        raise BenchInputError(f"--headline {headline} is not one of --capacities {capacities}")
    workloads = [Workload(trace, capacities, headline)]
    if not args.no_generated:
        workloads += generated_workloads(args.seed)
    report = Report("hitrate")
    report.notes.append(f"token hit rate = matched prefix tokens / input tokens; ratio = policy / Belady at the "
                        f"same capacity (host + disk tokens); {trace_layout(512).model_id} fp16 KV for bytes")
    curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for w in workloads:
        keys = trace_keys(w.trace, trace_layout(w.trace.block_tokens))
        infinite = replay(w.trace, INFINITE, keys=keys)
        report.add(f"{w.trace.name} infinite capacity hit rate", infinite.hit_rate, "fraction")
        curve = curves[w.trace.name] = {INFINITE: [(c, infinite.hit_rate) for c in w.capacities]}
        for capacity in progress(w.capacities, desc=w.trace.name):
            belady = replay(w.trace, BELADY, capacity + args.disk_tokens, keys=keys)  # what both tiers hold
            curve.setdefault(BELADY, []).append((capacity, belady.hit_rate))
            report.add(f"{w.trace.name} @{capacity} belady hit rate", belady.hit_rate, "fraction",
                       INFINITE, infinite.hit_rate)
            for policy in policies:
                r = replay(w.trace, policy, capacity, disk_tokens=args.disk_tokens, keys=keys)
                curve.setdefault(policy, []).append((capacity, r.hit_rate))
                prefix = f"{w.trace.name} @{capacity} {policy}"
                report.add(f"{prefix} hit rate", r.hit_rate, "fraction", BELADY, belady.hit_rate)
                if capacity == w.headline:
                    _details(report, prefix, r)
    _codec_rows(report, trace, headline, args.codecs)
    if args.plot:
        plot(curves, args.plot)
        report.notes.append(f"plot written to {args.plot}")
    return report


def _details(report: Report, prefix: str, r: ReplayResult) -> None:
    for tier, hits in r.tier_hits.items():
        report.add(f"{prefix} chunk hits in {tier}", hits, "chunks")
    report.add(f"{prefix} written", r.bytes_written / 1e9, "GB")
    report.add(f"{prefix} evicted", r.bytes_evicted / 1e9, "GB")
    report.add(f"{prefix} replay time ({r.requests} requests)", r.seconds, "s")


def _codec_rows(report: Report, trace: Trace, budget_tokens: int, names: list[str]) -> None:
    """LRU at a fixed byte budget (``budget_tokens`` of raw KV) for each codec: a smaller codec holds more."""
    if not names:
        return
    layout = trace_layout(trace.block_tokens)
    budget = chunk_nbytes(layout) * (budget_tokens // trace.block_tokens)
    keys = trace_keys(trace, layout)
    raw = replay(trace, "lru", capacity_bytes=budget, keys=keys)
    for name in names:
        r = raw if name == "raw" else replay(trace, "lru", capacity_bytes=budget, codec=name, keys=keys)
        report.add(f"{trace.name} {budget / 1e9:.0f} GB lru codec {name} hit rate ({r.capacity_tokens} tokens)",
                   r.hit_rate, "fraction", "raw", raw.hit_rate)


def plot(curves: dict[str, dict[str, list[tuple[int, float]]]], path: str | Path) -> None:
    """One panel per trace: hit rate against capacity (tokens) per policy, Belady and infinite dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4), squeeze=False)
    for ax, (name, curve) in zip(axes[0], curves.items()):
        for policy, points in curve.items():
            xs, ys = zip(*points)
            style = {"linestyle": "--", "color": "black"} if policy == BELADY else \
                {"linestyle": ":", "color": "gray"} if policy == INFINITE else {"marker": "o"}
            ax.plot(xs, ys, label=policy, **style)
        ax.set_xscale("log")
        ax.set_xlabel("capacity (tokens)")
        ax.set_ylabel("token hit rate")
        ax.set_title(name, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
