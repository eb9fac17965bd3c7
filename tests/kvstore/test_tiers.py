import errno
import os
from pathlib import Path
import numpy as np
import pytest
import torch

from kvtier.compression import get_codec
from kvtier.errors import TierError
from kvtier.kvstore import TieredStore
from kvtier.kvstore.chunk import Chunk, blob_bytes, decode_blob, key_summary, layer_checksums
from kvtier.kvstore.keys import chunk_keys, root_key
from kvtier.kvstore.tiers import DiskTier, HostTier, MetaTier
from kvtier.kvstore.tiers.memory import ExtentAllocator
from kvtier.layout import KVLayout

from .helpers import TINY, footprint, make_kv


def chunks(n, seed=0, layout=TINY):
    kv = make_kv(layout, n * layout.chunk_tokens, seed)
    tokens = np.arange(n * layout.chunk_tokens, dtype=np.int32) + 1000 * seed
    root = root_key(layout.fingerprint)
    keys = chunk_keys(root, tokens, layout.chunk_tokens)
    C = layout.chunk_tokens
    out = []
    for i, k in enumerate(keys):
        part = kv[:, :, :, i * C : (i + 1) * C].contiguous()
        out.append(Chunk(k, keys[i - 1] if i else root, tokens[i * C : (i + 1) * C], part, key_summary(part, layout.page_tokens)))
    return out


@pytest.fixture(params=["host", "disk"])
def tier(request, tmp_path):
    if request.param == "host":
        return HostTier(64 * 1024, prefault=False)
    return DiskTier(tmp_path / "disk", 64 * 1024)


def test_tier_semantics(tier):
    cs = chunks(3)
    assert not tier.contains(cs[0].key) and tier.used_bytes == 0
    sizes = []
    for c in cs:
        p = tier.prepare(c, TINY)
        assert tier.can_fit(p.nbytes)
        tier.commit(p)
        sizes.append(p.nbytes)
    assert len(tier) == 3 and tier.used_bytes == sum(sizes)
    out = torch.empty(TINY.chunk_shape, dtype=TINY.torch_dtype)
    for c in cs:
        got = tier.get(c.key, out)
        assert got.key == c.key and got.parent == c.parent and np.array_equal(got.tokens, c.tokens)
        assert torch.equal(out, c.kv)
        assert torch.equal(tier.summary(c.key), c.summary)
    one = torch.empty((1,) + TINY.chunk_shape[1:], dtype=TINY.torch_dtype)
    assert tier.get(cs[1].key, one, range(1, 2)) is not None and torch.equal(one, cs[1].kv[1:2])
    assert tier.delete(cs[1].key) == sizes[1]
    assert tier.delete(cs[1].key) == 0
    assert not tier.contains(cs[1].key) and tier.get(cs[1].key, out) is None
    assert tier.used_bytes == sizes[0] + sizes[2]
    assert tier.stats.misses == 1


def test_meta_tier_accounts_without_data():
    t = MetaTier("m", 10 * TINY.chunk_bytes)
    p = t.prepare(Chunk(b"k" * 16, b"r" * 16, None), TINY)
    assert p.nbytes == TINY.chunk_bytes + 4 * TINY.chunk_tokens
    t.commit(p)
    assert t.used_bytes == p.nbytes and t.contains(b"k" * 16)
    with pytest.raises(RuntimeError, match="metadata-only"):
        t.get(b"k" * 16, torch.empty(1))


def test_extent_allocator_coalesces():
    a = ExtentAllocator(256 * 10)
    offs = [a.alloc(256) for _ in range(10)]
    assert offs == [256 * i for i in range(10)] and a.alloc(256) is None
    for i in (1, 3, 2):
        a.free(offs[i], 256)
    assert a.alloc(768) == 256  # three freed neighbours merged into one extent
    a.free(256, 768)
    for i in (0, 4, 5, 6, 7, 8, 9):
        a.free(offs[i], 256)
    assert a.alloc(2560) == 0


