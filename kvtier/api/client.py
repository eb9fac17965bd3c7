"""Python clients of the kvtier service, sync (:class:`Client`) and async (:class:`AsyncClient`).

They mirror the in-process :class:`~kvtier.kvstore.store.TieredStore` (``put``, ``lookup``, ``get``, ``pin``,
``unpin``, ``delete``, ``prefetch``, ``stats``, ``keys``, ``root``, ``put_chunks``, ``attach``) and return the
same result types, so an engine switches from in-process to remote use by changing the line that makes its store::

    store = TieredStore(tiers, layout=layout)                 # in-process
    store = Client("http://127.0.0.1:8470", layout, api_key)  # remote

The tenant is fixed by the API key, so the store's ``namespace`` argument does not exist here. Connections are
reused (one httpx client), every request has a timeout, idempotent calls are retried on transport errors and
502/503/504, and every refusal raises a typed :class:`APIError` carrying the server's message.

Each operation is written once, as a generator that yields requests and receives responses (or has the
error thrown into it); the two clients only differ in how they send them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np
import torch

from kvtier.api.fetch_receiver import FetchReceiver
from kvtier.api.wire import CONTENT_TYPE, FRAME_PREFIX, frame_prefix, layer_slice, pieces
from kvtier.compression.codec import get_codec
from kvtier.errors import (BlobError, CapacityError, KVTierError, LayoutError, ParentMissingError,
                           StoreUnavailableError, TokenError)
from kvtier.kvstore.chunk import Chunk, encode_blob
from kvtier.kvstore.keys import TokenLike, as_tokens, chunk_keys
from kvtier.kvstore.store import ChunkRef, GetResult, LookupResult, PutResult, check_chain
from kvtier.layout import KVLayout

T = TypeVar("T")
logger = logging.getLogger(__name__)


class APIError(KVTierError):
    """The service refused a request (or could not be reached: ``status`` 0). ``error`` is the server's kind
    of error, ``detail`` its message."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{status} {error}: {detail}" if status else f"{error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


class BadRequestError(APIError, ValueError):
    """400 or 422: a malformed request, blob or chunk."""


class AuthenticationError(APIError):
    """401: a missing or unknown API key."""


class PermissionDeniedError(APIError):
    """403: the key may not use this endpoint."""


class NotFoundError(APIError):
    """404: an unknown layout, tenant or path."""


class ConflictError(APIError):
    """409: the parent of a put's first chunk is not cached (any more)."""


class PayloadTooLargeError(APIError):
    """413: over a limit (body size, tokens per request, chunks per batch, store capacity)."""


class CapacityExceededError(PayloadTooLargeError, CapacityError):
    """413 ``capacity``: a put no tier can hold; the in-process store raises CapacityError (so does this)."""


class RemoteLayoutError(BadRequestError, LayoutError):
    """400 ``LayoutError``: KV the service's store refused, as the in-process store would (a LayoutError)."""


class RemoteParentMissingError(ConflictError, ParentMissingError):
    """The chunk a request's tokens follow is not cached (409): start from the prompt's first chunk."""


class RemoteTokenError(BadRequestError, TokenError):
    """400 ``TokenError``: token ids the service refused, as the in-process store would (a TokenError)."""


class ServerError(APIError, StoreUnavailableError):
    """5xx (after the retries, for a 502, 503 or 504 of an idempotent call)."""


class ServiceUnavailableError(APIError, StoreUnavailableError):
    """The service could not be reached (status 0) after the retries."""


# The service's error kinds that are the store's exceptions: raised as classes that are both.
_BY_KIND: dict[tuple[int, str], type[APIError]] = {(413, "capacity"): CapacityExceededError,
                                                   (409, "parent_not_cached"): RemoteParentMissingError,
                                                   (400, "LayoutError"): RemoteLayoutError,
                                                   (400, "TokenError"): RemoteTokenError}
_BY_STATUS: dict[int, type[APIError]] = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
                                         404: NotFoundError, 409: ConflictError, 413: PayloadTooLargeError,
                                         422: BadRequestError}
_RETRY_STATUS = {502, 503, 504}
BODY_PIECE = 256 << 10  # a binary request body goes out in views of at most this many bytes
_KNOWN_KEYS = 1 << 16
# Without TCP_NODELAY a small request body written after its headers waits for the delayed ACK (40 ms).
SOCKET_OPTIONS = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


