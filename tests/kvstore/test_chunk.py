import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from kvtier.compression import get_codec
from kvtier.errors import BlobError
from kvtier.kvstore.chunk import (
    UNHASHED, Chunk, blob_bytes, blob_header, blob_tensors, decode_blob, encode_blob, key_summary, kv_parts,
    layer_checksums, with_layer_digests,
)
from kvtier.kvstore.keys import chain_key, root_key
from kvtier.layout import KVLayout

from .helpers import make_kv


def chunk_of(layout, seed=0):
    kv = make_kv(layout, layout.chunk_tokens, seed)
    root = root_key(layout.fingerprint, "ns")
    tokens = np.arange(layout.chunk_tokens, dtype=np.int32) + seed
    key = chain_key(root, tokens.tobytes())
    return Chunk(key, root, tokens, kv, key_summary(kv, layout.page_tokens), "ns")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_blob_round_trip(dtype):
    layout = KVLayout("m", num_layers=3, kv_heads=2, head_dim=16, dtype=dtype, chunk_tokens=32, page_tokens=8)
    chunk = chunk_of(layout)
    data = blob_bytes(chunk, layout, get_codec("raw"))
    header, back = decode_blob(data)
    assert header.key == chunk.key and header.parent == chunk.parent and header.namespace == "ns"
    assert header.layout == layout
    assert torch.equal(back.kv, chunk.kv) and back.kv.dtype == chunk.kv.dtype
    assert np.array_equal(back.tokens, chunk.tokens)
    assert torch.equal(back.summary, chunk.summary)


def test_blob_is_plain_safetensors():
    layout = KVLayout("m", num_layers=2, kv_heads=1, head_dim=8, chunk_tokens=16, page_tokens=8)
    chunk = chunk_of(layout)
    tensors = st_load(blob_bytes(chunk, layout, get_codec("raw")))
    assert torch.equal(tensors["kv.kv"], chunk.kv)
    assert torch.equal(tensors["tokens"], torch.from_numpy(chunk.tokens))


def test_one_layer_decodes_alone():
    layout = KVLayout("m", num_layers=4, kv_heads=2, head_dim=8, chunk_tokens=16, page_tokens=8)
    chunk = chunk_of(layout)
    data = bytearray(blob_bytes(chunk, layout, get_codec("raw")))
    _, back = decode_blob(data, layers=range(2, 3))
    assert torch.equal(back.kv, chunk.kv[2:3])
    # corrupting layer 0 does not stop reading layer 2, but does stop reading all layers
    header, _ = decode_blob(data)
    start = header.data_start + header.tensors["kv.kv"][2]
    data[start + 1] ^= 0xFF
    _, back = decode_blob(data, layers=range(2, 3))
    assert torch.equal(back.kv, chunk.kv[2:3])
    with pytest.raises(BlobError, match="checksum"):
        decode_blob(data)


def test_summary_matches_brute_force():
    layout = KVLayout("m", num_layers=2, kv_heads=3, head_dim=8, chunk_tokens=32, page_tokens=8)
    kv = make_kv(layout, 32).float()
    s = key_summary(kv, 8)
    for layer in range(2):
        for head in range(3):
            for page in range(4):
                keys = kv[layer, 0, head, page * 8 : (page + 1) * 8]
                assert torch.equal(s[layer, head, page, 0], keys.min(0).values)
                assert torch.equal(s[layer, head, page, 1], keys.max(0).values)
                assert torch.allclose(s[layer, head, page, 2], keys.mean(0), atol=1e-6)