@pytest.mark.parametrize("read_first", [False, True], ids=["unread", "read-before"])  # read: its header is cached
@pytest.mark.parametrize("damage", ["flip", "header", "tokens", "truncate", "empty", "swap"])
def test_disk_corruption_is_a_counted_miss(tmp_path, damage, read_first):
    tier = DiskTier(tmp_path, 1 << 20)
    cs = chunks(2)
    out = torch.empty(TINY.chunk_shape, dtype=TINY.torch_dtype)
    for c in cs:
        tier.commit(tier.prepare(c, TINY))
        if read_first:
            assert tier.get(c.key, out) is not None and torch.equal(out, c.kv)
    path = Path(tier._file(cs[0].key))
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    if damage == "flip":
        data[len(data) // 2] ^= 0x40
    elif damage == "header":
        i = data.index(b'"layer_xxh3":"') + 14  # a hex digit of layer 0's checksum
        data[i] = ord("0") if data[i] != ord("0") else ord("1")
    elif damage == "tokens":
        data[header_end + 1] ^= 0x01
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(Path(tier._file(cs[1].key)).read_bytes())  # another chunk's file under this key
    path.write_bytes(bytes(data))
    assert tier.get(cs[0].key, out) is None
    assert tier.stats.corrupt == 1 and not tier.contains(cs[0].key) and not path.exists()
    assert tier.get(cs[1].key, out) is not None and torch.equal(out, cs[1].kv)


def test_disk_header_cache_is_bounded_and_its_tokens_read_only(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, header_cache=2)
    cs = chunks(4)
    out = torch.empty(TINY.chunk_shape, dtype=TINY.torch_dtype)
    for c in cs:
        tier.commit(tier.prepare(c, TINY))
    for _ in range(2):
        for c in cs:
            got = tier.get(c.key, out)
            assert torch.equal(out, c.kv) and np.array_equal(got.tokens, c.tokens)
            assert len(tier._heads) <= 2
    with pytest.raises(ValueError, match="read-only"):
        got.tokens[0] = 7
    tier.commit(tier.prepare(cs[2], TINY))  # rewritten: its cached header is dropped
    assert cs[2].key not in tier._heads and tier.get(cs[2].key, out) is not None and torch.equal(out, cs[2].kv)
    tier.delete(cs[3].key)
    assert cs[3].key not in tier._heads


def test_disk_restart_lists_files_and_cleans_temporaries(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20)
    cs = chunks(3)
    for c in cs:
        tier.commit(tier.prepare(c, TINY))
    half = tmp_path / "tmp" / f"{cs[0].key.hex()}.kvt.123.1"  # named as the tier names a file it writes
    half.write_bytes(b"x" * 100)
    again = DiskTier(tmp_path, 1 << 20)
    assert len(again) == 3 and again.used_bytes == tier.used_bytes
    assert not half.exists()
    found = {c.key: c for c, layout in again.scan()}
    assert set(found) == {c.key for c in cs}
    assert all(found[c.key].parent == c.parent and np.array_equal(found[c.key].tokens, c.tokens) for c in cs)


def test_disk_restart_counts_each_chunk_file_once(tmp_path):
    """A stray copy of a chunk's file under another name (upper case) and a directory named like a chunk file
    are not counted, and a get of the latter's key is a miss, not a crash."""
    tier = DiskTier(tmp_path, 1 << 20)
    c = chunks(1)[0]
    tier.commit(tier.prepare(c, TINY))
    path = Path(tier._file(c.key))
    (path.parent / path.name.upper().replace(".KVT", ".kvt")).write_bytes(path.read_bytes())
    fake = chunks(2)[1].key.hex()
    (tmp_path / fake[:2] / f"{fake}.kvt").mkdir()
    again = DiskTier(tmp_path, 1 << 20)
    assert len(again) == 1 and again.used_bytes == tier.used_bytes
    out = torch.empty(TINY.chunk_shape, dtype=TINY.torch_dtype)
    assert again.get(chunks(2)[1].key, out) is None and again.get(c.key, out) is not None
    again.delete(c.key)
    assert len(again) == 0 and again.used_bytes == 0


def test_disk_summary_of_a_file_holding_another_chunk_is_a_corrupt_copy(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20)
    a, b = chunks(2)
    for c in (a, b):
        c.summary = key_summary(c.kv, TINY.page_tokens)
        tier.commit(tier.prepare(c, TINY))
    Path(tier._file(a.key)).write_bytes(Path(tier._file(b.key)).read_bytes())
    assert tier.summary(a.key) is None and not tier.contains(a.key) and tier.stats.corrupt == 1
    assert torch.equal(tier.summary(b.key), b.summary)


@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.EMFILE, "Too many open files")], ids=["denied", "no descriptors"])
def test_disk_file_that_cannot_be_opened_now_is_kept(tmp_path, monkeypatch, error):
    """Permission denied (which root, running the tests, never meets) and running out of file descriptors are
    injected: a get is a miss and the file stays for a later read; at start-up the tier refuses to open rather
    than delete it. A file that is gone is a corrupt copy: dropped."""
    import kvtier.kvstore.tiers.disk as disk

    tier = DiskTier(tmp_path, 1 << 20)
    a, b = chunks(2)
    for c in (a, b):
        tier.commit(tier.prepare(c, TINY))
    failing = {tier._file(a.key)}
    real_open = disk.os.open

    def fake_open(path, *args, **kwargs):
        if path in failing:
            raise error
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(disk.os, "open", fake_open)
    out = torch.empty(TINY.chunk_shape, dtype=TINY.torch_dtype)
    assert tier.get(a.key, out) is None and tier.summary(a.key) is None
    assert tier.contains(a.key) and tier.stats.corrupt == 0 and tier.stats.errors == 2
    with pytest.raises(TierError, match="nothing was deleted"):
        list(DiskTier(tmp_path, 1 << 20).scan())
    failing.clear()
    assert torch.equal(tier.get(a.key, out).kv, a.kv)
    os.unlink(tier._file(b.key))
    assert tier.get(b.key, out) is None and not tier.contains(b.key) and tier.stats.corrupt == 1


