"""Refusals: every limit and every bad body is a 4xx saying what was wrong, and nothing stored changes."""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time

import anyio
import httpx
import numpy as np
import pytest
import torch

from kvtier.api import Client
from kvtier.api.app import _replay
from kvtier.api.client import PayloadTooLargeError, ServerError
from kvtier.api.wire import frame_prefix
from kvtier.bench.api import free_port
from kvtier.compression.codec import get_codec
from kvtier.kvstore.chunk import Chunk, blob_bytes
from kvtier.kvstore.keys import chunk_keys
from kvtier.layout import KVLayout

from .helpers import KEYS, LAYOUT, kv_for, make_config, prompt, serve

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
    huge = KVLayout("huge", num_layers=64, kv_heads=64, head_dim=256, chunk_tokens=1 << 20, page_tokens=64)
    refused(httpx.post(url + "/v1/layouts", json=huge.to_dict(), headers=AUTH), 413, str(huge.chunk_bytes),
            "max_body_bytes")  # no chunk of it could ever be put
    assert used(url) == before
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as c, pytest.raises(PayloadTooLargeError) as err:
        c.pin(prompt(5000))  # a lookup or get goes in several requests; a pin names its prompt in one
    assert "4992 tokens" in err.value.detail  # the client sends the full chunks only


def test_long_prompts_go_in_several_batches(url):
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as c:  # 8 chunks per batch, 64 KiB bodies
        tokens = prompt(20 * C, seed=3)
        kv = kv_for(len(tokens), seed=3)
        assert c.put(tokens, kv).stored == 20
        got = c.get(tokens)
        assert got.tokens == 20 * C and (got.kv == kv).all()


