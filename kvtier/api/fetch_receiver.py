"""A fetch's reply received piece by piece, each chunk's KV straight into the caller's tensor.

The reply is a batch of framed raw-codec blobs (:mod:`kvtier.api.wire`), blob ``i`` holding chunk ``i`` of what
was asked for. :class:`FetchReceiver` takes the body's pieces as the HTTP client hands them over. A blob's header
is parsed as soon as it is in and checked against what was asked for (the layout, the chunk's key) before any of
its KV is written; then each KV byte is copied once, from the piece to its place in ``out``, and each layer's
XXH3-64 is computed from the piece while it is in the cache. When the blob ends, its tokens and checksums are
checked. No buffer holds the reply on the way.

Two kinds of failure are told apart:

- a chunk whose bytes fail (a broken header, a checksum) ends the reply there: :attr:`FetchReceiver.bad` says
  why, the chunks before it are good, and ``out`` from that chunk on may hold some of its bytes;
- a reply that is not what was asked for (another chunk or layout, other tokens, broken framing, more or fewer
  chunks than announced) raises BlobError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
import xxhash

from kvtier.api.wire import FRAME_PREFIX, LayerHasher
from kvtier.errors import BlobError
from kvtier.kvstore.chunk import BlobHeader, header_length, parse_header
from kvtier.layout import KVLayout

_KV = "kv.kv"  # the raw codec's one part
T = TypeVar("T")


class FetchReceiver:
    """Receives a reply of ``len(keys)`` chunks of ``layout`` (the layers fetched) into ``out``
    (``[layout.num_layers, T, H, >= len(keys) * C, D]``, CPU or not, any strides): chunk ``i`` must be the one
    keyed ``keys[i]``, of token ids ``ids[i * C : (i + 1) * C]``. Feeding never raises; after the last piece,
    :meth:`finish` does if the reply was not what was asked for."""

    def __init__(self, out: torch.Tensor, layout: KVLayout, keys: list[bytes], ids: np.ndarray) -> None:
        self.out = out
        self.layout = layout
        self.keys = keys
        self.ids = ids
        self.digests: list[tuple[str, ...]] = []  # each good chunk's layer checksums, in order
        self.bad: BlobError | None = None  # why the chunk after the good ones failed, if one did
        self._wrong: BlobError | None = None  # why the reply is not what was asked for, if it is not
        self._head = bytearray()  # the current frame's length prefix and blob header, until complete
        self._blob: _Blob | None = None  # the blob whose tensors are arriving
        self._staging: torch.Tensor | None = None  # for an ``out`` whose bytes cannot be written in place

    def feed(self, piece: bytes | memoryview) -> None:
        """Take the next piece of the body (the rest of the body is dropped once a chunk failed)."""
        blob = self._blob
        if blob is not None:
            lo, hi = blob.kv
            start, end = blob.pos, blob.pos + len(piece)
            if lo <= start and end < hi:  # all KV, not its last byte: most pieces
                blob.write(start - lo, piece)
                blob.hasher.update(piece, start)
                blob.pos = end
                return
        view = memoryview(piece)
        while len(view) and self.bad is None and self._wrong is None:
            try:
                view = self._head_bytes(view) if self._blob is None else self._blob_bytes(view)
            except _BadChunk as exc:
                self.bad = exc.error
            except BlobError as exc:
                self._wrong = exc

    def finish(self) -> None:
        """Raise BlobError unless the reply held the chunks asked for, as many as announced, up to the end of the
        body or to a chunk that failed."""
        if self._wrong is not None:
            raise self._wrong
        if self.bad is not None:
            return
        if self._head or self._blob is not None:
            raise BlobError("the reply ends inside a frame")
        if len(self.digests) != len(self.keys):
            raise BlobError(f"the service announced {len(self.keys)} chunks and sent {len(self.digests)}")

    # ------------------------------------------------------------------ helpers

    def _head_bytes(self, view: memoryview) -> memoryview:
        """Collect the frame's length prefix and its blob's header; start the blob once they are in."""
        if len(self.digests) == len(self.keys):
            raise BlobError(f"the service sent more chunks than the {len(self.keys)} it announced")
        known = len(self._head) >= FRAME_PREFIX + 8  # the header's own length is in
        need = FRAME_PREFIX + (_checked(header_length, self._head[FRAME_PREFIX:]) if known else 8)
        take = min(len(view), need - len(self._head))
        self._head += view[:take]
        if known and len(self._head) == need:
            frame = int.from_bytes(self._head[:FRAME_PREFIX], "little")
            header = _checked(parse_header, self._head[FRAME_PREFIX:])
            self._head.clear()
            self._blob = self._start(header, frame)
        return view[take:]

    def _start(self, header: BlobHeader, frame: int) -> _Blob:
        """Check ``header`` (of the next chunk, in a frame of ``frame`` bytes) against what was asked for, and
        say where its tensors go."""
        i = len(self.digests)
        layout = self.layout
        if header.layout != layout or header.key != self.keys[i]:
            raise BlobError(f"chunk {i} from the service is not the chunk asked for")
        kv = header.tensors.get(_KV)
        if header.codec.name != "raw" or kv is None or kv[:2] != (layout.torch_dtype, layout.chunk_shape) \
                or header.tensors["tokens"][:2] != (torch.int32, (layout.chunk_tokens,)) \
                or not set(header.tensors) <= {_KV, "tokens", "summary"}:
            raise BlobError(f"chunk {i} from the service is not a raw-codec blob of its layout")
        if header.total_bytes > frame:
            raise _BadChunk(BlobError(f"blob truncated: its tensors end at byte {header.total_bytes} of {frame}"))
        spans = sorted((header.data_start + lo, header.data_start + hi, name)
                       for name, (_, _, lo, hi) in header.tensors.items())
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            raise _BadChunk(BlobError("blob tensors overlap"))
        lo, hi = header.data_start + kv[2], header.data_start + kv[3]
        rows, staged = self._rows(i)
        return _Blob(header, frame, header.data_start, spans, (lo, hi), rows, staged,
                     LayerHasher(lo, hi, (hi - lo) // layout.num_layers))

    def _rows(self, i: int) -> tuple[np.ndarray, bool]:
        """The bytes of chunk ``i``'s KV in ``out`` as rows ``[R, W]`` (uint8, each row contiguous, in the blob's
        order), or else (``out`` not in CPU memory, or strided within ``[C, D]``) those of a staging tensor
        (True): copied to ``out`` once the chunk is verified."""
        C = self.layout.chunk_tokens
        part = self.out[:, :, :, i * C : (i + 1) * C]
        if part.device.type == "cpu" and part.stride(-1) == 1:
            rows = part.shape[0] * part.shape[1] * part.shape[2]
            for shape in ((1, -1), (rows, -1)):  # the whole chunk at once if it is contiguous, else rows [C, D]
                try:
                    return part.view(torch.uint8).view(shape).numpy(), False  # ``view`` raises, never copies
                except RuntimeError:
                    continue
        if self._staging is None:
            self._staging = torch.empty(self.layout.chunk_shape, dtype=self.layout.torch_dtype)
        return self._staging.view(torch.uint8).view(1, -1).numpy(), True

    def _blob_bytes(self, view: memoryview) -> memoryview:
        """Hand the blob's next bytes to its tensors; close it at its end."""
        blob = self._blob
        take = min(len(view), blob.frame - blob.pos)
        data = view[:take]
        for lo, hi, name in blob.spans:
            a, b = max(lo, blob.pos), min(hi, blob.pos + take)
            if a >= b:
                continue
            part = data[a - blob.pos : b - blob.pos]
            if name == _KV:
                blob.write(a - lo, part)
                blob.hasher.update(part, a)
            else:
                blob.small.setdefault(name, bytearray()).extend(part)
        blob.pos += take
        if blob.pos == blob.frame:
            self._close()
        return view[take:]

    def _close(self) -> None:
        """The blob is in: verify it, then count it good (after copying a staged chunk to ``out``)."""
        blob, self._blob = self._blob, None
        header, i, C = blob.header, len(self.digests), self.layout.chunk_tokens
        tokens, summary = blob.small.get("tokens", b""), blob.small.get("summary")
        if _digest(tokens) != header.tokens_xxh3 or _digest(summary) != header.summary_xxh3:
            raise _BadChunk(BlobError("blob checksum mismatch in its tokens or summary"))
        if blob.hasher.digests != header.layer_xxh3:
            raise _BadChunk(BlobError("blob checksum mismatch in its KV"))
        if not np.array_equal(np.frombuffer(tokens, dtype=np.int32), self.ids[i * C : (i + 1) * C]):
            raise BlobError(f"chunk {i} from the service is not the chunk asked for: other token ids")
        if blob.staged:
            self.out[:, :, :, i * C : (i + 1) * C].copy_(self._staging)
        self.digests.append(tuple(header.layer_xxh3))