def _error(reply: "_Reply") -> APIError:
    try:
        body = reply.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {"detail": bytes(reply.body).decode(errors="replace")}
    detail = body.get("detail", "")
    error = body.get("error", "validation_error" if reply.status == 422 else "http_error")
    cls = _BY_KIND.get((reply.status, error)) or _BY_STATUS.get(reply.status,
                                                                ServerError if reply.status >= 500 else APIError)
    return cls(reply.status, error, detail if isinstance(detail, str) else json.dumps(detail))


@dataclass
class _Call:
    """One HTTP request of an operation: a JSON body, or ``parts`` sent one after the other as a binary body.
    ``receive``: for a binary reply, makes the receiver its body is fed to (given the reply's headers)."""

    method: str
    path: str
    json: Any = None
    parts: list[bytes | memoryview] | None = None
    params: dict[str, str] | None = None
    idempotent: bool = True
    receive: Callable[[httpx.Headers], FetchReceiver] | None = None


@dataclass
class _Reply:
    """A response: its ``body``, or for a binary reply the ``received`` chunks (the body went to them)."""

    status: int
    headers: httpx.Headers
    body: bytes
    received: FetchReceiver | None = None

    def json(self) -> Any:
        return json.loads(bytes(self.body))


@dataclass
class _Attached:
    layout: KVLayout
    root: bytes
    max_chunks: int
    max_body: int
    max_tokens: int

    @property
    def chunks_per_request(self) -> int:
        """The most full chunks whose token ids one request may carry (at least one)."""
        return max(1, self.max_tokens // self.layout.chunk_tokens)


Op = Generator[_Call, _Reply, T]


class _Operations:
    """The operations as generators, shared by both clients."""

    def __init__(self, url: str, layout: KVLayout | None, api_key: str | None, timeout: float, retries: int,
                 backoff: float) -> None:
        self.url = url
        self.layout = layout
        self.retries = retries
        self.backoff = backoff
        self.timeout = httpx.Timeout(timeout)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.codec = get_codec("raw")
        self._attached: dict[str, _Attached] = {}
        self._known = _KnownKeys(_KNOWN_KEYS)
        self._urls: dict[tuple[str, tuple[tuple[str, str], ...]], httpx.URL] = {}  # (path, params) -> its URL

    # ------------------------------------------------------------------ building blocks

    def _layout(self, layout: KVLayout | None) -> KVLayout:
        layout = layout or self.layout
        if layout is None:
            raise LayoutError("no layout given and the client has no default layout")
        return layout

    def _attach_op(self, layout: KVLayout) -> Op[_Attached]:
        resp = yield _Call("POST", "/v1/layouts", json=layout.to_dict())
        body = resp.json()
        if body["fingerprint"] != layout.fingerprint:
            raise LayoutError(f"the service fingerprints the layout as {body['fingerprint']}, "
                              f"this client as {layout.fingerprint}: different kvtier versions?")
        limits = body["limits"]
        att = _Attached(layout, bytes.fromhex(body["root"]), limits["max_chunks_per_batch"], limits["max_body_bytes"],
                        limits["max_tokens_per_request"])
        self._attached[layout.fingerprint] = att
        return att

    def _ensure_op(self, layout: KVLayout | None) -> Op[_Attached]:
        layout = self._layout(layout)
        att = self._attached.get(layout.fingerprint)
        if att is None:
            att = yield from self._attach_op(layout)
        return att

    def _layout_call(self, att: _Attached, make: Callable[[_Attached], _Call]) -> Op[tuple[_Reply, _Attached]]:
        """Send ``make(att)``; when the service no longer knows the layout (it restarted), attach it again and send
        ``make`` of the new attachment (the service's limits may have changed). Returns the reply and the
        attachment it was made for."""
        try:
            return (yield make(att)), att
        except NotFoundError as exc:
            if exc.error != "layout_not_attached":
                raise
        att = yield from self._attach_op(att.layout)
        return (yield make(att)), att

    def _tokens_op(self, path: str, tokens: TokenLike, layout: KVLayout | None, idempotent: bool = True) -> Op[dict]:
        att = yield from self._ensure_op(layout)
        ids = _full_chunks(tokens, att.layout)
        body = {"layout": att.layout.fingerprint, "tokens": ids.tolist()}
        resp, _ = yield from self._layout_call(att, lambda _: _Call("POST", path, json=body, idempotent=idempotent))
        return resp.json()

    # ------------------------------------------------------------------ operations

    def attach_op(self, layout: KVLayout) -> Op[str]:
        return (yield from self._attach_op(layout)).layout.fingerprint

    def keys_op(self, tokens: TokenLike, layout: KVLayout | None) -> Op[list[bytes]]:
        att = yield from self._ensure_op(layout)
        return chunk_keys(att.root, as_tokens(tokens), att.layout.chunk_tokens)

    def lookup_op(self, tokens: TokenLike, layout: KVLayout | None) -> Op[LookupResult]:
        """One request per ``max_tokens_per_request`` tokens, each after the last chunk of the one before, as
        long as everything so far is cached."""
        att = yield from self._ensure_op(layout)
        C = att.layout.chunk_tokens
        ids = _full_chunks(tokens, att.layout)
        keys = chunk_keys(att.root, ids, C)
        refs: list[ChunkRef] = []
        while True:
            start = len(refs)
            ends = []

            def lookup(a: _Attached) -> _Call:
                ends.append(min(len(keys), start + a.chunks_per_request))
                return _Call("POST", "/v1/lookup", json=_chain_body(a, ids, keys, start, ends[-1]))

            try:
                resp, att = yield from self._layout_call(att, lookup)
            except RemoteParentMissingError:  # the chunks before this request's were evicted meanwhile
                break
            found = [ChunkRef(start + c["index"], bytes.fromhex(c["key"]), c["tiers"]) for c in resp.json()["chunks"]]
            if [r.key for r in found] != keys[start : start + len(found)]:
                raise ServerError(resp.status, "wrong_chunks", f"the service answered a lookup of chunks from {start} "
                                                               "on with other chunks' keys")
            refs += found
            if len(refs) < ends[-1] or ends[-1] == len(keys):
                break
        self._known.update(keys, len(refs))
        return LookupResult(len(refs) * C, refs)

    def count_op(self, path: str, tokens: TokenLike, layout: KVLayout | None, idempotent: bool) -> Op[int]:
        return (yield from self._tokens_op(path, tokens, layout, idempotent))["chunks"]

    def delete_op(self, tokens: TokenLike, layout: KVLayout | None) -> Op[int]:
        """The service deletes the prompt's last chunk and everything below it, other prompts' chunks included:
        forget every key known to be cached. Not retried (a retry would count nothing, or delete a prompt put
        again meanwhile)."""
        try:
            return (yield from self.count_op("/v1/delete", tokens, layout, idempotent=False))
        finally:
            self._known.clear()

    def flush_op(self, tenant: str | None) -> Op[int]:
        """Delete every unpinned chunk of ``tenant`` (None: of all); forget every key known to be cached."""
        try:
            return (yield from self.json_op("POST", "/v1/admin/flush", {"tenant": tenant}, idempotent=False))["chunks"]
        finally:
            self._known.clear()

    def root_op(self, layout: KVLayout | None) -> Op[bytes]:
        return (yield from self._ensure_op(layout)).root

    def put_op(self, tokens: TokenLike, kv: torch.Tensor, layout: KVLayout | None) -> Op[PutResult]:
        att = yield from self._ensure_op(layout)
        layout = att.layout
        ids = as_tokens(tokens)
        layout.check_kv(kv, len(ids))
        if kv.shape[3] != len(ids):
            raise LayoutError(f"kv holds {kv.shape[3]} tokens but {len(ids)} token ids were given")
        C = layout.chunk_tokens
        keys = chunk_keys(att.root, ids, C)
        chunks = [Chunk(key, keys[i - 1] if i else att.root, ids[i * C : (i + 1) * C], kv[:, :, :, i * C : (i + 1) * C])
                  for i, key in enumerate(keys)]
        # No lookup: a stale guess costs a 409 and a put from the start. The last chunk is sent even when known:
        # if it was evicted since, the put must store it again (it is present only if all its prefix is).
        known = min(self._known.prefix(keys), max(len(keys) - 1, 0))
        for start in dict.fromkeys((known, 0)):  # from the known prefix; after a 409, from the start
            try:
                stored, present = yield from self._chain_op(att, chunks, start)
                return PutResult(stored, present + start, len(chunks) - stored - present - start)
            except ConflictError:
                self._known.forget(keys[:start])  # the known prefix was evicted meanwhile
                att = self._attached.get(layout.fingerprint, att)  # under the limits of a new attachment, if any
        return PutResult(0, 0, len(chunks))

    def put_chunks_op(self, chunks: list[Chunk], root: bytes, layout: KVLayout | None) -> Op[PutResult]:
        """Checked here as the store checks them, before anything is sent: a chain longer than one request is
        stored request by request, and a refusal of a later one would leave the earlier ones stored."""
        att = yield from self._ensure_op(layout)
        if root != att.root:
            raise ValueError(f"root {root.hex()} is not this tenant's root of layout {att.layout.fingerprint} "
                             "(Client.root gives it)")
        check_chain(chunks, att.layout)
        if not chunks:
            return PutResult(0, 0, 0)
        stored, present = yield from self._chain_op(att, chunks, 0)
        return PutResult(stored, present, len(chunks) - stored - present)

    def _chain_op(self, att: _Attached, chunks: list[Chunk], start: int) -> Op[tuple[int, int]]:
        """Send ``chunks[start:]`` (a chain) in as few requests as the service's limits allow; returns the chunks
        stored and found present. A 409 of the first request (its first chunk's parent is not cached) propagates;
        after that one, the rest of the chain is dropped: a chunk this put stored was evicted meanwhile, or the
        service dropped chunks for room."""
        stored = present = 0
        first = start
        while start < len(chunks):
            ends = []  # where the batch sent last ends

            def batch(a: _Attached) -> _Call:
                parts, end = self._frames(chunks, a, start)
                ends.append(end)
                return _Call("PUT", "/v1/chunks", parts=parts, params={"layout": a.layout.fingerprint})

            try:
                resp, att = yield from self._layout_call(att, batch)
            except ConflictError:
                if start == first:
                    raise
                break
            result = resp.json()
            stored += result["stored"]
            present += result["present"]
            self._known.update([c.key for c in chunks[start : ends[-1]]], result["stored"] + result["present"])
            if result["dropped"]:
                break
            start = ends[-1]
        return stored, present

    def _frames(self, chunks: list[Chunk], att: _Attached, start: int) -> tuple[list[bytes | memoryview], int]:
        """The framed blobs of ``chunks[start]``, ``chunks[start + 1]``, ... that fit one request (the service's
        max_chunks_per_batch, max_tokens_per_request and max_body_bytes; at least one chunk), and the index after
        the last."""
        parts: list[bytes | memoryview] = []
        size, end = 0, start
        most = min(att.max_chunks, att.chunks_per_request)
        while end < len(chunks) and end - start < most:
            header, buffers = encode_blob(chunks[end], att.layout, self.codec)
            n = len(header) + sum(len(b) for b in buffers)
            if end > start and size + FRAME_PREFIX + n > att.max_body:
                break  # encoded again as the next batch's first
            parts += [frame_prefix(n), header, *buffers]
            size += FRAME_PREFIX + n
            end += 1
        return parts, end

    def get_op(self, tokens: TokenLike, out: torch.Tensor | None, layers: range | None,
               layout: KVLayout | None) -> Op[GetResult]:
        att = yield from self._ensure_op(layout)
        layers = att.layout.check_layers(layers)
        ids = _full_chunks(tokens, att.layout)
        keys = chunk_keys(att.root, ids, att.layout.chunk_tokens)
        if out is not None:
            att.layout.check_out(out, layers, 0)
        return (yield from self._fetch_op(att, ids, keys, out, layers))

    def _fetch_op(self, att: _Attached, ids: np.ndarray, keys: list[bytes], out: torch.Tensor | None,
                  layers: range) -> Op[GetResult]:
        """Fetch the cached prefix, one request per ``chunks_per_request`` chunks (at most ``max_chunks``), each
        after the chunk before, until a reply brings fewer chunks than asked for. Each reply is received straight
        into ``out`` (when None: into a tensor per reply, joined at the end)."""
        layout = att.layout
        C = layout.chunk_tokens
        sliced = layer_slice(layout, layers)
        tiers: list[str] = []
        digests: list[tuple[str, ...]] = []
        parts: list[torch.Tensor] = []  # without ``out``: each reply's chunks
        n = 0
        while n < len(keys):
            asked = []

            def fetch(a: _Attached) -> _Call:  # the batch's tokens, after the chunk before them
                asked.append(min(len(keys) - n, a.max_chunks, a.chunks_per_request))
                return _Call("POST", "/v1/chunks/fetch", receive=receiver, json={
                    **_chain_body(a, ids, keys, n, n + asked[-1]), "layer_start": layers.start,
                    "layer_stop": layers.stop})

            def receiver(headers: httpx.Headers) -> FetchReceiver:
                got = _announced(headers, C, asked[-1])
                if out is None:
                    dest = torch.empty(sliced.chunk_shape[:3] + (got * C, layout.head_dim), dtype=layout.torch_dtype)
                else:
                    layout.check_out(out, layers, (n + got) * C)
                    dest = out[:, :, :, n * C : (n + got) * C]
                return FetchReceiver(dest, sliced, keys[n : n + got], ids[n * C : (n + got) * C])

            try:
                reply, att = yield from self._layout_call(att, fetch)
            except RemoteParentMissingError:  # the chunks before this batch were evicted meanwhile
                break
            rx = reply.received
            if rx is None:
                raise ServerError(reply.status, "bad_reply", "the service answered a fetch without its chunks")
            try:
                rx.finish()
            except BlobError as exc:  # not the chunks asked for: the caller may take it as a service that cannot answer
                raise ServerError(200, "bad_reply", f"the service's reply is not what was asked for: {exc}") from None
            if out is None:
                parts.append(rx.out)
            tiers += reply.headers["x-kvtier-tiers"].split(",")[: len(rx.digests)]
            digests += rx.digests
            n += len(rx.digests)
            if rx.bad is not None:  # as the in-process store does with a bad copy: the hit ends there, the copy goes
                yield from self._drop_bad(att, ids, n, rx.bad)
                break
            if len(rx.keys) < asked[-1]:
                break
        if out is None:
            out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=3) if parts else \
                torch.empty(sliced.chunk_shape[:3] + (0, layout.head_dim), dtype=layout.torch_dtype)
            if out.shape[3] != n * C:  # a chunk failed: only the good ones
                out = out[:, :, :, : n * C].clone()
        self._known.update(keys, n)
        return GetResult(n * C, out, tiers, digests)

    def _drop_bad(self, att: _Attached, ids: np.ndarray, n: int, bad: BlobError) -> Op[None]:
        """Chunk ``n`` of a get failed verification: delete it (and the chunks after it) from the service."""
        logger.warning("chunk %d of a get failed verification (%s): the hit ends before it; deleting it and the "
                       "chunks after it from the service", n, bad)
        try:
            yield from self._tokens_op("/v1/delete", ids[: (n + 1) * att.layout.chunk_tokens], att.layout,
                                       idempotent=False)
        except APIError as exc:
            logger.warning("could not delete the chunk that failed verification: %s", exc)
        finally:
            self._known.clear()

    def json_op(self, method: str, path: str, body: Any = None, idempotent: bool = True) -> Op[Any]:
        return (yield _Call(method, path, json=body, idempotent=idempotent)).json()

    # ------------------------------------------------------------------ transport helpers

    def _request(self, http: httpx.Client | httpx.AsyncClient, call: _Call, body_iter) -> httpx.Request:
        """The httpx request of ``call``; a binary body goes out in pieces of at most ``BODY_PIECE`` bytes with its
        Content-Length (so no piece needs a fresh large allocation on the way). Each path and query is merged
        with the base URL once: parsing a URL takes a good part of building a request."""
        where = (call.path, tuple(sorted((call.params or {}).items())))
        url = self._urls.get(where)
        if url is None:
            url = self._urls[where] = http.build_request(call.method, call.path, params=call.params).url
        if call.parts is None:
            return http.build_request(call.method, url, json=call.json)
        body = [piece for part in call.parts for piece in pieces(part, BODY_PIECE)]
        headers = {"Content-Type": CONTENT_TYPE, "Content-Length": str(sum(len(p) for p in body))}
        return http.build_request(call.method, url, headers=headers, content=body_iter(body))

    def _settle(self, call: _Call, attempt: int, reply: _Reply | None,
                failure: httpx.TransportError | None) -> _Reply | None:
        """After try ``attempt`` of ``call``: its reply when it succeeded, None to try again; raises the typed
        error when it failed for good."""
        if failure is not None:
            if not self._retryable(call, attempt, failure):
                raise self._unreachable(call, failure) from failure
            return None
        if reply.status < 400:
            return reply
        if reply.status not in _RETRY_STATUS or not self._retryable(call, attempt, None):
            raise _error(reply)
        return None

    def _retryable(self, call: _Call, attempt: int, exc: Exception | None) -> bool:
        """Whether to try ``call`` again after ``exc`` (None: a 502/503/504)."""
        if attempt >= self.retries:
            return False
        return call.idempotent or isinstance(exc, httpx.ConnectError)  # a failed connect sent nothing

    @staticmethod
    def _receiver(call: _Call, resp: httpx.Response) -> FetchReceiver | None:
        """The receiver of a binary reply's body, or None to read the body whole."""
        return call.receive(resp.headers) if call.receive is not None and resp.status_code == 200 else None

    def _unreachable(self, call: _Call, exc: Exception) -> ServiceUnavailableError:
        return ServiceUnavailableError(0, type(exc).__name__, f"{call.method} {self.url}{call.path}: {exc}")