def test_a_client_gone_mid_put_changes_nothing_and_is_no_server_error(url, root):
    """The connection closes after 100 of 5000 announced bytes: nothing stored, every lent byte given back, and
    the request is counted as the client's (499), not as a 500."""
    before = used(url)
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(f"PUT /v1/chunks?layout={LAYOUT.fingerprint} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  f"{KEYS['alice']}\r\nContent-Length: 5000\r\n\r\n".encode() + frame_prefix(4992) + b"\0" * 92)
        time.sleep(0.2)  # the server is reading the body
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    deadline = time.monotonic() + 10
    while 'endpoint="/v1/chunks",status="499"' not in (metrics := httpx.get(url + "/metrics", headers=admin).text):
        assert time.monotonic() < deadline, "the disconnected put was not recorded"
        time.sleep(0.05)
    assert 'endpoint="/v1/chunks",status="500"' not in metrics
    assert used(url) == before


def test_batches_are_sized_by_their_real_frames(tmp_path):
    """Chunks of 2048 tokens and little KV: each blob's header and token ids (8.6 KiB) are half its KV (16 KiB),
    and the client still packs every batch under max_body_bytes (5 frames of 24.6 KiB in 128 KiB)."""
    wide = KVLayout("wide", num_layers=1, kv_heads=1, head_dim=2, chunk_tokens=2048, page_tokens=64)
    config = make_config(tmp_path, server={"max_body_bytes": 128 << 10, "max_tokens_per_request": 1 << 16,
                                           "max_chunks_per_batch": 8})
    tokens = np.random.default_rng(4).integers(0, 100, 12 * wide.chunk_tokens).tolist()  # short ids: the get's
    kv = torch.randn(wide.chunk_shape[:3] + (len(tokens), wide.head_dim)).to(wide.torch_dtype)  # JSON fits too
    with serve(config) as url, Client(url, wide, api_key=KEYS["alice"]) as c:
        assert c.put(tokens, kv).stored == 12
        assert c.stats()["requests"]["/v1/chunks"] == 3
        got = c.get(tokens)
        assert got.tokens == len(tokens) and torch.equal(got.kv, kv)


@pytest.mark.parametrize("first", ["get", "put"])
def test_a_service_restarted_with_other_limits_is_followed_at_once(tmp_path, first):
    """The service restarts on the same disk with 2 chunks per batch instead of 8: the client's first call
    attaches the layout again and follows the new limits (a get returns the whole prefix, a put is split)."""
    limits = {"max_body_bytes": 64 << 10, "max_tokens_per_request": 4096}
    tokens, kv = prompt(20 * C, seed=5), kv_for(20 * C, seed=5)
    port = free_port()
    with Client(f"http://127.0.0.1:{port}", LAYOUT, api_key=KEYS["alice"]) as c:
        with serve(make_config(tmp_path, server={**limits, "max_chunks_per_batch": 8}), port):
            stored = c.put(tokens if first == "get" else tokens[:C], kv if first == "get" else kv[:, :, :, :C]).stored
            assert stored == (20 if first == "get" else 1)
        with serve(make_config(tmp_path, server={**limits, "max_chunks_per_batch": 2}), port):
            if first == "get":
                got = c.get(tokens)
                assert got.tokens == 20 * C and torch.equal(got.kv, kv)
            else:
                assert c.put(tokens, kv).stored == 19


def test_prompts_longer_than_one_request_go_in_several(tmp_path):
    """max_tokens_per_request 64 of 16-token chunks: a put goes 4 chunks a request, and so do a lookup and a get,
    each after the last chunk of the one before (its ``parent``); they stop at the end of the cached prefix, and
    a parent that is not the tenant's cached chunk is a 409, whoever's it is."""
    small = LAYOUT.chunk_tokens * 4
    config = make_config(tmp_path, server={"max_body_bytes": 64 << 10, "max_tokens_per_request": small,
                                           "max_chunks_per_batch": 8})
    tokens, kv = prompt(10 * C, seed=6), kv_for(10 * C, seed=6)
    with serve(config) as url, Client(url, LAYOUT, api_key=KEYS["alice"]) as c, \
            Client(url, LAYOUT, api_key=KEYS["bob"]) as bob:
        assert c.put(tokens, kv).stored == 10
        assert c.stats()["requests"]["/v1/chunks"] == 3
        found = c.lookup(tokens + [7])
        assert found.tokens == 10 * C and [r.index for r in found.chunks] == list(range(10))
        assert [r.key for r in found.chunks] == c.keys(tokens)
        got = c.get(tokens)
        assert got.tokens == 10 * C and torch.equal(got.kv, kv)
        requests = c.stats()["requests"]
        assert (requests["/v1/lookup"], requests["/v1/chunks/fetch"]) == (3, 3)  # 4 + 4 + 2 chunks each
        assert c.delete(tokens[: 4 * C]) == 7  # chunk 3 and everything below it: 3 to 9
        assert c.lookup(tokens).tokens == 3 * C and torch.equal(c.get(tokens).kv, kv[:, :, :, : 3 * C])
        keys = c.keys(tokens)
        for parent, status in ((keys[1], 200), (keys[3], 409)):  # alice's own cached chunk; a deleted one
            reply = httpx.post(url + "/v1/lookup", headers=AUTH, json={
                "layout": LAYOUT.fingerprint, "tokens": tokens[2 * C : 3 * C], "parent": parent.hex()})
            assert reply.status_code == status, reply.text
        bob.attach(LAYOUT)
        stolen = httpx.post(url + "/v1/chunks/fetch", json={"layout": LAYOUT.fingerprint, "tokens": tokens[C : 2 * C],
                                                             "parent": keys[0].hex()},
                            headers={"Authorization": f"Bearer {KEYS['bob']}"})
        assert stolen.status_code == 409 and stolen.json()["error"] == "parent_not_cached"  # alice's key, to bob


def test_a_body_refused_for_its_size_is_counted_under_its_endpoint(url):
    refused(put(url, b"\x00" * (65 << 10)), 413, "Content-Length")
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEYS['admin']}"}).text
    assert 'kvtier_requests_total{endpoint="/v1/chunks",status="413"} 1.0' in metrics
    assert 'endpoint="unmatched"' not in metrics


