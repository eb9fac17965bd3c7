"""`kvtier serve` as a real process: config file plus environment overrides, and a restart that keeps the
chunks of the disk tier."""

from __future__ import annotations

import torch

from kvtier.api import Client
from kvtier.bench.api import ServerProcess

from .helpers import KEYS, LAYOUT, kv_for, make_config, prompt


def test_restart_keeps_disk_chunks_per_tenant(tmp_path):
    config = make_config(tmp_path).model_dump(mode="json")
    env = {"KVTIER_SERVER__MAX_CHUNKS_PER_BATCH": "2"}  # overrides the file's 8
    C = LAYOUT.chunk_tokens
    tokens = prompt(5 * C, seed=11)
    kv = kv_for(len(tokens), seed=11)
    server = ServerProcess(config, env)
    try:
        with Client(server.url, LAYOUT, api_key=KEYS["alice"]) as alice:
            assert alice.put(tokens, kv).stored == 5
            stats = alice.stats()
            assert stats["requests"]["/v1/chunks"] == 3  # batches of 2
    finally:
        server.stop()
    server = ServerProcess(config, env)
    try:
        with Client(server.url, LAYOUT, api_key=KEYS["alice"]) as alice, \
                Client(server.url, LAYOUT, api_key=KEYS["bob"]) as bob:
            got = alice.get(tokens)  # re-attaches the layout the new process does not know yet
            assert got.tokens == 5 * C and torch.equal(got.kv, kv[:, :, :, : 5 * C])
            assert bob.lookup(tokens).tokens == 0
            assert alice.stats()["used_bytes"] == 5 * LAYOUT.chunk_bytes
    finally:
        server.stop()
