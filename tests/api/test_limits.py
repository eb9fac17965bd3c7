"""Refusals: every limit and every bad body is a 4xx saying what was wrong, and nothing stored changes."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from kvtier.api import Client
from kvtier.api.client import PayloadTooLargeError
from kvtier.api.wire import frame_prefix
from kvtier.compression.codec import get_codec
from kvtier.kvstore.chunk import Chunk, blob_bytes
from kvtier.kvstore.keys import chunk_keys
from kvtier.layout import KVLayout

from .helpers import KEYS, LAYOUT, kv_for, prompt

AUTH = {"Authorization": f"Bearer {KEYS['alice']}"}
C = LAYOUT.chunk_tokens


def blobs(root: bytes, tokens: list[int], layout: KVLayout = LAYOUT) -> list[bytes]:
    """The blobs of the full chunks of ``tokens``, chained from ``root``."""
    ids = np.asarray(tokens, dtype=np.int32)
    keys = chunk_keys(root, ids, C)
    kv = kv_for(len(ids))
    return [blob_bytes(Chunk(k, keys[i - 1] if i else root, ids[i * C : (i + 1) * C], kv[:, :, :, i * C : (i + 1) * C]),
                       layout, get_codec("raw")) for i, k in enumerate(keys)]


def body(*parts: bytes) -> bytes:
    return b"".join(frame_prefix(len(p)) + p for p in parts)


def put(url: str, content: bytes, fingerprint: str = LAYOUT.fingerprint) -> httpx.Response:
    return httpx.put(url + "/v1/chunks", params={"layout": fingerprint}, content=content, headers=AUTH)


@pytest.fixture
def root(url) -> bytes:
    """Alice's root key (the layout attached), with something stored to see that it stays unchanged."""
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as c:
        c.put(prompt(2 * C, seed=99), kv_for(2 * C))
    return bytes.fromhex(httpx.post(url + "/v1/layouts", json=LAYOUT.to_dict(), headers=AUTH).json()["root"])


def used(url: str) -> tuple[int, int, list[int]]:
    """Chunks, chunks put, and the bytes each tier holds (lent bytes included: a refusal gives them back)."""
    stats = httpx.get(url + "/v1/admin/stats", headers={"Authorization": f"Bearer {KEYS['admin']}"}).json()
    tiers = [t["used_bytes"] for part in stats["store"]["partitions"].values() for t in part["tiers"]]
    return stats["store"]["chunks"], stats["store"]["put_chunks"], tiers


def refused(reply: httpx.Response, status: int, *words: str) -> None:
    assert reply.status_code == status, reply.text
    detail = str(reply.json()["detail"])
    assert all(w in detail for w in words), detail


def test_bad_bodies_are_refused_and_change_nothing(url, root):
    before = used(url)
    good = blobs(root, prompt(3 * C))
    flipped = bytearray(good[1])
    flipped[-5] ^= 0xFF  # a bit of the KV
    refused(put(url, body(good[0], bytes(flipped))), 400, "blob 1", "checksum")
    refused(put(url, body(good[0], good[1][:-10])), 400, "blob 1")  # a truncated blob
    refused(put(url, body(good[0])[:-3]), 400, "frame 0")  # broken framing
    refused(put(url, b"\x00" * 40), 400, "blob 0")
    other = KVLayout("other", num_layers=2, kv_heads=2, head_dim=8, chunk_tokens=C, page_tokens=8)
    refused(put(url, body(good[0], blobs(root, prompt(C), other)[0])), 400, "blob 1", other.fingerprint)
    wrong_key = blobs(root, prompt(2 * C, seed=1))[1]  # chained under another prompt's first chunk
    refused(put(url, body(good[0], wrong_key)), 400, "parent")
    refused(put(url, body(*blobs(bytes(16), prompt(C)))), 409, "root")
    ids = np.asarray(prompt(3 * C), dtype=np.int32)  # a summary that cannot be this layout's
    odd = Chunk(chunk_keys(root, ids, C)[0], root, ids[:C], kv_for(3 * C)[:, :, :, :C], torch.zeros(3, dtype=torch.float16))
    refused(put(url, body(blob_bytes(odd, LAYOUT, get_codec("raw")), good[1])), 400, "blob 0", "summary")
    refused(put(url, body(*good), fingerprint="0" * 32), 404, "not attached")
    refused(put(url, body(*good), fingerprint="nope"), 422, "layout", "pattern")
    assert used(url) == before
    assert put(url, body(*good)).json() == {"stored": 3, "present": 0, "dropped": 0}


def test_limits_say_what_was_wrong(url, root):
    before = used(url)
    refused(put(url, body(*blobs(root, prompt(9 * C)))), 413, "9 chunks", "limit is 8")
    refused(put(url, b"\x00" * (65 << 10)), 413, "Content-Length", str(64 << 10))
    chunked = httpx.put(url + "/v1/chunks", params={"layout": LAYOUT.fingerprint}, headers=AUTH,
                        content=iter([b"\x00" * (32 << 10)] * 3))  # no Content-Length: cut off while read
    refused(chunked, 413, "over the limit")
    tokens = {"layout": LAYOUT.fingerprint, "tokens": prompt(4097)}
    refused(httpx.post(url + "/v1/lookup", json=tokens, headers=AUTH), 413, "4097 tokens", "4096")
    refused(httpx.post(url + "/v1/chunks/fetch", json={**tokens, "tokens": prompt(C), "layer_stop": 3},
                       headers=AUTH), 400, "layers")
    assert used(url) == before
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as c, pytest.raises(PayloadTooLargeError) as err:
        c.lookup(prompt(5000))
    assert "4992 tokens" in err.value.detail  # the client sends the full chunks only


def test_long_prompts_go_in_several_batches(url):
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as c:  # 8 chunks per batch, 64 KiB bodies
        tokens = prompt(20 * C, seed=3)
        kv = kv_for(len(tokens), seed=3)
        assert c.put(tokens, kv).stored == 20
        got = c.get(tokens)
        assert got.tokens == 20 * C and (got.kv == kv).all()