def raw(url: str, request: bytes, seconds: float = 5) -> tuple[int, dict]:
    """Send ``request`` on a connection of its own; the status and JSON body of the reply (0, {} if none came
    within ``seconds``)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(request)
        s.settimeout(seconds)
        data = b""
        try:
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                if not (piece := s.recv(65536)):
                    break
                data += piece
        except TimeoutError:
            pass
    if not data:
        return 0, {}
    top, _, body = data.partition(b"\r\n\r\n")
    return int(top.split()[1]), json.loads(body)


def heads(method: str, path: str, **headers: object) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: x", f"Authorization: Bearer {KEYS['alice']}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def chunked(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n0\r\n\r\n"


@pytest.mark.parametrize("path", ["/v1/lookup", "/v1/chunks/fetch"])
def test_a_client_gone_mid_body_of_a_json_request_is_recorded_as_499(url, path):
    data = json.dumps({"layout": LAYOUT.fingerprint, "tokens": prompt(64)}).encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(heads("POST", path, Content_Type="application/json", Content_Length=len(data)) + data[:10])
        time.sleep(0.2)  # the server is reading the body
    admin = {"Authorization": f"Bearer {KEYS['admin']}"}
    deadline = time.monotonic() + 10
    while f'endpoint="{path}",status="499"' not in (metrics := httpx.get(url + "/metrics", headers=admin).text):
        assert time.monotonic() < deadline, f"the disconnected request was not recorded as 499: {metrics}"
        time.sleep(0.05)
    assert f'endpoint="{path}",status="400"' not in metrics


def test_a_fetch_whose_client_left_before_its_response_is_a_499_and_counts_nothing_sent(tmp_path):
    """Clients that send a whole fetch and close at once: the service finds them gone once the chunks are read
    (from disk, in a worker thread), sends nothing, records 499 and counts no bytes out for the tenant."""
    tokens = prompt(4 * C, seed=11)
    config = make_config(tmp_path, tiers=[{"kind": "disk", "capacity_bytes": 4 << 20, "path": str(tmp_path / "disk")}])
    with serve(config) as url, Client(url, LAYOUT, api_key=KEYS["alice"]) as alice:
        alice.put(tokens, kv_for(4 * C))
        before = alice.stats()["bytes_out"]
        data = json.dumps({"layout": LAYOUT.fingerprint, "tokens": tokens}).encode()
        host, port = url.removeprefix("http://").split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port))) as s:
                s.sendall(heads("POST", "/v1/chunks/fetch", Content_Type="application/json",
                                Content_Length=len(data)) + data)
        admin = {"Authorization": f"Bearer {KEYS['admin']}"}
        deadline = time.monotonic() + 10
        while 'endpoint="/v1/chunks/fetch",status="499"} 3.0' not in (m := httpx.get(url + "/metrics", headers=admin).text):
            assert time.monotonic() < deadline, m
            time.sleep(0.05)
        assert 'endpoint="/v1/chunks/fetch",status="200"' not in m
        assert alice.stats()["bytes_out"] == before


def test_chunks_a_fetch_sends_from_the_tiers_memory_stay_pinned_until_the_reply_is_out(tmp_path):
    """A fetch of chunks in the first tier's host memory sends them from there: while its reply is held back (the
    transport's writes are stalled here), they are pinned (a delete leaves them); once its parts are handed over
    (before the reply ends: the next request on the connection finds them unpinned), or its client is gone,
    nothing stays pinned and they can be deleted."""
    gate, apps = threading.Event(), []

    def stall_fetch_bodies(app):
        apps.append(app)

        async def stalled(scope, receive, send):
            async def gated(message):
                if message["type"] == "http.response.body" and scope.get("path") == "/v1/chunks/fetch":
                    await anyio.to_thread.run_sync(gate.wait, 10)
                await send(message)

            await app(scope, receive, gated)

        return stalled

    config = make_config(tmp_path, tiers=[{"kind": "host", "capacity_bytes": 1 << 20}])
    tokens, kv = prompt(3 * C, seed=12), kv_for(3 * C, seed=12)
    with serve(config, wrap=stall_fetch_bodies) as url, Client(url, LAYOUT, api_key=KEYS["alice"]) as alice:
        assert alice.put(tokens, kv).stored == 3
        service = apps[0].state.service
        store = service.store(service.auth.identify(KEYS["alice"]))
        nodes = [store.index.get(k) for k in alice.keys(tokens)]
        got = []
        reader = threading.Thread(target=lambda: got.append(alice.get(tokens)))
        reader.start()
        deadline = time.monotonic() + 10
        while not all(n.pins for n in nodes):
            assert time.monotonic() < deadline and reader.is_alive()
            time.sleep(0.01)
        assert store.delete(tokens, service.auth.identify(KEYS["alice"]).namespace, LAYOUT) == 0  # pinned
        gate.set()
        reader.join(10)
        assert got[0].tokens == 3 * C and torch.equal(got[0].kv, kv)
        assert alice.delete(tokens) == 1  # the next request on the connection: unpinned before the reply ended
        assert alice.put(tokens, kv).stored == 1
        nodes = [store.index.get(k) for k in alice.keys(tokens)]
        data = json.dumps({"layout": LAYOUT.fingerprint, "tokens": tokens}).encode()
        host, port = url.removeprefix("http://").split(":")
        for _ in range(3):  # clients that leave without reading their reply
            with socket.create_connection((host, int(port))) as s:
                s.sendall(heads("POST", "/v1/chunks/fetch", Content_Type="application/json",
                                Content_Length=len(data)) + data)
        while any(n.pins for n in nodes):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert alice.delete(tokens) == 1 and alice.lookup(tokens).tokens == 2 * C


def test_transfer_encoding_with_content_length_is_refused_before_reading(url, root):
    """RFC 9112 6.3: a message with both may be an attempt at request smuggling; the service refuses it 400,
    naming both headers, whatever the endpoint, and nothing changes."""
    before = used(url)
    data = body(*blobs(root, prompt(2 * C, seed=7)))
    for request in (heads("PUT", f"/v1/chunks?layout={LAYOUT.fingerprint}", Transfer_Encoding="chunked",
                          Content_Length=16) + chunked(data),
                    heads("POST", "/v1/lookup", Content_Type="application/json", Transfer_Encoding="chunked",
                          Content_Length=len(data)) + chunked(json.dumps({"layout": LAYOUT.fingerprint,
                                                                           "tokens": prompt(C)}).encode())):
        status, reply = raw(url, request)
        assert status == 400 and reply["error"] == "conflicting_length", reply
        assert "Transfer-Encoding" in reply["detail"] and "Content-Length" in reply["detail"]
    assert used(url) == before
    assert put(url, data).json() == {"stored": 2, "present": 0, "dropped": 0}  # the same body, sent once sized


def test_json_bodies_are_limited_by_the_token_limit_before_parsing(tmp_path):
    """max_body_bytes (1 MiB) sizes chunk batches; a JSON body may only be as large as the largest valid one
    (max_tokens_per_request ids of 10 digits, with ", " between them, and room for the other fields)."""
    config = make_config(tmp_path, server={"max_body_bytes": 1 << 20, "max_tokens_per_request": 4096,
                                           "max_chunks_per_batch": 8})
    with serve(config) as url:
        Client(url, LAYOUT, api_key=KEYS["alice"]).attach(LAYOUT)
        largest = json.dumps({"layout": LAYOUT.fingerprint, "tokens": [2**31 - 1] * 4096}).encode()
        reply = httpx.post(url + "/v1/lookup", content=largest, headers={**AUTH, "Content-Type": "application/json"})
        assert reply.status_code == 200 and reply.json()["tokens"] == 0, reply.text
        for path in ("/v1/lookup", "/v1/chunks/fetch", "/v1/pin", "/v1/layouts"):  # headers only: not read
            status, refusal = raw(url, heads("POST", path, Content_Type="application/json", Content_Length=900_000))
            assert status == 413 and refusal["error"] == "body_too_large", (path, status, refusal)
            assert "900000" in refusal["detail"] and "JSON" in refusal["detail"]
        many = json.dumps({"layout": LAYOUT.fingerprint, "tokens": [1] * 300_000}).encode()
        refused(httpx.post(url + "/v1/lookup", headers={**AUTH, "Content-Type": "application/json"},
                           content=iter([many[i : i + 8192] for i in range(0, len(many), 8192)])),
                413, "over the limit")  # chunked: cut off once past the limit
        batch = body(b"\x00" * (512 << 10))  # a put body may still take max_body_bytes: read, then refused
        refused(put(url, batch), 400, "blob 0")


def test_a_tenant_attaches_at_most_max_layouts_per_tenant(tmp_path):
    """Layouts stay attached until a restart: their number is bounded per tenant, so no tenant can make the
    service keep ever more of them; attaching one of its own again, or another tenant's attaching, still works."""
    config = make_config(tmp_path, server={"max_body_bytes": 64 << 10, "max_tokens_per_request": 4096,
                                           "max_chunks_per_batch": 8, "max_layouts_per_tenant": 2})
    layouts = [dataclasses.replace(LAYOUT, model_id=f"model-{i}") for i in range(3)]
    with serve(config) as url:
        def attach(layout: KVLayout, key: str) -> httpx.Response:
            return httpx.post(url + "/v1/layouts", json=layout.to_dict(), headers={"Authorization": f"Bearer {key}"})

        assert [attach(layout, KEYS["alice"]).status_code for layout in layouts[:2]] == [200, 200]
        third = attach(layouts[2], KEYS["alice"])
        assert third.status_code == 409 and third.json()["error"] == "too_many_layouts"
        assert "max_layouts_per_tenant" in third.json()["detail"]
        assert attach(layouts[0], KEYS["alice"]).status_code == 200
        assert attach(layouts[2], KEYS["bob"]).status_code == 200