class _Blob:
    """A blob being received: its header, its frame's size, the next byte's offset in it, its tensors' spans
    and its KV's (offsets in the blob, sorted), where its KV goes (staged or not) and its layer hashes so far."""

    def __init__(self, header: BlobHeader, frame: int, pos: int, spans: list[tuple[int, int, str]],
                 kv: tuple[int, int], rows: np.ndarray, staged: bool, hasher: LayerHasher) -> None:
        self.header = header
        self.frame = frame
        self.pos = pos
        self.spans = spans
        self.kv = kv
        self.rows = rows
        self.flat = memoryview(rows).cast("B") if rows.shape[0] == 1 else None  # one contiguous run
        self.staged = staged
        self.hasher = hasher
        self.small: dict[str, bytearray] = {}  # the tensors other than the KV (tokens, summary)

    def write(self, at: int, data: bytes | memoryview) -> None:
        """Write ``data`` at byte ``at`` of the KV, the rows read one after the other (at most three copies)."""
        if self.flat is not None:
            self.flat[at : at + len(data)] = data
            return
        rows, src = self.rows, np.frombuffer(data, dtype=np.uint8)
        width = rows.shape[1]
        r, c = divmod(at, width)
        if c:
            n = min(len(src), width - c)
            rows[r, c : c + n] = src[:n]
            src, r = src[n:], r + 1
        full = len(src) // width
        if full:
            rows[r : r + full] = src[: full * width].reshape(full, width)
            src, r = src[full * width :], r + full
        if len(src):
            rows[r, : len(src)] = src


class _BadChunk(Exception):
    """A chunk whose bytes fail (carries the BlobError)."""

    def __init__(self, error: BlobError) -> None:
        self.error = error


def _checked(parse: Callable[[memoryview], T], data: bytearray) -> T:
    """``parse(data)``, its BlobError taken as a bad chunk."""
    try:
        return parse(memoryview(data))
    except BlobError as exc:
        raise _BadChunk(exc) from None


def _digest(data: bytearray | bytes | None) -> str:
    """XXH3-64 hex digest of a small tensor's bytes as a blob header gives it ("" for an absent tensor)."""
    return "" if data is None else xxhash.xxh3_64_hexdigest(data)
