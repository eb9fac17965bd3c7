"""``kvtier demo``: three requests share a system prompt; the store serves its KV to the second and third."""

from __future__ import annotations

import sys
import tempfile

import numpy as np
import torch

from kvtier.errors import KVTierError
from kvtier.kvstore import DiskTier, HostTier, TieredStore
from kvtier.layout import SMOLLM2_135M


def run_demo(disk_dir: str | None = None) -> int:
    """Run the demo with its disk tier in ``disk_dir`` (default: a new temporary folder); the exit status. A
    folder the disk tier cannot use is one line on stderr (``kvtier demo: ...``) and status 2."""
    layout = SMOLLM2_135M
    folder = disk_dir or tempfile.mkdtemp(prefix="kvtier-demo-")
    try:
        disk = DiskTier(folder, 64 * layout.chunk_bytes)
    except (KVTierError, OSError) as exc:
        print(f"kvtier demo: disk tier in {folder}: {exc}", file=sys.stderr)
        return 2
    store = TieredStore([HostTier(8 * layout.chunk_bytes), disk], layout=layout)
    rng = np.random.default_rng(0)
    system = rng.integers(0, 49152, 4 * layout.chunk_tokens)  # a 1024-token shared system prompt
    print(f"layout {layout.model_id}: {layout.chunk_bytes / 2**20:.1f} MiB per {layout.chunk_tokens}-token chunk; "
          f"disk tier in {folder}")
    for turn in range(3):
        prompt = np.concatenate([system, rng.integers(0, 49152, 600)])
        hit = store.lookup(prompt)
        got = store.get(prompt)
        # An engine would prefill only prompt[got.tokens:] here; we make up KV for the whole prompt instead.
        kv = torch.randn(layout.chunk_shape[:3] + (len(prompt), layout.head_dim)).to(layout.torch_dtype)
        if got.tokens:
            kv[:, :, :, : got.tokens] = got.kv
        res = store.put(prompt, kv)
        print(f"request {turn}: {len(prompt)} tokens, {hit.tokens} served from {sorted(set(got.tiers)) or '-'}, "
              f"{res.stored} new chunks stored")
    s = store.stats()
    print(f"token hit rate {s['token_hit_rate']:.2f}; " + "; ".join(
        f"{t['name']}: {t['chunks']} chunks, {t['used_bytes'] / 2**20:.1f} of {t['capacity_bytes'] / 2**20:.0f} MiB"
        for t in s["tiers"]))
    return 0
