"""The binary body of chunk puts and fetches: a batch of chunk blobs (:mod:`kvtier.kvstore.chunk`), each
preceded by its length as a little-endian u64. A fetch of layers ``[a, b)`` returns blobs of the layout with
``num_layers = b - a`` (:func:`layer_slice`): the same format, so the same checksums verify them.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator

from kvtier.errors import BlobError
from kvtier.layout import KVLayout

CONTENT_TYPE = "application/x-kvtier-chunks"
_LEN = struct.Struct("<Q")


def frame_prefix(nbytes: int) -> bytes:
    """The length prefix of a blob of ``nbytes`` bytes."""
    return _LEN.pack(nbytes)


def split_frames(body: memoryview) -> Iterator[memoryview]:
    """The blobs of a batch body, as views of it; BlobError if the framing is broken."""
    pos = 0
    index = 0
    while pos < len(body):
        if len(body) - pos < _LEN.size:
            raise BlobError(f"frame {index}: {len(body) - pos} trailing bytes, a length prefix needs {_LEN.size}")
        (n,) = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        if n > len(body) - pos:
            raise BlobError(f"frame {index}: length {n} runs past the end of the body ({len(body) - pos} bytes left)")
        yield body[pos : pos + n]
        pos += n
        index += 1


def layer_slice(layout: KVLayout, layers: range) -> KVLayout:
    """The layout whose chunks are ``layers`` of ``layout``'s chunks (``layout`` itself for all layers)."""
    if len(layers) == layout.num_layers:
        return layout
    return dataclasses.replace(layout, num_layers=len(layers))