class _KnownKeys:
    """Chunk keys this client last saw cached (by lookups, gets and puts; a lookup or get that finds less
    forgets the rest), at most ``capacity``, least recent dropped first. A put sends only what follows the
    known prefix, without asking first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: OrderedDict[bytes, None] = OrderedDict()
        self._lock = threading.Lock()

    def update(self, keys: list[bytes], cached: int) -> None:
        """The service says the first ``cached`` of ``keys`` are cached and the rest are not."""
        with self._lock:
            for key in keys[:cached]:
                self._keys[key] = None
                self._keys.move_to_end(key)
            for key in keys[cached:]:
                self._keys.pop(key, None)
            while len(self._keys) > self.capacity:
                self._keys.popitem(last=False)

    def forget(self, keys: list[bytes]) -> None:
        with self._lock:
            for key in keys:
                self._keys.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()

    def prefix(self, keys: list[bytes]) -> int:
        """How many leading ``keys`` are known."""
        with self._lock:
            n = 0
            while n < len(keys) and keys[n] in self._keys:
                n += 1
            return n


def _announced(headers: httpx.Headers, chunk_tokens: int, asked: int) -> int:
    """The chunks a fetch's reply announces (X-KVTier-Tokens): ServerError unless 0 to ``asked`` whole chunks."""
    tokens = headers.get("x-kvtier-tokens", "")
    if not tokens.isdigit() or int(tokens) % chunk_tokens or int(tokens) // chunk_tokens > asked:
        raise ServerError(200, "bad_reply", f"a fetch of {asked} chunks of {chunk_tokens} tokens announced "
                                            f"{tokens!r} tokens")
    return int(tokens) // chunk_tokens


