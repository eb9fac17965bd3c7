"""Load: 16 concurrent clients of two tenants doing mixed put/lookup/get on overlapping prefixes against a
`kvtier serve` process with tiny tiers (constant eviction): no errors, every get equal to what was put (for
that tenant), and the server's memory flat across rounds."""

from __future__ import annotations

import hashlib
import random
import threading
import time

import psutil
import pytest
import torch

from kvtier.api import Client
from kvtier.bench.api import ServerProcess

from .helpers import KEYS, LAYOUT, make_config

C = LAYOUT.chunk_tokens
CLIENTS = 16
ROUND_S = 3.0
SYSTEM = [[random.Random(i).randrange(32000) for _ in range(2 * C)] for i in range(3)]  # shared prefixes
USER = [[random.Random(100 + i).randrange(32000) for _ in range(C)] for i in range(6)]


def chunk_kv(tenant: str, prefix: list[int]) -> torch.Tensor:
    """The KV a tenant puts for the chunk ending ``prefix``: a function of the whole prefix, like a model's."""
    seed = int.from_bytes(hashlib.blake2b(repr((tenant, prefix)).encode(), digest_size=8).digest(), "little")
    g = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.chunk_shape, generator=g).to(LAYOUT.torch_dtype)


def prompt_kv(tenant: str, tokens: list[int]) -> torch.Tensor:
    return torch.cat([chunk_kv(tenant, tokens[: (i + 1) * C]) for i in range(len(tokens) // C)], dim=3)


def worker(url: str, tenant: str, seed: int, stop: threading.Event, errors: list, counts: dict) -> None:
    rng = random.Random(seed)
    try:
        with Client(url, LAYOUT, api_key=KEYS[tenant], timeout=60) as client:
            while not stop.is_set():
                tokens = rng.choice(SYSTEM) + sum(rng.sample(USER, rng.randint(0, 3)), [])
                op = rng.choice(["put", "put", "lookup", "get", "get"])
                if op == "put":
                    result = client.put(tokens, prompt_kv(tenant, tokens))
                    assert result.stored + result.present + result.dropped == len(tokens) // C
                elif op == "lookup":
                    found = client.lookup(tokens)
                    assert found.tokens % C == 0 and found.tokens <= len(tokens)
                else:
                    got = client.get(tokens)
                    for i in range(got.tokens // C):
                        expected = chunk_kv(tenant, tokens[: (i + 1) * C])
                        assert torch.equal(got.kv[:, :, :, i * C : (i + 1) * C], expected), f"{tenant} chunk {i}"
                    counts["chunks checked"] = counts.get("chunks checked", 0) + got.tokens // C
                counts[op] = counts.get(op, 0) + 1
    except Exception as exc:  # noqa: BLE001 - every failure is reported by the test
        errors.append(exc)


@pytest.mark.parametrize("below", ["write-through disk", "demoting disk", "nothing"])
def test_concurrent_clients_under_eviction(tmp_path, below):
    """Below the host tier: a disk every put writes through (puts stored on a worker thread), a disk the host
    demotes to (puts stored on the event loop while no demotion is needed), or nothing (all on the event loop)."""
    config = make_config(tmp_path).model_dump(mode="json")
    config["tiers"][0]["capacity_bytes"] = 32 * LAYOUT.chunk_bytes
    config["tiers"][1]["capacity_bytes"] = 96 * LAYOUT.chunk_bytes
    config["tiers"][1]["write_through"] = below == "write-through disk"
    if below == "nothing":  # the host tier alone, large enough for the quota
        del config["tiers"][1]
        config["tiers"][0]["capacity_bytes"] = 64 * LAYOUT.chunk_bytes
    config["tenants"][1]["quota_bytes"] = 40 * LAYOUT.chunk_bytes
    server = ServerProcess(config)
    try:
        process = psutil.Process(server.proc.pid)
        rss = []
        totals: dict[str, int] = {}
        for round_ in range(3):
            stop = threading.Event()
            errors: list[Exception] = []
            counts: list[dict] = [{} for _ in range(CLIENTS)]
            threads = [threading.Thread(target=worker, args=(server.url, "alice" if i % 2 else "bob", 1000 * round_ + i,
                                                              stop, errors, counts[i])) for i in range(CLIENTS)]
            for t in threads:
                t.start()
            time.sleep(ROUND_S)
            stop.set()
            for t in threads:
                t.join(timeout=60)
            assert not any(t.is_alive() for t in threads), "a client hung"
            assert not errors, errors[:3]
            for c in counts:
                for op, n in c.items():
                    totals[op] = totals.get(op, 0) + n
            rss.append(process.memory_info().rss)
        assert set(totals) == {"put", "lookup", "get", "chunks checked"} and min(totals.values()) > 0, totals
        assert rss[2] - rss[1] < 16 << 20, [r >> 20 for r in rss]  # MiB: flat once warm
        with Client(server.url, api_key=KEYS["admin"]) as admin:
            store = admin.admin_stats()["store"]
        assert store["drops"] > 0  # it ran under eviction
        assert all(p["tiers"][0]["evictions"] > 0 for p in store["partitions"].values())
    finally:
        server.stop()
