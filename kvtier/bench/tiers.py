"""Put and get bandwidth of each tier, and prefix lookup time, against baselines measured in the same run.

Baselines: a copy into a preallocated buffer (memory tiers); a plain file write of the same bytes as the
tier's files (same durability: no fsync unless ``--fsync``) and a ``readinto`` a preallocated buffer of them
(disk tier, page cache and cold), with one more row comparing a plain write of the KV alone to that of the
tier's bytes (the format's cost: the key summary adds 4.7% to a raw-codec chunk); BLAKE2b over the same token
bytes (lookup); raw redis-py SET/GET (Redis tier, with ``--redis-url``). Bandwidths count KV bytes. Before
each timed disk write, ours and the baseline's, the files of the previous round are deleted and ``sync``
runs (untimed), so that neither side pays for write-back the other left pending.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from kvtier.bench.args import at_least, listed, one_of, writable_folder
from kvtier.bench.report import Report, Row, progress
from kvtier.kvstore.chunk import Chunk, key_summary
from kvtier.kvstore.keys import chunk_keys, root_key
from kvtier.kvstore.store import TieredStore
from kvtier.kvstore.tiers import DiskTier, HostTier, MetaTier, Tier
from kvtier.layout import KVLayout

LAYOUTS = {
    "smollm2": KVLayout("HuggingFaceTB/SmolLM2-135M-Instruct", num_layers=30, kv_heads=3, head_dim=64),
    "large": KVLayout("large-32x8x128", num_layers=32, kv_heads=8, head_dim=128),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layouts", type=listed(one_of(LAYOUTS)), default="smollm2,large",
                        help="comma list of: " + ", ".join(LAYOUTS))
    parser.add_argument("--bytes", type=at_least(1), default=192 << 20,
                        help="KV bytes moved per measurement (at least two chunks are)")
    parser.add_argument("--repeat", type=at_least(1), default=5, help="rounds; the best of each side is reported")
    parser.add_argument("--dir", type=writable_folder, default=None,
                        help="folder for the disk tier, made if missing (default: a temporary one)")
    parser.add_argument("--fsync", action="store_true", help="disk tier and baseline both fsync every file")
    parser.add_argument("--index-chunks", type=at_least(1), default=1_000_000, help="chunks in the lookup index")
    parser.add_argument("--prompt-tokens", type=at_least(256), default=131072,
                        help="tokens of the looked-up prompt (at least one 256-token chunk)")
    parser.add_argument("--redis-url", default=None, help="also measure a Redis tier at this URL")


Step = tuple[Callable[[], None], Callable[[], None] | None]  # (timed function, untimed set-up before it)


def _best_pair(ours: Step, base: Step, repeat: int) -> tuple[float, float]:
    """Best time of each side over ``repeat`` rounds, alternating, so both see the same machine load."""
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, (fn, setup) in enumerate((ours, base)):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def _chunks(layout: KVLayout, n: int) -> list[Chunk]:
    g = torch.Generator().manual_seed(0)
    root = root_key(layout.fingerprint)
    tokens = np.arange(n * layout.chunk_tokens, dtype=np.int32)
    keys = chunk_keys(root, tokens, layout.chunk_tokens)
    out = []
    for i, key in enumerate(keys):
        kv = torch.randn(layout.chunk_shape, generator=g).to(layout.torch_dtype)
        out.append(Chunk(key, keys[i - 1] if i else root, tokens[i * layout.chunk_tokens : (i + 1) * layout.chunk_tokens],
                         kv, key_summary(kv, layout.page_tokens)))
    return out


def _tier_rows(name: str, tier: Tier, chunks: list[Chunk], layout: KVLayout, repeat: int,
               base_put: Step, base_get: Step, base_name: tuple[str, str], label: str = "",
               sync: bool = False) -> list[Row]:
    """Put and get rows of ``tier`` against ``base_put``/``base_get``; ``sync``: after deleting the previous
    round's chunks, and before the gets, ``sync`` (untimed) so that no write-back runs while a side is timed."""
    total = len(chunks) * layout.chunk_bytes
    outs = [torch.empty(layout.chunk_shape, dtype=layout.torch_dtype) for _ in chunks]

    def clear() -> None:
        for c in chunks:
            tier.delete(c.key)
        if sync:
            os.sync()

    def put() -> None:
        for c in chunks:
            tier.commit(tier.prepare(c, layout))

    def get() -> None:
        for c, o in zip(chunks, outs):
            if tier.get(c.key, o) is None:
                raise RuntimeError(f"{name}: chunk missing during the benchmark")

    t_put, b_put = _best_pair((put, clear), base_put, repeat)
    if sync:
        os.sync()  # the last round's files, both sides', written back before the reads are timed
    t_get, b_get = _best_pair((get, None), base_get, repeat)
    if not all(torch.equal(o, c.kv) for o, c in zip(outs, chunks)):
        raise RuntimeError(f"{name}: a chunk read back differs from what was written")
    gb = total / 1e9
    tag = f"{name} {label}".strip()
    return [
        Row(f"{tag} put", gb / t_put, "GB/s", base_name[0], gb / b_put),
        Row(f"{tag} get", gb / t_get, "GB/s", base_name[1], gb / b_get),
    ]


