"""Every endpoint through the client, sync and async, against a real server."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import numpy as np
import pytest
import torch

from kvtier.api import AsyncClient, Client
from kvtier.api.auth import hash_key
from kvtier.api.client import (AuthenticationError, NotFoundError, PermissionDeniedError, ServerError,
                               ServiceUnavailableError)
from kvtier.errors import LayoutError, StoreUnavailableError
from kvtier.kvstore.chunk import layer_checksums

from .helpers import BLOB_BYTES, KEYS, LAYOUT, kv_for, make_config, prompt, serve



class Awaitable:
    """The sync client behind the async client's interface, so one scenario drives both."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __getattr__(self, name):
        method = getattr(self.client, name)

        async def call(*args, **kwargs):
            return method(*args, **kwargs)

        return call


def open_client(kind: str, url: str, api_key: str):
    if kind == "sync":
        return Awaitable(Client(url, LAYOUT, api_key=api_key))
    return AsyncClient(url, LAYOUT, api_key=api_key)


async def close(client) -> None:
    await (client.close() if isinstance(client, Awaitable) else client.aclose())


async def scenario(kind: str, url: str) -> None:
    c = open_client(kind, url, KEYS["alice"])
    admin = open_client(kind, url, KEYS["admin"])
    try:
        C = LAYOUT.chunk_tokens
        tokens = prompt(3 * C + 5)
        kv = kv_for(len(tokens))
        assert (await c.health())["status"] == "ok"
        assert await c.attach(LAYOUT) == LAYOUT.fingerprint

        put = await c.put(tokens, kv)
        assert (put.stored, put.present, put.dropped) == (3, 0, 0)
        again = await c.put(tokens, kv)
        assert (again.stored, again.present) == (0, 3)

        found = await c.lookup(tokens)
        assert found.tokens == 3 * C
        assert [ref.key for ref in found.chunks] == await c.keys(tokens)
        assert all(ref.tiers for ref in found.chunks)

        got = await c.get(tokens)
        assert got.tokens == 3 * C and len(got.tiers) == 3
        assert torch.equal(got.kv, kv[:, :, :, : 3 * C])
        out = torch.zeros(1, 2, 2, 4 * C, 8, dtype=torch.float16)
        part = await c.get(tokens, out=out, layers=range(1, 2))
        assert part.kv is out and torch.equal(out[:, :, :, : 3 * C], kv[1:2, :, :, : 3 * C])
        with pytest.raises(LayoutError):
            await c.get(tokens, layers=range(0, 3))

        assert await c.prefetch(tokens) == 3
        assert await c.pin(tokens) == 3
        assert await c.unpin(tokens) == 3
        assert await c.delete(tokens) == 1  # the last chunk and what hangs below it
        assert (await c.lookup(tokens)).tokens == 2 * C

        stats = await c.stats()
        assert stats["tenant"] == "alice" and stats["used_bytes"] == 2 * LAYOUT.chunk_bytes
        assert stats["put_chunks"] == 3
        assert stats["requests"]["/v1/chunks"] == 2  # the second put knew its chunks cached: it sent the last only

        everything = await admin.admin_stats()
        assert everything["store"]["chunks"] == 2
        assert {t["tenant"] for t in everything["tenants"]} == {"alice", "bob"}
        assert await admin.flush("alice") == 2
        put = await c.put(tokens, kv)  # what the client saw cached is gone: a 409, then it sends it all
        assert (put.stored, put.present) == (3, 0)
        assert await admin.flush("alice") == 3
        assert (await c.lookup(tokens)).tokens == 0  # the client learns they are gone ...
        assert (await c.put(tokens, kv)).stored == 3  # ... and sends everything at once
        assert (await c.stats())["requests"]["/v1/chunks"] == 5
        assert await admin.flush() == 3
        with pytest.raises(PermissionDeniedError):
            await c.admin_stats()
        with pytest.raises(PermissionDeniedError):
            await admin.lookup(tokens)
        with pytest.raises(NotFoundError):
            await admin.flush("carol")
    finally:
        await close(c)
        await close(admin)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_every_endpoint_round_trips(url, kind):
    asyncio.run(scenario(kind, url))