async def _aiter(pieces: list[memoryview]):
    for piece in pieces:
        yield piece


def _chain_body(att: _Attached, ids: np.ndarray, keys: list[bytes], start: int, end: int) -> dict[str, Any]:
    """The JSON of a lookup or fetch of chunks ``[start, end)``: their tokens, after the chunk before them."""
    C = att.layout.chunk_tokens
    body = {"layout": att.layout.fingerprint, "tokens": ids[start * C : end * C].tolist()}
    if start:
        body["parent"] = keys[start - 1].hex()
    return body


def _full_chunks(tokens: TokenLike, layout: KVLayout) -> np.ndarray:
    ids = as_tokens(tokens)
    return ids[: len(ids) // layout.chunk_tokens * layout.chunk_tokens]


def _own_namespace(namespace: str) -> None:
    """A client works in its API key's tenant, which is its namespace: ``namespace`` (the store's argument, kept
    so that an engine switches by changing one line) must be ``""``."""
    if namespace != "":
        raise ValueError(f"a Client's namespace is its API key's tenant: pass namespace='' (got {namespace!r}), "
                         "or use another key")


class Client(_Operations):
    """Synchronous client. ``layout``: the default layout (attached on first use); ``api_key``: the tenant's
    (or the admin's) key; ``timeout`` in seconds per request; ``retries`` of idempotent calls."""

    def __init__(self, url: str, layout: KVLayout | None = None, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 2, backoff: float = 0.05) -> None:
        super().__init__(url, layout, api_key, timeout, retries, backoff)
        self._http = httpx.Client(base_url=url, headers=self.headers, timeout=self.timeout,
                                  transport=httpx.HTTPTransport(socket_options=SOCKET_OPTIONS))

    def _send(self, call: _Call) -> _Reply:
        for attempt in range(self.retries + 1):
            try:
                reply, failure = self._exchange(call), None
            except httpx.TransportError as exc:
                reply, failure = None, exc
            if (done := self._settle(call, attempt, reply, failure)) is not None:
                return done
            time.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _exchange(self, call: _Call) -> _Reply:
        resp = self._http.send(self._request(self._http, call, iter), stream=True)
        try:
            rx = self._receiver(call, resp)
            if rx is None:
                return _Reply(resp.status_code, resp.headers, resp.read())
            for piece in resp.iter_bytes():
                rx.feed(piece)
            return _Reply(resp.status_code, resp.headers, b"", rx)
        finally:
            resp.close()

    def _run(self, op: Op[T]) -> T:
        try:
            call = next(op)
            while True:
                try:
                    resp = self._send(call)
                except APIError as exc:
                    call = op.throw(exc)
                else:
                    call = op.send(resp)
        except StopIteration as stop:
            return stop.value

    def attach(self, layout: KVLayout) -> str:
        """Attach ``layout`` (done on first use anyway); returns its fingerprint."""
        return self._run(self.attach_op(layout))

    def keys(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> list[bytes]:
        """This tenant's chunk keys of the full chunks of ``tokens``."""
        _own_namespace(namespace)
        return self._run(self.keys_op(tokens, layout))

    def lookup(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> LookupResult:
        _own_namespace(namespace)
        return self._run(self.lookup_op(tokens, layout))

    def put(self, tokens: TokenLike, kv: torch.Tensor, namespace: str = "",
            layout: KVLayout | None = None) -> PutResult:
        """Store the full chunks of ``tokens`` (``kv``: ``[L, T, H, len(tokens), D]``). Chunks this client knows
        to be cached (from its lookups, gets and puts) are not sent again."""
        _own_namespace(namespace)
        return self._run(self.put_op(tokens, kv, layout))

    def root(self, namespace: str = "", layout: KVLayout | None = None) -> bytes:
        """The parent key of this tenant's first chunk of ``layout``."""
        _own_namespace(namespace)
        return self._run(self.root_op(layout))

    def put_chunks(self, chunks: Sequence[Chunk], root: bytes, namespace: str = "",
                   layout: KVLayout | None = None) -> PutResult:
        """Store a chain of chunks built elsewhere (keys from :meth:`keys`, the first parent :meth:`root` or a
        cached chunk's key), as the store's ``put_chunks``: a first parent that is not cached raises a
        ParentMissingError (put from the start)."""
        _own_namespace(namespace)
        return self._run(self.put_chunks_op(list(chunks), root, layout))

    def get(self, tokens: TokenLike, out: torch.Tensor | None = None, layers: range | None = None,
            namespace: str = "", layout: KVLayout | None = None) -> GetResult:
        """Fetch the cached prefix of ``tokens`` (``layers``: a contiguous range, default all) into ``out``."""
        _own_namespace(namespace)
        return self._run(self.get_op(tokens, out, layers, layout))

    def pin(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> int:
        _own_namespace(namespace)
        return self._run(self.count_op("/v1/pin", tokens, layout, idempotent=False))

    def unpin(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> int:
        _own_namespace(namespace)
        return self._run(self.count_op("/v1/unpin", tokens, layout, idempotent=False))

    def delete(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> int:
        _own_namespace(namespace)
        return self._run(self.delete_op(tokens, layout))

    def prefetch(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> int:
        _own_namespace(namespace)
        return self._run(self.count_op("/v1/prefetch", tokens, layout, idempotent=True))

    def stats(self) -> dict:
        """This tenant's usage, quota and counters."""
        return self._run(self.json_op("GET", "/v1/stats"))

    def health(self) -> dict:
        return self._run(self.json_op("GET", "/v1/health"))

    def admin_stats(self) -> dict:
        """The whole store's statistics (admin key)."""
        return self._run(self.json_op("GET", "/v1/admin/stats"))

    def flush(self, tenant: str | None = None) -> int:
        """Delete every unpinned chunk of ``tenant`` (None: of all tenants; admin key)."""
        return self._run(self.flush_op(tenant))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Operations):
    """Asynchronous client: the methods of :class:`Client`, awaited."""

    def __init__(self, url: str, layout: KVLayout | None = None, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 2, backoff: float = 0.05) -> None:
        super().__init__(url, layout, api_key, timeout, retries, backoff)
        self._http = httpx.AsyncClient(base_url=url, headers=self.headers, timeout=self.timeout,
                                       transport=httpx.AsyncHTTPTransport(socket_options=SOCKET_OPTIONS))

    async def _send(self, call: _Call) -> _Reply:
        for attempt in range(self.retries + 1):
            try:
                reply, failure = await self._exchange(call), None
            except httpx.TransportError as exc:
                reply, failure = None, exc
            if (done := self._settle(call, attempt, reply, failure)) is not None:
                return done
            await asyncio.sleep(self.backoff * 2**attempt)
        raise AssertionError("unreachable")

    async def _exchange(self, call: _Call) -> _Reply:
        resp = await self._http.send(self._request(self._http, call, _aiter), stream=True)
        try:
            rx = self._receiver(call, resp)
            if rx is None:
                return _Reply(resp.status_code, resp.headers, await resp.aread())
            async for piece in resp.aiter_bytes():
                rx.feed(piece)
            return _Reply(resp.status_code, resp.headers, b"", rx)
        finally:
            await resp.aclose()

    async def _run(self, op: Op[T]) -> T:
        try:
            call = next(op)
            while True:
                try:
                    resp = await self._send(call)
                except APIError as exc:
                    call = op.throw(exc)
                else:
                    call = op.send(resp)
        except StopIteration as stop:
            return stop.value

    async def attach(self, layout: KVLayout) -> str:
        return await self._run(self.attach_op(layout))

    async def keys(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> list[bytes]:
        _own_namespace(namespace)
        return await self._run(self.keys_op(tokens, layout))

    async def lookup(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> LookupResult:
        _own_namespace(namespace)
        return await self._run(self.lookup_op(tokens, layout))

    async def put(self, tokens: TokenLike, kv: torch.Tensor, namespace: str = "",
                  layout: KVLayout | None = None) -> PutResult:
        _own_namespace(namespace)
        return await self._run(self.put_op(tokens, kv, layout))

    async def root(self, namespace: str = "", layout: KVLayout | None = None) -> bytes:
        _own_namespace(namespace)
        return await self._run(self.root_op(layout))

    async def put_chunks(self, chunks: Sequence[Chunk], root: bytes, namespace: str = "",
                         layout: KVLayout | None = None) -> PutResult:
        _own_namespace(namespace)
        return await self._run(self.put_chunks_op(list(chunks), root, layout))

    async def get(self, tokens: TokenLike, out: torch.Tensor | None = None, layers: range | None = None,
                  namespace: str = "", layout: KVLayout | None = None) -> GetResult:
        _own_namespace(namespace)
        return await self._run(self.get_op(tokens, out, layers, layout))

    async def pin(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> int:
        _own_namespace(namespace)
        return await self._run(self.count_op("/v1/pin", tokens, layout, idempotent=False))

    async def unpin(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> int:
        _own_namespace(namespace)
        return await self._run(self.count_op("/v1/unpin", tokens, layout, idempotent=False))

    async def delete(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> int:
        _own_namespace(namespace)
        return await self._run(self.delete_op(tokens, layout))

    async def prefetch(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> int:
        _own_namespace(namespace)
        return await self._run(self.count_op("/v1/prefetch", tokens, layout, idempotent=True))

    async def stats(self) -> dict:
        return await self._run(self.json_op("GET", "/v1/stats"))

    async def health(self) -> dict:
        return await self._run(self.json_op("GET", "/v1/health"))

    async def admin_stats(self) -> dict:
        return await self._run(self.json_op("GET", "/v1/admin/stats"))

    async def flush(self, tenant: str | None = None) -> int:
        return await self._run(self.flush_op(tenant))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
