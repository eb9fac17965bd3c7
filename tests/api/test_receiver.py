"""BlobReceiver: a put's body in arbitrary pieces lands blob by blob in the buffers asked for, its KV layers hashed
on the way; a broken body is refused whatever the piece boundaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.api.receiver import BlobReceiver, TooManyBlobs
from kvtier.api.wire import frame_prefix
from kvtier.compression.codec import get_codec
from kvtier.errors import BlobError
from kvtier.kvstore.chunk import Chunk, blob_bytes, blob_tensors, decode_blob, kv_parts, layer_checksums
from kvtier.layout import KVLayout

LAYOUT = KVLayout("recv", num_layers=3, kv_heads=2, head_dim=8, chunk_tokens=16, page_tokens=8)


def blob(seed: int, codec: str = "raw") -> bytes:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(LAYOUT.chunk_shape, generator=g).to(LAYOUT.torch_dtype)
    tokens = np.arange(seed, seed + LAYOUT.chunk_tokens, dtype=np.int32)
    return blob_bytes(Chunk(bytes([seed]) * 16, bytes(16), tokens, kv), LAYOUT, get_codec(codec))


def body(*blobs: bytes) -> bytes:
    return b"".join(frame_prefix(len(b)) + b for b in blobs)


def feed(data: bytes, sizes: list[int], max_blobs: int = 8, declared: int | None = None) -> BlobReceiver:
    """A receiver fed ``data`` in pieces of ``sizes`` (cycled), each blob into a fresh buffer."""
    asked: list[int] = []

    def destination(n: int) -> torch.Tensor:
        asked.append(n)
        return torch.full((n,), 0xAA, dtype=torch.uint8)

    r = BlobReceiver(destination, len(data) if declared is None else declared, max_blobs)
    r.asked = asked
    pos, i = 0, 0
    while pos < len(data):
        n = sizes[i % len(sizes)]
        r.feed(data[pos : pos + n])
        pos, i = pos + n, i + 1
    r.feed(b"")
    return r


@pytest.mark.parametrize("sizes", [[1], [7, 3], [64], [1000, 1], [1 << 20]])
def test_blobs_land_whole_and_hashed_whatever_the_pieces(sizes):
    blobs = [blob(1), blob(2), blob(3)]
    received = feed(body(*blobs), sizes).finish()
    assert [bytes(r.blob) for r in received] == blobs
    for r, b in zip(received, blobs):
        header, chunk = decode_blob(r.blob, in_place=True)  # hashing again agrees with the digests streamed
        assert r.layer_xxh3 == header.layer_xxh3 == layer_checksums({"kv": chunk.kv})
        start = r.buffer.data_ptr()
        assert start <= chunk.kv.data_ptr() < start + r.buffer.numel()  # decoded where it landed


def test_a_codec_with_several_parts_is_hashed_afterwards():
    b = blob(4, "int8")
    assert len(kv_parts(blob_tensors(decode_blob(b)[1], get_codec("int8")))) > 1
    received = feed(body(b), [333]).finish()
    assert received[0].layer_xxh3 is None and bytes(received[0].blob) == b


def test_a_flipped_kv_bit_fails_verification_with_the_streamed_digests():
    b = bytearray(blob(5))
    b[-3] ^= 0x10
    r = feed(body(bytes(b)), [100]).finish()[0]
    with pytest.raises(BlobError, match="checksum"):
        decode_blob(r.blob, in_place=True, layer_xxh3=r.layer_xxh3)


def test_a_broken_header_is_left_to_verification():
    junk = b"\x07" * 300
    r = feed(body(junk), [50]).finish()[0]
    assert r.layer_xxh3 is None and bytes(r.blob) == junk
    with pytest.raises(BlobError):
        decode_blob(r.blob, in_place=True)


@pytest.mark.parametrize("cut", [3, 8, 20, -1])
def test_a_body_that_ends_inside_a_frame_is_refused(cut):
    data = body(blob(6), blob(7))
    with pytest.raises(BlobError, match="ends inside a frame"):
        feed(data[:cut], [5], declared=len(data)).finish()  # a body cut short of what it declared


def test_a_frame_longer_than_the_body_is_refused_before_any_buffer():
    b = blob(8)
    data = frame_prefix(len(b) + 1) + b
    r = feed(data, [9])
    with pytest.raises(BlobError, match="runs past the end of the body"):
        r.finish()
    assert r.asked == []
    r = feed(body(b) + b"xx", [9], declared=len(b) + 8)  # more than declared
    with pytest.raises(BlobError, match="declared length"):
        r.finish()


def test_too_many_blobs_are_counted_not_kept():
    r = feed(body(*(blob(i) for i in range(5))), [123], max_blobs=2)
    with pytest.raises(TooManyBlobs, match="5 chunks"):
        r.finish()
    assert len(r.asked) == 2