def test_metrics_count_hits_bytes_and_requests(url):
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as c:
        tokens = prompt(2 * LAYOUT.chunk_tokens)
        c.put(tokens, kv_for(len(tokens)))
        c.get(tokens)
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"}).text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines['kvtier_tier_hits_total{partition="shared",tier="host"}']) == 2  # alice: no quota
    assert float(lines['kvtier_requests_total{endpoint="/v1/chunks/fetch",status="200"}']) == 1
    assert float(lines['kvtier_bytes_received_total{endpoint="/v1/chunks"}']) > 2 * LAYOUT.chunk_bytes
    assert float(lines['kvtier_bytes_sent_total{endpoint="/v1/chunks/fetch"}']) > 2 * LAYOUT.chunk_bytes
    assert 'kvtier_request_seconds_bucket{endpoint="/v1/chunks",le="0.01"}' in lines
    assert "kvtier_store_queue_depth" in lines and "kvtier_requests_in_flight" in lines
    assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEYS['alice']}"}).status_code == 403


def test_keys_are_checked(url):
    for key in (None, "wrong", KEYS["alice"] + "x"):
        with Client(url, LAYOUT, api_key=key) as c, pytest.raises(AuthenticationError) as err:
            c.lookup(prompt(16))
        assert err.value.status == 401 and "API key" in err.value.detail


def test_a_memory_only_service_stores_in_place_past_its_capacity(tmp_path):
    """Host tier only: puts are received into lent host memory and stored on the event loop; a full tier evicts
    after each put to keep room for the next, and every chunk still cached reads back as put."""
    config = make_config(tmp_path, tiers=[{"kind": "host", "capacity_bytes": 48 << 10}])
    with serve(config) as url, Client(url, LAYOUT, api_key=KEYS["alice"]) as c:
        prompts = [prompt(4 * LAYOUT.chunk_tokens, seed=s) for s in range(12)]
        for s, p in enumerate(prompts):
            assert c.put(p, kv_for(len(p), seed=s)).stored == 4
        stats = httpx.get(url + "/v1/admin/stats", headers={"Authorization": f"Bearer {KEYS['admin']}"}).json()["store"]
        host = max((part["tiers"][0] for part in stats["partitions"].values()), key=lambda t: t["used_bytes"])
        assert 0 < host["used_bytes"] <= host["capacity_bytes"] and host["evictions"] > 0
        cached = 0
        for s, p in enumerate(prompts):
            got = c.get(p)
            assert torch.equal(got.kv[:, :, :, : got.tokens], kv_for(len(p), seed=s)[:, :, :, : got.tokens])
            cached += got.tokens > 0
        assert cached >= 2


def test_a_service_without_tenants_is_healthy_and_refuses_tenant_calls(tmp_path):
    """No tenant and no open access (``kvtier serve`` warns): health and the admin's endpoints still answer."""
    with serve(make_config(tmp_path, tenants=[])) as url:
        health = httpx.get(url + "/v1/health")
        assert health.status_code == 200 and health.json()["tiers"] == ["host", "disk"]
        admin = {"Authorization": f"Bearer {KEYS['admin']}"}
        assert httpx.get(url + "/v1/admin/stats", headers=admin).status_code == 200
        assert httpx.post(url + "/v1/lookup", json={"layout": LAYOUT.fingerprint, "tokens": [1]},
                          headers={"Authorization": f"Bearer {KEYS['alice']}"}).status_code == 401


