"""Clients that stall cannot hold the byte budget (``max_bytes_in_flight``) for long: a put's body must keep
arriving (``body_timeout_s`` between pieces, else 408), a fetch's response must keep being read (the same
timeout, then the connection is dropped), a request whose client leaves while it waits for its bytes leaves the
queue (499), and one that waits past ``budget_wait_s`` is refused 503."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import torch

from kvtier.api import Client
from kvtier.api.client import APIError
from kvtier.api.wire import frame_prefix
from kvtier.layout import KVLayout

from .helpers import KEYS, LAYOUT, kv_for, make_config, prompt, serve

C = LAYOUT.chunk_tokens
LIMITS = {"max_body_bytes": 64 << 10, "max_tokens_per_request": 4096, "max_chunks_per_batch": 8}
ADMIN = {"Authorization": f"Bearer {KEYS['admin']}"}


def metric(url: str, name: str) -> str:
    """The lines of ``/metrics`` that start with ``name``."""
    text = httpx.get(url + "/metrics", headers=ADMIN).text
    return "\n".join(line for line in text.splitlines() if line.startswith(name))


def gauge(url: str, name: str) -> float:
    """The value of the unlabelled gauge ``name``."""
    return float(metric(url, name + " ").split()[1])


def wait_for(condition, what: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def connect(url: str, **options: int) -> socket.socket:
    """A raw connection to the server (``options``: SOL_SOCKET options set before connecting)."""
    host, port = url.removeprefix("http://").split(":")
    s = socket.socket()
    for name, value in options.items():
        s.setsockopt(socket.SOL_SOCKET, getattr(socket, name), value)
    s.connect((host, int(port)))
    return s


def head(method: str, path: str, tenant: str, content_length: int) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[tenant]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n").encode()


def reply(s: socket.socket, seconds: float = 10) -> tuple[int, dict, bytes]:
    """Status, headers and body of the response on ``s`` (read until the server closes it, or ``seconds``)."""
    s.settimeout(seconds)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    top, _, body = data.partition(b"\r\n\r\n")
    lines = top.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


@contextmanager
def stalled_put(url: str, drip: float | None = None) -> Iterator[socket.socket]:
    """Alice's put announcing a whole max_body_bytes body, of which it sends a frame's start, then nothing (or,
    with ``drip``, one byte every ``drip`` seconds, which keeps it going piece by piece); yields once the put
    holds its bytes of the budget."""
    stop = threading.Event()
    s = connect(url)
    s.sendall(head("PUT", f"/v1/chunks?layout={LAYOUT.fingerprint}", "alice", LIMITS["max_body_bytes"])
              + frame_prefix(4992) + b"\0" * 92)

    def dripping() -> None:
        while not stop.wait(drip):
            s.sendall(b"\0")

    dripper = threading.Thread(target=dripping, daemon=True)
    if drip is not None:
        dripper.start()
    try:
        wait_for(lambda: gauge(url, "kvtier_bytes_in_flight") == LIMITS["max_body_bytes"],
                 "the stalled put does not hold its bytes")
        yield s
    finally:
        stop.set()
        if drip is not None:
            dripper.join()
        s.close()


def tier_bytes(url: str, partition: str) -> list[int]:
    """The bytes each tier of ``partition`` holds, lent bytes included."""
    stats = httpx.get(url + "/v1/admin/stats", headers=ADMIN).json()
    return [t["used_bytes"] for t in stats["store"]["partitions"][partition]["tiers"]]


def test_a_stalled_put_is_refused_408_and_gives_back_its_bytes(tmp_path):
    """The put holds the whole budget; once its body stops for body_timeout_s it is refused 408 (connection
    closed), its budget and lent bytes are given back, and bob's put, which waited for the bytes, is stored."""
    config = make_config(tmp_path, server={**LIMITS, "max_bytes_in_flight": 64 << 10, "body_timeout_s": 2})
    with serve(config) as url, Client(url, LAYOUT, api_key=KEYS["alice"]) as alice:
        alice.attach(LAYOUT)
        before = tier_bytes(url, "shared")
        with stalled_put(url) as s, Client(url, LAYOUT, api_key=KEYS["bob"], timeout=5, retries=0) as bob:
            assert bob.put(prompt(C), kv_for(C)).stored == 1
            status, headers, body = reply(s)
        assert status == 408 and headers["connection"] == "close"
        assert json.loads(body)["error"] == "body_timeout" and "2.0 s" in json.loads(body)["detail"]
        assert tier_bytes(url, "shared") == before
        assert gauge(url, "kvtier_bytes_in_flight") == 0
        assert 'endpoint="/v1/chunks",status="408"} 1.0' in metric(url, "kvtier_requests_total")


