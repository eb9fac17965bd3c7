"""A put's body received piece by piece, each blob straight into the buffer it will be kept in.

The body is a batch of framed blobs (:mod:`kvtier.api.wire`). :class:`BlobReceiver` takes the body's pieces
as the HTTP server hands them over and copies each piece once, into the buffer a ``destination`` callback
gives for its blob (the service lends one from the first tier's memory, so the tier keeps the bytes where
they landed). While a raw-codec blob's KV arrives, each layer's XXH3-64 is computed from the bytes just
written, still in the cache: verifying the blob afterwards needs no second pass over its KV.

Nothing here trusts the body: a frame longer than what is left of the body stops the writing (the rest of the
body is read and dropped), and so does a blob past ``max_blobs`` (the frames after it are only counted);
:meth:`BlobReceiver.finish` then raises. A blob's header is checked when the blob is verified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from kvtier.api.wire import FRAME_PREFIX, LayerHasher, frame_length
from kvtier.errors import BlobError
from kvtier.kvstore.chunk import BlobHeader, header_length, parse_header


@dataclass
class ReceivedBlob:
    """One blob of the body: its bytes (``blob``, a writable view of ``buffer``), its header once parsed and, for
    a raw-codec blob, the XXH3-64 of each KV layer computed as the bytes arrived (else None)."""

    buffer: torch.Tensor
    blob: memoryview
    header: BlobHeader | None = None
    layer_xxh3: list[str] | None = None


class BlobReceiver:
    """Receives a batch body. ``destination(nbytes)`` gives the uint8 buffer ``[nbytes]`` for the next blob;
    ``body_bytes``: the declared body size (or the body limit when undeclared); ``max_blobs``: blobs allowed."""

    def __init__(self, destination: Callable[[int], torch.Tensor], body_bytes: int, max_blobs: int) -> None:
        self.destination = destination
        self.left = body_bytes
        self.received = 0  # bytes fed
        self.max_blobs = max_blobs
        self.blobs: list[ReceivedBlob] = []
        self.error: BlobError | None = None
        self.extra = 0  # blobs past max_blobs, counted and dropped
        self._skip = 0  # bytes of such a blob still to drop
        self._prefix = bytearray()
        self._filled = 0  # bytes of the current blob written
        self._hashes: LayerHasher | None = None
        self._parsed = False

    def feed(self, piece: bytes | memoryview) -> None:
        """Take the next piece of the body."""
        if self.error is not None:
            return
        view = memoryview(piece)
        self.left -= len(view)
        self.received += len(view)
        try:
            if self.left < 0:
                raise BlobError("the body runs past its declared length")
            while len(view):
                view = self._take(view)
        except BlobError as exc:
            self.error = exc

    def finish(self) -> list[ReceivedBlob]:
        """The body's blobs, once all of it is fed; raises what went wrong (BlobError, TooManyBlobs)."""
        if self.error is None and (self._prefix or self._skip or self._current_open()):
            self.error = BlobError("the body ends inside a frame")
        if self.error is not None:
            raise self.error
        if self.extra:
            raise TooManyBlobs(f"{len(self.blobs) + self.extra} chunks in one batch")
        return self.blobs

    def _current_open(self) -> bool:
        return bool(self.blobs) and self._filled < len(self.blobs[-1].blob)

    def _take(self, view: memoryview) -> memoryview:
        """Write what of ``view`` belongs to the current frame; returns the rest."""
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            return view[n:]
        if not self._current_open():
            need = FRAME_PREFIX - len(self._prefix)
            self._prefix += view[:need]
            if len(self._prefix) < FRAME_PREFIX:
                return view[len(view) :]
            self._open(frame_length(self._prefix, len(self.blobs), self.left + len(view) - need))
            self._prefix.clear()
            return view[need:]
        blob = self.blobs[-1].blob
        lo = self._filled
        hi = min(len(blob), lo + len(view))
        blob[lo:hi] = view[: hi - lo]
        self._filled = hi
        if not self._parsed:
            self._parse(blob, hi)
        if self._hashes is not None:
            self._hashes.update(blob[lo:hi], lo)
            if self._hashes.complete:
                self.blobs[-1].layer_xxh3 = self._hashes.digests
        return view[hi - lo :]

    def _open(self, nbytes: int) -> None:
        if len(self.blobs) == self.max_blobs:
            self.extra += 1
            self._skip = nbytes
            return
        buffer = self.destination(nbytes)
        self.blobs.append(ReceivedBlob(buffer, memoryview(buffer.numpy()).cast("B")))
        self._filled = 0
        self._hashes = None
        self._parsed = False

    def _parse(self, blob: memoryview, filled: int) -> None:
        """Once the blob's header is in: where its KV is, if the layers can be hashed as they arrive (a single
        part, as the raw codec writes)."""
        try:
            if filled < 8 or filled < header_length(blob[:8]):
                return
            header = parse_header(blob[:filled])
        except BlobError:  # reported with the blob's index when it is verified
            self._parsed = True
            return
        self._parsed = True
        self.blobs[-1].header = header
        parts = [spec for name, spec in header.tensors.items() if name.startswith("kv.")]
        if len(parts) == 1:
            _, shape, lo, hi = parts[0]
            if shape and shape[0] == header.layout.num_layers and (hi - lo) % shape[0] == 0 and hi > lo:
                start = header.data_start + lo
                self._hashes = LayerHasher(start, header.data_start + hi, (hi - lo) // shape[0])
                if filled > start:  # KV bytes arrived with the header
                    self._hashes.update(blob[start:filled], start)


class TooManyBlobs(Exception):
    """A batch with more blobs than allowed."""
