"""The binary body of chunk puts and fetches: a batch of chunk blobs (:mod:`kvtier.kvstore.chunk`), each
preceded by its length as a little-endian u64. A fetch of layers ``[a, b)`` returns blobs of the layout with
``num_layers = b - a`` (:func:`layer_slice`): the same format, so the same checksums verify them.
"""

from __future__ import annotations

import dataclasses
import struct
import threading
from collections.abc import Iterator

from kvtier.errors import BlobError
from kvtier.layout import KVLayout

CONTENT_TYPE = "application/x-kvtier-chunks"
_LEN = struct.Struct("<Q")
FRAME_PREFIX = _LEN.size


def frame_prefix(nbytes: int) -> bytes:
    """The length prefix of a blob of ``nbytes`` bytes."""
    return _LEN.pack(nbytes)


def frame_length(prefix: bytes | bytearray | memoryview, index: int, left: int) -> int:
    """The length a frame's prefix gives, checked against the ``left`` bytes of the body after it."""
    (n,) = _LEN.unpack_from(prefix)
    if n > left:
        raise BlobError(f"frame {index}: length {n} runs past the end of the body ({left} bytes left)")
    return n


def split_frames(body: memoryview) -> Iterator[memoryview]:
    """The blobs of a batch body, as views of it; BlobError if the framing is broken."""
    pos = 0
    index = 0
    while pos < len(body):
        if len(body) - pos < FRAME_PREFIX:
            raise BlobError(f"frame {index}: {len(body) - pos} trailing bytes, a length prefix needs {FRAME_PREFIX}")
        n = frame_length(body[pos:], index, len(body) - pos - FRAME_PREFIX)
        pos += FRAME_PREFIX
        yield body[pos : pos + n]
        pos += n
        index += 1


def layer_slice(layout: KVLayout, layers: range) -> KVLayout:
    """The layout whose chunks are ``layers`` of ``layout``'s chunks (``layout`` itself for all layers)."""
    if len(layers) == layout.num_layers:
        return layout
    return dataclasses.replace(layout, num_layers=len(layers))


class BufferPool:
    """Body buffers for reuse: writing a large body into fresh memory page-faults on every page, which costs
    more than the copy. Keeps up to ``keep`` buffers of at most ``max_bytes`` each; thread-safe."""

    def __init__(self, keep: int = 4, max_bytes: int = 64 << 20) -> None:
        self.keep = keep
        self.max_bytes = max_bytes
        self._free: list[bytearray] = []
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> bytearray:
        """A buffer of at least ``nbytes`` bytes (its contents are stale)."""
        with self._lock:
            for i, buf in enumerate(self._free):
                if len(buf) >= nbytes:
                    return self._free.pop(i)
        return bytearray(nbytes)

    def give(self, buf: bytearray) -> None:
        """Hand ``buf`` back; nothing may use it afterwards."""
        with self._lock:
            if len(self._free) < self.keep and len(buf) <= self.max_bytes:
                self._free.append(buf)
