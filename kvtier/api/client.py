"""Python clients of the kvtier service, sync (:class:`Client`) and async (:class:`AsyncClient`).

They mirror the in-process :class:`~kvtier.kvstore.store.TieredStore` (``put``, ``lookup``, ``get``, ``pin``,
``unpin``, ``delete``, ``prefetch``, ``stats``, ``keys``, ``attach``) and return the same result types, so an
engine switches from in-process to remote use by changing the line that makes its store::

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
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import numpy as np
import torch

from kvtier.api.wire import CONTENT_TYPE, frame_prefix, layer_slice, split_frames
from kvtier.compression.codec import get_codec
from kvtier.errors import BlobError, KVTierError, LayoutError
from kvtier.kvstore.chunk import Chunk, decode_blob, encode_blob
from kvtier.kvstore.keys import TokenLike, as_tokens, chunk_keys
from kvtier.kvstore.store import ChunkRef, GetResult, LookupResult, PutResult
from kvtier.layout import KVLayout

T = TypeVar("T")


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


class ServerError(APIError):
    """5xx."""


class ServiceUnavailableError(APIError):
    """The service could not be reached (status 0) after the retries."""


_BY_STATUS: dict[int, type[APIError]] = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError,
                                         404: NotFoundError, 409: ConflictError, 413: PayloadTooLargeError,
                                         422: BadRequestError}
_RETRY_STATUS = {502, 503, 504}


def _error(resp: httpx.Response) -> APIError:
    try:
        body = resp.json()
    except ValueError:
        body = {}
    detail = body.get("detail", resp.text) if isinstance(body, dict) else resp.text
    error = body.get("error", "validation_error" if resp.status_code == 422 else "http_error") if isinstance(body, dict) else "http_error"
    cls = _BY_STATUS.get(resp.status_code, ServerError if resp.status_code >= 500 else APIError)
    return cls(resp.status_code, error, detail if isinstance(detail, str) else str(detail))


@dataclass
class _Call:
    """One HTTP request of an operation."""

    method: str
    path: str
    json: Any = None
    content: bytes | None = None
    params: dict[str, str] | None = None
    idempotent: bool = True


@dataclass
class _Attached:
    layout: KVLayout
    root: bytes
    max_chunks: int
    max_body: int


Op = Generator[_Call, httpx.Response, T]


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
        att = _Attached(layout, bytes.fromhex(body["root"]), body["limits"]["max_chunks_per_batch"],
                        body["limits"]["max_body_bytes"])
        self._attached[layout.fingerprint] = att
        return att

    def _ensure_op(self, layout: KVLayout | None) -> Op[_Attached]:
        layout = self._layout(layout)
        att = self._attached.get(layout.fingerprint)
        if att is None:
            att = yield from self._attach_op(layout)
        return att

    def _layout_call(self, att: _Attached, make: Callable[[], _Call]) -> Op[httpx.Response]:
        """Send ``make()``; when the service no longer knows the layout (it restarted), attach it and resend."""
        try:
            return (yield make())
        except NotFoundError as exc:
            if exc.error != "layout_not_attached":
                raise
        yield from self._attach_op(att.layout)
        return (yield make())

    def _tokens_op(self, path: str, tokens: TokenLike, layout: KVLayout | None, idempotent: bool = True) -> Op[dict]:
        att = yield from self._ensure_op(layout)
        ids = _full_chunks(tokens, att.layout)
        body = {"layout": att.layout.fingerprint, "tokens": ids.tolist()}
        resp = yield from self._layout_call(att, lambda: _Call("POST", path, json=body, idempotent=idempotent))
        return resp.json()

    # ------------------------------------------------------------------ operations

    def attach_op(self, layout: KVLayout) -> Op[str]:
        return (yield from self._attach_op(layout)).layout.fingerprint

    def keys_op(self, tokens: TokenLike, layout: KVLayout | None) -> Op[list[bytes]]:
        att = yield from self._ensure_op(layout)
        return chunk_keys(att.root, as_tokens(tokens), att.layout.chunk_tokens)

    def lookup_op(self, tokens: TokenLike, layout: KVLayout | None) -> Op[LookupResult]:
        body = yield from self._tokens_op("/v1/lookup", tokens, layout)
        return LookupResult(body["tokens"], [ChunkRef(c["index"], bytes.fromhex(c["key"]), c["tiers"])
                                             for c in body["chunks"]])

    def count_op(self, path: str, tokens: TokenLike, layout: KVLayout | None, idempotent: bool) -> Op[int]:
        return (yield from self._tokens_op(path, tokens, layout, idempotent))["chunks"]

    def put_op(self, tokens: TokenLike, kv: torch.Tensor, layout: KVLayout | None) -> Op[PutResult]:
        att = yield from self._ensure_op(layout)
        layout = att.layout
        ids = as_tokens(tokens)
        layout.check_kv(kv, len(ids))
        if kv.shape[3] != len(ids):
            raise LayoutError(f"kv holds {kv.shape[3]} tokens but {len(ids)} token ids were given")
        C = layout.chunk_tokens
        n_full = len(ids) // C
        keys = chunk_keys(att.root, ids, C)
        cached = (yield from self.lookup_op(ids[: n_full * C], layout)).tokens // C
        stored, present, start = 0, cached, cached
        per_batch = max(1, min(att.max_chunks, (att.max_body - 4096) // (layout.chunk_bytes + 4096)))
        while start < n_full:
            end = min(n_full, start + per_batch)
            body = b"".join(self._frames(ids, kv, keys, att, start, end))
            params = {"layout": layout.fingerprint}
            try:
                resp = yield from self._layout_call(att, lambda: _Call("PUT", "/v1/chunks", content=body, params=params))
            except ConflictError:
                if start != cached or cached == 0:
                    break  # a chunk this put stored was evicted meanwhile: the rest is dropped
                stored, present, start, cached = 0, 0, 0, 0  # the cached prefix was evicted: put it all
                continue
            result = resp.json()
            stored += result["stored"]
            present += result["present"]
            if result["dropped"]:
                break
            start = end
        return PutResult(stored, present, n_full - stored - present)

    def _frames(self, ids: np.ndarray, kv: torch.Tensor, keys: list[bytes], att: _Attached, start: int,
                end: int) -> list[bytes | memoryview]:
        C = att.layout.chunk_tokens
        parts: list[bytes | memoryview] = []
        for i in range(start, end):
            chunk = Chunk(keys[i], keys[i - 1] if i else att.root, ids[i * C : (i + 1) * C], kv[:, :, :, i * C : (i + 1) * C])
            header, buffers = encode_blob(chunk, att.layout, self.codec)
            parts += [frame_prefix(len(header) + sum(len(b) for b in buffers)), header, *buffers]
        return parts

    def get_op(self, tokens: TokenLike, out: torch.Tensor | None, layers: range | None,
               layout: KVLayout | None) -> Op[GetResult]:
        att = yield from self._ensure_op(layout)
        layout = att.layout
        layers = _check_layers(layers, layout)
        ids = _full_chunks(tokens, layout)
        C = layout.chunk_tokens
        keys = chunk_keys(att.root, ids, C)
        bodies: list[bytes] = []
        tiers: list[str] = []
        n = 0
        while n < len(keys):
            request = {"layout": layout.fingerprint, "tokens": ids.tolist(), "start_chunk": n,
                       "layer_start": layers.start, "layer_stop": layers.stop}
            resp = yield from self._layout_call(att, lambda: _Call("POST", "/v1/chunks/fetch", json=request))
            got = int(resp.headers["x-kvtier-tokens"]) // C
            bodies.append(resp.content)
            tiers += [t for t in resp.headers["x-kvtier-tiers"].split(",") if t]
            n += got
            if got < att.max_chunks:
                break
        shape = (len(layers),) + layout.chunk_shape[1:3] + (n * C, layout.head_dim)
        if out is None:
            out = torch.empty(shape, dtype=layout.torch_dtype)
        elif out.dim() != 5 or tuple(out.shape[:3]) != shape[:3] or out.shape[3] < n * C or out.shape[4] != shape[4] \
                or out.dtype != layout.torch_dtype:
            raise LayoutError(f"out buffer {tuple(out.shape)} {out.dtype} does not fit [{shape[0]}, {shape[1]}, "
                              f"{shape[2]}, >={n * C}, {shape[4]}] of {layout.torch_dtype}")
        sliced = layer_slice(layout, layers)
        i = 0
        for body in bodies:
            for blob in split_frames(memoryview(body)):
                if i >= n:
                    raise BlobError(f"the service sent more chunks than the {n} it announced")
                header, chunk = decode_blob(blob, out[:, :, :, i * C : (i + 1) * C])
                if (header.layout != sliced or chunk.key != keys[i]
                        or not np.array_equal(chunk.tokens, ids[i * C : (i + 1) * C])):
                    raise BlobError(f"chunk {i} from the service is not the chunk asked for")
                i += 1
        if i != n:
            raise BlobError(f"the service announced {n} chunks and sent {i}")
        return GetResult(n * C, out, tiers)

    def json_op(self, method: str, path: str, body: Any = None, idempotent: bool = True) -> Op[Any]:
        return (yield _Call(method, path, json=body, idempotent=idempotent)).json()

    # ------------------------------------------------------------------ transport helpers

    def _request_args(self, call: _Call) -> dict[str, Any]:
        args: dict[str, Any] = {"params": call.params}
        if call.content is not None:
            args["content"] = call.content
            args["headers"] = {"Content-Type": CONTENT_TYPE}
        elif call.json is not None:
            args["json"] = call.json
        return args

    def _retryable(self, call: _Call, attempt: int, exc: Exception | None, resp: httpx.Response | None) -> bool:
        if attempt >= self.retries:
            return False
        if isinstance(exc, httpx.ConnectError):
            return True  # nothing was sent
        return call.idempotent and (exc is not None or resp.status_code in _RETRY_STATUS)

    def _unreachable(self, call: _Call, exc: Exception) -> ServiceUnavailableError:
        return ServiceUnavailableError(0, type(exc).__name__, f"{call.method} {self.url}{call.path}: {exc}")


def _full_chunks(tokens: TokenLike, layout: KVLayout) -> np.ndarray:
    ids = as_tokens(tokens)
    return ids[: len(ids) // layout.chunk_tokens * layout.chunk_tokens]


def _check_layers(layers: range | None, layout: KVLayout) -> range:
    if layers is None:
        return range(layout.num_layers)
    if not isinstance(layers, range) or layers.step != 1 or not 0 <= layers.start < layers.stop <= layout.num_layers:
        raise LayoutError(f"layers must be a contiguous non-empty range within 0..{layout.num_layers}, got {layers!r}")
    return layers


class Client(_Operations):
    """Synchronous client. ``layout``: the default layout (attached on first use); ``api_key``: the tenant's
    (or the admin's) key; ``timeout`` in seconds per request; ``retries`` of idempotent calls."""

    def __init__(self, url: str, layout: KVLayout | None = None, api_key: str | None = None, timeout: float = 30.0,
                 retries: int = 2, backoff: float = 0.05) -> None:
        super().__init__(url, layout, api_key, timeout, retries, backoff)
        self._http = httpx.Client(base_url=url, headers=self.headers, timeout=self.timeout)

    def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            exc, resp = None, None
            try:
                resp = self._http.request(call.method, call.path, **self._request_args(call))
            except httpx.TransportError as e:
                exc = e
            if not self._retryable(call, attempt, exc, resp):
                break
            attempt += 1
            time.sleep(self.backoff * 2 ** attempt)
        if exc is not None:
            raise self._unreachable(call, exc) from exc
        if resp.status_code >= 400:
            raise _error(resp)
        return resp

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

    def keys(self, tokens: TokenLike, layout: KVLayout | None = None) -> list[bytes]:
        """This tenant's chunk keys of the full chunks of ``tokens``."""
        return self._run(self.keys_op(tokens, layout))

    def lookup(self, tokens: TokenLike, layout: KVLayout | None = None) -> LookupResult:
        return self._run(self.lookup_op(tokens, layout))

    def put(self, tokens: TokenLike, kv: torch.Tensor, layout: KVLayout | None = None) -> PutResult:
        """Store the full chunks of ``tokens`` (``kv``: ``[L, T, H, len(tokens), D]``); only chunks not cached
        yet are sent."""
        return self._run(self.put_op(tokens, kv, layout))

    def get(self, tokens: TokenLike, out: torch.Tensor | None = None, layers: range | None = None,
            layout: KVLayout | None = None) -> GetResult:
        """Fetch the cached prefix of ``tokens`` (``layers``: a contiguous range, default all) into ``out``."""
        return self._run(self.get_op(tokens, out, layers, layout))

    def pin(self, tokens: TokenLike, layout: KVLayout | None = None) -> int:
        return self._run(self.count_op("/v1/pin", tokens, layout, idempotent=False))

    def unpin(self, tokens: TokenLike, layout: KVLayout | None = None) -> int:
        return self._run(self.count_op("/v1/unpin", tokens, layout, idempotent=False))

    def delete(self, tokens: TokenLike, layout: KVLayout | None = None) -> int:
        return self._run(self.count_op("/v1/delete", tokens, layout, idempotent=True))

    def prefetch(self, tokens: TokenLike, layout: KVLayout | None = None) -> int:
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
        return self._run(self.json_op("POST", "/v1/admin/flush", {"tenant": tenant}))["chunks"]

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
        self._http = httpx.AsyncClient(base_url=url, headers=self.headers, timeout=self.timeout)

    async def _send(self, call: _Call) -> httpx.Response:
        attempt = 0
        while True:
            exc, resp = None, None
            try:
                resp = await self._http.request(call.method, call.path, **self._request_args(call))
            except httpx.TransportError as e:
                exc = e
            if not self._retryable(call, attempt, exc, resp):
                break
            attempt += 1
            await asyncio.sleep(self.backoff * 2 ** attempt)
        if exc is not None:
            raise self._unreachable(call, exc) from exc
        if resp.status_code >= 400:
            raise _error(resp)
        return resp

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

    async def keys(self, tokens: TokenLike, layout: KVLayout | None = None) -> list[bytes]:
        return await self._run(self.keys_op(tokens, layout))

    async def lookup(self, tokens: TokenLike, layout: KVLayout | None = None) -> LookupResult:
        return await self._run(self.lookup_op(tokens, layout))

    async def put(self, tokens: TokenLike, kv: torch.Tensor, layout: KVLayout | None = None) -> PutResult:
        return await self._run(self.put_op(tokens, kv, layout))

    async def get(self, tokens: TokenLike, out: torch.Tensor | None = None, layers: range | None = None,
                  layout: KVLayout | None = None) -> GetResult:
        return await self._run(self.get_op(tokens, out, layers, layout))

    async def pin(self, tokens: TokenLike, layout: KVLayout | None = None) -> int:
        return await self._run(self.count_op("/v1/pin", tokens, layout, idempotent=False))

    async def unpin(self, tokens: TokenLike, layout: KVLayout | None = None) -> int:
        return await self._run(self.count_op("/v1/unpin", tokens, layout, idempotent=False))

    async def delete(self, tokens: TokenLike, layout: KVLayout | None = None) -> int:
        return await self._run(self.count_op("/v1/delete", tokens, layout, idempotent=True))

    async def prefetch(self, tokens: TokenLike, layout: KVLayout | None = None) -> int:
        return await self._run(self.count_op("/v1/prefetch", tokens, layout, idempotent=True))

    async def stats(self) -> dict:
        return await self._run(self.json_op("GET", "/v1/stats"))

    async def health(self) -> dict:
        return await self._run(self.json_op("GET", "/v1/health"))

    async def admin_stats(self) -> dict:
        return await self._run(self.json_op("GET", "/v1/admin/stats"))

    async def flush(self, tenant: str | None = None) -> int:
        return (await self._run(self.json_op("POST", "/v1/admin/flush", {"tenant": tenant})))["chunks"]

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()
