"""Lossless codecs: ``zstd`` and ``lz4`` over byte-shuffled KV, one compressed frame per layer.

Byte shuffling stores byte 0 of every element, then byte 1, and so on: the high bytes of fp16/bf16/fp32
values (sign, exponent, top mantissa bits) are far more repetitive than the low ones, and grouping them
lets a general-purpose compressor find that. The compression itself is done by the ``zstandard`` and
``lz4`` libraries; both frames carry a checksum of the content, so corrupt data raises CodecError.

Parts (layer-major, so one layer decodes alone):

- ``data`` uint8 ``[L, max_frame_bytes]``: layer ``l``'s frame in ``data[l, :nbytes[l]]``, zero padding after;
- ``nbytes`` int64 ``[L]``: the frame length of each layer.

The padding up to the largest layer's frame is counted in the stored size (it is stored).
"""

from __future__ import annotations

import threading
from abc import abstractmethod
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, TypeVar

import numpy as np
import torch

from kvtier.compression.codec import Codec, expect_parts, register_codec
from kvtier.errors import CodecError

T = TypeVar("T")


def shuffle_bytes(x: torch.Tensor) -> np.ndarray:
    """``x`` (any shape, contiguous, CPU) -> uint8 ``[itemsize * numel]``: byte ``b`` of every element, for
    ``b = 0, 1, ...`` (numpy: its byte transpose is about 10x faster than torch's here)."""
    raw = x.reshape(-1).view(torch.uint8).numpy().reshape(-1, x.element_size())
    return np.ascontiguousarray(raw.T).reshape(-1)


def unshuffle_bytes(shuffled: np.ndarray, out: torch.Tensor) -> None:
    """Inverse of :func:`shuffle_bytes`: write the elements held by ``shuffled`` into contiguous CPU ``out``."""
    size = out.element_size()
    dst = out.view(-1).view(torch.uint8).numpy().reshape(-1, size)
    for b, plane in enumerate(shuffled.reshape(size, -1)):  # one byte plane at a time: a fast strided write
        dst[:, b] = plane


