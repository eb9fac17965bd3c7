"""The binary body of chunk puts and fetches: a batch of chunk blobs (:mod:`kvtier.kvstore.chunk`), each
preceded by its length as a little-endian u64. A fetch of layers ``[a, b)`` returns blobs of the layout with
``num_layers = b - a`` (:func:`layer_slice`): the same format, so the same checksums verify them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import struct
from dataclasses import dataclass, field

import torch
import xxhash

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


_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytes.restype = ctypes.py_object
_bytes_buffer = ctypes.pythonapi.PyBytes_AsString
_bytes_buffer.argtypes = (ctypes.py_object,)
_bytes_buffer.restype = ctypes.c_void_p


def pieces(data: bytes | memoryview, size: int) -> list[memoryview]:
    """``data`` as consecutive views of at most ``size`` bytes."""
    view = memoryview(data)
    return [view[i : i + size] for i in range(0, len(view), size)]


def fresh_bytes(nbytes: int) -> tuple[bytes, torch.Tensor]:
    """A new ``bytes`` object of ``nbytes`` (at least 1) and a uint8 tensor ``[nbytes]`` over its contents, to be
    filled before the bytes go anywhere: the C API's documented way of building a bytes object in place
    (``PyBytes_FromStringAndSize(NULL, n)``, whose buffer may be written until the object is shared). A body part
    that is a ``bytes`` object goes out as it is; h11 copies any other buffer into one first."""
    if nbytes < 1:
        raise ValueError(f"fresh_bytes needs at least 1 byte, got {nbytes}")
    body = _new_bytes(None, nbytes)
    array = (ctypes.c_char * nbytes).from_address(_bytes_buffer(body))
    array.owner = body  # the tensor keeps the array alive, and the array the bytes
    return body, torch.frombuffer(array, dtype=torch.uint8)


def layer_slice(layout: KVLayout, layers: range) -> KVLayout:
    """The layout whose chunks are ``layers`` of ``layout``'s chunks (``layout`` itself for all layers)."""
    if len(layers) == layout.num_layers:
        return layout
    return dataclasses.replace(layout, num_layers=len(layers))


@dataclass
class LayerHasher:
    """The XXH3-64 of each layer of a blob's KV part (bytes ``[start, end)`` of the blob, layers of ``step``
    bytes), computed from the bytes as they arrive, in order: a receiver checks a blob without a second pass."""

    start: int
    end: int
    step: int
    done: int = 0  # bytes of the part hashed so far
    digests: list[str] = field(default_factory=list)
    layer: xxhash.xxh3_64 = field(default_factory=xxhash.xxh3_64)

    @property
    def complete(self) -> bool:
        return self.done == self.end - self.start

    def update(self, data: bytes | memoryview, at: int) -> None:
        """Hash what of ``data`` (the blob's bytes from offset ``at`` on, the next ones to arrive) is KV."""
        pos, hi = max(at, self.start + self.done), min(at + len(data), self.end)
        if pos == at and hi == at + len(data) and self.done % self.step + len(data) < self.step:
            self.layer.update(data)  # inside one layer: most pieces
            self.done += len(data)
            return
        view = memoryview(data)
        while pos < hi:
            take = min(hi - pos, self.step - self.done % self.step)
            self.layer.update(view[pos - at : pos - at + take])
            pos += take
            self.done += take
            if self.done % self.step == 0:
                self.digests.append(self.layer.hexdigest())
                self.layer.reset()
