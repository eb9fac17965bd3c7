"""DiskTier: one blob file per chunk in a local folder.

- Writes are atomic: the blob goes to ``tmp/`` and is renamed into place, so a reader never sees half a
  file. The calling thread writes the KV and the summary in one vectored write while the tier's hashing
  thread hashes the KV (the write releases the GIL); the header with those digests goes last, with the
  tokens (its length does not depend on them). A large chunk's KV starts on a page boundary, so the kernel
  copies whole, aligned pages both ways.
- ``fsync=False`` (the default) skips the flush to the device: a crash may lose recent chunks, but a lost or
  torn file can never be served, because every read verifies its checksums.
- Reads go straight into the caller's buffer (no staging copy for the raw codec), 2 MiB of layers at a
  time, each group hashed right after it is read while it is still in the CPU cache, and verify the per-layer
  checksums of what they read; a corrupt or truncated file is a miss, deleted and counted.
- The parsed headers and verified tokens of the last ``header_cache`` chunks read are kept in memory with the
  file bytes they came from: a read whose first bytes (header and tokens) equal those skips parsing and
  checking them again (about 70 us of a 5.6 MiB chunk's 650), and verifies every KV byte against the digests
  of that header as always. Any other bytes are parsed afresh.
- On start-up the folder is listed for sizes; :meth:`scan` reads each header for the store's index.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from kvtier.compression.codec import Codec
from kvtier.errors import BlobError, TierError
from kvtier.kvstore.chunk import (
    UNHASHED, BlobHeader, Chunk, blob_header, blob_tensors, byte_view, carried_digests, checksum, header_length,
    kv_parts, layer_digests, parse_header, part_views, raw_digests, with_layer_digests,
)
from kvtier.kvstore.tiers.base import Prepared, Tier
from kvtier.layout import KVLayout

log = logging.getLogger(__name__)

SUFFIX = ".kvt"
_TMP_NAME = re.compile(r"[0-9a-f]+\.kvt\.\d+\.\d+")  # a file being written: <key>.kvt.<pid>.<sequence>
_PAGE = 4096  # the KV of a large chunk starts on a page boundary of the file (see blob_header's align)
_ALIGN_FROM = 64 * _PAGE  # smaller chunks are not padded: the padding would cost more than it saves
_FIRST_READ = 2 * _PAGE  # the header and the tokens, in one read
_GROUP_BYTES = 2 << 20  # KV is read this much at a time, then hashed while in cache


def _transfer(op, fd: int, bufs: list[memoryview], offset: int) -> int:
    """``os.preadv`` or ``os.pwritev`` of all of ``bufs`` (consecutive in the file) at ``offset``, call after
    call; stops early only when a call moves nothing (end of file). Returns the bytes moved."""
    done = 0
    while bufs:
        n = op(fd, bufs, offset + done)
        if n <= 0:
            break
        done += n
        while bufs and n >= len(bufs[0]):  # drop what was moved; a partly moved buffer keeps its rest
            n -= len(bufs[0])
            bufs = bufs[1:]
        if bufs:
            bufs = [bufs[0][n:]] + bufs[1:]
    return done


def _pwrite_all(fd: int, bufs: list[memoryview], offset: int) -> None:
    """Write all of ``bufs``, one after another, at ``offset``."""
    want = sum(len(b) for b in bufs)
    done = _transfer(os.pwritev, fd, bufs, offset)
    if done < want:
        raise OSError(f"write at {offset + done} made no progress")


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    """Fill ``buf`` from ``offset``; BlobError if the file ends first."""
    done = _transfer(os.preadv, fd, [buf], offset)
    if done < len(buf):
        raise BlobError(f"file truncated: wanted {len(buf)} bytes at {offset}, got {done}")


def _layer_groups(views: list[tuple[memoryview, int]], num_layers: int) -> Iterator[range]:
    """Consecutive layers of about ``_GROUP_BYTES`` (over all parts): a group's bytes are hashed right
    after they are copied, while they are still in the CPU cache."""
    group = max(1, _GROUP_BYTES // sum(step for _, step in views))
    for g0 in range(0, num_layers, group):
        yield range(g0, min(g0 + group, num_layers))


def _lock_folder(path: Path) -> int:
    """Lock ``path`` for this process (a POSIX lock on ``path/.lock``, released when the process ends or the tier
    closes); TierError when another process holds it: two stores on one folder would delete each other's files
    and together fill twice its capacity. The descriptor is returned, to be closed on close()."""
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise TierError(f"disk tier folder {path} is in use by another process (it holds {path / '.lock'})") from None
    return fd


class DiskTier(Tier):
    persistent = True

    def __init__(self, path: str | os.PathLike, capacity_bytes: int, codec: Codec | str = "raw",
                 name: str = "disk", fsync: bool = False, header_cache: int = 1024) -> None:
        super().__init__(name, capacity_bytes, codec)
        self._heads: OrderedDict[bytes, tuple[bytes, BlobHeader, np.ndarray]] = OrderedDict()
        self._heads_max = header_cache
        self._heads_lock = threading.Lock()
        self.path = Path(path)
        self._root = str(self.path)
        self.fsync = fsync
        self._tmp = self.path / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)  # (a path that is a file: NotADirectoryError)
        self._lock_fd = _lock_folder(self.path)
        for f in self._tmp.iterdir():  # half-written files of an earlier run (only those: nothing else is ours)
            if _TMP_NAME.fullmatch(f.name) and f.is_file():
                f.unlink(missing_ok=True)
        for i in range(256):  # the files' folders, by the key's first byte
            (self.path / f"{i:02x}").mkdir(exist_ok=True)
        self._sizes: dict[bytes, int] = {}
        self._used = 0
        self._tmp_seq = 0
        self._tmp_lock = threading.Lock()
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kvtier-{name}-hasher")
        self._closed = False
        for sub in self.path.iterdir():
            if sub.is_dir() and len(sub.name) == 2:
                for f in sub.glob("*" + SUFFIX):
                    try:
                        key = bytes.fromhex(f.name[: -len(SUFFIX)])
                        st = f.stat()
                    except (ValueError, OSError):
                        continue
                    if not stat.S_ISREG(st.st_mode) or str(f) != self._file(key) or key in self._sizes:
                        continue  # not a file, or not where this tier puts that key's file (a stray copy)
                    self._sizes[key] = st.st_size
                    self._used += st.st_size

    def _file(self, key: bytes) -> str:
        h = key.hex()
        return os.path.join(self._root, h[:2], h + SUFFIX)

    @property
    def used_bytes(self) -> int:
        return self._used

    def prepare(self, chunk: Chunk, layout: KVLayout) -> Prepared:
        tensors = blob_tensors(chunk, self.codec)
        align = _PAGE if layout.chunk_bytes >= _ALIGN_FROM else 8
        known = carried_digests(chunk, self.codec)
        header = blob_header(chunk, layout, self.codec, tensors, known or [UNHASHED] * layout.num_layers, align=align)
        return Prepared(chunk.key, len(header) + sum(t.nbytes for t in tensors.values()), (header, tensors, known is None))

    def _write_blob(self, fd: int, header: bytes, tensors: dict[str, torch.Tensor], unhashed: bool) -> None:
        """The KV parts and the summary (which follow each other in the file) in one vectored write by this
        thread; last, in one write, the header and the tokens that follow it. A chunk that carried its checksums
        has them in ``header`` already; else (``unhashed``) the tier's hashing thread hashes the KV during the
        first write (``pwritev`` releases the GIL, so the two overlap where the cores do not share memory
        bandwidth; on our 2-vCPU VMs it is a wash against hashing first) and the digests go into the header. The
        writes stay on the calling thread, as a plain file write would.

        Nothing between the submit and the write may call torch: a torch call releases the GIL, the hashing
        thread takes it, and this thread then waits for the whole hash before it can start writing."""
        parts = kv_parts(tensors)
        views = part_views(parts)
        body = [byte_view(t) for name, t in tensors.items() if name != "tokens"]  # kv.* then summary
        hashed = self._hasher.submit(layer_digests, views, range(len(parts[next(iter(parts))]))) if unhashed else None
        try:
            _pwrite_all(fd, body, len(header) + tensors["tokens"].nbytes)
        finally:
            if hashed is not None:  # waited for also when writing failed: the hasher must be done with the views
                header = with_layer_digests(header, hashed.result())
        _pwrite_all(fd, [memoryview(header + byte_view(tensors["tokens"]))], 0)

    def commit(self, prepared: Prepared) -> None:
        if self._closed:
            raise TierError(f"disk tier {self.name!r} is closed: it writes nothing more")
        final = self._file(prepared.key)
        with self._tmp_lock:
            self._tmp_seq += 1
            tmp = self._tmp / f"{os.path.basename(final)}.{os.getpid()}.{self._tmp_seq}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                self._write_blob(fd, *prepared.payload)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.replace(tmp, final)
            except FileNotFoundError:  # its folder was removed behind our back
                os.makedirs(os.path.dirname(final), exist_ok=True)
                os.replace(tmp, final)
        except OSError as exc:  # e.g. the disk is full: leave nothing behind, keep the accounting
            tmp.unlink(missing_ok=True)
            raise TierError(f"disk tier {self.name!r} could not write {final}: {exc}") from exc
        self._forget_head(prepared.key)
        old = self._sizes.get(prepared.key, 0)
        self._sizes[prepared.key] = prepared.nbytes
        self._used += prepared.nbytes - old
        self.stats.bytes_written += prepared.nbytes

    @staticmethod
    def _read_first(fd: int) -> memoryview:
        """The file's first bytes (up to ``_FIRST_READ``): the header and, usually, the tokens."""
        first = memoryview(bytearray(_FIRST_READ))
        return first[: os.preadv(fd, [first], 0)]

    @staticmethod
    def _check_size(fd: int, header: BlobHeader) -> None:
        size = os.fstat(fd).st_size
        if size != header.total_bytes:
            raise BlobError(f"file is {size} bytes, its header says {header.total_bytes}")

    def _read_header(self, fd: int, first: memoryview | None = None) -> tuple[BlobHeader, memoryview]:
        """The parsed header of the open file and the bytes read from its start (at least the header, usually
        also the tokens); ``first``: those bytes, when already read."""
        first = self._read_first(fd) if first is None else first
        need = header_length(first)
        header_end = need
        if need > len(first):
            more = memoryview(bytearray(need))
            _pread_into(fd, more, 0)
            first = more
        header = parse_header(first[:header_end])
        self._check_size(fd, header)
        return header, first

    def _read_tensor(self, fd: int, header: BlobHeader, first: memoryview, name: str) -> torch.Tensor:
        dtype, shape, lo, hi = header.tensors[name]
        out = torch.empty(shape, dtype=dtype)
        start = header.data_start + lo
        if start + (hi - lo) <= len(first):
            out.view(-1).view(torch.uint8).copy_(torch.frombuffer(first[start : start + hi - lo], dtype=torch.uint8))
        elif hi > lo:
            _pread_into(fd, memoryview(out.view(-1).view(torch.uint8).numpy()), start)
        return out

    def _read_head(self, fd: int, key: bytes) -> tuple[BlobHeader, np.ndarray]:
        """The header and the verified tokens (read-only: they may be shared) of ``key``'s open file; from the
        header cache when the file starts with the very bytes they were parsed from. BlobError when either is
        wrong."""
        first = self._read_first(fd)
        with self._heads_lock:
            cached = self._heads.get(key)
        if cached is not None and first[: len(cached[0])].tobytes() == cached[0]:  # memcmp, unlike memoryview ==
            header, tokens = cached[1], cached[2]
            self._check_size(fd, header)
            with self._heads_lock:
                if key in self._heads:
                    self._heads.move_to_end(key)
            return header, tokens
        header, first = self._read_header(fd, first)
        if header.key != key:
            raise BlobError(f"file holds key {header.key.hex()}, not {key.hex()}")
        tensor = self._read_tensor(fd, header, first, "tokens")
        if checksum(tensor) != header.tokens_xxh3:
            raise BlobError("tokens checksum mismatch")
        tokens = tensor.numpy()
        tokens.flags.writeable = False
        verified = header.data_start + header.tensors["tokens"][3]  # the header and the tokens
        if self._heads_max and verified <= len(first):
            with self._heads_lock:
                self._heads[key] = (bytes(first[:verified]), header, tokens)
                self._heads.move_to_end(key)
                while len(self._heads) > self._heads_max:
                    self._heads.popitem(last=False)
        return header, tokens

    def _forget_head(self, key: bytes) -> None:
        with self._heads_lock:
            self._heads.pop(key, None)

    def _corrupt(self, key: bytes, why: str) -> None:
        log.warning("disk tier %s: chunk %s is unreadable (%s); deleted", self.name, key.hex(), why)
        self.stats.corrupt += 1
        self.delete(key)

    def _unreadable(self, key: bytes, exc: Exception) -> None:
        """A read of ``key`` failed with ``exc``: a bad or missing file is deleted (corrupt); an I/O error (out of
        file descriptors, a failing device, a permission) leaves the file for a later read."""
        if _transient(exc):
            log.warning("disk tier %s: chunk %s cannot be read now (%s); kept", self.name, key.hex(), exc)
            self.stats.errors += 1
        else:
            self._corrupt(key, str(exc))

    def get(self, key: bytes, out: torch.Tensor, layers: range | None = None) -> Chunk | None:
        if key not in self._sizes:
            self.stats.misses += 1
            return None
        try:
            fd = os.open(self._file(key), os.O_RDONLY)
        except OSError as exc:  # gone, or unreadable for now
            self._unreadable(key, exc)
            self.stats.misses += 1
            return None
        try:
            header, tokens = self._read_head(fd, key)
            layers = layers if layers is not None else range(header.layout.num_layers)
            parts = self._read_kv(fd, header, out, layers)
            header.codec.decode(parts, out)
        except (BlobError, ValueError, OSError) as exc:
            self._unreadable(key, exc)
            self.stats.misses += 1
            return None
        finally:
            os.close(fd)
        self.stats.hits += 1
        self.stats.bytes_read += self._sizes.get(key, 0)
        return Chunk(header.key, header.parent, tokens, out, layer_xxh3=raw_digests(header, layers))

    def _read_kv(self, fd: int, header: BlobHeader, out: torch.Tensor, layers: range) -> dict[str, torch.Tensor]:
        """Read the codec parts of ``layers`` and verify their checksums as they arrive, a few layers at a time
        so the bytes are hashed while still in cache. The raw codec's part is read straight into ``out``."""
        direct = self.codec.name == "raw" and header.codec.name == "raw" and out.device.type == "cpu" and out.is_contiguous()
        parts = {}
        spans = []
        for name in sorted(n for n in header.tensors if n.startswith("kv.")):
            dtype, shape, lo, hi = header.tensors[name]
            want = (len(layers),) + shape[1:]
            target = out if direct else torch.empty(want, dtype=dtype)
            if tuple(target.shape) != want or target.dtype != dtype:
                raise BlobError(f"stored part {name} {shape} {dtype} does not fit the buffer {tuple(out.shape)}")
            parts[name[3:]] = target
            spans.append(header.data_start + lo + layers.start * ((hi - lo) // shape[0]))
        views = part_views(parts)
        digests = []
        for group in _layer_groups(views, len(layers)):
            for (view, step), start in zip(views, spans):
                _pread_into(fd, view[group.start * step : group.stop * step], start + group.start * step)
            digests += layer_digests(views, group)
        if digests != header.layer_xxh3[layers.start : layers.stop]:
            raise BlobError("KV checksum mismatch")
        return parts

    def summary(self, key: bytes) -> torch.Tensor | None:
        if key not in self._sizes:
            return None
        try:
            fd = os.open(self._file(key), os.O_RDONLY)
        except OSError as exc:
            self._unreadable(key, exc)
            return None
        try:
            header, first = self._read_header(fd)
            if header.key != key:
                raise BlobError(f"file holds chunk {header.key.hex()}")
            if "summary" not in header.tensors:
                return None
            summary = self._read_tensor(fd, header, first, "summary")
            if checksum(summary) != header.summary_xxh3:
                raise BlobError("summary checksum mismatch")
            return summary
        except (BlobError, OSError) as exc:
            self._unreadable(key, exc)
            return None
        finally:
            os.close(fd)

    def scan(self) -> Iterator[tuple[Chunk, KVLayout]]:
        """Header, parent and tokens of every file; bad or vanished ones are deleted and counted. A file that
        cannot be read now (permissions, out of file descriptors, a failing device) raises TierError: the folder
        is left as it is for a later start."""
        for key in list(self._sizes):
            try:
                fd = os.open(self._file(key), os.O_RDONLY)
                try:
                    header, tokens = self._read_head(fd, key)
                finally:
                    os.close(fd)
            except (BlobError, OSError) as exc:
                if _transient(exc):
                    raise TierError(f"disk tier {self.name!r} cannot read {self._file(key)}: {exc}; nothing was "
                                    "deleted") from None
                self._corrupt(key, str(exc))
                continue
            yield Chunk(key, header.parent, tokens, namespace=header.namespace), header.layout

    def contains(self, key: bytes) -> bool:
        return key in self._sizes

    def close(self) -> None:
        """Stop the hashing thread (after any hash in flight) and let another process open the folder; later
        commits raise TierError."""
        self._closed = True
        self._hasher.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the folder's lock
            self._lock_fd = None

    def delete(self, key: bytes) -> int:
        self._forget_head(key)
        nbytes = self._sizes.pop(key, None)
        if nbytes is None:
            return 0
        self._used -= nbytes
        try:
            os.unlink(self._file(key))
        except FileNotFoundError:
            pass
        except OSError as exc:  # e.g. a directory in its place: forgotten all the same
            log.warning("disk tier %s: could not remove %s: %s", self.name, self._file(key), exc)
        return nbytes

    def __len__(self) -> int:
        return len(self._sizes)


def _transient(exc: Exception) -> bool:
    """Whether a failed read says nothing about the file itself (an I/O error, out of file descriptors, a
    permission), rather than that it is bad or missing."""
    return isinstance(exc, OSError) and exc.errno != errno.ENOENT
