"""Tenants: identical prompts never share chunks; no tenant can see, match, read, evict or learn of another's
chunks; quotas hold per tenant."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from kvtier.api import Client
from kvtier.api.auth import hash_key
from kvtier.api.wire import frame_prefix
from kvtier.compression.codec import get_codec
from kvtier.kvstore.chunk import Chunk, blob_bytes
from kvtier.kvstore.keys import chunk_keys
from kvtier.layout import KVLayout

from .helpers import BLOB_BYTES, BOB_QUOTA, KEYS, LAYOUT, kv_for, make_config, prompt, serve


def test_identical_prompts_never_share_and_stay_apart(url):
    C = LAYOUT.chunk_tokens
    tokens = prompt(4 * C)
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as alice, Client(url, LAYOUT, api_key=KEYS["bob"]) as bob:
        alice_kv, bob_kv = kv_for(len(tokens), seed=1), kv_for(len(tokens), seed=2)
        assert alice.put(tokens, alice_kv).stored == 4
        assert set(alice.keys(tokens)).isdisjoint(bob.keys(tokens))

        # bob sees nothing of alice's: no match, no data, nothing to pin, prefetch or delete
        assert bob.lookup(tokens).tokens == 0
        assert bob.get(tokens).tokens == 0
        assert (bob.pin(tokens), bob.prefetch(tokens), bob.delete(tokens), bob.unpin(tokens)) == (0, 0, 0, 0)
        assert bob.stats()["used_bytes"] == 0

        # his own copy of the same prompt is stored apart, and each reads back its own KV
        assert bob.put(tokens, bob_kv).stored == 4
        assert torch.equal(alice.get(tokens).kv, alice_kv)
        assert torch.equal(bob.get(tokens).kv, bob_kv)
        assert bob.delete(tokens[:C]) == 4
        assert alice.lookup(tokens).tokens == 4 * C

        # a put chained under alice's chunk is refused exactly like one under a key that does not exist
        alice_keys = alice.keys(tokens)
        replies = [_put_under(url, KEYS["bob"], parent, tokens[C : 2 * C]) for parent in (alice_keys[0], bytes(16))]
        assert replies[0].status_code == replies[1].status_code == 409
        assert replies[0].json()["detail"].replace(alice_keys[0].hex(), "") == \
            replies[1].json()["detail"].replace(bytes(16).hex(), "")
        assert alice.lookup(tokens).tokens == 4 * C

        # a layout attached by alice is unknown to bob until he attaches it himself
        other = LAYOUT.__class__(**{**LAYOUT.to_dict(), "model_id": "other", "tensors": ("k", "v")})
        alice.attach(other)
        reply = httpx.post(url + "/v1/lookup", json={"layout": other.fingerprint, "tokens": tokens},
                           headers={"Authorization": f"Bearer {KEYS['bob']}"})
        assert reply.status_code == 404 and reply.json()["error"] == "layout_not_attached"


def _put_under(url: str, api_key: str, parent: bytes, tokens: list[int]) -> httpx.Response:
    """A raw put of one chunk whose parent is ``parent``."""
    ids = np.asarray(tokens, dtype=np.int32)
    key = chunk_keys(parent, ids, LAYOUT.chunk_tokens)[0]
    blob = blob_bytes(Chunk(key, parent, ids, kv_for(len(tokens))), LAYOUT, get_codec("raw"))
    return httpx.put(url + "/v1/chunks", params={"layout": LAYOUT.fingerprint}, content=frame_prefix(len(blob)) + blob,
                     headers={"Authorization": f"Bearer {api_key}"})


def test_quota_is_enforced_per_tenant(url):
    C = LAYOUT.chunk_tokens  # bob's partition: 4 chunks
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as alice, Client(url, LAYOUT, api_key=KEYS["bob"]) as bob:
        assert alice.put(prompt(6 * C, seed=5), kv_for(6 * C)).stored == 6
        first = bob.put(prompt(3 * C, seed=6), kv_for(3 * C))
        assert first.stored == 3
        second = bob.put(prompt(3 * C, seed=7), kv_for(3 * C))  # room for one: his own old chunks make way
        assert second.stored + second.dropped == 3 and second.stored >= 1
        stats = bob.stats()
        assert stats["quota_bytes"] == BOB_QUOTA
        assert stats["used_bytes"] <= stats["quota_bytes"]
        too_long = bob.put(prompt(6 * C, seed=8), kv_for(6 * C))  # a chain longer than the partition
        assert (too_long.stored, too_long.dropped) == (4, 2) and bob.stats()["used_bytes"] <= BOB_QUOTA
        assert alice.lookup(prompt(6 * C, seed=5)).tokens == 6 * C  # alice lost nothing
        assert alice.stats()["quota_bytes"] is None



def test_another_tenants_traffic_never_evicts_a_partition(tmp_path):
    """bob (a quota: his own partition) keeps every chunk while alice floods the shared partition."""
    C = LAYOUT.chunk_tokens
    config = make_config(tmp_path, tiers=[
        {"kind": "host", "capacity_bytes": 8 * BLOB_BYTES},
        {"kind": "disk", "capacity_bytes": 24 * BLOB_BYTES, "path": str(tmp_path / "disk"), "write_through": True}])
    with serve(config) as url, Client(url, LAYOUT, api_key=KEYS["alice"]) as alice, \
            Client(url, LAYOUT, api_key=KEYS["bob"]) as bob:
        mine = prompt(3 * C, seed=11)
        assert bob.put(mine, kv_for(3 * C)).stored == 3
        for seed in range(20, 30):  # far more than the shared partition holds: alice evicts her own chunks
            alice.put(prompt(8 * C, seed=seed), kv_for(8 * C))
        assert alice.lookup(prompt(8 * C, seed=20)).tokens < 8 * C
        got = bob.get(mine)
        assert got.tokens == 3 * C and torch.equal(got.kv, kv_for(3 * C))


@pytest.mark.parametrize(("name", "quota"), [("anonymous", None), ("shared", BOB_QUOTA)])
def test_reserved_tenant_names_are_refused(tmp_path, name, quota):
    """``anonymous`` would share open access's keyless namespace; ``shared`` would replace the shared partition."""
    tenants = [{"name": name, "key_sha256": hash_key("k" * 32), **({"quota_bytes": quota} if quota else {})}]
    with pytest.raises(ValueError, match=f"tenant name '{name}' is reserved"):
        make_config(tmp_path, tenants=tenants, open_access=True)


