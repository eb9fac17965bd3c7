"""Helpers of the API tests: a real uvicorn server on 127.0.0.1 (a free port, in a thread) with two tenants and
an admin, small tiers (a 64 KiB host tier over a disk tier) and a tiny layout (2 KiB chunks)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
import uvicorn

from kvtier.api import create_app
from kvtier.api.auth import hash_key
from kvtier.compression.codec import get_codec
from kvtier.config import KVTierConfig
from kvtier.kvstore.chunk import Chunk, blob_bytes, key_summary
from kvtier.layout import KVLayout

KEYS = {"alice": "alice-key", "bob": "bob-key", "admin": "admin-key"}
LAYOUT = KVLayout("tiny", num_layers=2, kv_heads=2, head_dim=8, dtype="float16", chunk_tokens=16, page_tokens=8)
# One chunk of LAYOUT as a disk blob (KV, key summary, tokens, header): what a partition's capacity counts.
def _blob_bytes() -> int:
    kv = torch.zeros(LAYOUT.chunk_shape, dtype=LAYOUT.torch_dtype)
    chunk = Chunk(b"k" * 16, b"p" * 16, np.zeros(LAYOUT.chunk_tokens, dtype=np.int32), kv,
                  key_summary(kv, LAYOUT.page_tokens), "tenant/bob")
    return len(blob_bytes(chunk, LAYOUT, get_codec("raw")))


BLOB_BYTES = _blob_bytes()
BOB_QUOTA = 4 * BLOB_BYTES + BLOB_BYTES // 2  # bob's partition of the disk tier: 4 chunks


def make_config(tmp_path, **overrides) -> KVTierConfig:
    data = {
        "tiers": [{"kind": "host", "capacity_bytes": 64 << 10},
                  {"kind": "disk", "capacity_bytes": 4 << 20, "path": str(tmp_path / "disk"), "write_through": True}],
        "tenants": [{"name": "alice", "key_sha256": hash_key(KEYS["alice"])},
                    {"name": "bob", "key_sha256": hash_key(KEYS["bob"]), "quota_bytes": BOB_QUOTA}],
        "admin_key_sha256": hash_key(KEYS["admin"]),
        "server": {"max_body_bytes": 64 << 10, "max_tokens_per_request": 4096, "max_chunks_per_batch": 8},
    }
    data.update(overrides)
    return KVTierConfig(**data)


@contextmanager
def serve(config: KVTierConfig, port: int = 0, wrap=lambda app: app) -> Iterator[str]:
    """Run the app for ``config`` (as ``wrap`` returns it: a test may put a fault in front of it) with uvicorn in a
    thread (on ``port``, 0: a free one); yields its URL."""
    server = uvicorn.Server(uvicorn.Config(wrap(create_app(config)), host="127.0.0.1", port=port, log_level="warning",
                                           http="h11"))  # as `kvtier serve` runs it
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def prompt(n_tokens: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32000, (n_tokens,), generator=g).tolist()


def kv_for(n_tokens: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = LAYOUT.chunk_shape[:3] + (n_tokens, LAYOUT.head_dim)
    return torch.randn(shape, generator=g).to(LAYOUT.torch_dtype)
