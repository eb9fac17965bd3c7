"""FetchReceiver: a fetch's reply in arbitrary pieces lands chunk by chunk in the caller's tensor, whatever its
strides; a chunk whose bytes fail ends the reply there, and a reply that is not what was asked for is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvtier.api.fetch_receiver import FetchReceiver
from kvtier.api.wire import frame_prefix
from kvtier.compression.codec import get_codec
from kvtier.errors import BlobError
from kvtier.kvstore.chunk import Chunk, blob_bytes, layer_checksums
from kvtier.kvstore.keys import chunk_keys
from kvtier.layout import KVLayout

LAYOUT = KVLayout("fetch", num_layers=3, kv_heads=2, head_dim=8, chunk_tokens=16, page_tokens=8)
C = LAYOUT.chunk_tokens
ROOT = bytes(range(16))
IDS = np.arange(100, 100 + 3 * C, dtype=np.int32)
KEYS = chunk_keys(ROOT, IDS, C)
KV = torch.randn((3, 2, 2, 3 * C, 8), generator=torch.Generator().manual_seed(0)).to(LAYOUT.torch_dtype)


def blob(i: int, key: bytes | None = None, tokens: np.ndarray | None = None, codec: str = "raw",
         layout: KVLayout = LAYOUT, summary: bool = False) -> bytes:
    """Chunk ``i``'s blob (or one with another key, other tokens, codec or layout)."""
    kv = KV[:, :, :, i * C : (i + 1) * C].contiguous()
    chunk = Chunk(KEYS[i] if key is None else key, KEYS[i - 1] if i else ROOT,
                  IDS[i * C : (i + 1) * C] if tokens is None else tokens, kv,
                  summary=torch.zeros(layout.summary_shape, dtype=layout.torch_dtype) if summary else None)
    return blob_bytes(chunk, layout, get_codec(codec))


def body(*blobs: bytes) -> bytes:
    return b"".join(frame_prefix(len(b)) + b for b in blobs)


def receive(data: bytes, out: torch.Tensor, n: int, sizes: list[int] = (4096,)) -> FetchReceiver:
    """A receiver of ``n`` chunks into ``out``, fed ``data`` in pieces of ``sizes`` (cycled)."""
    rx = FetchReceiver(out, LAYOUT, KEYS[:n], IDS[: n * C])
    pos, i = 0, 0
    while pos < len(data):
        rx.feed(data[pos : pos + sizes[i % len(sizes)]])
        pos, i = pos + sizes[i % len(sizes)], i + 1
    return rx


def out_of(kind: str) -> torch.Tensor:
    """An ``out`` of 3 chunks, for each way of writing one: rows of [C, D] one after the other or apart, and a
    staging tensor (strided within [C, D], or GPU memory)."""
    if kind == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return {"contiguous": lambda: torch.zeros((3, 2, 2, 3 * C, 8), dtype=LAYOUT.torch_dtype),
            "wider": lambda: torch.zeros((3, 2, 2, 5 * C, 8), dtype=LAYOUT.torch_dtype),
            "strided": lambda: torch.zeros((3, 2, 2, 8, 3 * C), dtype=LAYOUT.torch_dtype).transpose(3, 4),
            "cuda": lambda: torch.zeros((3, 2, 2, 3 * C, 8), dtype=LAYOUT.torch_dtype, device="cuda")}[kind]()


@pytest.mark.parametrize("sizes", [[1], [7, 3], [64], [1000, 1], [1 << 20]])
@pytest.mark.parametrize("kind", ["contiguous", "wider", "strided", "cuda"])
def test_chunks_land_in_out_verified_whatever_the_pieces_and_strides(sizes, kind):
    out = out_of(kind)
    rx = receive(body(*(blob(i) for i in range(3))), out, 3, sizes)
    rx.finish()
    assert rx.bad is None and torch.equal(out[:, :, :, : 3 * C].cpu(), KV)
    assert rx.digests == [tuple(layer_checksums({"kv": KV[:, :, :, i * C : (i + 1) * C].contiguous()}))
                          for i in range(3)]
    if kind == "wider":
        assert not out[:, :, :, 3 * C :].any()  # nothing past the chunks


def test_one_chunk_lands_in_a_contiguous_out_and_a_summary_is_checked():
    out = torch.zeros(LAYOUT.chunk_shape, dtype=LAYOUT.torch_dtype)
    rx = receive(body(blob(0, summary=True)), out, 1, [333])
    rx.finish()
    assert rx.bad is None and torch.equal(out, KV[:, :, :, :C])


@pytest.mark.parametrize("where", ["kv", "tokens", "summary", "header"])
def test_a_chunk_whose_bytes_fail_ends_the_reply_there(where):
    """Chunk 1 is damaged: chunk 0 is good, ``bad`` says why chunk 1 is not, and the rest is dropped."""
    damaged = bytearray(blob(1, summary=where == "summary"))
    start = 8 + int.from_bytes(damaged[:8], "little")  # where the tensors start: the tokens, the KV, the summary
    if where == "header":
        damaged[:8] = (1 << 40).to_bytes(8, "little")  # a header length out of range
    else:
        damaged[{"tokens": start + 5, "kv": start + 4 * C + 7, "summary": len(damaged) - 3}[where]] ^= 0x20
    out = torch.zeros((3, 2, 2, 3 * C, 8), dtype=LAYOUT.torch_dtype)
    rx = receive(body(blob(0), bytes(damaged), blob(2)), out, 3, [100])
    rx.finish()  # not the service's fault to report: the chunk before it is a hit
    assert rx.bad is not None and len(rx.digests) == 1
    assert ("checksum" in str(rx.bad)) != (where == "header")
    assert torch.equal(out[:, :, :, :C], KV[:, :, :, :C])


@pytest.mark.parametrize("wrong, message", [
    (lambda: body(blob(1)), "not the chunk asked for"),  # another chunk's blob
    (lambda: body(blob(0, tokens=IDS[C : 2 * C])), "other token ids"),  # its key, other (checksummed) tokens
    (lambda: body(blob(0, codec="int8")), "not a raw-codec blob"),
    (lambda: body(blob(0, layout=KVLayout("fetch", num_layers=3, kv_heads=2, head_dim=8, chunk_tokens=16,
                                          page_tokens=4))), "not the chunk asked for"),
    (lambda: body(blob(0))[:-5], "ends inside a frame"),
    (lambda: body(blob(0), blob(1)), "more chunks than"),
    (lambda: b"", "announced 1 chunks and sent 0"),
])
def test_a_reply_that_is_not_what_was_asked_for_is_refused(wrong, message):
    out = torch.zeros((3, 2, 2, 3 * C, 8), dtype=LAYOUT.torch_dtype)
    rx = receive(wrong(), out, 1, [50])
    with pytest.raises(BlobError, match=message):
        rx.finish()
    if message == "not the chunk asked for":
        assert not out.any()  # checked before any KV was written