def test_a_quota_bounds_the_tenants_kv_whatever_its_tiers_codecs(tmp_path):
    """An int4 disk tier packs about 3x the KV into the partition's bytes: the quota still bounds the KV a tenant
    keeps (what its stats report as used), not only the bytes its partition's tiers hold."""
    big = KVLayout("big", num_layers=4, kv_heads=2, head_dim=32, dtype="float16", chunk_tokens=16, page_tokens=16)
    quota = 256 << 10  # 16 chunks of KV
    config = make_config(
        tmp_path, tiers=[{"kind": "host", "capacity_bytes": 1 << 20},
                         {"kind": "disk", "capacity_bytes": 4 << 20, "path": str(tmp_path / "disk"), "codec": "int4",
                          "write_through": True}],
        tenants=[{"name": "bob", "key_sha256": hash_key(KEYS["bob"]), "quota_bytes": quota}])
    with serve(config) as url, Client(url, big, api_key=KEYS["bob"]) as bob:
        for seed in range(4):
            tokens = prompt(8 * 16, seed=seed)
            bob.put(tokens, torch.randn(big.chunk_shape[:3] + (len(tokens), big.head_dim)).to(torch.float16))
        stats = bob.stats()
        assert stats["quota_bytes"] == quota and quota // 2 < stats["used_bytes"] <= quota


def test_a_tenant_whose_quota_changed_leaves_nothing_stranded(tmp_path):
    """Chunks a tenant put while it shared the store are deleted when it gets a partition of its own (they would
    take the shared room, out of its reach), and its partition's folder when it loses the quota again."""
    from kvtier.api.auth import tenant_namespace
    from kvtier.api.partitions import Partitions
    from kvtier.config import KVTierConfig

    def config(quota: int | None) -> KVTierConfig:
        return KVTierConfig(tiers=[{"kind": "disk", "capacity_bytes": 4 << 20, "path": str(tmp_path / "disk")}],
                            tenants=[{"name": "alice", "key_sha256": hash_key(KEYS["alice"])},
                                     {"name": "bob", "key_sha256": hash_key(KEYS["bob"]), "quota_bytes": quota}])

    bob, alice = tenant_namespace("bob"), tenant_namespace("alice")
    tokens = prompt(2 * LAYOUT.chunk_tokens)
    first = Partitions(config(None))
    for namespace in (bob, alice):
        first.for_namespace(namespace).put(tokens, kv_for(len(tokens)), namespace=namespace, layout=LAYOUT)
    first.close()
    second = Partitions(config(1 << 20))
    assert bob not in second.stores["shared"].namespace_bytes or not second.stores["shared"].namespace_bytes[bob]
    assert second.for_namespace(alice).lookup(tokens, alice, LAYOUT).tokens == len(tokens)  # alice keeps hers
    second.for_namespace(bob).put(tokens, kv_for(len(tokens)), namespace=bob, layout=LAYOUT)
    second.close()
    assert (tmp_path / "disk" / "partitions" / "bob").is_dir()
    third = Partitions(config(None))
    assert not (tmp_path / "disk" / "partitions" / "bob").exists()
    assert third.for_namespace(bob).lookup(tokens, bob, LAYOUT).tokens == 0
    third.close()