@pytest.mark.parametrize("payload", [b'{"layout": "%s", "tokens": [NaN]}', b'{"layout": "%s", "tokens": [1e400]}',
                                     b'{"layout": "\\ud800%s", "tokens": []}', b'{"layout": "%s", "\\ud800": 1}'])
def test_json_values_no_answer_can_echo_still_get_a_422(url, root, payload):
    """Python's JSON reader takes NaN, 1e400 and lone surrogates, which no JSON answer can carry back: the 422 says
    what was wrong and where, without the value, and the connection stays usable."""
    with httpx.Client(base_url=url, headers={**AUTH, "Content-Type": "application/json"}) as http:
        reply = http.post("/v1/lookup", content=payload.replace(b"%s", LAYOUT.fingerprint.encode()))
        assert reply.status_code == 422, reply.text
        assert all({"type", "loc", "msg"} <= set(e) for e in reply.json()["detail"])
        assert http.post("/v1/lookup", json={"layout": LAYOUT.fingerprint, "tokens": []}).status_code == 200


@pytest.mark.parametrize("token", [True, "5", 1.0])
def test_a_token_id_is_a_json_integer(url, root, token):
    reply = httpx.post(url + "/v1/lookup", json={"layout": LAYOUT.fingerprint, "tokens": [token]}, headers=AUTH)
    assert reply.status_code == 422 and reply.json()["detail"][0]["loc"] == ["body", "tokens", 0], reply.text