class LosslessCodec(Codec):
    """Per-layer compressed frames of (optionally) byte-shuffled KV. Subclasses give the compressor."""

    lossless = True
    default_level: int

    def __init__(self, level: int | None = None, shuffle: bool = True) -> None:
        if not isinstance(shuffle, bool):
            raise CodecError(f"codec {self.name!r}: shuffle must be a bool, got {shuffle!r}")
        self.level = self.default_level if level is None else level
        self.shuffle = shuffle
        self._check_level()

    def params(self) -> dict[str, Any]:
        return {"level": self.level, "shuffle": self.shuffle}

    @abstractmethod
    def _check_level(self) -> None:
        """Raise CodecError when ``self.level`` is not valid for the library."""

    @abstractmethod
    def _compress(self, data: memoryview) -> bytes:
        """One frame holding ``data`` and a checksum of it."""

    @abstractmethod
    def _decompress(self, frame: memoryview, nbytes: int) -> bytes:
        """The ``nbytes`` bytes held by ``frame``; raise CodecError when the frame is not valid."""

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        if kv.dim() < 1 or kv.device.type != "cpu":
            raise CodecError(f"codec {self.name!r}: kv must be a CPU tensor [L, ...], got {tuple(kv.shape)} on {kv.device}")
        frames = _run_all(self._encode_layer, kv.contiguous())
        width = max((len(f) for f in frames), default=0)
        data = torch.zeros((len(frames), width), dtype=torch.uint8)
        for row, frame in zip(data.numpy(), frames):
            row[: len(frame)] = np.frombuffer(frame, dtype=np.uint8)
        return {"data": data, "nbytes": torch.tensor([len(f) for f in frames], dtype=torch.int64)}

    def _encode_layer(self, layer: torch.Tensor) -> bytes:
        raw = shuffle_bytes(layer) if self.shuffle else layer.reshape(-1).view(torch.uint8).numpy()
        return self._compress(memoryview(raw))

    def decode(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        expect_parts(parts, ("data", "nbytes"), self.name)
        data, nbytes = parts["data"], parts["nbytes"]
        if out.device.type != "cpu" or data.device.type != "cpu":
            raise CodecError(f"codec {self.name!r}: decodes on the CPU only, got data on {data.device}, out on {out.device}")
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[0] != out.shape[0]:
            raise CodecError(f"codec {self.name!r}: data must be uint8 [{out.shape[0]}, n], got {data.dtype} {tuple(data.shape)}")
        if nbytes.dtype != torch.int64 or tuple(nbytes.shape) != (out.shape[0],):
            raise CodecError(f"codec {self.name!r}: nbytes must be int64 [{out.shape[0]}], got {nbytes.dtype} {tuple(nbytes.shape)}")
        if bool(((nbytes < 0) | (nbytes > data.shape[1])).any()):
            raise CodecError(f"codec {self.name!r}: frame lengths {nbytes.tolist()} do not fit data of width {data.shape[1]}")
        target = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
        frames = [memoryview(row[:n]) for row, n in zip(data.contiguous().numpy(), nbytes.tolist())]
        _run_all(self._decode_layer, frames, target)
        if target is not out:
            out.copy_(target)

    def _decode_layer(self, frame: memoryview, dst: torch.Tensor) -> None:
        nbytes = dst.numel() * dst.element_size()
        raw = self._decompress(frame, nbytes)
        if len(raw) != nbytes:
            raise CodecError(f"codec {self.name!r}: a layer decoded to {len(raw)} bytes, expected {nbytes}")
        src = np.frombuffer(raw, dtype=np.uint8)
        if self.shuffle:
            unshuffle_bytes(src, dst)
        else:
            dst.view(-1).view(torch.uint8).numpy()[:] = src


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    """Threads that compress layers in parallel (both libraries release the GIL), one per torch thread."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="kvtier-codec")
        return _POOL


def _run_all(fn: Callable[..., T], *args: Iterable) -> list[T]:
    """``fn`` over the layers on the pool; returns once every call has finished (so none still writes into a
    caller's buffer), then raises the first error if any failed."""
    pool = _pool()
    futures = [pool.submit(fn, *a) for a in zip(*args)]
    wait(futures)
    return [f.result() for f in futures]


@register_codec
class ZstdCodec(LosslessCodec):
    """zstd frames (level 1 by default: about the speed of a disk write here) with content checksums."""

    name = "zstd"
    default_level = 1

    def _check_level(self) -> None:
        import zstandard

        if type(self.level) is not int or not -(1 << 17) <= self.level <= zstandard.MAX_COMPRESSION_LEVEL:
            raise CodecError(f"codec 'zstd': level must be an integer <= {zstandard.MAX_COMPRESSION_LEVEL}, got {self.level!r}")

    def _compress(self, data: memoryview) -> bytes:
        import zstandard

        return zstandard.ZstdCompressor(level=self.level, write_checksum=True).compress(data)

    def _decompress(self, frame: memoryview, nbytes: int) -> bytes:
        import zstandard

        try:
            if zstandard.frame_content_size(frame) != nbytes:
                raise CodecError(f"codec 'zstd': a frame does not hold the {nbytes} bytes of one layer")
            return zstandard.ZstdDecompressor().decompress(frame)
        except zstandard.ZstdError as exc:
            raise CodecError(f"codec 'zstd': corrupt frame: {exc}") from None


@register_codec
class LZ4Codec(LosslessCodec):
    """lz4 frames (fast mode by default) with content checksums."""

    name = "lz4"
    default_level = 0

    def _check_level(self) -> None:
        if type(self.level) is not int or not 0 <= self.level <= 16:  # a bool is an int, not a level
            raise CodecError(f"codec 'lz4': level must be an integer in [0, 16], got {self.level!r}")

    def _compress(self, data: memoryview) -> bytes:
        import lz4.frame

        return lz4.frame.compress(data, compression_level=self.level, content_checksum=True, store_size=True)

    def _decompress(self, frame: memoryview, nbytes: int) -> bytes:
        import lz4.frame

        decompressor = lz4.frame.LZ4FrameDecompressor()
        try:
            raw = decompressor.decompress(frame, max_length=nbytes)
        except RuntimeError as exc:
            raise CodecError(f"codec 'lz4': corrupt frame: {exc}") from None
        if not decompressor.eof or decompressor.unused_data:
            raise CodecError("codec 'lz4': a frame is truncated or has trailing bytes")
        return raw
