"""Put and get throughput and latency through the service vs a bare endpoint of the same server.

A real ``kvtier serve`` runs in a subprocess on 127.0.0.1 (host tier only: this measures the API, not the
disk) with the bench endpoints on. For chunks of 1, 4 and 16 MiB, one :class:`~kvtier.api.client.Client`
times ``put(tokens, kv)`` of a new chunk (upload of a framed blob; decode, verify and store on the server) and
``get(tokens)`` of a cached one (fetch, decode and verify into a tensor), and, in alternating rounds, the bare
endpoint that swallows a body of the same size (``PUT /v1/bench/sink``: sent in views of 256 KiB, as the client
sends a put's body; one ``bytes`` body would be copied piece by piece on its way out) or returns
one from memory (``GET /v1/bench/source``: ``bytes`` parts of 1 MiB, which h11 sends without a copy, received
into a reused buffer), with its own httpx client: the HTTP stack's own limit. Then, in
this process and without a socket (:mod:`kvtier.bench.api_cost`), the service's own work per put (put minus
sink) beside the least a put must do with the bytes (copy them into kept memory and hash them).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from kvtier.api.auth import hash_key
from kvtier.api.client import BODY_PIECE, SOCKET_OPTIONS, Client
from kvtier.api.serve_cli import keep_freed_memory
from kvtier.api.wire import pieces
from kvtier.bench.api_cost import put_cost, without_settings
from kvtier.bench.args import at_least
from kvtier.bench.report import Report, progress
from kvtier.compression.codec import get_codec
from kvtier.kvstore.chunk import Chunk, blob_bytes
from kvtier.layout import KVLayout

_HEADS, _HEAD_DIM, _CHUNK_TOKENS = 8, 128, 256  # fp16: 1 MiB of KV per layer and chunk


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=at_least(1), nargs="+", default=[1, 4, 16], help="chunk sizes in MiB")
    parser.add_argument("--iterations", type=at_least(1), default=60,
                        help="timed calls per size, operation and path (spread over the rounds)")
    parser.add_argument("--rounds", type=at_least(1), default=6,
                        help="alternations between service and baseline (rounds past --iterations time nothing)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``kvtier serve`` in a subprocess with ``config`` (and ``env`` added to the environment, whose own
    ``KVTIER_*`` variables are left out: they would override ``config``); ``url`` once started. Stopped by
    :meth:`stop`, or on leaving it as a context manager."""

    def __init__(self, config: dict, env: dict[str, str] | None = None, startup_s: float = 60.0) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="kvtier-serve-")
        path = Path(self._dir.name) / "config.json"
        path.write_text(json.dumps(config))
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvtier.cli", "serve", "--config", str(path), "--port", str(port),
             "--log-level", "warning"], env={**without_settings(os.environ), **(env or {})})
        deadline = time.monotonic() + startup_s
        while True:
            try:
                if httpx.get(self.url + "/v1/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kvtier serve did not start (exit code {self.proc.returncode})")
            time.sleep(0.1)

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._dir.cleanup()