@pytest.mark.parametrize("codec", ["raw", "int4", "zstd"])
def test_disk_file_is_the_encoded_blob_with_page_aligned_kv(tmp_path, codec):
    """The disk tier writes the KV first and the header last: the file must be byte for byte the blob that
    encode_blob makes (digests included), with the first KV part on a page boundary."""
    from kvtier.compression import get_codec
    from kvtier.kvstore.chunk import decode_blob, encode_blob, parse_header

    layout = KVLayout("m", num_layers=5, kv_heads=2, head_dim=64, chunk_tokens=256, page_tokens=16)  # 640 KiB
    tier = DiskTier(tmp_path, 1 << 22, codec=codec)
    (c,) = chunks(1, layout=layout)
    tier.commit(tier.prepare(c, layout))
    data = Path(tier._file(c.key)).read_bytes()
    header, buffers = encode_blob(c, layout, get_codec(codec), align=4096)
    assert data == b"".join([header, *buffers])
    parsed = parse_header(data)
    first_kv = min(lo for name, (_, _, lo, _) in parsed.tensors.items() if name.startswith("kv."))
    assert (parsed.data_start + first_kv) % 4096 == 0
    _, back = decode_blob(data)
    out = torch.empty(layout.chunk_shape, dtype=layout.torch_dtype)
    assert tier.get(c.key, out) is not None and torch.equal(out, back.kv)


def test_disk_short_writes_and_reads_are_continued(tmp_path, monkeypatch):
    """pwritev/preadv may move fewer bytes than asked (signals, some file systems): the tier continues each
    call where the last one stopped, also inside one of several buffers. (A mock: short transfers cannot be
    caused on demand on a local file system.)"""
    import os

    import kvtier.kvstore.tiers.disk as disk

    def short(op):
        def call(fd, bufs, offset):
            budget, cut = 1000, []
            for b in bufs:  # at most 1000 bytes in all, cutting through a buffer
                cut.append(b[:budget])
                budget -= len(cut[-1])
                if budget == 0:
                    break
            return op(fd, cut, offset)
        return call

    monkeypatch.setattr(disk.os, "pwritev", short(os.pwritev))
    monkeypatch.setattr(disk.os, "preadv", short(os.preadv))
    tier = DiskTier(tmp_path, 1 << 20)
    cs = chunks(2)
    for c in cs:
        tier.commit(tier.prepare(c, TINY))
    monkeypatch.undo()
    out = torch.empty(TINY.chunk_shape, dtype=TINY.torch_dtype)
    for c in cs:
        assert tier.get(c.key, out) is not None and torch.equal(out, c.kv)
        assert torch.equal(tier.summary(c.key), c.summary)
    monkeypatch.setattr(disk.os, "preadv", short(os.preadv))
    for c in cs:
        assert tier.get(c.key, out) is not None and torch.equal(out, c.kv)