def test_a_lookup_answered_with_other_chunks_is_an_error(tmp_path):
    """A server that ignored ``parent`` (an older one: unknown fields were dropped) would match a later request's
    tokens from the root and answer other chunks' keys: the client checks every key it is given."""
    def parentless(app):  # the fault: the service never sees a lookup's parent
        async def older(scope, receive, send):
            if scope["type"] != "http" or scope["path"] != "/v1/lookup":
                return await app(scope, receive, send)
            body, more = b"", True
            while more:
                message = await receive()
                body, more = body + message.get("body", b""), message.get("more_body", False)
            request = json.loads(body)
            request.pop("parent", None)
            stripped = {"type": "http.request", "body": json.dumps(request).encode(), "more_body": False}
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
            headers.append((b"content-length", str(len(stripped["body"])).encode()))
            await app({**scope, "headers": headers}, _replay(stripped, receive), send)
        return older

    config = make_config(tmp_path, server={"max_tokens_per_request": 2 * C})
    tokens = prompt(4 * C, seed=12)
    with serve(config, wrap=parentless) as url, Client(url, LAYOUT, api_key=KEYS["alice"]) as c:
        c.put(tokens[: 2 * C] * 2, kv_for(4 * C, seed=12))  # chunks whose tokens the second request repeats
        with pytest.raises(ServerError, match="other chunks' keys"):
            c.lookup(tokens[: 2 * C] * 2)
