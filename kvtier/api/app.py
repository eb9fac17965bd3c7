"""The kvtier service: a FastAPI app over the store's partitions (:mod:`kvtier.api.partitions`): one
:class:`~kvtier.kvstore.store.TieredStore` per tenant with a quota, one shared by the others.

Every tenant endpoint takes token ids and a layout fingerprint; the server derives the chunk keys from the
tenant's own namespace, so a request can only ever name its own tenant's chunks. The one place a client
names a key is the chunk a request's tokens follow (the parent of a put's first chunk; a lookup's or fetch's
``parent``, for a prompt too long for one request), and that must be the tenant's root or a cached chunk of the
tenant's namespace: any other key, cached or not, gets the same 409. Layouts are attached per tenant.

Chunk data travels in the blob format (:mod:`kvtier.kvstore.chunk`), framed by :mod:`kvtier.api.wire`. A put
is decoded and verified entirely (framing, checksums, layout, key chain) before anything is stored; a fetch
copies each chunk once, into its own buffer, and streams the blobs from there with a Content-Length.
Store calls that may block run in worker threads. A put lends, verifies and stores on the event loop when none
of that can block (layers hashed as they arrived, only lent memory touched, the lock free), else in a thread.
The chunk bytes that puts and fetches hold at once
are bounded by ``server.max_bytes_in_flight`` (:mod:`kvtier.api.budget`): a request that does not fit waits, at
most ``server.budget_wait_s`` (then 503) and only while its client is connected. No client can hold those bytes
for long by stalling: a request body must keep arriving and a response must keep being read
(``server.body_timeout_s`` per piece, :class:`_Instrument`).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import anyio
import numpy as np
import torch
from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Message, Receive

from kvtier.api import schemas
from kvtier.api.auth import ANONYMOUS, Authenticator, Principal, tenant_namespace
from kvtier.api.budget import ByteBudget
from kvtier.api.metrics import Metrics
from kvtier.api.partitions import Partitions, merged_stats
from kvtier.api.receiver import BlobReceiver, ReceivedBlob, TooManyBlobs
from kvtier.api.wire import CONTENT_TYPE, FRAME_PREFIX, fresh_bytes, frame_prefix, layer_slice, pieces
from kvtier.compression.codec import get_codec
from kvtier.config import KVTierConfig, ServerConfig
from kvtier.errors import BlobError, CapacityError, KVTierError, LayoutError, ParentMissingError, TierError
from kvtier.kvstore.chunk import Chunk, byte_view, decode_blob, encode_blob, parse_header
from kvtier.kvstore.keys import as_tokens, chunk_keys, root_key
from kvtier.kvstore.store import TieredStore
from kvtier.layout import KVLayout

T = TypeVar("T")
_SMALL = 64 << 10  # buffers below this are joined with their frame's header into one write
_PART = 1 << 20  # a borrowed chunk's KV goes out in parts of at most this many bytes
_BINARY_BODIES = {"/v1/chunks", "/v1/bench/sink"}  # the paths whose bodies are chunk data, not JSON
_JSON_TOKEN_BYTES = 12  # a token id in JSON: at most 10 digits, then ", " (json.dumps's default separator)
_JSON_OTHER_BYTES = 64 << 10  # a JSON body's other fields (a layout's names, flags, whitespace)


def json_body_limit(limits: ServerConfig) -> int:
    """The largest JSON body the service reads: ``max_tokens_per_request`` token ids and the other fields.
    Anything larger could only be refused once parsed (at several times its size in memory)."""
    return _JSON_TOKEN_BYTES * limits.max_tokens_per_request + _JSON_OTHER_BYTES


class Refusal(HTTPException):
    """A request refused (4xx, or 503 when the service is busy): ``status``, a short ``error`` kind and a
    ``detail`` saying what was wrong."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(status, detail)
        self.error = error


def _error_response(status: int, error: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status)


@dataclass
class _TenantCounters:
    requests: Tally = field(default_factory=Tally)
    lookup_tokens: int = 0
    hit_tokens: int = 0
    put_chunks: int = 0
    fetched_chunks: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class Fetched:
    """A fetch ready to stream: ``chunks`` chunks (``tokens`` tokens, read from ``tiers``) framed in ``parts``;
    ``release(wait=True) -> bool``: when the parts are views of chunks borrowed from the store, gives them back
    once sent (see :meth:`TieredStore.borrow_keys`)."""

    parts: list[bytes | memoryview]
    tokens: int
    tiers: list[str]
    chunks: int
    release: Callable[..., bool] | None = None


class FramesResponse(Response):
    """Streams a list of byte buffers with a Content-Length (no copy of the buffers here). ``on_close`` is awaited
    once the last buffer has been handed over, before the response ends (uvicorn's h11 protocol has copied every
    buffer that is not ``bytes`` by then: what the buffers lent can go back), or when sending fails."""

    media_type = CONTENT_TYPE

    def __init__(self, parts: list[bytes | memoryview], headers: dict[str, str],
                 on_close: Callable[[], Awaitable[None]] | None = None) -> None:
        self.parts = parts
        self.on_close = on_close
        self.status_code = 200
        self.background = None
        nbytes = sum(len(p) for p in parts)
        self.raw_headers = [(b"content-type", CONTENT_TYPE.encode()), (b"content-length", str(nbytes).encode())]
        self.raw_headers += [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope, receive, send) -> None:
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            for part in self.parts:
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await self._close()  # before the end: a request after this one on the connection finds it done
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self._close()

    async def _close(self) -> None:
        on_close, self.on_close = self.on_close, None
        if on_close is not None:
            with anyio.CancelScope(shield=True):
                await on_close()