def test_one_client_puts_and_gets_with_two_layouts_in_turn(url):
    """Requests of each layout name that layout, however they alternate (the client merges each path and query
    with its base URL once and keeps it)."""
    other = dataclasses.replace(LAYOUT, model_id="other", num_layers=1)
    tokens = prompt(2 * LAYOUT.chunk_tokens)
    kv = kv_for(len(tokens))
    with Client(url, api_key=KEYS["alice"]) as c:
        for layout, part in [(LAYOUT, kv), (other, kv[:1]), (LAYOUT, kv), (other, kv[:1])]:
            assert c.put(tokens, part.contiguous(), layout=layout).stored + c.lookup(tokens, layout=layout).tokens > 0
            got = c.get(tokens, layout=layout)
            assert got.tokens == len(tokens) and torch.equal(got.kv, part)


def test_a_put_after_a_delete_sends_what_the_delete_removed(url):
    """A delete takes the prompt's subtree: the client forgets every chunk it knew cached, so a later put
    stores them again instead of reporting them present."""
    C = LAYOUT.chunk_tokens
    tokens, kv = prompt(4 * C), kv_for(4 * C)
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as c:
        assert c.put(tokens, kv).stored == 4
        assert c.delete(tokens[: 2 * C]) == 3  # chunk 1 and the two below it
        assert (c.put(tokens[: 2 * C], kv[:, :, :, : 2 * C]).stored, c.put(tokens, kv).stored) == (1, 2)
        got = c.get(tokens)
        assert got.tokens == 4 * C and torch.equal(got.kv, kv)


def test_a_prompt_evicted_since_the_client_saw_it_is_stored_again(tmp_path):
    """The client remembers what it saw cached; other traffic evicts the prompt; a put of it again (no lookup
    first, as an engine offloading KV does) must store it again, as the in-process store would, not report it
    present and leave it uncached."""
    C = LAYOUT.chunk_tokens
    config = make_config(tmp_path, tiers=[{"kind": "host", "capacity_bytes": 4 * BLOB_BYTES}],
                         tenants=[{"name": "alice", "key_sha256": hash_key(KEYS["alice"])}])
    tokens, kv = prompt(2 * C), kv_for(2 * C)
    with serve(config) as url, Client(url, LAYOUT, api_key=KEYS["alice"]) as c, \
            Client(url, LAYOUT, api_key=KEYS["alice"]) as observer:
        assert c.put(tokens, kv).stored == 2
        for seed in range(1, 5):  # other prompts take the tier
            c.put(prompt(2 * C, seed=seed), kv_for(2 * C, seed=seed))
        assert observer.lookup(tokens).tokens == 0
        assert c.put(tokens, kv).stored == 2
        got = observer.get(tokens)
        assert got.tokens == 2 * C and torch.equal(got.kv, kv)


class _LoseReply(httpx.BaseTransport):
    """Forwards every request to the real server, but for the first one to ``path`` it drops the reply, as a
    connection lost after the server acted would (a fault that cannot be produced on demand)."""

    def __init__(self, path: str) -> None:
        self.inner, self.path, self.lost = httpx.HTTPTransport(), path, False

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if request.url.path == self.path and not self.lost:
            self.lost = True
            response.read()
            response.close()
            raise httpx.ReadError("connection lost before the reply", request=request)
        return response


@pytest.mark.parametrize("call", ["delete", "flush"])
def test_a_delete_or_flush_whose_reply_is_lost_is_not_repeated(url, call):
    """Repeating it would report 0 chunks, or delete what another client put back meanwhile: the caller gets
    the error instead, and the chunks were deleted once."""
    C = LAYOUT.chunk_tokens
    tokens = prompt(3 * C)
    key = KEYS["alice"] if call == "delete" else KEYS["admin"]
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as alice, Client(url, LAYOUT, api_key=key) as c:
        assert alice.put(tokens, kv_for(3 * C)).stored == 3
        path = "/v1/delete" if call == "delete" else "/v1/admin/flush"
        c._http = httpx.Client(base_url=url, headers=c.headers, transport=_LoseReply(path))
        with pytest.raises(ServiceUnavailableError, match="connection lost"):
            c.delete(tokens[:C]) if call == "delete" else c.flush("alice")
        assert alice.lookup(tokens).tokens == 0