@pytest.mark.parametrize("queued", ["fetch", "put"])
def test_a_request_whose_client_leaves_while_it_waits_for_bytes_leaves_the_queue(tmp_path, queued):
    """A put dripping a byte at a time holds the budget; bob's fetch (its body read) or put (headers sent, no
    body yet) queued behind it leaves the queue as soon as its client closes, and is recorded as 499."""
    config = make_config(tmp_path, server={**LIMITS, "max_bytes_in_flight": 64 << 10, "body_timeout_s": 1,
                                           "budget_wait_s": 30})
    with serve(config) as url:
        Client(url, LAYOUT, api_key=KEYS["alice"]).attach(LAYOUT)
        Client(url, LAYOUT, api_key=KEYS["bob"]).attach(LAYOUT)
        with stalled_put(url, drip=0.2):
            if queued == "fetch":
                data = json.dumps({"layout": LAYOUT.fingerprint, "tokens": prompt(2 * C)}).encode()
                request, endpoint = head("POST", "/v1/chunks/fetch", "bob", len(data)) + data, "/v1/chunks/fetch"
            else:
                request = head("PUT", f"/v1/chunks?layout={LAYOUT.fingerprint}", "bob", 1000)
                endpoint = "/v1/chunks"
            with connect(url) as s:
                s.sendall(request)
                wait_for(lambda: gauge(url, "kvtier_requests_waiting_for_bytes") == 1,
                         "the request did not queue")
            wait_for(lambda: gauge(url, "kvtier_requests_waiting_for_bytes") == 0,
                     "the request stayed queued after its client left", seconds=5)
            assert f'endpoint="{endpoint}",status="499"' in metric(url, "kvtier_requests_total")


def test_a_request_that_waits_too_long_for_its_bytes_is_refused_503(tmp_path):
    config = make_config(tmp_path, server={**LIMITS, "max_bytes_in_flight": 64 << 10, "body_timeout_s": 1,
                                           "budget_wait_s": 1})
    with serve(config) as url, Client(url, LAYOUT, api_key=KEYS["bob"], timeout=5, retries=0) as bob:
        Client(url, LAYOUT, api_key=KEYS["alice"]).attach(LAYOUT)
        tokens, kv = prompt(2 * C), kv_for(2 * C)
        assert bob.put(tokens, kv).stored == 2
        with stalled_put(url, drip=0.2):
            for call in (lambda: bob.get(tokens), lambda: bob.put(prompt(C, seed=1), kv_for(C))):
                with pytest.raises(APIError) as err:
                    call()
                assert err.value.status == 503 and err.value.error == "busy", err.value
                assert "max_bytes_in_flight" in err.value.detail
            assert gauge(url, "kvtier_requests_waiting_for_bytes") == 0
        got = bob.get(tokens)  # the budget is free again
        assert got.tokens == 2 * C and torch.equal(got.kv, kv)


def test_a_fetch_whose_response_is_not_read_gives_back_its_bytes(tmp_path):
    """A client fetches 16 MiB and reads none of it: once the response stalls for body_timeout_s the server
    drops it and gives back its bytes, so the next fetch, which needs the whole budget, is served."""
    big = KVLayout("big", num_layers=8, kv_heads=8, head_dim=128, dtype="float16", chunk_tokens=16, page_tokens=16)
    n = 32  # chunks of 512 KiB
    config = make_config(tmp_path, tiers=[{"kind": "host", "capacity_bytes": 96 << 20}],
                         server={"max_body_bytes": 9 << 20, "max_tokens_per_request": 4096, "max_chunks_per_batch": n,
                                 "max_bytes_in_flight": n * big.chunk_bytes, "body_timeout_s": 1})
    tokens = prompt(n * 16, seed=2)
    kv = torch.randn(big.chunk_shape[:3] + (len(tokens), big.head_dim)).to(big.torch_dtype)
    with serve(config) as url, Client(url, big, api_key=KEYS["alice"], timeout=5, retries=0) as alice:
        assert alice.put(tokens, kv).stored == n
        data = json.dumps({"layout": big.fingerprint, "tokens": tokens}).encode()
        with connect(url, SO_RCVBUF=4096) as s:
            s.sendall(head("POST", "/v1/chunks/fetch", "alice", len(data)) + data)  # and never read
            wait_for(lambda: gauge(url, "kvtier_bytes_in_flight") == n * big.chunk_bytes,
                     "the unread fetch does not hold the budget")
            got = alice.get(tokens)
            assert got.tokens == len(tokens) and torch.equal(got.kv, kv)
        assert 'endpoint="/v1/chunks/fetch",status="408"} 1.0' in metric(url, "kvtier_requests_total")
        assert gauge(url, "kvtier_bytes_in_flight") == 0
