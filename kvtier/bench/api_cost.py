"""What a put costs the service itself, without the HTTP stack: the app called in process (ASGI) with a body
handed over in the pieces uvicorn hands over, against the bare sink in the same app, and against the least any
put must do with those bytes (copy them into memory it keeps and hash each KV layer, as the receiver does).

``kvtier bench api`` reports ``put - sink`` beside that floor: how far the service's own work is from it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import numpy as np
import torch
import xxhash

from kvtier.api.app import create_app
from kvtier.api.wire import CONTENT_TYPE, frame_prefix, pieces
from kvtier.config import KVTierConfig
from kvtier.kvstore.chunk import Chunk, encode_blob
from kvtier.kvstore.keys import chunk_keys
from kvtier.layout import KVLayout

PIECE = 256 << 10  # what uvicorn's transport reads at a time (asyncio's 256 KiB)


async def _call(app, path: str, query: str, body: bytes, key: str) -> None:
    """One PUT through the ASGI app; each piece becomes a fresh bytes object, as one read from a socket does."""
    parts = pieces(body, PIECE)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "PUT", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": query.encode(), "root_path": "",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(body)).encode()),
                         (b"content-type", CONTENT_TYPE.encode())]}
    sent = iter(range(1, len(parts) + 1))

    async def receive() -> dict:
        i = next(sent)
        return {"type": "http.request", "body": bytes(parts[i - 1]), "more_body": i < len(parts)}

    status = []

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"PUT {path} answered {status} in process")


def _floor(body: bytes) -> Callable[[], float]:
    """Seconds to copy ``body``, piece by piece as it arrives (each piece fresh, as the app gets it), into memory
    that is kept and not in the cache (a tier's, here the next of several body-sized slots over 64 MiB), hashing
    each piece there: the part of a put that the sink does not do and that no put avoids."""
    slots = max(2, (64 << 20) // len(body))
    keep = memoryview(np.ones(slots * len(body), dtype=np.uint8))  # written once: no page faults in the timing
    turn = iter(range(1 << 62))

    def run() -> float:
        base = next(turn) % slots * len(body)
        h = xxhash.xxh3_64()
        spent = 0.0
        for lo in range(0, len(body), PIECE):
            piece = bytes(memoryview(body)[lo : lo + PIECE])
            t0 = time.perf_counter()
            dst = keep[base + lo : base + lo + len(piece)]
            dst[:] = piece
            h.update(dst)
            spent += time.perf_counter() - t0
        return spent

    return run


def without_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the ``KVTIER_*`` variables, which override any config (a benchmark's own too)."""
    prefix = KVTierConfig.model_config["env_prefix"]
    return {k: v for k, v in environ.items() if not k.upper().startswith(prefix)}


@contextmanager
def _own_settings() -> Iterator[None]:
    """Set the process's ``KVTIER_*`` variables aside while a benchmark's config is read."""
    aside = {k: os.environ.pop(k) for k in set(os.environ) - set(without_settings(os.environ))}
    try:
        yield
    finally:
        os.environ.update(aside)


def put_cost(config: dict, key: str, layout: KVLayout, iterations: int,
             rng: np.random.Generator) -> tuple[float, float, float]:
    """Median seconds of an in-process put of one new chunk of ``layout``, of the sink with the same body, and of
    the copy-and-hash floor (``iterations`` each, alternating)."""
    with _own_settings():
        settings = KVTierConfig.model_validate(config)
    app = create_app(settings)
    service = app.state.service
    who = service.auth.identify(key)
    root = bytes.fromhex(service.attach(who, layout).root)
    kv = torch.randn(layout.chunk_shape, dtype=layout.torch_dtype)
    query = f"layout={layout.fingerprint}"

    def body() -> bytes:
        tokens = rng.integers(0, 50_000, size=layout.chunk_tokens)
        header, buffers = encode_blob(Chunk(chunk_keys(root, tokens, layout.chunk_tokens)[0], root, tokens, kv),
                                      layout, service.codec)
        return b"".join([frame_prefix(len(header) + sum(map(len, buffers))), header, *buffers])

    bodies = [body() for _ in range(iterations + 1)]
    floor = _floor(bodies[0])
    times: dict[str, list[float]] = {"put": [], "sink": [], "floor": []}

    async def measure() -> None:
        async with app.router.lifespan_context(app):
            for i, b in enumerate(bodies):  # the first round warms up
                for name, step in (("put", lambda: _call(app, "/v1/chunks", query, b, key)),
                                   ("sink", lambda: _call(app, "/v1/bench/sink", "", bodies[0], key))):
                    t0 = time.perf_counter()
                    await step()
                    times[name].append(time.perf_counter() - t0)
                times["floor"].append(floor())

    gc.collect()  # not during the timed calls
    asyncio.run(measure())
    stored = service.store(who).counters.put_chunks
    if stored != len(bodies):
        raise RuntimeError(f"{stored} of {len(bodies)} in-process puts stored their chunk")
    return tuple(float(np.median(times[name][1:])) for name in ("put", "sink", "floor"))