def test_an_out_that_is_not_a_tensor_is_a_layout_error(url):
    C = LAYOUT.chunk_tokens
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as c:
        c.put(prompt(C), kv_for(C))
        with pytest.raises(LayoutError, match="of type ndarray"):
            c.get(prompt(C), out=kv_for(C).numpy())


def test_the_client_takes_the_stores_arguments_and_raises_its_errors(tmp_path):
    """An engine switches by changing one line: the same positional arguments (namespace before layout; a client's
    namespace is its key's tenant, so only "" is taken), and the store's own exception classes for a put no tier
    can hold (CapacityError) and KV a lossy tier cannot encode (LayoutError)."""
    from kvtier.errors import CapacityError

    C = LAYOUT.chunk_tokens
    config = make_config(tmp_path, tiers=[{"kind": "host", "capacity_bytes": 2 * BLOB_BYTES},
                                          {"kind": "disk", "capacity_bytes": BLOB_BYTES, "codec": "fp8",
                                           "path": str(tmp_path / "disk")}],
                         tenants=[{"name": "alice", "key_sha256": hash_key(KEYS["alice"])}])
    tokens, kv = prompt(2 * C), kv_for(2 * C)
    with serve(config) as url, Client(url, api_key=KEYS["alice"]) as c:
        assert c.put(tokens, kv, "", LAYOUT).stored == 2
        assert c.lookup(tokens, "", LAYOUT).tokens == 2 * C
        assert torch.equal(c.get(tokens, None, None, "", LAYOUT).kv, kv)
        with pytest.raises(ValueError, match="namespace"):
            c.lookup(tokens, "tenant/bob", LAYOUT)
        with pytest.raises(CapacityError):
            c.put(prompt(8 * C, seed=1), kv_for(8 * C, seed=1), layout=LAYOUT)
        bad = kv_for(C, seed=2)
        bad[0, 0, 0, 3, 1] = float("nan")
        with pytest.raises(LayoutError, match="inf, nan"):
            c.put(prompt(C, seed=2), bad, layout=LAYOUT)
        assert c.lookup(tokens, layout=LAYOUT).tokens == 2 * C