def _memory_rows(layout: KVLayout, chunks: list[Chunk], repeat: int, label: str) -> list[Row]:
    n = len(chunks)
    pool = torch.empty((n,) + layout.chunk_shape, dtype=layout.torch_dtype)
    pool.zero_()
    outs = [torch.empty(layout.chunk_shape, dtype=layout.torch_dtype) for _ in chunks]
    for o in outs:
        o.zero_()

    def copy_in() -> None:
        for i, c in enumerate(chunks):
            pool[i].copy_(c.kv)

    def copy_out() -> None:
        for i, o in enumerate(outs):
            o.copy_(pool[i])

    tier = HostTier(n * (layout.chunk_bytes + layout.chunk_bytes // 8))
    rows = _tier_rows("host tier", tier, chunks, layout, repeat, (copy_in, None), (copy_out, None),
                      ("copy into preallocated buffer", "copy out of preallocated buffer"), label=label)
    # The whole store path: keys, verification, index bookkeeping (a memory tier makes key summaries on first use).
    store = TieredStore([HostTier(n * (layout.chunk_bytes + layout.chunk_bytes // 8))], layout=layout)
    tokens = np.concatenate([c.tokens for c in chunks])
    kv = torch.cat([c.kv for c in chunks], dim=3)
    out = torch.empty_like(kv)
    t_put, base_put = _best_pair((lambda: store.put(tokens, kv), lambda: store.delete(tokens[: layout.chunk_tokens])), (copy_in, None), repeat)
    t_get, base_get = _best_pair((lambda: store.get(tokens, out), None), (copy_out, None), repeat)
    if not torch.equal(out, kv):
        raise RuntimeError("store get returned other KV than was put")
    gb = n * layout.chunk_bytes / 1e9
    rows.append(Row(f"store(host) put {label}", gb / t_put, "GB/s", "copy into preallocated buffer", gb / base_put))
    rows.append(Row(f"store(host) get {label}", gb / t_get, "GB/s", "copy out of preallocated buffer", gb / base_get))
    return rows


def _drop_cache(paths: list[str]) -> None:
    """Evict these files from the page cache (written back first: only clean pages can be dropped)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _disk_rows(layout: KVLayout, chunks: list[Chunk], repeat: int, label: str, folder: str, fsync: bool) -> list[Row]:
    """The disk tier against plain files holding the same bytes as the tier's files (blob header, tokens, KV,
    key summary), written from and read into one buffer each; and the same plain write of the KV alone, so the
    format's extra bytes are seen apart."""
    tier = DiskTier(os.path.join(folder, "tier"), len(chunks) * layout.chunk_bytes * 2, fsync=fsync)
    tier_files = []
    for c in chunks:  # the tier's own bytes, for the baseline to write and read
        tier.commit(tier.prepare(c, layout))
        tier_files.append(str(tier._file(c.key)))
    blobs = [memoryview(Path(f).read_bytes()) for f in tier_files]
    kv_views = [memoryview(c.kv.reshape(-1).view(torch.uint8).numpy()) for c in chunks]
    raw_dir = os.path.join(folder, "raw")
    os.makedirs(raw_dir, exist_ok=True)
    paths = [os.path.join(raw_dir, f"{i}.bin") for i in range(len(chunks))]
    bufs = [bytearray(len(b)) for b in blobs]

    def raw_clear() -> None:
        for p in paths:
            if os.path.exists(p):
                os.unlink(p)
        os.sync()

    def raw_write(data: list[memoryview]) -> None:
        for p, v in zip(paths, data):
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, v)
            if fsync:
                os.fsync(fd)
            os.close(fd)

    def raw_read() -> None:
        for p, b in zip(paths, bufs):
            with open(p, "rb", buffering=0) as f:
                f.readinto(b)

    def write_blobs() -> None:
        raw_write(blobs)

    durability = "fsync" if fsync else "no fsync"
    t_kv, t_blobs = _best_pair((lambda: raw_write(kv_views), raw_clear), (write_blobs, raw_clear), repeat)
    write_blobs()
    rows = _tier_rows("disk tier", tier, chunks, layout, repeat, (write_blobs, raw_clear), (raw_read, None),
                      (f"raw file write of the same bytes ({durability})", "raw file read of the same bytes (page cache)"),
                      label=label, sync=True)
    outs = [torch.empty(layout.chunk_shape, dtype=layout.torch_dtype) for _ in chunks]

    def cold_get() -> None:
        for c, o in zip(chunks, outs):
            tier.get(c.key, o)

    t_cold, base_cold = _best_pair((cold_get, lambda: _drop_cache(tier_files)),
                                   (raw_read, lambda: _drop_cache(paths)), repeat)
    gb = len(chunks) * layout.chunk_bytes / 1e9
    rows.append(Row(f"disk tier get (cold) {label}", gb / t_cold, "GB/s", "raw file read of the same bytes (cold)",
                    gb / base_cold))
    rows.append(Row(f"raw file write of the KV only {label}", gb / t_kv, "GB/s",
                    "raw file write of the tier's bytes (KV + header + key summary)", gb / t_blobs))
    tier.close()
    shutil.rmtree(raw_dir, ignore_errors=True)
    return rows


def _lookup_rows(n_chunks: int, prompt_tokens: int) -> list[Row]:
    """A metadata-only index of ``n_chunks`` (prompts of ``prompt_tokens``), then one full-hit lookup."""
    layout = KVLayout("lookup-bench", num_layers=1, kv_heads=1, head_dim=1, chunk_tokens=256)
    store = TieredStore([MetaTier("meta", 1 << 62)], layout=layout, metadata_only=True)
    per_prompt = prompt_tokens // layout.chunk_tokens
    rss0 = _rss()
    rng = np.random.default_rng(0)
    prompt = None
    for _ in progress(range(max(1, n_chunks // per_prompt)), desc="building the index"):
        prompt = rng.integers(0, 50_000, prompt_tokens, dtype=np.int32)
        store.put(prompt, None)
    index_bytes = _rss() - rss0
    lookups = 20
    t0 = time.perf_counter()
    for _ in range(lookups):
        hit = store.lookup(prompt)
    t = (time.perf_counter() - t0) / lookups
    if hit.tokens != per_prompt * layout.chunk_tokens:
        raise RuntimeError("lookup missed a prompt that is in the index")
    t0 = time.perf_counter()
    for _ in range(lookups):
        chunk_keys(root_key(layout.fingerprint), prompt, layout.chunk_tokens)
    t_hash = (time.perf_counter() - t0) / lookups
    n = len(store.index)
    del store
    gc.collect()
    return [
        Row(f"lookup {prompt_tokens}-token prompt in {n}-chunk index", t / prompt_tokens * 1e9, "ns/token",
            "BLAKE2b chain over the same tokens", t_hash / prompt_tokens * 1e9, higher_is_better=False),
        Row(f"index memory for {n} chunks (metadata-only)", index_bytes / 2**20, "MiB"),
    ]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _layout_chunks(name: str, nbytes: int) -> tuple[KVLayout, list[Chunk], str]:
    """The layout ``name``, about ``nbytes`` of its chunks (the same every call) and its row label."""
    layout = LAYOUTS[name]
    return layout, _chunks(layout, max(2, nbytes // layout.chunk_bytes)), f"[{layout.chunk_bytes / 2**20:.1f} MiB chunks]"


def run(args: argparse.Namespace) -> Report:
    report = Report("tiers")
    folder = args.dir or tempfile.mkdtemp(prefix="kvtier-bench-")
    try:
        # Every layout's disk rows before any memory rows: the memory rows free large pools, which these VMs hand
        # back to the host in the background for seconds, taking CPU from whichever side of a disk row runs then.
        disk_rows = {}
        for name in args.layouts:
            layout, chunks, label = _layout_chunks(name, args.bytes)
            disk_rows[name] = _disk_rows(layout, chunks, args.repeat, label, os.path.join(folder, name), args.fsync)
        for name in args.layouts:
            layout, chunks, label = _layout_chunks(name, args.bytes)
            report.extend(_memory_rows(layout, chunks, args.repeat, label))
            report.extend(disk_rows[name])
            if args.redis_url:
                from kvtier.bench.redis_bw import measure_redis

                report.extend(measure_redis(args.redis_url, layout, chunks, args.repeat, label))
            del chunks
            gc.collect()
        if args.index_chunks:
            report.extend(_lookup_rows(args.index_chunks, args.prompt_tokens))
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)
    return report