class Service:
    """What the endpoints do, on plain Python values. Every method but :meth:`put` may block (run it in a thread);
    :meth:`put` is a coroutine that hands what may block to the ``run`` it is given."""

    def __init__(self, config: KVTierConfig, partitions: Partitions) -> None:
        self.config = config
        self.limits = config.server
        self.partitions = partitions
        self.auth = Authenticator(config)
        self.budget = ByteBudget(config.server.max_bytes_in_flight)
        self.metrics = Metrics(partitions.stores, self.budget)
        self.codec = get_codec("raw")
        self._attached: dict[str, set[str]] = {}
        self._counters: dict[str, _TenantCounters] = {}
        self._lock = threading.Lock()
        self._source: list[bytes] = []

    def store(self, principal: Principal) -> TieredStore:
        """The store holding ``principal``'s tenant."""
        return self.partitions.for_namespace(principal.namespace)

    async def hold(self, request: Request, nbytes: int) -> tuple[int, Request]:
        """Hold ``nbytes`` of the byte budget for ``request``: the bytes held (for ``budget.release``) and the
        request to read the body from. A request that has to wait for its bytes watches its connection meanwhile:
        its client leaving ends the wait (ClientDisconnect, recorded as 499), and so does a wait longer than
        ``budget_wait_s`` (503). A put's body may start arriving while it waits: its first piece is kept for it
        (the connection is not watched after that)."""
        held = self.budget.try_acquire(nbytes)
        if held is not None:
            return held, request
        heard: list[Message | HTTPException] = []  # what the connection said while the request waited
        async with anyio.create_task_group() as tasks:
            async def watch() -> None:
                try:
                    heard.append(await request.receive())
                except HTTPException as exc:  # the body's first piece refused (late, too large): raised below
                    heard.append(exc)
                if isinstance(heard[0], HTTPException) or heard[0]["type"] == "http.disconnect":
                    tasks.cancel_scope.cancel()

            tasks.start_soon(watch)
            with anyio.move_on_after(self.limits.budget_wait_s):
                held = await self.budget.acquire(nbytes)  # a cancelled wait leaves the queue, holding nothing
            tasks.cancel_scope.cancel()
        early = heard[0] if heard else None
        if isinstance(early, HTTPException):
            failure: Exception | None = early
        elif early is not None and early["type"] == "http.disconnect":
            failure = ClientDisconnect()
        elif held is None:
            failure = Refusal(503, "busy", f"waited {self.limits.budget_wait_s} s for {min(nbytes, self.budget.limit)} "
                                           f"bytes of max_bytes_in_flight ({self.budget.limit}), all held by other "
                                           "requests: try again later")
        else:
            failure = None
        if failure is not None:
            if held is not None:  # granted just as the wait ended otherwise
                self.budget.release(held)
            raise failure
        return held, (request if early is None else Request(request.scope, _replay(early, request.receive)))

    # ------------------------------------------------------------------ bookkeeping

    def tenants(self) -> list[str]:
        names = [t.name for t in self.config.tenants]
        return names + [ANONYMOUS] if self.config.open_access else names

    def count(self, tenant: str, **deltas: int) -> None:
        with self._lock:
            c = self._counters.setdefault(tenant, _TenantCounters())
            for name, value in deltas.items():
                setattr(c, name, getattr(c, name) + value)

    def count_request(self, tenant: str, endpoint: str) -> None:
        with self._lock:
            self._counters.setdefault(tenant, _TenantCounters()).requests[endpoint] += 1

    def layout(self, principal: Principal, fingerprint: str) -> KVLayout:
        """The layout ``fingerprint`` if this tenant attached it; 404 otherwise."""
        with self._lock:
            known = fingerprint in self._attached.get(principal.tenant, ())
        if not known:
            raise Refusal(404, "layout_not_attached",
                           f"layout {fingerprint} is not attached for this tenant: POST /v1/layouts first")
        return self.store(principal).layouts[fingerprint]

    def check_tokens(self, n: int) -> None:
        if n > self.limits.max_tokens_per_request:
            raise Refusal(413, "too_many_tokens",
                           f"{n} tokens in one request; the limit is {self.limits.max_tokens_per_request}")

    # ------------------------------------------------------------------ tenant operations

    def attach(self, principal: Principal, layout: KVLayout) -> schemas.AttachResponse:
        least = FRAME_PREFIX + 4 * layout.chunk_tokens + layout.chunk_bytes  # a blob's header comes on top
        if least > self.limits.max_body_bytes:
            raise Refusal(413, "chunk_too_large", f"a chunk of this layout takes over {least} bytes framed "
                                                   f"({layout.chunk_bytes} of KV), more than max_body_bytes "
                                                   f"({self.limits.max_body_bytes}): it could not be put")
        with self._lock:
            attached = self._attached.setdefault(principal.tenant, set())
            if layout.fingerprint not in attached and len(attached) >= self.limits.max_layouts_per_tenant:
                raise Refusal(409, "too_many_layouts", f"this tenant has {len(attached)} layouts attached, the most "
                                                       "allowed (max_layouts_per_tenant); use one of them")
            fingerprint = self.store(principal).attach(layout)
            attached.add(fingerprint)
        return schemas.AttachResponse(
            fingerprint=fingerprint, root=root_key(fingerprint, principal.namespace).hex(),
            chunk_tokens=layout.chunk_tokens, chunk_bytes=layout.chunk_bytes,
            limits=schemas.Limits(**self.limits.model_dump(include=set(schemas.Limits.model_fields))),
        )

    def chain(self, principal: Principal, layout: KVLayout,
              req: schemas.ChainRequest) -> tuple[bytes, np.ndarray, list[bytes]]:
        """The key the request's tokens follow (its ``parent``, or the tenant's root), the tokens and the keys of
        their full chunks; a 409 when that parent is not one of the tenant's cached chunks."""
        store = self.store(principal)
        if req.parent is None:
            base = store.root(principal.namespace, layout)
        else:
            base = bytes.fromhex(req.parent)
            try:
                store.check_parent(base, principal.namespace, layout)
            except ParentMissingError:
                raise _parent_missing(base) from None
        ids = as_tokens(req.tokens)
        return base, ids, chunk_keys(base, ids, layout.chunk_tokens)

    def lookup(self, principal: Principal, layout: KVLayout, req: schemas.ChainRequest) -> schemas.LookupResponse:
        _, _, keys = self.chain(principal, layout, req)
        result = self.store(principal).lookup_keys(keys, layout, n_tokens=len(req.tokens))
        self.count(principal.tenant, lookup_tokens=len(req.tokens), hit_tokens=result.tokens)
        return schemas.LookupResponse(tokens=result.tokens, chunks=[
            schemas.ChunkInfo(index=c.index, key=c.key.hex(), tiers=c.tiers) for c in result.chunks])

    async def put(self, principal: Principal, layout: KVLayout, request: Request,
                  run: Callable[..., Awaitable[Any]]) -> schemas.PutResponse:
        """Receive a batch of blobs (a chain of chunks), verify every one, then store them; nothing is stored or
        evicted on a refusal. Each blob lands in free bytes lent by the first tier, which keeps them (no copy), or
        else in a buffer of its own. Verifying and storing run on the event loop when they cannot block (the
        layers were hashed as they arrived; the put only touches lent memory and the lock is free), else in a
        thread (``run``). The store then evicts to keep as many bytes free as this body took, for the next put.
        """
        store = self.store(principal)
        lent: list[torch.Tensor] = []

        def destination(nbytes: int) -> torch.Tensor:
            buffer = store.lend(nbytes, layout, wait=False)
            if buffer is None:
                return torch.empty(nbytes, dtype=torch.uint8)
            lent.append(buffer)
            return buffer

        declared = request.headers.get("content-length")  # the middleware checked it against max_body_bytes
        receiver = BlobReceiver(destination, int(declared) if declared else self.limits.max_body_bytes,
                                self.limits.max_chunks_per_batch)
        try:
            async for piece in request.stream():
                receiver.feed(piece)
            try:
                blobs = receiver.finish()
            except TooManyBlobs as exc:
                raise Refusal(413, "too_many_chunks", f"{exc}; the limit is {self.limits.max_chunks_per_batch}") from None
            self.check_tokens(len(blobs) * layout.chunk_tokens)
            if all(b.layer_xxh3 is not None for b in blobs):
                chunks = self.verify(layout, blobs)
            else:
                chunks = await run(self.verify, layout, blobs)
            handed, lent = lent, []  # the put gives back what it does not keep
            room = receiver.received  # afterwards the tier has room to lend to the next put of this size
            result = (self.store_chunks(principal, layout, chunks, handed, room, wait=False)
                      or await run(self.store_chunks, principal, layout, chunks, handed, room, True))
            self.count(principal.tenant, bytes_in=receiver.received)
            return result
        finally:
            if lent:
                with anyio.CancelScope(shield=True):
                    await run(store.take_back, lent)

    @staticmethod
    def verify(layout: KVLayout, blobs: list[ReceivedBlob]) -> list[Chunk]:
        """The chunks of ``blobs``, each verified (layout, checksums). That the first one's parent is the tenant's
        root or one of its cached chunks, the store checks when it stores them (a 409 otherwise)."""
        chunks = []
        for i, b in enumerate(blobs):
            try:  # the layout first: a blob's header may claim any size; then in place, where it was received
                header = b.header or parse_header(b.blob)
                if header.layout.fingerprint != layout.fingerprint:
                    raise Refusal(400, "wrong_layout", f"blob {i} has layout {header.layout.fingerprint}, "
                                                        f"the request names {layout.fingerprint}")
                header, chunk = decode_blob(b.blob, in_place=True, header=header, layer_xxh3=b.layer_xxh3)
            except BlobError as exc:
                raise Refusal(400, "bad_blob", f"blob {i}: {exc}") from None
            chunks.append(chunk)
        return chunks

    def store_chunks(self, principal: Principal, layout: KVLayout, chunks: list[Chunk], lent: list[torch.Tensor],
                     headroom: int, wait: bool) -> schemas.PutResponse | None:
        """Store verified chunks (``lent``: the bytes lent for them, given back unless kept; ``headroom``: bytes
        to keep free for lending); None when ``wait=False`` and that would block."""
        if not chunks:
            return schemas.PutResponse(stored=0, present=0, dropped=0)
        root = root_key(layout.fingerprint, principal.namespace)
        parent = chunks[0].parent
        try:
            result = self.store(principal).put_chunks(chunks, root, principal.namespace, layout, wait=wait, lent=lent,
                                                      headroom=headroom)
        except ParentMissingError:  # not this tenant's, never put, or evicted
            raise _parent_missing(parent) from None
        except LayoutError:  # KV the store's tiers cannot take (a lossy tier and inf or nan): the KVTierError
            raise  # handler answers it; it is a ValueError too
        except ValueError as exc:  # the chain does not hold (CapacityError is not one: a 413 below)
            raise Refusal(400, "bad_chunk", str(exc)) from None
        if result is None:
            return None
        self.count(principal.tenant, put_chunks=result.stored)
        self.metrics.chunks_moved.labels("in").inc(result.stored)
        return schemas.PutResponse(stored=result.stored, present=result.present, dropped=result.dropped)

    def fetch_bytes(self, layout: KVLayout, req: schemas.FetchRequest) -> int:
        """The most chunk bytes ``fetch`` can hold for ``req``: its chunks' KV, of the layers asked for."""
        chunks = min(len(req.tokens) // layout.chunk_tokens - req.start_chunk, self.limits.max_chunks_per_batch)
        return max(0, chunks) * layer_slice(layout, _layers(layout, req.layer_start, req.layer_stop)).chunk_bytes

    def fetch(self, principal: Principal, layout: KVLayout, req: schemas.FetchRequest,
              wait: bool = True) -> Fetched | None:
        """Fetch up to ``max_chunks_per_batch`` cached chunks from chunk ``req.start_chunk`` on and frame them as
        blobs of the (layer-sliced) layout. ``wait=False`` (on the event loop): the chunks borrowed from the first
        tier's memory and sent from there, in parts of at most ``_PART`` bytes that h11 copies one by one as they go
        out, between the client's reads; None when the store would have to wait or read. Else (in a thread) each
        chunk's KV is read once, into a ``bytes`` object that goes out as it is. A chunk that came in with checksums
        (a put's blob, a disk or Redis tier's) goes out with the same ones: the client checks the bytes against what
        was verified when they arrived, not against a hash of whatever the memory holds now."""
        layers = _layers(layout, req.layer_start, req.layer_stop)
        sliced = layer_slice(layout, layers)
        base, ids, keys = self.chain(principal, layout, req)
        C = layout.chunk_tokens
        start = req.start_chunk
        parent = keys[start - 1] if 0 < start <= len(keys) else base
        asked = keys[start : start + self.limits.max_chunks_per_batch]
        store = self.store(principal)
        if not wait:
            borrowed = store.borrow_keys(asked, parent, layers, layout)
            if borrowed is None:
                return None
            fetched = Fetched([], borrowed.tokens, borrowed.tiers, len(borrowed.chunks), borrowed.release)
            chunks = borrowed.chunks
            sends = [pieces(byte_view(c.kv), _PART) for c in chunks]  # each KV from where the tier holds it
        else:
            bodies = [fresh_bytes(sliced.chunk_bytes) for _ in asked]
            kvs = [t.view(sliced.torch_dtype).view(sliced.chunk_shape) for _, t in bodies]
            got = store.get_keys(asked, parent, kvs, layers, layout)
            fetched = Fetched([], got.tokens, got.tiers, got.tokens // C)
            chunks = [Chunk(keys[j], keys[j - 1] if j > start else parent, ids[j * C : (j + 1) * C], kvs[j - start],
                            layer_xxh3=got.layer_xxh3[j - start]) for j in range(start, start + fetched.chunks)]
            sends = [[body] for body, _ in bodies[: fetched.chunks]]  # each KV as the bytes it was read into
        for chunk, kv_parts in zip(chunks, sends):
            header, (tokens, _) = encode_blob(chunk, sliced, self.codec)  # a raw blob: the tokens, then the KV
            fetched.parts += _frame(header, [tokens, *kv_parts])
        return fetched

    def count_fetched(self, principal: Principal, fetched: Fetched) -> None:
        """Count a fetch that is sent (not one whose client left while its chunks were read)."""
        self.count(principal.tenant, fetched_chunks=fetched.chunks, bytes_out=sum(len(p) for p in fetched.parts))
        self.metrics.chunks_moved.labels("out").inc(fetched.chunks)

    def pin(self, principal: Principal, layout: KVLayout, tokens: list[int]) -> int:
        return self.store(principal).pin(tokens, principal.namespace, layout)

    def unpin(self, principal: Principal, layout: KVLayout, tokens: list[int]) -> int:
        return self.store(principal).unpin(tokens, principal.namespace, layout)

    def delete(self, principal: Principal, layout: KVLayout, tokens: list[int]) -> int:
        return self.store(principal).delete(tokens, principal.namespace, layout)

    def prefetch(self, principal: Principal, layout: KVLayout, tokens: list[int]) -> int:
        return self.store(principal).prefetch(tokens, principal.namespace, layout)

    def tenant_stats(self, tenant: str) -> schemas.TenantStats:
        quota = next((t.quota_bytes for t in self.config.tenants if t.name == tenant), None)
        with self._lock:
            c = self._counters.get(tenant, _TenantCounters())
            counters = dict(requests=dict(c.requests), lookup_tokens=c.lookup_tokens, hit_tokens=c.hit_tokens,
                            put_chunks=c.put_chunks, fetched_chunks=c.fetched_chunks, bytes_in=c.bytes_in,
                            bytes_out=c.bytes_out)
        namespace = tenant_namespace(tenant)
        used = self.partitions.for_namespace(namespace).namespace_bytes.get(namespace, 0)
        return schemas.TenantStats(tenant=tenant, used_bytes=used, quota_bytes=quota, **counters)

    # ------------------------------------------------------------------ admin

    def admin_stats(self) -> schemas.AdminStats:
        return schemas.AdminStats(store=merged_stats(self.partitions.stores),
                                  tenants=[self.tenant_stats(t) for t in self.tenants()])

    def flush(self, tenant: str | None) -> int:
        """Delete every unpinned chunk of ``tenant`` (None: of every namespace in the store)."""
        if tenant is None:
            return sum(store.delete_namespace(ns) for store in self.partitions.stores.values()
                       for ns in store.stats()["namespaces"])
        if tenant not in self.tenants():
            raise Refusal(404, "unknown_tenant", f"no tenant named {tenant!r} is configured")
        namespace = tenant_namespace(tenant)
        return self.partitions.for_namespace(namespace).delete_namespace(namespace)

    def source(self, nbytes: int) -> list[bytes]:
        """Bench only: ``nbytes`` random bytes (the last size asked for is kept), as ``bytes`` parts of at most
        ``_PART``: the most the HTTP stack can do with bytes in memory (h11 sends a ``bytes`` part without copying
        it, and parts let the transport drain between them), as a fetch sends a borrowed chunk. Not zeros:
        ``bytes(n)`` maps every page to the kernel's one zero page, and sending that is reading one cached page over
        and over."""
        with self._lock:
            if sum(map(len, self._source)) != nbytes:
                self._source = [bytes(piece) for piece in pieces(os.urandom(nbytes), _PART)]
            return self._source


def _parent_missing(key: bytes) -> Refusal:
    return Refusal(409, "parent_not_cached", f"the parent {key.hex()} (the chunk the tokens follow) is neither this "
                                              "tenant's root nor one of its cached chunks (never put, or evicted): "
                                              "start from the prompt's first chunk")


def _layers(layout: KVLayout, start: int | None, stop: int | None) -> range:
    layers = range(start or 0, layout.num_layers if stop is None else stop)
    if not 0 <= layers.start < layers.stop <= layout.num_layers:
        raise Refusal(400, "bad_layers", f"layers [{layers.start}, {layers.stop}) are not a non-empty range "
                                          f"within the layout's {layout.num_layers} layers")
    return layers


def _printable(value: str | int) -> str | int:
    """``value`` as JSON can carry it in UTF-8 (a lone surrogate, from a JSON escape, cannot be)."""
    return value.encode("utf-8", "backslashreplace").decode() if isinstance(value, str) else value


def _replay(first: Message, receive: Receive) -> Receive:
    """``receive``, giving ``first`` (a message already received from it) before anything else."""
    pending = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


def _frame(header: bytes, buffers: list[bytes | memoryview]) -> list[bytes | memoryview]:
    """One frame as few parts as possible: small buffers join the length prefix and the header."""
    parts: list[bytes | memoryview] = []
    pending = [frame_prefix(len(header) + sum(len(b) for b in buffers)), header]
    for b in buffers:
        if len(b) < _SMALL:
            pending.append(b)
        else:
            parts += [b"".join(pending), b]
            pending = []
    if pending:
        parts.append(b"".join(pending))
    return parts


class _Instrument:
    """ASGI middleware: request metrics, and what every request must respect before and while it is read:
    - no Transfer-Encoding beside a Content-Length (400 before anything is read: RFC 9112 section 6.3);
    - a body within its endpoint's limit: ``max_body_bytes`` for chunk data, :func:`json_body_limit` for JSON (a
      declared Content-Length over it is refused 413 before anything is read; a chunked body is cut off when it
      passes it);
    - a body that keeps arriving (408 once no piece came for ``body_timeout_s``, and the connection closes), and a
      response that keeps being read (dropped once the client took no piece for ``body_timeout_s``, recorded 408).
    A client that leaves while its body is read, while it waits for its bytes, or (a fetch) while its chunks are
    read in a worker thread is recorded as 499, whatever the app answered; one that leaves while a response
    streams, or while a fetch from host memory is read on the event loop, is not seen (uvicorn drops what is
    sent to a closed connection)."""

    def __init__(self, app, service: Service, paths: set[str]) -> None:
        self.app = app
        self.metrics = service.metrics
        self.max_body = service.limits.max_body_bytes
        self.max_json = json_body_limit(service.limits)
        self.timeout = service.limits.body_timeout_s
        self.paths = paths  # the app's route paths (none has parameters)

    def _route_path(self, scope) -> str:
        """The endpoint label of a request refused before routing (an oversized body): its path if it is a
        route's, else ``unmatched``."""
        return scope["path"] if scope["path"] in self.paths else "unmatched"

    def _limit(self, scope) -> tuple[int, str]:
        """The body limit of the request's endpoint, and what to call it in a refusal."""
        if scope["path"] in _BINARY_BODIES:
            return self.max_body, "a body of chunk data (max_body_bytes)"
        return self.max_json, "a JSON body (max_tokens_per_request token ids and the other fields)"

    @staticmethod
    def _refusal(scope, limit: int, what: str) -> JSONResponse | None:
        """The answer to a request refused for its headers, before anything is read; None if it may go on."""
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is None:
            return None
        if b"transfer-encoding" in headers:  # h11 reads the body chunked: the Content-Length is not its size
            return _error_response(400, "conflicting_length", "the request has both a Transfer-Encoding and a "
                                   "Content-Length header: send one of them (RFC 9112 section 6.3)")
        if not declared.isdigit():
            return _error_response(400, "body_too_large", "Content-Length is not a number")
        if int(declared) > limit:
            return _error_response(413, "body_too_large", f"Content-Length {declared.decode()} is over the limit "
                                                          f"of {limit} bytes for {what}")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        limit, what = self._limit(scope)
        received = sent = 0
        status = 500
        body_in = responded = gone = False
        loop = asyncio.get_running_loop()
        waiting = ""  # what the deadline is armed for while the client is awaited: "receive", "send" or nothing

        def arm(what: str) -> None:  # one deadline per request, armed while a piece is awaited: cheaper than a
            # cancel scope per piece
            nonlocal waiting
            waiting = what
            deadline.reschedule(loop.time() + self.timeout)

        def disarm() -> None:
            nonlocal waiting
            if not deadline.expired():  # else ``waiting`` says what ran out
                waiting = ""
                deadline.reschedule(None)

        async def counting_receive() -> Message:
            nonlocal received, body_in, gone
            if body_in:  # the whole body is in: what comes next is the client leaving, however late
                message = await receive()
            else:
                arm("receive")
                try:
                    message = await receive()
                finally:  # also when the wait is cancelled (a request's watch while it waits for bytes)
                    disarm()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_in = not message.get("more_body", False)
                if received > limit:
                    raise Refusal(413, "body_too_large", f"request body over the limit of {limit} bytes for {what}")
            elif message["type"] == "http.disconnect":
                gone = gone or not responded
            return message

        async def counting_send(message: Message) -> None:
            nonlocal sent, status, responded
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
                responded = not message.get("more_body", False)
            arm("send")
            try:
                await send(message)
            finally:
                disarm()

        m.in_flight.inc()
        start = time.perf_counter()
        try:
            refusal = self._refusal(scope, limit, what)
            if refusal is not None:
                await refusal(scope, receive, send)
                status, sent = refusal.status_code, len(refusal.body)
            else:
                async with asyncio.timeout(None) as deadline:
                    await self.app(scope, counting_receive, counting_send)
        except TimeoutError:
            if not deadline.expired():
                raise  # not ours
            if waiting == "receive" and not sent and status == 500:  # no response yet: say why, and close
                late = _error_response(408, "body_timeout", f"no piece of the request body arrived for {self.timeout}"
                                                            " s (body_timeout_s)")
                late.headers["Connection"] = "close"
                await late(scope, receive, send)
            status = 408  # a stalled response is dropped: the server closes the connection
        finally:
            m.in_flight.dec()
            endpoint = getattr(scope.get("route"), "path", None) or self._route_path(scope)
            m.latency.labels(endpoint).observe(time.perf_counter() - start)
            m.requests.labels(endpoint, "499" if gone else str(status)).inc()
            m.bytes_in.labels(endpoint).inc(received)
            m.bytes_out.labels(endpoint).inc(sent)


_WHY = {400: "malformed request, blob or chunk, or both Transfer-Encoding and Content-Length",
        401: "missing or unknown API key", 403: "the key may not use this endpoint",
        404: "unknown layout or tenant", 408: "the request body stalled (no piece of it for body_timeout_s)",
        409: "the first chunk's parent is not cached", 413: "over a size limit",
        503: "busy: no room under max_bytes_in_flight within budget_wait_s (or a tier failing)"}
_REFUSALS = (400, 401, 403, 404, 409, 413)  # what any endpoint with a key may answer
_READ = (*_REFUSALS, 408)  # ... and one that reads a body


def _errors(*statuses: int, beside_binary: bool = False) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI error responses ``statuses``. A route with a binary response (``beside_binary``) would document
    them in its media type: JSON is named explicitly."""
    if beside_binary:
        return {s: {"description": _WHY[s],
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
                for s in statuses}
    return {s: {"model": schemas.ErrorBody, "description": _WHY[s]} for s in statuses}


_BINARY = {"schema": {"type": "string", "format": "binary"}}


def create_app(config: KVTierConfig) -> FastAPI:
    """The service for ``config``; its stores are built now and closed on shutdown."""
    partitions = Partitions(config)
    service = Service(config, partitions)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        partitions.close()

    app = FastAPI(title="kvtier", version="1", lifespan=lifespan,
                  description="A tiered KV-cache store: chunks of KV keyed by token prefix, per tenant.")
    app.state.service = service
    paths: set[str] = set()  # filled once the routes exist
    app.add_middleware(_Instrument, service=service, paths=paths)
    bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer KEY`")

    # The dependencies are async (they only hash a key and look it up): FastAPI would run plain functions on its
    # thread pool, a hand-off per dependency and request.
    async def principal(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Principal:
        found = service.auth.identify(creds.credentials if creds else None)
        if found is None:
            raise Refusal(401, "unauthorized", "a valid API key is required: Authorization: Bearer KEY")
        return found

    async def tenant(request: Request, who: Principal = Depends(principal)) -> Principal:
        if who.tenant is None:
            raise Refusal(403, "forbidden", "the admin key is not a tenant's key; tenant endpoints need one")
        service.count_request(who.tenant, request.scope["route"].path)
        return who

    async def admin(who: Principal = Depends(principal)) -> Principal:
        if not who.admin:
            raise Refusal(403, "forbidden", "this endpoint needs the admin key")
        return who

    async def run(fn: Callable[..., T], *args) -> T:
        service.metrics.store_queue.inc()
        try:
            return await anyio.to_thread.run_sync(partial(fn, *args))
        finally:
            service.metrics.store_queue.dec()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = getattr(exc, "error", "http_error")
        return JSONResponse({"error": error, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own 422 echoes each bad value, and one JSON cannot carry back (NaN, 1e400, a lone surrogate)
        # made it a 500: what was wrong, and where, without the value
        return JSONResponse({"detail": [{"type": e["type"], "loc": [_printable(x) for x in e["loc"]],
                                         "msg": _printable(e["msg"])} for e in exc.errors()]}, status_code=422)

    @app.exception_handler(CapacityError)
    async def capacity_error(request: Request, exc: CapacityError) -> JSONResponse:
        return _error_response(413, "capacity", str(exc))

    @app.exception_handler(TierError)
    async def tier_error(request: Request, exc: TierError) -> JSONResponse:
        return _error_response(503, "tier_unavailable", str(exc))  # the client retries idempotent calls

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # nobody reads this answer: it records the request as the client's doing (nginx's 499), not a 500
        return _error_response(499, "client_disconnected", "the client closed the connection mid-request")

    @app.exception_handler(KVTierError)
    async def kvtier_error(request: Request, exc: KVTierError) -> JSONResponse:
        return _error_response(400, type(exc).__name__, str(exc))

    @app.get("/v1/health", response_model=schemas.Health, tags=["service"], responses=_errors(400, 413))
    async def health() -> schemas.Health:
        """Liveness: answers without a key."""
        return schemas.Health(status="ok", tiers=[t.name or t.kind for t in config.tiers])

    @app.post("/v1/layouts", response_model=schemas.AttachResponse, responses=_errors(*_READ), tags=["chunks"])
    async def attach(body: schemas.Layout, who: Principal = Depends(tenant)) -> schemas.AttachResponse:
        """Attach a model's KV layout for this tenant; returns its fingerprint, which every other call names."""
        layout = KVLayout.from_dict(body.model_dump())
        return service.attach(who, layout)

    @app.post("/v1/lookup", response_model=schemas.LookupResponse, responses=_errors(*_READ), tags=["chunks"])
    async def lookup(body: schemas.ChainRequest, who: Principal = Depends(tenant)) -> schemas.LookupResponse:
        """The longest cached prefix of the tokens (after ``parent``, if given): its length and, per chunk, its
        index among these tokens' chunks, its key and tiers."""
        layout = service.layout(who, body.layout)
        service.check_tokens(len(body.tokens))
        return await run(service.lookup, who, layout, body)

    @app.put("/v1/chunks", response_model=schemas.PutResponse, responses=_errors(*_READ, 503), tags=["chunks"],
             openapi_extra={"requestBody": {
                 "required": True, "content": {CONTENT_TYPE: _BINARY},
                 "description": "chunk blobs, each preceded by its length (u64 little-endian): a chain, "
                                "the first one's parent being the tenant's root or a cached chunk"}})
    async def put_chunks(request: Request, layout: str = Query(pattern=schemas.FINGERPRINT, description="layout fingerprint"),
                         who: Principal = Depends(tenant)) -> schemas.PutResponse:
        """Store a batch of chunks (idempotent: chunks already cached are counted as present)."""
        kv_layout = service.layout(who, layout)
        declared = request.headers.get("content-length")  # the middleware checked it against max_body_bytes
        held, request = await service.hold(request, int(declared) if declared else service.limits.max_body_bytes)
        try:
            return await service.put(who, kv_layout, request, run)
        finally:
            service.budget.release(held)

    @app.post("/v1/chunks/fetch", response_class=FramesResponse, status_code=200, tags=["chunks"],
              responses={200: {"content": {CONTENT_TYPE: _BINARY},
                               "description": "the cached chunks from start_chunk on, as framed blobs; headers "
                                              "X-KVTier-Tokens (tokens returned) and X-KVTier-Tiers (per chunk)"},
                         **_errors(*_READ, 503, beside_binary=True)})
    async def fetch(request: Request, body: schemas.FetchRequest, who: Principal = Depends(tenant)) -> FramesResponse:
        """Fetch cached chunks (all layers, or the layers [layer_start, layer_stop)), at most
        max_chunks_per_batch from chunk start_chunk on."""
        layout = service.layout(who, body.layout)
        service.check_tokens(len(body.tokens))
        held, _ = await service.hold(request, service.fetch_bytes(layout, body))
        try:
            fetched = service.fetch(who, layout, body, wait=False)  # on the event loop when nothing can block
            if fetched is None:
                fetched = await run(service.fetch, who, layout, body)
                if await request.is_disconnected():  # it left while its chunks were read: nothing to send (a 499)
                    raise ClientDisconnect()
        except BaseException:
            service.budget.release(held)
            raise

        async def sent() -> None:  # the response is handed over, or failed: its bytes and borrowed chunks go back
            service.budget.release(held)
            if fetched.release is not None and not fetched.release(False):
                await run(fetched.release)

        service.count_fetched(who, fetched)
        headers = {"x-kvtier-tokens": str(fetched.tokens), "x-kvtier-tiers": ",".join(fetched.tiers)}
        return FramesResponse(fetched.parts, headers, on_close=sent)

    def count_endpoint(path: str, method: Callable[[Principal, KVLayout, list[int]], int], doc: str) -> None:
        async def endpoint(body: schemas.TokensRequest, who: Principal = Depends(tenant)) -> schemas.CountResponse:
            layout = service.layout(who, body.layout)
            service.check_tokens(len(body.tokens))
            return schemas.CountResponse(chunks=await run(method, who, layout, body.tokens))

        endpoint.__doc__ = doc
        app.post(path, response_model=schemas.CountResponse, responses=_errors(*_READ), tags=["chunks"],
                 name=path.rsplit("/", 1)[1])(endpoint)

    count_endpoint("/v1/prefetch", service.prefetch, "Promote the cached prefix to the first tier; returns the "
                                                     "chunks now there.")
    count_endpoint("/v1/pin", service.pin, "Protect the prompt's full chunks from eviction and deletion, those "
                                           "cached now and those put later, until the unpin of the same tokens "
                                           "(pins nest); returns the chunks cached now.")
    count_endpoint("/v1/unpin", service.unpin, "Undo one pin of the same tokens (another prompt's pins stay); "
                                               "returns the cached chunks unpinned.")
    count_endpoint("/v1/delete", service.delete, "Delete the prompt's last full chunk and everything cached below "
                                                 "it, except pinned ones; returns the chunks deleted.")

    @app.get("/v1/stats", response_model=schemas.TenantStats, responses=_errors(*_REFUSALS), tags=["service"])
    async def tenant_stats(who: Principal = Depends(tenant)) -> schemas.TenantStats:
        """This tenant's usage, quota and counters (nothing about other tenants)."""
        return service.tenant_stats(who.tenant)

    @app.get("/v1/admin/stats", response_model=schemas.AdminStats, responses=_errors(*_REFUSALS), tags=["admin"])
    async def admin_stats(who: Principal = Depends(admin)) -> schemas.AdminStats:
        """The whole store's statistics and every tenant's."""
        return await run(service.admin_stats)

    @app.post("/v1/admin/flush", response_model=schemas.CountResponse, responses=_errors(*_READ), tags=["admin"])
    async def flush(body: schemas.FlushRequest = Body(default_factory=schemas.FlushRequest),
                    who: Principal = Depends(admin)) -> schemas.CountResponse:
        """Delete every unpinned chunk of one tenant, or of all."""
        return schemas.CountResponse(chunks=await run(service.flush, body.tenant))

    @app.get("/metrics", tags=["service"], responses={200: {"content": {CONTENT_TYPE_LATEST: {}}},
                                                   **_errors(*_REFUSALS, beside_binary=True)},
             response_class=Response)
    async def metrics(who: Principal = Depends(admin)) -> Response:
        """Prometheus metrics (admin key: they describe every tenant's traffic)."""
        data = await run(generate_latest, service.metrics.registry)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    if config.server.bench_endpoints:
        @app.put("/v1/bench/sink", tags=["bench"], responses=_errors(*_READ), openapi_extra={
            "requestBody": {"required": True, "content": {"application/octet-stream": _BINARY}}})
        async def sink(request: Request, who: Principal = Depends(tenant)) -> dict[str, int]:
            """Bench baseline: read the body and drop it."""
            n = 0
            async for piece in request.stream():
                n += len(piece)
            return {"bytes": n}

        @app.get("/v1/bench/source", response_class=FramesResponse, status_code=200, tags=["bench"],
                 responses=_errors(*_REFUSALS, beside_binary=True))
        async def source(nbytes: int = Query(ge=0, le=config.server.max_body_bytes),
                         who: Principal = Depends(tenant)) -> FramesResponse:
            """Bench baseline: ``nbytes`` bytes (at most max_body_bytes) from memory, sent like a fetch."""
            return FramesResponse(service.source(nbytes), {})

    paths.update(route.path for route in app.routes)
    return app