def _timed(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _measure(service, baseline, iterations: int, rounds: int, bar) -> tuple[list[float], list[float]]:
    """Alternate ``rounds`` times between the two, ``iterations`` timed calls each in all. Garbage left by what ran
    before (the in-process app of :mod:`kvtier.bench.api_cost`) is collected first: a full collection of it takes
    about 100 ms, which would land in one timed call."""
    gc.collect()
    service(), baseline()  # warm up both paths
    s_times: list[float] = []
    b_times: list[float] = []
    for r in range(rounds):
        n = iterations * (r + 1) // rounds - iterations * r // rounds
        s_times += _timed(service, n)
        b_times += _timed(baseline, n)
        bar.update(1)
    return s_times, b_times


def _rows(report: Report, op: str, mib: int, nbytes: int, s: list[float], b: list[float]) -> None:
    base = f"bare {'sink' if op == 'put' else 'source'} endpoint"
    report.add(f"{op} {mib} MiB throughput", nbytes / np.mean(s) / 1e9, "GB/s", base, nbytes / np.mean(b) / 1e9)
    for q in (50, 99):
        report.add(f"{op} {mib} MiB p{q} latency", float(np.percentile(s, q)) * 1e3, "ms", base,
                   float(np.percentile(b, q)) * 1e3, higher_is_better=False)


def run(args: argparse.Namespace) -> Report:
    key = secrets.token_hex(16)
    largest = max(args.sizes) << 20
    config = {
        "tiers": [{"kind": "host", "capacity_bytes": max(256 << 20, 8 * largest)}],
        "tenants": [{"name": "bench", "key_sha256": hash_key(key)}],
        "server": {"bench_endpoints": True, "max_body_bytes": 4 * largest},
    }
    report = Report("api")
    torch.set_num_threads(1)  # like the server: intra-op threads would fight it for the cores
    keep_freed_memory()  # like the server: fresh large buffers (h11's body pieces) reuse warm pages, not new ones
    rng = np.random.default_rng(0)
    with ServerProcess(config) as server, Client(server.url, api_key=key, timeout=60) as client, \
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                         transport=httpx.HTTPTransport(socket_options=SOCKET_OPTIONS)) as http:
        bar = progress(total=2 * len(args.sizes) * args.rounds, desc="bench api")
        for mib in args.sizes:
            layout = KVLayout("bench", num_layers=mib, kv_heads=_HEADS, head_dim=_HEAD_DIM,
                              chunk_tokens=_CHUNK_TOKENS)
            kv = torch.randn(layout.chunk_shape, dtype=torch.float16)
            prompts = iter(rng.integers(0, 50_000, size=(args.iterations + 2, _CHUNK_TOKENS)))  # warm-up, get
            body = bytes(_frame_bytes(layout, kv))
            length = {"Content-Length": str(len(body))}

            def put() -> None:
                assert client.put(next(prompts), kv, layout=layout).stored == 1

            def sink() -> None:  # the body in the client's pieces: one ``bytes`` would be copied as it goes out
                http.put("/v1/bench/sink", content=iter(pieces(body, BODY_PIECE)), headers=length).raise_for_status()

            s, b = _measure(put, sink, args.iterations, args.rounds, bar)
            _rows(report, "put", mib, len(body), s, b)

            cached = next(prompts)
            client.put(cached, kv, layout=layout)
            out = torch.empty_like(kv)

            def get() -> None:
                assert client.get(cached, out=out, layout=layout).tokens == _CHUNK_TOKENS

            received = memoryview(bytearray(len(body)))  # the baseline keeps the bytes too, in memory it reuses

            def source() -> None:
                with http.stream("GET", "/v1/bench/source", params={"nbytes": len(body)}) as resp:
                    resp.raise_for_status()
                    pos = 0
                    for piece in resp.iter_bytes():
                        received[pos : pos + len(piece)] = piece
                        pos += len(piece)
                assert pos == len(body)

            s, b = _measure(get, source, args.iterations, args.rounds, bar)
            _rows(report, "get", mib, len(body), s, b)
            put_s, sink_s, floor_s = put_cost(config, key, layout, args.iterations, rng)
            report.add(f"put {mib} MiB service work beyond the sink, in process", (put_s - sink_s) * 1e3, "ms",
                       "copy + XXH3 of the body into kept memory", floor_s * 1e3, higher_is_better=False)
        bar.close()
    report.notes.append("service: kvtier.api.Client put (upload, verify, store) / get (fetch, verify, decode into a tensor) "
                        "against a real `kvtier serve` subprocess on 127.0.0.1, host tier only; baseline: the same "
                        "server's bare sink/source endpoints with bodies of the same size (httpx, one connection each; "
                        "the sink's body sent in views of 256 KiB, as the client sends a put's; the source's body sent "
                        "in 1 MiB bytes parts, as a fetch sends, and received into a reused buffer, as the client "
                        "receives into `out`), alternating rounds; bytes = one framed chunk blob; "
                        "torch uses one intra-op thread in both processes")
    report.notes.append("in process: the same app called through ASGI with the body in 256 KiB pieces, no socket: "
                        "put minus sink (medians) is the service's own work, beside the least a put must do with "
                        "the bytes (kvtier.bench.api_cost)")
    return report



def _frame_bytes(layout: KVLayout, kv: torch.Tensor) -> int:
    """Bytes of one framed chunk blob of ``layout`` on the wire."""
    tokens = np.zeros(layout.chunk_tokens, dtype=np.int32)
    return 8 + len(blob_bytes(Chunk(bytes(16), bytes(16), tokens, kv), layout, get_codec("raw")))