async def chain_scenario(kind: str, url: str) -> None:
    """``root`` and ``put_chunks``, the store's calls for chunks built elsewhere (the transformers adapter's)."""
    from kvtier.api.client import ConflictError
    from kvtier.errors import ParentMissingError
    from kvtier.kvstore.chunk import Chunk
    from kvtier.kvstore.keys import root_key

    C = LAYOUT.chunk_tokens
    c = open_client(kind, url, KEYS["alice"])
    try:
        tokens = prompt(10 * C, seed=5)  # more chunks than max_chunks_per_batch (8): two requests
        kv = kv_for(len(tokens), seed=5)
        root, keys = await c.root(), await c.keys(tokens)
        assert root != root_key(LAYOUT.fingerprint, "")  # the tenant's own root, not the bare namespace's
        ids = torch.tensor(tokens, dtype=torch.int32).numpy()
        chunks = [Chunk(k, keys[i - 1] if i else root, ids[i * C : (i + 1) * C], kv[:, :, :, i * C : (i + 1) * C])
                  for i, k in enumerate(keys)]
        with pytest.raises(ParentMissingError) as missing:  # the first parent is not cached yet
            await c.put_chunks(chunks[4:], root)
        assert isinstance(missing.value, ConflictError) and "parent" in str(missing.value)
        with pytest.raises(ValueError, match="root"):
            await c.put_chunks(chunks, keys[0])
        with pytest.raises(ValueError, match="expected"):
            await c.put_chunks([chunks[0], chunks[2]], root)
        with pytest.raises(ValueError, match="namespace"):
            await c.put_chunks(chunks, root, "tenant/bob")
        # checked as the store checks them, before anything is sent: a bad chunk in the second request's part of
        # the chain must not leave the first request's chunks stored
        forged = chunks[:9] + [Chunk(keys[9], keys[8], ids[:C], chunks[9].kv)]  # a key that is not H(parent || tokens)
        with pytest.raises(ValueError, match="H\\(parent"):
            await c.put_chunks(forged, root)
        with pytest.raises(LayoutError, match="dtype"):
            await c.put_chunks(chunks[:9] + [Chunk(keys[9], keys[8], chunks[9].tokens, chunks[9].kv.float())], root)
        with pytest.raises(LayoutError, match="tokens"):
            await c.put_chunks([Chunk(keys[0], root, chunks[0].tokens, kv[:, :, :, : 2 * C])], root)
        with pytest.raises(ValueError, match="root"):
            await c.put_chunks([], keys[0])
        assert (await c.lookup(tokens)).tokens == 0  # nothing refused was stored

        put = await c.put_chunks(chunks[:2], root)
        assert (put.stored, put.present, put.dropped) == (2, 0, 0)
        rest = await c.put_chunks(chunks[1:], root)  # from a cached parent on: one present, eight new
        assert (rest.stored, rest.present, rest.dropped) == (8, 1, 0)
        assert (await c.put_chunks(chunks, root)).present == 10
        # the one refused by the service (409), the first two chunks, then nine and ten in two requests each (8 at most)
        assert (await c.stats())["requests"]["/v1/chunks"] == 1 + 1 + 2 + 2
        got = await c.get(tokens)
        assert got.tokens == 10 * C and torch.equal(got.kv, kv)
        assert (await c.put_chunks([], root)).stored == 0
    finally:
        await close(c)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_chunks_built_elsewhere_are_put_as_a_chain(url, kind):
    asyncio.run(chain_scenario(kind, url))


def test_a_get_over_several_requests_lands_in_out_and_stops_at_the_first_short_reply(tmp_path):
    """A get of more chunks than one request may carry (max_chunks_per_batch) asks for them request by request,
    each after the chunk before, and stops at the first reply that brings fewer than asked for (the cached prefix
    ends there). Each reply lands in the caller's ``out`` (without one, in a tensor of its own; the get joins
    them), and nothing is written past the hit."""
    C = LAYOUT.chunk_tokens
    tokens, kv = prompt(5 * C, seed=7), kv_for(5 * C, seed=7)
    with serve(make_config(tmp_path, server={"max_chunks_per_batch": 2})) as url, \
            Client(url, LAYOUT, api_key=KEYS["alice"]) as c:
        assert c.put(tokens[: 3 * C], kv[:, :, :, : 3 * C]).stored == 3
        got = c.get(tokens)
        assert got.tokens == 3 * C and torch.equal(got.kv, kv[:, :, :, : 3 * C])
        assert c.stats()["requests"]["/v1/chunks/fetch"] == 2  # chunks 0-1, then 2 (asked for 2-3)
        out = torch.full(kv.shape[:3] + (6 * C, kv.shape[4]), 7.0, dtype=kv.dtype)
        got = c.get(tokens, out=out)
        assert got.tokens == 3 * C and got.kv is out and torch.equal(out[:, :, :, : 3 * C], kv[:, :, :, : 3 * C])
        assert bool((out[:, :, :, 3 * C :] == 7).all())
        assert c.put(tokens, kv).stored == 2
        assert torch.equal(c.get(tokens).kv, kv)
        assert c.stats()["requests"]["/v1/chunks/fetch"] == 2 + 2 + 3  # then 0-1, 2-3, 4


