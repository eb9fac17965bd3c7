"""RedisTier: chunks as blobs in a Redis server (redis-py + hiredis, one connection pool, pipelines).

Keys, for chunk key ``k`` (hex ``h``) and ``prefix`` (default ``kvtier:``):

- ``{prefix}{h}:0`` .. ``{prefix}{h}:{n-1}``: the blob (:mod:`kvtier.kvstore.chunk`) cut into parts of
  ``part_bytes`` (the last one shorter). Large values block the server while it copies them and make the
  client's reader buffer grow; parts of a few MiB keep both cheap.
- ``{prefix}{h}:m``, the index entry: ``b"KVTM"``, the blob's length and part size (``<QQ``), then the
  blob's head (header and tokens, a few KiB). Start-up lists these entries alone to rebuild the tier's
  sizes and the store's index without reading any KV.

A commit sends the parts, then the index entry, in one transaction (MULTI/EXEC, pipelined), straight from the
tensors' memory: the pure-Python command packer passes memoryviews to the socket, where redis-py's hiredis
packer would copy each value twice (hiredis still parses the replies). A get reads exactly the byte ranges it needs (``GETRANGE``:
the whole blob, or the header, tokens and requested layers), verifies the tokens' and layers' checksums as
:class:`~kvtier.kvstore.tiers.disk.DiskTier` does, and copies the raw codec's bytes straight into ``out``. A
missing part reads as an empty range, so a chunk that lost a part, or holds a bad one, is a miss that is
deleted and counted in ``stats.corrupt``: no torn or corrupt chunk is ever served, whatever happened to the
server. The transaction is there so that nothing leaks: a commit cut off before its EXEC arrived (the connection
lost, this process killed) leaves no part behind without its index entry. (A user whose ACL denies MULTI/EXEC
gets plain pipelines, with a warning at start-up; a commit cut off may then leave parts behind.)

Failures: gets and summaries never raise. A Redis error during a get is a miss counted in ``stats.errors``,
and the chunk is kept (the server may answer the next read; the store forgets only a chunk a tier no longer
contains). The keys of every delete that failed are deleted by the next delete or commit that reaches the
server, or by :meth:`close` (one try). A commit sends them first, on their own (a transaction Redis refuses, e.g.
when full, would drop them with it), and is refused while they cannot be sent (they could delete a chunk it
stored again). A commit that fails raises :class:`RedisTierError` and leaves nothing
of the chunk accounted. Every command has a timeout, so nothing waits forever.

``used_bytes`` is the sum of the lengths of the values this tier stored (parts and index entries), not
Redis's own per-key overhead. One tier owns a prefix: two stores sharing a prefix would evict each other's
chunks unseen (not detected). Another prefix that starts with this one is another tier's: its keys are not
chunk keys of this one (a key is 16 bytes), so they are left alone.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import redis
import torch
from redis.backoff import NoBackoff
from redis.connection import Encoder, PythonRespSerializer
from redis.retry import Retry

from kvtier.compression.codec import Codec
from kvtier.errors import BlobError, CodecError, LayoutError, TierError
from kvtier.kvstore.chunk import (BlobHeader, Chunk, byte_view, checksum, encode_blob, header_length, layer_checksums,
                                  parse_header, raw_digests)
from kvtier.kvstore.keys import KEY_BYTES
from kvtier.kvstore.tiers.base import Prepared, Tier
from kvtier.layout import KVLayout

log = logging.getLogger(__name__)

_MAGIC = b"KVTM"
_META = struct.Struct("<QQ")  # blob bytes, part bytes
_BATCH_BYTES = 64 << 20  # a pipeline of get_many/commit_many moves at most about this much
_SCAN_BATCH = 512
_MAX_VALUE = 512 << 20  # Redis's limit on one string value
T = TypeVar("T")


class RedisTierError(TierError):
    """A Redis command failed (connection refused or lost, timeout, out of memory): nothing was stored."""


@dataclass
class _Entry:
    """Where one stored chunk's bytes are: its blob's layout in parts, and the byte spans of its tensors."""

    nbytes: int  # accounted: the blob plus the index entry
    chunk_shape: tuple[int, ...]  # the layout's
    dtype: torch.dtype
    blob_bytes: int
    part_bytes: int
    head_end: int  # header and tokens: blob[0:head_end]
    kv: tuple[tuple[int, int], ...]  # per KV tensor: (start in the blob, bytes per layer)
    summary: tuple[int, int] | None  # the summary's [start, end) in the blob

    @property
    def n_parts(self) -> int:
        return -(-self.blob_bytes // self.part_bytes)

    def check(self, out: torch.Tensor, layers: range | None) -> None:
        """Raise LayoutError unless ``layers`` of this chunk fit ``out`` (a caller's mistake deletes nothing)."""
        n = self.chunk_shape[0]
        if layers is not None and (not isinstance(layers, range) or layers.step != 1
                                   or not 0 <= layers.start < layers.stop <= n):
            raise LayoutError(f"layers must be a contiguous non-empty range within 0..{n}, got {layers!r}")
        want = (n if layers is None else len(layers),) + self.chunk_shape[1:]
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want or out.dtype != self.dtype:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise LayoutError(f"out buffer {shape} does not fit {want} of {self.dtype}")

    def ranges(self, layers: range | None) -> list[tuple[int, int]]:
        """The blob byte ranges a get of ``layers`` (None: all) reads: header, tokens and those layers."""
        if layers is None:
            return [(0, self.blob_bytes)]
        spans = [(0, self.head_end)]
        spans += [(start + layers.start * per, start + layers.stop * per) for start, per in self.kv]
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(spans):
            if merged and lo <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        return merged


def _check_parts(header: BlobHeader) -> BlobHeader:
    """BlobError unless every KV tensor of ``header`` is layer-major over the layout's layers."""
    for name, (_, shape, _, _) in header.tensors.items():
        if name.startswith("kv.") and (not shape or shape[0] != header.layout.num_layers):
            raise BlobError(f"blob KV part {name} of shape {shape} is not layer-major")
    return header


def _entry(header: BlobHeader, nbytes: int, blob_bytes: int, part_bytes: int) -> _Entry:
    start = header.data_start
    kv = tuple((start + lo, (hi - lo) // shape[0])
               for name, (_, shape, lo, hi) in sorted(header.tensors.items()) if name.startswith("kv."))
    summary = None
    if "summary" in header.tensors:
        _, _, lo, hi = header.tensors["summary"]
        summary = (start + lo, start + hi)
    layout = header.layout
    return _Entry(nbytes, layout.chunk_shape, layout.torch_dtype, blob_bytes, part_bytes,
                  start + header.tensors["tokens"][3], kv, summary)


def _slices(buffers: Sequence[memoryview], start: int, end: int) -> list[memoryview]:
    """Views of bytes ``[start, end)`` of the concatenation of ``buffers`` (no copy)."""
    out = []
    offset = 0
    for buf in buffers:
        lo, hi = max(start, offset), min(end, offset + len(buf))
        if lo < hi:
            out.append(buf[lo - offset : hi - offset])
        offset += len(buf)
    return out


class _Pieces:
    """The replies of a chunk's GETRANGEs: ``(blob offset, length)`` each, checked for length."""

    def __init__(self, spans: list[tuple[int, int]], replies: list[bytes]) -> None:
        for (_, n), reply in zip(spans, replies):
            if len(reply) != n:
                raise BlobError(f"a part is missing or truncated ({len(reply)} of {n} bytes)")
        self.spans = spans
        self.replies = replies

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.spans)

    def copy_to(self, start: int, dst: memoryview) -> None:
        """Fill ``dst`` with blob bytes ``[start, start + len(dst))``; BlobError if some were not read."""
        end = start + len(dst)
        filled = 0
        for (offset, n), reply in zip(self.spans, self.replies):
            lo, hi = max(start, offset), min(end, offset + n)
            if lo < hi:
                dst[lo - start : hi - start] = memoryview(reply)[lo - offset : hi - offset]
                filled += hi - lo
        if filled != len(dst):
            raise BlobError(f"blob bytes {start}..{end} were not read")

    def tensor(self, header: BlobHeader, name: str, layers: range | None = None) -> torch.Tensor:
        """A new tensor holding ``name`` (only ``layers`` of it, when given)."""
        dtype, shape, lo, hi = header.tensors[name]
        if layers is not None:
            per = (hi - lo) // shape[0]
            lo, shape = lo + layers.start * per, (len(layers),) + shape[1:]
        out = torch.empty(shape, dtype=dtype)
        self.copy_to(header.data_start + lo, byte_view(out))
        return out


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisTier(Tier):
    """A persistent tier in Redis at ``url`` (``redis://[:password@]host:port/db``, ``rediss://``,
    ``unix://``): chunks survive a restart of the store process while the server keeps its data.

    ``max_value_bytes``: the largest value (blob part) written; ``timeout_s``: connect and command timeout.
    Raises :class:`RedisTierError` when the server cannot be reached at start-up.
    """

    persistent = True

    def __init__(self, url: str, capacity_bytes: int, codec: Codec | str = "raw", name: str = "redis",
                 prefix: str = "kvtier:", max_value_bytes: int = 4 << 20, timeout_s: float = 2.0) -> None:
        super().__init__(name, capacity_bytes, codec)
        if not 4096 <= max_value_bytes <= _MAX_VALUE:
            raise ValueError(f"tier {name!r}: max_value_bytes must be in [4096, {_MAX_VALUE}], "
                             f"got {max_value_bytes}")
        self.prefix = prefix
        self.part_bytes = int(max_value_bytes)
        # hiredis parses replies; the pure-Python packer sends memoryviews of the tensors without copying them
        # (redis-py's hiredis packer copies every value twice).
        self._pool = redis.ConnectionPool.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 1),
            command_packer=PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode))
        self._redis = redis.Redis(connection_pool=self._pool)
        kwargs = self._pool.connection_kwargs
        self.where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
        self._entries: dict[bytes, _Entry] = {}
        self._used = 0
        self._stale: set[bytes] = set()  # Redis keys to delete with the next write that reaches the server
        try:
            self._atomic = self._transactions_allowed()
            for key, meta, header in self._read_index(self._list_index()):
                if header is None:
                    self.stats.corrupt += 1
                    self._delete_all(key)
                    continue
                blob_bytes, part_bytes = _META.unpack_from(meta, 4)
                self._add(key, _entry(header, blob_bytes + len(meta), blob_bytes, part_bytes))
        except redis.RedisError as exc:
            self._pool.disconnect()
            raise RedisTierError(f"redis tier {name!r}: cannot read its chunks from {self.where}: {exc}") from None

    def _transactions_allowed(self) -> bool:
        """Whether this connection's user may run MULTI/EXEC (an ACL may deny it). Without, commits are plain
        pipelines: a commit cut off may then leave parts behind (never served, never deleted)."""
        pipe = self._redis.pipeline(transaction=True)
        pipe.exists(self._meta(bytes(KEY_BYTES)))
        try:
            pipe.execute()
        except redis.ResponseError as exc:
            log.warning("redis tier %s: transactions are refused at %s (%s): commits are plain pipelines, and one "
                        "cut off may leave parts behind", self.name, self.where, exc)
            return False
        return True

    # ------------------------------------------------------------------ keys and index entries

    def _part(self, key: bytes, i: int) -> bytes:
        return f"{self.prefix}{key.hex()}:{i}".encode()

    def _meta(self, key: bytes) -> bytes:
        return f"{self.prefix}{key.hex()}:m".encode()

    def _names(self, key: bytes, entry: _Entry) -> list[bytes]:
        return [self._meta(key)] + [self._part(key, i) for i in range(entry.n_parts)]

    def _list_index(self) -> list[bytes]:
        """Keys of the chunks whose index entries are in Redis."""
        pattern = _glob_escape(self.prefix) + "*:m"
        keys = []
        for name in self._redis.scan_iter(match=pattern, count=1000):
            try:
                key = bytes.fromhex(name[len(self.prefix.encode()) : -2].decode())
            except ValueError:
                continue
            if len(key) == KEY_BYTES:  # else another prefix's (this one followed by hex digits)
                keys.append(key)
        return keys

    def _read_index(self, keys: Sequence[bytes]) -> Iterator[tuple[bytes, bytes, BlobHeader | None]]:
        """``(key, index entry, parsed header)`` per key; an unreadable entry gives None for the header
        (and an entry that vanished, b"")."""
        for i in range(0, len(keys), _SCAN_BATCH):
            batch = keys[i : i + _SCAN_BATCH]
            pipe = self._redis.pipeline(transaction=False)
            for key in batch:
                pipe.get(self._meta(key))
            for key, meta in zip(batch, pipe.execute()):
                meta = meta or b""
                try:
                    header = self._check_meta(key, meta)
                except BlobError as exc:
                    log.warning("redis tier %s: index entry of %s is unreadable (%s)", self.name, key.hex(), exc)
                    header = None
                yield key, meta, header

    def _check_meta(self, key: bytes, meta: bytes) -> BlobHeader:
        head = 4 + _META.size
        if len(meta) < head or meta[:4] != _MAGIC:
            raise BlobError("not a kvtier index entry")
        blob_bytes, part_bytes = _META.unpack_from(meta, 4)
        header = _check_parts(parse_header(memoryview(meta)[head:]))
        if header.key != key or header.total_bytes != blob_bytes or not 0 < part_bytes <= _MAX_VALUE:
            raise BlobError("index entry does not match its key or sizes")
        _, _, lo, hi = header.tensors["tokens"]
        if len(meta) - head < header.data_start + hi:
            raise BlobError("index entry lacks the tokens")
        return header

    def _delete_all(self, key: bytes) -> None:
        """Delete every Redis key of a chunk whose index entry is unreadable (its part count is unknown)."""
        names = list(self._redis.scan_iter(match=_glob_escape(f"{self.prefix}{key.hex()}:") + "*", count=1000))
        if names:
            self._redis.delete(*names)

    def _add(self, key: bytes, entry: _Entry) -> None:
        self._entries[key] = entry
        self._used += entry.nbytes

    # ------------------------------------------------------------------ the tier contract

    @property
    def used_bytes(self) -> int:
        return self._used

    def prepare(self, chunk: Chunk, layout: KVLayout) -> Prepared:
        header, buffers = encode_blob(chunk, layout, self.codec)
        flat = [memoryview(header), *buffers]
        blob_bytes = sum(len(b) for b in flat)
        parsed = parse_header(header)
        entry = _entry(parsed, 0, blob_bytes, self.part_bytes)
        meta = b"".join([_MAGIC, _META.pack(blob_bytes, self.part_bytes), *_slices(flat, 0, entry.head_end)])
        entry.nbytes = blob_bytes + len(meta)
        parts = []
        for i in range(entry.n_parts):
            pieces = _slices(flat, i * self.part_bytes, min(blob_bytes, (i + 1) * self.part_bytes))
            parts.append(pieces[0] if len(pieces) == 1 else b"".join(pieces))
        return Prepared(chunk.key, entry.nbytes, (entry, parts, meta))

    def commit(self, prepared: Prepared) -> None:
        self.commit_many([prepared])

    def commit_many(self, prepared: Sequence[Prepared]) -> None:
        """Store the chunks in transactions (MULTI/EXEC) of up to about 64 MiB: a transaction cut off (the
        connection lost, this process killed) leaves nothing of its chunks in Redis. Raises RedisTierError if one
        fails; the chunks of earlier transactions are stored then, the others are not."""
        for batch in self._batches(prepared, lambda p: p.nbytes):
            # the queued deletes on their own: a transaction refused (Redis full) would drop them with it; and if
            # they fail, so would the commit (and a commit that did go through could be deleted by them later)
            if self._stale and not self._send_stale("retried with the next write"):
                raise RedisTierError(f"redis tier {self.name!r}: storing {len(batch)} chunk(s) at {self.where} "
                                     "failed: the deletes queued before it could not be sent")
            pipe = self._redis.pipeline(transaction=self._atomic)
            for p in batch:
                old = self._entries.get(p.key)
                if old is not None:
                    pipe.delete(*self._names(p.key, old))
                entry, parts, meta = p.payload
                for i, part in enumerate(parts):
                    pipe.set(self._part(p.key, i), part)
                pipe.set(self._meta(p.key), meta)
            try:
                failed = next((r for r in pipe.execute(raise_on_error=False) if isinstance(r, Exception)), None)
                if failed is not None:
                    raise failed
            except redis.RedisError as exc:
                self.stats.errors += 1
                for p in batch:  # some of its commands may have run (EXEC runs the others): delete its keys later
                    if p.key in self._entries:
                        self._stale.update(self._names(p.key, self._entries[p.key]))
                        self._forget(p.key)
                    self._stale.update(self._names(p.key, p.payload[0]))
                raise RedisTierError(f"redis tier {self.name!r}: storing {len(batch)} chunk(s) at {self.where} "
                                     f"failed: {type(exc).__name__}: {exc}") from None
            for p in batch:
                self._forget(p.key)
                self._add(p.key, p.payload[0])
                self.stats.bytes_written += p.nbytes

    def get(self, key: bytes, out: torch.Tensor, layers: range | None = None) -> Chunk | None:
        return self.get_many([key], [out], layers)[0]

    def get_many(self, keys: Sequence[bytes], outs: Sequence[torch.Tensor],
                 layers: range | None = None) -> list[Chunk | None]:
        """Fetch chunks in pipelines of up to about 64 MiB; misses (also corrupt chunks and failures) are None."""
        results: list[Chunk | None] = [None] * len(keys)
        wanted = [i for i, k in enumerate(keys) if k in self._entries]
        for i in wanted:
            self._entries[keys[i]].check(outs[i], layers)
        self.stats.misses += len(keys) - len(wanted)
        for batch in self._batches(wanted, lambda i: self._entries[keys[i]].blob_bytes):
            pipe = self._redis.pipeline(transaction=False)
            reads = [self._queue_reads(pipe, keys[i], self._entries[keys[i]].ranges(layers)) for i in batch]
            try:
                replies = pipe.execute()
            except redis.RedisError as exc:
                log.warning("redis tier %s: reading %d chunk(s) from %s failed: %s",
                            self.name, len(batch), self.where, exc)
                self.stats.errors += 1  # the chunks stay: the server may be back for the next read
                self.stats.misses += len(batch)
                continue
            for i, spans in zip(batch, reads):
                mine, replies = replies[: len(spans)], replies[len(spans) :]
                if keys[i] not in self._entries:  # deleted meanwhile: the same key, corrupt, earlier in this batch
                    self.stats.misses += 1
                    continue
                try:
                    pieces = _Pieces(spans, mine)
                except BlobError as exc:
                    self._corrupt(keys[i], str(exc))
                    self.stats.misses += 1
                    continue
                results[i] = self._decode(keys[i], self._entries[keys[i]], outs[i], layers, pieces)
        return results

    def summary(self, key: bytes) -> torch.Tensor | None:
        entry = self._entries.get(key)
        if entry is None or entry.summary is None:
            return None
        pipe = self._redis.pipeline(transaction=False)
        spans = self._queue_reads(pipe, key, [(0, entry.head_end), entry.summary])
        try:
            pieces = _Pieces(spans, pipe.execute())
            header = self._header(key, pieces)
            summary = pieces.tensor(header, "summary")
            if checksum(summary) != header.summary_xxh3:
                raise BlobError("summary checksum mismatch")
            return summary
        except redis.RedisError as exc:
            log.warning("redis tier %s: reading a summary from %s failed: %s", self.name, self.where, exc)
            self.stats.errors += 1
            return None
        except BlobError as exc:
            self._corrupt(key, str(exc))
            return None

    def scan(self) -> Iterator[tuple[Chunk, KVLayout]]:
        """Key, parent, tokens and namespace of every chunk, from the index entries; unreadable ones are
        deleted and counted. Raises RedisTierError if the server cannot be read."""
        try:
            for key, meta, header in self._read_index(list(self._entries)):
                if header is None:
                    self._corrupt(key, "unreadable index entry")
                    continue
                tokens = torch.frombuffer(bytearray(self._token_bytes(meta, header)), dtype=torch.int32)
                if checksum(tokens) != header.tokens_xxh3:
                    self._corrupt(key, "tokens checksum mismatch")
                    continue
                yield Chunk(key, header.parent, tokens.numpy(), namespace=header.namespace), header.layout
        except redis.RedisError as exc:
            self.stats.errors += 1
            raise RedisTierError(
                f"redis tier {self.name!r}: listing its chunks at {self.where} failed: {exc}") from None

    def contains(self, key: bytes) -> bool:
        return key in self._entries

    def delete(self, key: bytes) -> int:
        entry = self._entries.get(key)
        if entry is None:
            return 0
        self._forget(key)
        self._stale.update(self._names(key, entry))
        self._send_stale("retried with the next write")
        return entry.nbytes

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        """Send the deletes that have not reached the server yet (one try, within the command timeout: else the
        chunks they delete would come back at the next start), then drop the connections."""
        if self._stale:
            self._send_stale("they come back at the next start")
        self._pool.disconnect()

    def _send_stale(self, else_: str) -> bool:
        """Delete the keys of chunks deleted here; whether that worked. A failure is counted and logged with
        ``else_`` (what follows)."""
        stale = set(self._stale)
        pipe = self._redis.pipeline(transaction=False)
        pipe.delete(*stale)
        try:
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("redis tier %s: deleting %d keys at %s failed (%s): %s", self.name, len(stale), self.where,
                        else_, exc)
            self.stats.errors += 1
            return False
        self._stale -= stale
        return True

    # ------------------------------------------------------------------ helpers

    def _forget(self, key: bytes) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._used -= entry.nbytes

    def _corrupt(self, key: bytes, why: str) -> None:
        log.warning("redis tier %s: chunk %s is unreadable (%s); deleted", self.name, key.hex(), why)
        self.stats.corrupt += 1
        self.delete(key)

    @staticmethod
    def _batches(items: Sequence[T], size: Callable[[T], int]) -> Iterator[list[T]]:
        """``items`` in consecutive groups of at most ``_BATCH_BYTES`` (or one item)."""
        batch: list[T] = []
        total = 0
        for item in items:
            if batch and total + size(item) > _BATCH_BYTES:
                yield batch
                batch, total = [], 0
            batch.append(item)
            total += size(item)
        if batch:
            yield batch

    def _queue_reads(self, pipe: redis.client.Pipeline, key: bytes,
                     ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Queue a GETRANGE per part overlapping each blob range; returns the pieces' (blob offset, length)."""
        P = self._entries[key].part_bytes
        pieces = []
        for lo, hi in ranges:
            for i in range(lo // P, (hi - 1) // P + 1):
                a, b = max(lo, i * P), min(hi, (i + 1) * P)
                pipe.getrange(self._part(key, i), a - i * P, b - i * P - 1)
                pieces.append((a, b - a))
        return pieces

    @staticmethod
    def _header(key: bytes, pieces: _Pieces) -> BlobHeader:
        first = bytearray(8)
        pieces.copy_to(0, memoryview(first))
        head = bytearray(header_length(first))
        pieces.copy_to(0, memoryview(head))
        header = _check_parts(parse_header(head))
        if header.key != key:
            raise BlobError(f"the value holds chunk {header.key.hex()}")
        return header

    def _decode(self, key: bytes, entry: _Entry, out: torch.Tensor, layers: range | None,
                pieces: _Pieces) -> Chunk | None:
        """Verify the chunk read into ``pieces`` and decode its KV into ``out``: like DiskTier, the raw codec's
        bytes go straight into a contiguous CPU ``out``; other codecs decode from a copy of their parts."""
        try:
            header = self._header(key, pieces)
            tokens = pieces.tensor(header, "tokens")
            if checksum(tokens) != header.tokens_xxh3:
                raise BlobError("tokens checksum mismatch")
            layers = layers if layers is not None else range(header.layout.num_layers)
            if header.layout.chunk_shape != entry.chunk_shape or header.layout.torch_dtype != entry.dtype:
                raise BlobError(f"the stored layout {header.layout.chunk_shape} differs from the index entry's")
            direct = header.codec.name == "raw" and out.device.type == "cpu" and out.is_contiguous()
            parts = {}
            for name, (dtype, shape, lo, hi) in sorted(header.tensors.items()):
                if not name.startswith("kv."):
                    continue
                if direct:
                    if tuple(out.shape) != (len(layers),) + shape[1:] or out.dtype != dtype:
                        raise BlobError(f"stored {name} {shape} {dtype} does not fit the buffer {tuple(out.shape)}")
                    pieces.copy_to(header.data_start + lo + layers.start * ((hi - lo) // shape[0]), byte_view(out))
                    parts[name[3:]] = out
                else:
                    parts[name[3:]] = pieces.tensor(header, name, layers)
            if layer_checksums(parts) != header.layer_xxh3[layers.start : layers.stop]:
                raise BlobError("KV checksum mismatch")
            header.codec.decode(parts, out)
        except (BlobError, CodecError) as exc:
            self._corrupt(key, str(exc))
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        self.stats.bytes_read += pieces.nbytes
        return Chunk(key, header.parent, tokens.numpy(), out, namespace=header.namespace,
                     layer_xxh3=raw_digests(header, layers))

    @staticmethod
    def _token_bytes(meta: bytes, header: BlobHeader) -> bytes:
        _, _, lo, hi = header.tensors["tokens"]
        start = 4 + _META.size + header.data_start
        return meta[start + lo : start + hi]