def test_opening_a_disk_tier_removes_only_its_own_half_written_files(tmp_path):
    """A crash may leave files being written in tmp/; opening the tier removes those and nothing else there."""
    (tmp_path / "tmp" / "project").mkdir(parents=True)
    (tmp_path / "tmp" / "project" / "notes.txt").write_text("someone's")
    (tmp_path / "tmp" / "0a1b2c.kvt.4242.7").write_bytes(b"half a chunk")
    DiskTier(tmp_path, 1 << 20)
    assert sorted(p.name for p in (tmp_path / "tmp").iterdir()) == ["project"]
    assert (tmp_path / "tmp" / "project" / "notes.txt").read_text() == "someone's"


def test_a_disk_folder_is_opened_by_one_process_at_a_time(tmp_path):
    """Two stores (processes) on one folder would delete each other's files and fill twice its capacity: the
    second is refused while the first holds the folder, and may open it once the first has closed."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kvtier.kvstore.tiers import DiskTier; "
                               f"t = DiskTier({str(tmp_path)!r}, 1 << 20); print('open', flush=True); "
                               "sys.stdin.readline(); t.close(); print('closed', flush=True); sys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(TierError, match="in use by another process"):
            DiskTier(tmp_path, 1 << 20)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "closed"
        tier = DiskTier(tmp_path, 1 << 20)
        a = chunks(1)[0]
        tier.commit(tier.prepare(a, TINY))
        assert len(tier) == 1
        tier.close()
    finally:
        holder.kill()
        holder.wait()


def carrying(cs, layout=TINY):
    """``cs`` as read back from their raw blobs: each carries its verified layer checksums."""
    return [decode_blob(blob_bytes(c, layout, get_codec("raw")))[1] for c in cs]


def test_tiers_hand_on_the_checksums_a_chunk_came_with(tier):
    came, plain = carrying(chunks(1)), chunks(1, seed=1)
    for c in came + plain:
        tier.commit(tier.prepare(c, TINY))
    out = torch.empty(TINY.chunk_shape, dtype=TINY.torch_dtype)
    assert tier.get(came[0].key, out).layer_xxh3 == came[0].layer_xxh3 is not None
    one = torch.empty((1,) + TINY.chunk_shape[1:], dtype=TINY.torch_dtype)
    assert tier.get(came[0].key, one, range(1, 2)).layer_xxh3 == came[0].layer_xxh3[1:]
    # a chunk put without: the disk tier hashed its blob (and verified the read), a memory tier knows none
    expected = tuple(layer_checksums({"kv": plain[0].kv})) if isinstance(tier, DiskTier) else None
    assert tier.get(plain[0].key, out).layer_xxh3 == expected


def test_memory_that_changed_is_not_written_to_disk_as_good(tmp_path):
    """A chunk's bytes changed in host memory after they were verified (a fault: flipped here by hand) are
    demoted with the checksums they came with, so the disk read finds them bad: a miss, not wrong KV."""
    host = HostTier(footprint(TINY), prefault=False)
    store = TieredStore([host, DiskTier(tmp_path / "disk", 1 << 20)], layout=TINY)
    first, second = carrying(chunks(1)), chunks(1, seed=1)
    assert store.put_chunks(first, first[0].parent).stored == 1
    offset = host._entries[first[0].key].offset
    host.pool[offset + 3] ^= 0x40
    assert store.put_chunks(second, second[0].parent).stored == 1  # demotes the first
    assert not host.contains(first[0].key) and store.tiers[1].contains(first[0].key)
    got = store.get(first[0].tokens)
    assert got.tokens == 0
    assert store.tiers[1].stats.corrupt == 1 and not store.tiers[1].contains(first[0].key)
    assert store.get(second[0].tokens).tokens == TINY.chunk_tokens