@pytest.mark.parametrize("damage", ["flip_kv", "flip_tokens", "truncate", "header", "garbage", "empty"])
def test_damaged_blob_is_a_blob_error(damage):
    layout = KVLayout("m", num_layers=2, kv_heads=1, head_dim=8, chunk_tokens=16, page_tokens=8)
    data = bytearray(blob_bytes(chunk_of(layout), layout, get_codec("raw")))
    header, _ = decode_blob(data)
    if damage == "flip_kv":
        data[header.data_start + header.tensors["kv.kv"][2] + 5] ^= 1
    elif damage == "flip_tokens":
        data[header.data_start + header.tensors["tokens"][2]] ^= 1
    elif damage == "truncate":
        data = data[: len(data) - 10]
    elif damage == "header":
        data[20] = ord("{")
    elif damage == "garbage":
        data = bytearray(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    else:
        data = bytearray()
    with pytest.raises(BlobError):
        decode_blob(data)


@pytest.mark.parametrize(("name", "shape", "offsets"), [("tokens", [-1, -16], None), ("kv.kv", [2, 2, 1, -16, -8], None),
                                                    ("tokens", [2**64, 0], [0, 0])])
def test_a_header_with_an_impossible_shape_is_a_blob_error(name, shape, offsets):
    """Negative dimensions whose product still matches the byte range, or a huge one of an empty tensor."""
    layout = KVLayout("m", num_layers=2, kv_heads=1, head_dim=8, chunk_tokens=16, page_tokens=8)
    blob = blob_bytes(chunk_of(layout), layout, get_codec("raw"))
    n = struct.unpack_from("<Q", blob)[0]
    header = json.loads(blob[8 : 8 + n])
    header[name]["shape"] = shape
    header[name]["data_offsets"] = offsets or header[name]["data_offsets"]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with pytest.raises(BlobError, match="dimension out of range"):
        decode_blob(struct.pack("<Q", len(text)) + text + blob[8 + n :])


@pytest.mark.parametrize("part", ["summary_shape", "summary_dtype", "tokens_shape", "tokens_dtype"])
def test_well_formed_blob_with_misshapen_parts_is_refused(part):
    """Checksums only say the bytes arrived as sent: a blob built with a summary or tokens of the wrong shape
    or dtype is refused, not stored for retrieval to trip over later."""
    layout = KVLayout("m", num_layers=2, kv_heads=2, head_dim=8, chunk_tokens=16, page_tokens=8)
    chunk = chunk_of(layout)
    if part == "summary_shape":
        chunk.summary = chunk.summary[:, :, :1].contiguous()
    elif part == "summary_dtype":
        chunk.summary = chunk.summary.float()
    elif part == "tokens_shape":
        chunk.tokens = chunk.tokens[:-1]
    else:
        chunk.tokens = chunk.tokens.astype(np.int64)
    data = bytearray(encode_blob_unchecked(chunk, layout))
    with pytest.raises(BlobError, match="summary" if part.startswith("summary") else "tokens"):
        decode_blob(data)


def encode_blob_unchecked(chunk, layout) -> bytes:
    """The blob of ``chunk`` with its tensors as they are (``blob_tensors`` would convert the tokens)."""
    tensors = blob_tensors(chunk, get_codec("raw"))
    tensors["tokens"] = torch.from_numpy(np.ascontiguousarray(chunk.tokens))
    header = blob_header(chunk, layout, get_codec("raw"), tensors, layer_checksums(kv_parts(tensors)))
    return b"".join([header, *(t.reshape(-1).view(torch.uint8).numpy().tobytes() for t in tensors.values())])


def test_aligned_blob_is_still_plain_safetensors():
    layout = KVLayout("m", num_layers=2, kv_heads=1, head_dim=8, chunk_tokens=24, page_tokens=8)
    chunk = chunk_of(layout)
    header, buffers = encode_blob(chunk, layout, get_codec("raw"), align=4096)
    data = b"".join([header, *buffers])
    assert (len(header) + chunk.tokens.nbytes) % 4096 == 0
    assert torch.equal(st_load(data)["kv.kv"], chunk.kv)
    assert torch.equal(decode_blob(data)[1].kv, chunk.kv)


def test_layer_digests_are_replaced_in_place():
    layout = KVLayout("m", num_layers=3, kv_heads=1, head_dim=8, chunk_tokens=16, page_tokens=8)
    chunk = chunk_of(layout)
    tensors = blob_tensors(chunk, get_codec("raw"))
    blank = blob_header(chunk, layout, get_codec("raw"), tensors, [UNHASHED] * 3)
    real = layer_checksums(kv_parts(tensors))
    filled = with_layer_digests(blank, real)
    assert filled == blob_header(chunk, layout, get_codec("raw"), tensors, real)
    with pytest.raises(ValueError, match="do not fit"):
        with_layer_digests(blank, real[:2])


def test_in_place_decode_shares_the_blob_bytes_only_when_it_may():
    layout = KVLayout("m", num_layers=2, kv_heads=1, head_dim=8, chunk_tokens=16, page_tokens=8)
    chunk = chunk_of(layout)
    data = bytearray(blob_bytes(chunk, layout, get_codec("raw")))
    _, back = decode_blob(data, in_place=True)
    assert torch.equal(back.kv, chunk.kv)
    back.kv.zero_()  # it is a view of the blob's bytes
    with pytest.raises(BlobError, match="checksum"):
        decode_blob(data)
    frozen = bytes(blob_bytes(chunk, layout, get_codec("raw")))  # read-only: a copy
    _, back = decode_blob(frozen, in_place=True)
    assert torch.equal(back.kv, chunk.kv)
    quantized = bytearray(blob_bytes(chunk, layout, get_codec("int8")))  # not raw: decoded into new memory
    _, back = decode_blob(quantized, in_place=True)
    start = np.frombuffer(quantized, dtype=np.uint8).ctypes.data
    assert not start <= back.kv.data_ptr() < start + len(quantized)
    codec = get_codec("int8")
    expected = torch.empty_like(chunk.kv)
    codec.decode(codec.encode(chunk.kv), expected)
    assert torch.equal(back.kv, expected)


def _with_header(blob: bytes, edit) -> bytes:
    n = struct.unpack_from("<Q", blob)[0]
    header = json.loads(blob[8 : 8 + n])
    text = edit(header)
    text = text if isinstance(text, bytes) else json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blob[8 + n :]


@pytest.mark.parametrize("edit", [
    lambda h: h["kv.kv"].update(data_offsets=[0, float("inf")]),  # JSON's Infinity: int() overflows
    lambda h: h["tokens"].update(shape=[float("inf")]),
    lambda h: b"[" * 5000 + b"]" * 5000,  # nesting deeper than the JSON parser recurses
    lambda h: h["__metadata__"].update(layout=json.dumps({**json.loads(h["__metadata__"]["layout"]),
                                                           "kv_heads": 2**40})),  # more KV than can be allocated
], ids=["inf-offset", "inf-shape", "nested", "huge-layout"])
def test_a_header_no_parser_or_allocator_can_take_is_a_blob_error(edit):
    layout = KVLayout("m", num_layers=1, kv_heads=1, head_dim=4, chunk_tokens=8, page_tokens=8)
    chunk = chunk_of(layout)
    chunk.summary = None  # (a summary's shape would give a huge layout away before the KV is allocated)
    with pytest.raises(BlobError):
        decode_blob(_with_header(blob_bytes(chunk, layout, get_codec("raw")), edit))


def test_a_raw_blob_hands_its_verified_checksums_to_the_chunk():
    layout = KVLayout("m", num_layers=4, kv_heads=2, head_dim=8, chunk_tokens=16, page_tokens=8)
    chunk = chunk_of(layout)
    header, back = decode_blob(blob_bytes(chunk, layout, get_codec("raw")))
    assert back.layer_xxh3 == tuple(header.layer_xxh3) == tuple(layer_checksums({"kv": chunk.kv}))
    _, some = decode_blob(blob_bytes(chunk, layout, get_codec("raw")), layers=range(1, 4, 2))
    assert some.layer_xxh3 == (header.layer_xxh3[1], header.layer_xxh3[3])
    assert chunk.layer_xxh3 is None  # a chunk built from a tensor knows none
    # a lossy or compressed blob's checksums are of its encoded parts, not of the KV's bytes
    for codec in ("int8", "zstd"):
        assert decode_blob(blob_bytes(chunk, layout, get_codec(codec)))[1].layer_xxh3 is None


def test_a_blob_of_a_chunk_carries_its_checksums_instead_of_new_ones():
    """The checksums a chunk came in with go out with it: bytes changed in between fail the next reader's check."""
    layout = KVLayout("m", num_layers=3, kv_heads=2, head_dim=8, chunk_tokens=16, page_tokens=8)
    _, back = decode_blob(blob_bytes(chunk_of(layout), layout, get_codec("raw")))
    assert torch.equal(decode_blob(blob_bytes(back, layout, get_codec("raw")))[1].kv, back.kv)
    back.kv[1, 0, 0, 0, 0] += 1  # the memory holding it changed after it was verified
    with pytest.raises(BlobError, match="checksum"):
        decode_blob(blob_bytes(back, layout, get_codec("raw")))
    # another codec's blob hashes its own parts; so does a blob of a chunk whose checksums do not fit its KV
    assert decode_blob(blob_bytes(back, layout, get_codec("zstd")))[1].kv[1, 0, 0, 0, 0] == back.kv[1, 0, 0, 0, 0]
    back.layer_xxh3 = back.layer_xxh3[:2]
    assert torch.equal(decode_blob(blob_bytes(back, layout, get_codec("raw")))[1].kv, back.kv)