def test_a_put_retried_after_a_restart_takes_the_new_limits(tmp_path):
    """The service restarts (memory only: its chunks are gone) with a smaller max_chunks_per_batch: a put that
    extends a prompt the client saw cached is refused (409), the client attaches again and sends the whole
    prompt from its start, in batches of the new size."""
    C = LAYOUT.chunk_tokens
    tokens, kv = prompt(12 * C, seed=9), kv_for(12 * C, seed=9)
    tiers = [{"kind": "host", "capacity_bytes": 1 << 20}]
    config = make_config(tmp_path, tiers=tiers)
    with serve(config) as url:
        c = Client(url, LAYOUT, api_key=KEYS["alice"])
        assert c.put(tokens[: 10 * C], kv[:, :, :, : 10 * C]).stored == 10
    smaller = make_config(tmp_path, tiers=tiers, server={"max_chunks_per_batch": 2})
    with serve(smaller, port=int(url.rsplit(":", 1)[1])), c:
        put = c.put(tokens, kv)
        assert (put.stored, put.present, put.dropped) == (12, 0, 0)
        assert torch.equal(c.get(tokens).kv, kv)


def test_a_chunk_changed_in_the_services_memory_is_never_handed_out(tmp_path, caplog):
    """A fetch sends each chunk with the checksums it was put with, not a hash of whatever the service's memory
    holds now: bytes changed in between (a fault, flipped here by hand) fail the client's check. As the in-process
    store does with a bad copy, the hit ends before that chunk and the chunk is deleted (a put stores it again)."""
    apps = []
    config = make_config(tmp_path, tiers=[{"kind": "host", "capacity_bytes": 64 << 10}])
    C = LAYOUT.chunk_tokens
    tokens, kv = prompt(3 * C, seed=3), kv_for(3 * C, seed=3)
    sums = [layer_checksums({"kv": kv[:, :, :, i * C : (i + 1) * C].contiguous()}) for i in range(3)]
    with serve(config, wrap=lambda app: apps.append(app) or app) as url, Client(url, LAYOUT, api_key=KEYS["alice"]) as c:
        assert c.put(tokens, kv).stored == 3
        got = c.get(tokens)
        assert torch.equal(got.kv, kv) and got.layer_xxh3 == [tuple(s) for s in sums]
        assert c.get(tokens, layers=range(1, 2)).layer_xxh3 == [(s[1],) for s in sums]
        service = apps[0].state.service
        host = service.store(service.auth.identify(KEYS["alice"])).tiers[0]
        entry = host._entries[c.keys(tokens)[1]]
        host.pool[entry.offset + entry.parts["kv"][2] + 5] ^= 0x10
        got = c.get(tokens)
        assert got.tokens == C and torch.equal(got.kv[:, :, :, :C], kv[:, :, :, :C])
        assert got.tiers == ["host"] and got.layer_xxh3 == [tuple(sums[0])]
        assert "failed verification" in caplog.text
        assert c.lookup(tokens).tokens == C  # the bad chunk and the one after it are gone from the service
        assert c.put(tokens, kv).stored == 2
        assert torch.equal(c.get(tokens).kv, kv)


def test_a_reply_with_other_chunks_than_asked_for_is_a_server_error(url):
    """A service that answers a fetch with another prompt's chunks (a fault a correct service cannot make: here
    the client's request carries the other prompt's tokens) has the client raise a ServerError (a
    StoreUnavailableError: an engine recomputes), never return them."""
    C = LAYOUT.chunk_tokens
    first, second = prompt(C, seed=4), prompt(C, seed=5)
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as c:
        assert c.put(first, kv_for(C, seed=4)).stored == 1 and c.put(second, kv_for(C, seed=5)).stored == 1
        real = c._fetch_op

        def swapped(att, ids, keys, out, layers):  # asks for the second prompt, checks against the first
            return real(att, np.asarray(second, dtype=np.int32), keys, out, layers)

        c._fetch_op = swapped
        with pytest.raises(ServerError, match="bad_reply.*not the chunk asked for") as err:
            c.get(first)
        assert isinstance(err.value, StoreUnavailableError)
