"""Chunks and the one blob format every tier and the wire use.

A :class:`Chunk` is the KV of ``chunk_tokens`` consecutive tokens for all layers of one model, with what
verifies a hit: its own token ids and its parent key.

The blob is a safetensors file (readable by ``safetensors.safe_open`` / ``safetensors.torch.load``):

- tensors: ``tokens`` (int32 ``[C]``), ``summary`` (``[L, H, P, 3, D]``, optional) and the codec's parts as
  ``kv.<name>``, each layer-major (first dim ``L``), so one layer's bytes sit at known offsets;
- metadata: ``format`` (``kvtier-chunk/1``), ``key``, ``parent`` (hex), ``namespace``, ``layout`` (the KVLayout as JSON),
  ``codec`` and ``codec_params`` (JSON), ``layer_xxh3`` (one XXH3-64 per layer over that layer's slices
  of every codec part, comma separated), ``tokens_xxh3`` and ``summary_xxh3``.

Tensors are laid out tokens first, then the KV parts, then the summary, so a reader gets the header and the
tokens with one small read and can verify a hit before it reads any KV.

Writing is zero-copy: :func:`encode_blob` returns the header and memoryviews of the tensors, which a file
write (``os.writev``), a Redis value or an HTTP body take as they are.
"""

from __future__ import annotations

import functools
import json
import math
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import xxhash

from kvtier.compression.codec import Codec, get_codec
from kvtier.errors import BlobError, CodecError
from kvtier.layout import KVLayout

FORMAT = "kvtier-chunk/1"
_MAX_HEADER = 1 << 20

_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
    torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.bool: "BOOL",
}
_NAME_DTYPES = {v: k for k, v in _DTYPE_NAMES.items()}


@dataclass
class Chunk:
    """One chunk. ``kv``: ``[L, T, H, C, D]`` in the layout's dtype (None in metadata-only use);
    ``tokens``: int32 ``[C]``; ``summary``: ``[L, H, P, 3, D]`` per-page key min/max/mean, or None;
    ``layer_xxh3``: the XXH3-64 of each layer of ``kv`` (its raw bytes) as verified against a blob's checksums
    when the chunk was read from one, else None. A blob encoded from the chunk carries these instead of new
    ones, so the bytes are checked end to end: from the blob that brought them to whoever reads them next."""

    key: bytes
    parent: bytes
    tokens: np.ndarray
    kv: torch.Tensor | None = None
    summary: torch.Tensor | None = None
    namespace: str = ""
    layer_xxh3: tuple[str, ...] | None = None


def key_summary(kv: torch.Tensor, page_tokens: int) -> torch.Tensor:
    """Per layer, KV head and page of ``page_tokens`` tokens: the per-channel min, max and mean of the keys.

    ``kv``: ``[L, T, H, C, D]`` (tensor 0 is the key, or the latent for MLA) -> ``[L, H, C // page, 3, D]``
    in ``kv``'s dtype. Decode-time retrieval scores pages with it (Quest: ``sum_d max(q_d min_d, q_d max_d)``).
    Reduced in fp32 over ``[pages, page_tokens, D]`` (CPU reductions on fp16, or over a middle dimension of
    a 5-D view, are several times slower), about 1 MiB of layers at a time on CPU: one fp32 copy of a large
    chunk's keys would land in fresh pages, and the page faults cost more than the arithmetic. On a GPU all layers
    at once (the kernel launches of 1 MiB steps would cost more than the arithmetic).
    """
    L, _, H, C, D = kv.shape
    step = L if kv.is_cuda else max(1, (1 << 20) // (H * C * D * 4))
    out = []
    for start in range(0, L, step):
        keys = kv[start : start + step, 0].reshape(-1, page_tokens, D).float()
        out.append(torch.stack((keys.amin(dim=1), keys.amax(dim=1), keys.mean(dim=1)), dim=1))
    return torch.cat(out).view(L, H, C // page_tokens, 3, D).to(kv.dtype)


UNHASHED = "0" * 16  # a layer digest's length: sizes a header before the KV is hashed
_DIGESTS_FIELD = b'"layer_xxh3":"'


def byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def part_views(parts: dict[str, torch.Tensor]) -> list[tuple[memoryview, int]]:
    """For each part in name order: its bytes and the bytes one layer takes (parts are contiguous and
    layer-major, so layer ``l`` is the ``l``-th equal slice)."""
    out = []
    for name in sorted(parts):
        view = byte_view(parts[name])
        out.append((view, len(view) // parts[name].shape[0]))
    return out


def layer_digests(views: list[tuple[memoryview, int]], layers: range) -> list[str]:
    """XXH3-64 hex digest of each layer in ``layers`` (indices into ``views``) over all parts' slices."""
    if len(views) == 1:  # one part (the raw codec): one call per layer instead of three
        view, step = views[0]
        return [xxhash.xxh3_64_hexdigest(view[layer * step : (layer + 1) * step]) for layer in layers]
    out = []
    for layer in layers:
        h = xxhash.xxh3_64()
        for view, step in views:
            h.update(view[layer * step : (layer + 1) * step])
        out.append(h.hexdigest())
    return out


def layer_checksums(parts: dict[str, torch.Tensor]) -> list[str]:
    """One XXH3-64 hex digest per layer over that layer's slice of every part (parts sorted by name)."""
    return layer_digests(part_views(parts), range(parts[next(iter(parts))].shape[0]))


def raw_digests(header: BlobHeader, layers: range) -> tuple[str, ...] | None:
    """The verified checksums of ``layers`` from ``header`` as a chunk carries them (:attr:`Chunk.layer_xxh3`):
    those of a raw-codec blob, whose KV part is the layers' raw bytes; None for any other codec."""
    if header.codec.name != "raw":
        return None
    return tuple(header.layer_xxh3[layers.start : layers.stop : layers.step])


def carried_digests(chunk: Chunk, codec: Codec) -> tuple[str, ...] | None:
    """The chunk's own layer checksums (:attr:`Chunk.layer_xxh3`) if a blob of it in ``codec`` carries them: the
    raw codec, whose KV part is the chunk's bytes as they are. None otherwise (the blob's KV is hashed)."""
    known = chunk.layer_xxh3
    if codec.name != "raw" or known is None or chunk.kv is None or len(known) != chunk.kv.shape[0]:
        return None
    return known


def checksum(t: torch.Tensor | None) -> str:
    """XXH3-64 hex digest of a contiguous CPU tensor's bytes ("" for None)."""
    return "" if t is None else xxhash.xxh3_64_hexdigest(byte_view(t))


def blob_tensors(chunk: Chunk, codec: Codec) -> dict[str, torch.Tensor]:
    """The blob's tensors in file order: ``tokens``, the codec's parts as ``kv.<name>``, ``summary`` if any."""
    if chunk.kv is None:
        raise BlobError("a chunk without KV cannot be encoded as a blob")
    kv = chunk.kv if chunk.kv.device.type == "cpu" else chunk.kv.cpu()
    parts = {name: t.contiguous() for name, t in codec.encode(kv).items()}
    tokens = np.ascontiguousarray(chunk.tokens, dtype=np.int32)  # a read-only array would make torch warn
    tensors = {"tokens": torch.from_numpy(tokens if tokens.flags.writeable else tokens.copy())}
    tensors.update((f"kv.{name}", t) for name, t in sorted(parts.items()))
    if chunk.summary is not None:
        tensors["summary"] = chunk.summary.cpu().contiguous()
    return tensors


def kv_parts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The codec's parts among a blob's tensors, by part name."""
    return {name[3:]: t for name, t in tensors.items() if name.startswith("kv.")}


def blob_header(chunk: Chunk, layout: KVLayout, codec: Codec, tensors: dict[str, torch.Tensor],
                layer_xxh3: Sequence[str], align: int = 8) -> bytes:
    """The safetensors header of a blob of ``tensors`` (from :func:`blob_tensors`) whose KV layers hash to
    ``layer_xxh3``. Its length does not depend on the digests' values (each is 16 hex digits), so a writer
    may put the KV first and the header last.

    ``align``: the header is padded with spaces (as safetensors allows) so that the first KV part starts at
    a multiple of this many bytes; the disk tier asks for its page size, so reads and writes of the KV copy
    whole, aligned pages.
    """
    metadata = {
        "format": FORMAT,
        "key": chunk.key.hex(),
        "parent": chunk.parent.hex(),
        "namespace": chunk.namespace,
        "layout": _layout_json(layout),
        "codec": codec.name,
        "codec_params": json.dumps(codec.params(), sort_keys=True),
        "layer_xxh3": ",".join(layer_xxh3),
        "tokens_xxh3": checksum(tensors["tokens"]),
        "summary_xxh3": checksum(tensors.get("summary")),
    }
    header: dict = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    if align > 8:
        kv_start = 8 + len(text) + tensors["tokens"].nbytes  # the tokens come first
        text += b" " * (-kv_start % align)
    return struct.pack("<Q", len(text)) + text


def with_layer_digests(header: bytes, layer_xxh3: list[str]) -> bytes:
    """``header`` (from :func:`blob_header`) with its layer digests replaced; the length does not change."""
    start = header.index(_DIGESTS_FIELD) + len(_DIGESTS_FIELD)
    end = header.index(b'"', start)
    text = ",".join(layer_xxh3).encode()
    if len(text) != end - start:
        raise ValueError(f"{len(layer_xxh3)} layer digests do not fit the header's {header[start:end].count(b',') + 1}")
    return header[:start] + text + header[end:]


@functools.lru_cache(maxsize=64)
def _layout_json(layout: KVLayout) -> str:
    return json.dumps(layout.to_dict(), sort_keys=True)


def encode_blob(chunk: Chunk, layout: KVLayout, codec: Codec, align: int = 8) -> tuple[bytes, list[memoryview]]:
    """Encode ``chunk`` with ``codec``: the safetensors header and the tensor buffers, in file order.

    ``b"".join([header, *buffers])`` (or a vectored write of them) is the blob. With the raw codec, a chunk's
    own ``layer_xxh3`` become the blob's checksums (the KV is not hashed again).
    """
    tensors = blob_tensors(chunk, codec)
    digests = carried_digests(chunk, codec)
    if digests is None:
        digests = layer_checksums(kv_parts(tensors))
    header = blob_header(chunk, layout, codec, tensors, digests, align)
    return header, [byte_view(t) for t in tensors.values()]


def blob_bytes(chunk: Chunk, layout: KVLayout, codec: Codec) -> bytes:
    """The whole blob as one bytes object (for the wire and Redis)."""
    header, buffers = encode_blob(chunk, layout, codec)
    return b"".join([header, *buffers])


@dataclass
class BlobHeader:
    """A parsed blob header. ``tensors`` maps name -> (dtype, shape, start, end) relative to ``data_start``."""

    key: bytes
    parent: bytes
    namespace: str
    layout: KVLayout
    codec: Codec
    layer_xxh3: list[str]
    tokens_xxh3: str
    summary_xxh3: str
    tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]
    data_start: int

    @property
    def total_bytes(self) -> int:
        return self.data_start + max((end for *_, end in self.tensors.values()), default=0)


@functools.lru_cache(maxsize=64)
def _layout(text: str) -> KVLayout:
    return KVLayout.from_dict(json.loads(text))


@functools.lru_cache(maxsize=64)
def _codec(name: str, params: str) -> Codec:
    return get_codec(name, **json.loads(params))


def max_blob_bytes(layout: KVLayout) -> int:
    """The most bytes a blob of ``layout`` can take with the raw codec (the largest header included)."""
    summary = math.prod(layout.summary_shape) * layout.torch_dtype.itemsize
    return 8 + _MAX_HEADER + 4 * layout.chunk_tokens + layout.chunk_bytes + summary


def header_length(prefix: bytes | memoryview) -> int:
    """Bytes taken by the header, given at least the blob's first 8 bytes."""
    if len(prefix) < 8:
        raise BlobError(f"blob too short: {len(prefix)} bytes, a header needs at least 8")
    (n,) = struct.unpack_from("<Q", prefix)
    if n <= 0 or n > _MAX_HEADER:
        raise BlobError(f"blob header length {n} is out of range (1..{_MAX_HEADER})")
    return 8 + n


def parse_header(data: bytes | memoryview) -> BlobHeader:
    """Parse and validate a blob header from ``data`` (at least :func:`header_length` bytes)."""
    start = header_length(data)
    if len(data) < start:
        raise BlobError(f"blob truncated inside its header ({len(data)} of {start} bytes)")
    try:
        raw = json.loads(bytes(data[8:start]))
        meta = raw.pop("__metadata__")
        if meta.get("format") != FORMAT:
            raise BlobError(f"not a kvtier chunk blob: format {meta.get('format')!r}, expected {FORMAT!r}")
        layout = _layout(meta["layout"])
        codec = _codec(meta["codec"], meta["codec_params"])
        tensors = {}
        for name, spec in raw.items():
            dtype = _NAME_DTYPES[spec["dtype"]]
            lo, hi = (int(x) for x in spec["data_offsets"])
            shape = tuple(int(s) for s in spec["shape"])
            if any(not 0 <= d < 1 << 40 for d in shape):
                raise BlobError(f"blob tensor {name!r} has a dimension out of range in its shape {shape}")
            if lo < 0 or hi < lo or hi - lo != math.prod(shape) * dtype.itemsize:
                raise BlobError(f"blob tensor {name!r} has inconsistent offsets {lo}..{hi} for shape {shape}")
            tensors[name] = (dtype, shape, lo, hi)
        header = BlobHeader(
            key=bytes.fromhex(meta["key"]),
            parent=bytes.fromhex(meta["parent"]),
            namespace=meta["namespace"],
            layout=layout,
            codec=codec,
            layer_xxh3=meta["layer_xxh3"].split(","),
            tokens_xxh3=meta["tokens_xxh3"],
            summary_xxh3=meta["summary_xxh3"],
            tensors=tensors,
            data_start=start,
        )
    except BlobError:
        raise
    except (KeyError, ValueError, TypeError, AttributeError, ArithmeticError, RecursionError, CodecError) as exc:
        raise BlobError(f"malformed blob header: {type(exc).__name__}: {exc}") from None
    if "tokens" not in tensors or not any(n.startswith("kv.") for n in tensors):
        raise BlobError("blob lacks its tokens or KV tensors")
    if len(header.layer_xxh3) != layout.num_layers:
        raise BlobError(f"blob has {len(header.layer_xxh3)} layer checksums for {layout.num_layers} layers")
    return header


def _tensor(data: memoryview, header: BlobHeader, name: str) -> torch.Tensor:
    dtype, shape, lo, hi = header.tensors[name]
    if header.data_start + hi > len(data):
        raise BlobError(f"blob truncated: tensor {name!r} ends at byte {header.data_start + hi} of {len(data)}")
    if lo == hi:
        return torch.empty(shape, dtype=dtype)
    raw = data[header.data_start + lo : header.data_start + hi]
    with warnings.catch_warnings():  # torch warns on read-only buffers; these tensors are only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(raw, dtype=torch.uint8).view(dtype).view(shape)


def decode_blob(data: bytes | bytearray | memoryview, out: torch.Tensor | None = None,
                layers: range | None = None, in_place: bool = False, header: BlobHeader | None = None,
                layer_xxh3: list[str] | None = None) -> tuple[BlobHeader, Chunk]:
    """Verify and decode a blob. Returns the header and a Chunk whose ``kv`` is ``out`` (filled) or new.

    ``layers``: decode only these layers (``out`` then has ``len(layers)`` layers); only their checksums
    are checked. Raises BlobError on any corruption: a bad header, a truncated body, a checksum mismatch.
    The returned ``tokens``/``summary`` may share memory with ``data``. ``in_place`` (without ``out``): a
    raw-codec blob in writable ``data`` decodes to a view of its own bytes, with no copy. ``header`` and
    ``layer_xxh3``: the header as parsed from ``data`` and the digests of all KV layers as computed from its
    bytes while they arrived (neither is done again).
    """
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    header = parse_header(view) if header is None else header
    layout = header.layout
    layers = layers if layers is not None else range(layout.num_layers)
    parts = {name[3:]: _tensor(view, header, name) for name in header.tensors if name.startswith("kv.")}
    tokens = _tensor(view, header, "tokens")
    summary = _tensor(view, header, "summary") if "summary" in header.tensors else None
    if checksum(tokens) != header.tokens_xxh3 or checksum(summary) != header.summary_xxh3:
        raise BlobError("blob checksum mismatch in its tokens or summary")
    if tuple(tokens.shape) != (layout.chunk_tokens,) or tokens.dtype != torch.int32:
        raise BlobError(f"blob tokens are {tuple(tokens.shape)} {tokens.dtype}, not ({layout.chunk_tokens},) int32")
    if summary is not None and (tuple(summary.shape) != layout.summary_shape or summary.dtype != layout.torch_dtype):
        raise BlobError(f"blob key summary is {tuple(summary.shape)} {summary.dtype}, not {layout.summary_shape} "
                        f"{layout.torch_dtype}")
    for part in parts.values():
        if part.dim() == 0 or part.shape[0] != layout.num_layers:
            raise BlobError(f"blob KV part of shape {tuple(part.shape)} is not layer-major over {layout.num_layers} layers")
    sub = {name: p[layers.start : layers.stop : layers.step] for name, p in parts.items()}
    sums = layer_checksums(sub) if layer_xxh3 is None else layer_xxh3[layers.start : layers.stop : layers.step]
    if sums != header.layer_xxh3[layers.start : layers.stop : layers.step]:
        raise BlobError("blob checksum mismatch in its KV")
    shape = (len(layers),) + layout.chunk_shape[1:]
    own = sub.get("kv")
    if out is None and in_place and not view.readonly and header.codec.name == "raw" and own is not None \
            and tuple(own.shape) == shape and own.dtype == layout.torch_dtype:
        out = own
    if out is None:
        try:  # the blob's own layout says how large: it may claim anything
            out = torch.empty(shape, dtype=layout.torch_dtype)
        except (RuntimeError, TypeError, OverflowError, MemoryError) as exc:
            raise BlobError(f"blob layout's KV {shape} cannot be allocated: {exc}") from None
    elif tuple(out.shape) != shape or out.dtype != layout.torch_dtype:
        raise BlobError(f"output buffer {tuple(out.shape)} {out.dtype} does not fit {shape} {layout.torch_dtype}")
    try:
        header.codec.decode(sub, out)
    except CodecError as exc:
        raise BlobError(f"blob KV fails to decode: {exc}") from None
    chunk = Chunk(header.key, header.parent, tokens.numpy(), out, summary, header.namespace, raw_digests(header, layers))
    return header, chunk
