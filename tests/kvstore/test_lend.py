"""Receiving in place: bytes lent by the first tier, chunks taken over without a copy, summaries on demand."""

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from kvtier.compression.codec import get_codec
from kvtier.errors import LayoutError, ParentMissingError
from kvtier.kvstore import DiskTier, HostTier, TieredStore
from kvtier.kvstore.chunk import Chunk, blob_bytes, decode_blob, key_summary
from kvtier.kvstore.keys import chunk_keys, root_key

from .helpers import TINY, footprint, kv_for_tokens, lend_size

C = TINY.chunk_tokens
NS = "tenant"
ROOT = root_key(TINY.fingerprint, NS)


def prompt(seed: int, n_chunks: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, n_chunks * C).astype(np.int32)


def blobs(tokens: np.ndarray) -> list[bytes]:
    """The raw blobs of ``tokens``' chunks, chained from the tenant's root."""
    keys = chunk_keys(ROOT, tokens, C)
    kv = kv_for_tokens(TINY, tokens)
    return [blob_bytes(Chunk(k, keys[i - 1] if i else ROOT, tokens[i * C : (i + 1) * C], kv[:, :, :, i * C : (i + 1) * C]),
                       TINY, get_codec("raw")) for i, k in enumerate(keys)]


def receive(store: TieredStore, blob: bytes, wait: bool = False) -> tuple[Chunk, torch.Tensor | None]:
    """``blob`` received into lent bytes when the store lends them (else into its own buffer), decoded in place."""
    lent = store.lend(len(blob), TINY, wait=wait)
    buffer = lent if lent is not None else torch.empty(len(blob), dtype=torch.uint8)
    memoryview(buffer.numpy())[:] = blob
    return decode_blob(memoryview(buffer.numpy()), in_place=True)[1], lent


@contextmanager
def lock_held(store: TieredStore) -> Iterator[None]:
    """Another thread holds the store's lock for the block."""
    held, release = threading.Event(), threading.Event()

    def hold():
        with store._lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait(10)
    try:
        yield
    finally:
        release.set()
        holder.join()


def test_a_lent_chunk_is_taken_over_without_a_copy():
    tier = HostTier(1 << 20, prefault=False)
    store = TieredStore([tier], layout=TINY)
    tokens = prompt(0, 2)
    received = [receive(store, b) for b in blobs(tokens)]
    chunks, lent = [c for c, _ in received], [b for _, b in received]
    assert all(b is not None for b in lent) and tier.used_bytes == sum(tier.lend_nbytes(b.numel(), TINY) for b in lent)
    result = store.put_chunks(chunks, ROOT, NS, TINY, wait=False, lent=lent)
    assert (result.stored, result.present) == (2, 0)
    for c, b in zip(chunks, lent):  # the entry's KV is where the blob landed
        entry = tier._entries[c.key]
        assert tier.pool.data_ptr() + entry.offset == b.data_ptr()
        assert tier.pool.data_ptr() + entry.offset + entry.parts["kv"][2] == c.kv.data_ptr()
    assert tier.used_bytes == sum(e.nbytes for e in tier._entries.values())
    got = store.get(tokens, namespace=NS)
    assert got.tokens == 2 * C and torch.equal(got.kv, kv_for_tokens(TINY, tokens))


def one_received(seed: int) -> tuple[TieredStore, HostTier, np.ndarray, torch.Tensor]:
    """A host-only store holding one chunk received into lent bytes: the store, its tier, the tokens, the bytes."""
    tier = HostTier(1 << 20, prefault=False)
    store = TieredStore([tier], layout=TINY)
    tokens = prompt(seed, 1)
    chunk, lent = receive(store, blobs(tokens)[0])
    store.put_chunks([chunk], ROOT, NS, TINY, lent=[lent])
    return store, tier, tokens, lent


def test_what_no_put_takes_is_given_back():
    store, tier, tokens, lent = one_received(1)
    used = tier.used_bytes
    again, lent2 = receive(store, blobs(tokens)[0])  # the same chunk: present, so its bytes go back
    assert tier.used_bytes > used
    assert store.put_chunks([again], ROOT, NS, TINY, wait=False, lent=[lent2]).present == 1
    assert tier.used_bytes == used
    assert store.lend(TINY.chunk_bytes - 1, TINY) is None and store.lend(100 << 20, TINY) is None  # no raw blob
    refused = store.lend(len(blobs(tokens)[0]), TINY)
    store.take_back([refused])  # a refused put gives its bytes back itself
    assert tier.used_bytes == used
    store.take_back([lent])  # taken over long ago: a stale hand-back frees nothing
    assert tier.used_bytes == used and len(tier) == 1


def test_a_stale_hand_back_never_frees_a_later_lend():
    store, tier, tokens, lent = one_received(2)
    store.delete(tokens.tolist(), NS)  # its extent is free again...
    again = store.lend(lent.numel(), TINY)  # ...and lent to someone else, at the same address
    assert again.data_ptr() == lent.data_ptr()
    store.take_back([lent])
    assert tier.used_bytes == tier.lend_nbytes(lent.numel(), TINY)
    store.take_back([again])
    assert tier.used_bytes == 0


def test_lending_never_evicts_and_a_put_keeps_headroom():
    one = len(blobs(prompt(0, 1))[0])
    room = lend_size(TINY, one)
    tier = HostTier(3 * room, prefault=False)
    store = TieredStore([tier], layout=TINY)
    for seed in range(3):  # fill it: the third put leaves no room to lend
        chunk, lent = receive(store, blobs(prompt(seed, 1))[0])
        assert lent is not None
        store.put_chunks([chunk], ROOT, NS, TINY, wait=False, lent=[lent])
    assert len(tier) == 3 and store.lend(one, TINY) is None  # full: a lend is refused, nothing evicted
    assert len(tier) == 3
    chunk, lent = receive(store, blobs(prompt(3, 1))[0])  # received into a buffer of its own
    assert lent is None
    assert store.put_chunks([chunk], ROOT, NS, TINY, wait=False) is None  # not in lent bytes: not on the loop
    assert store.put_chunks([chunk], ROOT, NS, TINY, headroom=one).stored == 1  # copies, evicts, keeps room
    assert len(tier) == 2 and store.lend(one, TINY) is not None


def test_a_put_that_might_block_is_not_done_without_waiting(tmp_path):
    tier = HostTier(1 << 20, prefault=False)
    store = TieredStore([tier], layout=TINY)
    chunk, lent = receive(store, blobs(prompt(4, 1))[0])
    with lock_held(store):
        assert store.lend(len(blobs(prompt(4, 1))[0]), TINY, wait=False) is None
        assert store.put_chunks([chunk], ROOT, NS, TINY, wait=False, lent=[lent]) is None
    assert len(tier) == 0
    assert store.put_chunks([chunk], ROOT, NS, TINY, wait=False, lent=[lent]).stored == 1
    through = TieredStore([HostTier(1 << 20, prefault=False), DiskTier(tmp_path, 1 << 20)], layout=TINY,
                          write_through=[False, True])
    chunk, lent = receive(through, blobs(prompt(5, 1))[0])
    assert through.put_chunks([chunk], ROOT, NS, TINY, wait=False, lent=[lent]) is None  # a disk write is I/O
    assert through.put_chunks([chunk], ROOT, NS, TINY, lent=[lent]).stored == 1
    assert through.lookup(prompt(5, 1).tolist(), NS).chunks[0].tiers == ["host", "disk"]


def test_a_get_into_one_tensor_per_chunk_fills_each():
    store = TieredStore([HostTier(4 * footprint(TINY), prefault=False)], layout=TINY)
    tokens = prompt(6, 3)
    kv = kv_for_tokens(TINY, tokens)
    store.put(tokens, kv, NS)
    outs = [torch.zeros(TINY.chunk_shape, dtype=TINY.torch_dtype) for _ in range(4)]  # one more than cached
    got = store.get_keys(chunk_keys(ROOT, tokens, C) + [bytes(16)], ROOT, outs, layout=TINY)
    assert got.tokens == 3 * C and got.kv is outs and got.tiers == ["host"] * 3
    for i in range(3):
        assert torch.equal(outs[i], kv[:, :, :, i * C : (i + 1) * C])
    assert not outs[3].any()
    with pytest.raises(LayoutError):
        store.get_keys(chunk_keys(ROOT, tokens, C), ROOT, [torch.zeros(1)] * 3, layout=TINY)
    with pytest.raises(LayoutError, match="one per key"):  # fewer tensors than keys: refused before any read
        store.get_keys(chunk_keys(ROOT, tokens, C), ROOT, outs[:2], layout=TINY)


def test_borrowed_chunks_are_views_of_the_tier_pinned_until_released(tmp_path):
    """``borrow_keys`` hands out the chunks' KV where the first tier holds it (no copy), verified and counted as a
    get, and pins them: nothing evicts or deletes them until ``release``. It never waits: None, with nothing
    pinned, when the lock is taken or a chunk is not in the first tier's host memory."""
    tier = HostTier(3 * footprint(TINY), prefault=False)
    store = TieredStore([tier, DiskTier(tmp_path, 1 << 20)], layout=TINY, write_through=[False, True])
    tokens = prompt(6, 3)
    kv = kv_for_tokens(TINY, tokens)
    store.put(tokens, kv, NS)
    keys = chunk_keys(ROOT, tokens, C)
    gets = store.counters.gets
    borrowed = store.borrow_keys(keys + [bytes(16)], ROOT, range(1, 2), TINY)
    assert borrowed.tokens == 3 * C and borrowed.tiers == ["host"] * 3 and store.counters.gets == gets + 1
    for i, chunk in enumerate(borrowed.chunks):
        assert torch.equal(chunk.kv, kv[1:2, :, :, i * C : (i + 1) * C]) and chunk.key == keys[i]
        assert tier.pool.data_ptr() <= chunk.kv.data_ptr() < tier.pool.data_ptr() + tier.pool.numel()
    assert store.delete(tokens, NS) == 0  # pinned: not deleted
    store.put(prompt(7, 3), kv_for_tokens(TINY, prompt(7, 3)), NS)  # the host is full of pinned chunks
    assert [c.tiers for c in store.lookup(tokens, NS).chunks] == [["host", "disk"]] * 3
    with lock_held(store):
        assert store.borrow_keys(keys, ROOT, layout=TINY) is None
        assert borrowed.release(False) is False  # would wait for the lock: nothing done
    assert borrowed.release() is True
    assert store.delete(tokens, NS) == 1  # the prompt's last chunk (and what hangs below it)
    store.put(tokens, kv, NS)
    store.tiers[0].delete(keys[1])  # chunk 1 only on disk now: reading it is I/O
    store._forget(store.index.get(keys[1]), 0)
    assert store.borrow_keys(keys, ROOT, layout=TINY) is None
    assert all(store.index.get(k).pins == 0 for k in keys)


@pytest.mark.parametrize("how", ["put", "received"])
@pytest.mark.parametrize("asked", [True, False])
def test_summaries_are_made_on_first_use_or_on_the_way_to_disk(tmp_path, how, asked):
    tokens = prompt(6, 3)
    lend = lend_size(TINY, len(blobs(tokens)[0]))
    host, disk = HostTier(max(3 * lend, 4 * footprint(TINY)), prefault=False), DiskTier(tmp_path, 1 << 20)
    assert host.capacity_bytes < 7 * footprint(TINY)
    store = TieredStore([host, disk], layout=TINY)
    if how == "put":
        store.put(tokens.tolist(), kv_for_tokens(TINY, tokens), NS)
    else:
        received = [receive(store, b) for b in blobs(tokens)]
        assert all(b is not None for _, b in received)
        store.put_chunks([c for c, _ in received], ROOT, NS, TINY, lent=[b for _, b in received])
    keys = store.keys(tokens.tolist(), NS)
    assert all(host.contains(k) and host.summary(k) is None for k in keys)  # none made at put time
    kv = kv_for_tokens(TINY, tokens)
    want = [key_summary(kv[:, :, :, i * C : (i + 1) * C], TINY.page_tokens) for i in range(3)]
    if asked:
        got = store.summaries(tokens.tolist(), NS)
        assert len(got) == 3 and all(torch.equal(g, w) for g, w in zip(got, want))
        assert torch.equal(host.summary(keys[0]), want[0])  # kept in its slot
    store.put(prompt(7, 4).tolist(), kv_for_tokens(TINY, prompt(7, 4)), NS)  # demotes all three to disk
    assert not any(host.contains(k) for k in keys)
    assert all(torch.equal(disk.summary(k), w) for k, w in zip(keys, want))
    assert all(torch.equal(g, w) for g, w in zip(store.summaries(tokens.tolist(), NS), want))


def test_a_store_without_summaries_keeps_no_slot():
    def used(summaries: bool) -> int:
        tier = HostTier(1 << 20, prefault=False)
        TieredStore([tier], layout=TINY, summaries=summaries).put(prompt(8, 1).tolist(), kv_for_tokens(TINY, prompt(8, 1)))
        return tier.used_bytes

    slot = -(-int(np.prod(TINY.summary_shape)) * 2 // 256) * 256
    assert used(True) - used(False) == slot


def test_a_put_that_would_evict_for_a_quota_or_demote_waits(tmp_path):
    store, tier, tokens, lent = one_received(9)
    store.set_quota(NS, TINY.chunk_bytes)  # full: one more chunk means evicting the namespace's own
    chunk, lent = receive(store, blobs(prompt(10, 1))[0])
    assert store.put_chunks([chunk], ROOT, NS, TINY, wait=False, lent=[lent]) is None
    assert store.put_chunks([chunk], ROOT, NS, TINY, lent=[lent]).stored == 1 and len(tier) == 1  # the old one went
    one = len(blobs(prompt(0, 1))[0])
    host = HostTier(lend_size(TINY, one), prefault=False)
    demoting = TieredStore([host, DiskTier(tmp_path, 1 << 20)], layout=TINY)
    first, lent = receive(demoting, blobs(prompt(11, 1))[0])
    assert demoting.put_chunks([first], ROOT, NS, TINY, wait=False, lent=[lent], headroom=one).stored == 1
    assert demoting.lend(one, TINY) is None  # no room made: that needs a demotion, which is I/O
    demoting.put_chunks([], ROOT, NS, TINY, headroom=one)  # waiting: the first chunk goes to disk
    assert demoting.lookup(prompt(11, 1).tolist(), NS).chunks[0].tiers == ["disk"]
    assert demoting.lend(one, TINY) is not None


def test_a_refused_put_evicts_nothing_for_headroom():
    one = len(blobs(prompt(0, 1))[0])
    room = lend_size(TINY, one)
    tier = HostTier(2 * room, prefault=False)
    store = TieredStore([tier], layout=TINY)
    for seed in (12, 13):  # full: the headroom a put asks for needs an eviction
        chunk, lent = receive(store, blobs(prompt(seed, 1))[0])
        store.put_chunks([chunk], ROOT, NS, TINY, wait=False, lent=[lent])
    assert len(tier) == 2
    chunk, _ = receive(store, blobs(prompt(14, 1))[0])
    chunk.parent = bytes(16)  # a broken chain: refused
    with pytest.raises(ParentMissingError, match="neither the root nor cached"):
        store.put_chunks([chunk], ROOT, NS, TINY, headroom=one)
    assert len(tier) == 2


class _EvictFirst:
    """Stands in for the store's lock: the first time it is taken, ``evict`` runs first. This injects the race of
    an eviction between a put's unlocked look at the index and its locked insert."""

    def __init__(self, lock, evict) -> None:
        self.lock, self.evict = lock, evict

    def __enter__(self):
        evict, self.evict = self.evict, None
        if evict is not None:
            evict()
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def test_a_parent_evicted_during_the_put_is_reported_and_nothing_is_orphaned():
    tier = HostTier(1 << 20, prefault=False)
    store = TieredStore([tier], layout=TINY)
    tokens = prompt(15, 2)
    first, second = (receive(store, b) for b in blobs(tokens))
    store.put_chunks([first[0]], ROOT, NS, TINY, lent=[first[1]])
    store._lock = _EvictFirst(store._lock, lambda: store.delete(tokens[:C], namespace=NS))
    with pytest.raises(ParentMissingError, match="evicted"):
        store.put_chunks([second[0]], ROOT, NS, TINY, lent=[second[1]])
    assert len(tier) == 0 and len(store.index) == 0 and tier.used_bytes == 0


def test_a_continuation_is_linked_under_its_parent():
    """A put that starts below the root (the client sends only what the store lacks) hangs its chunks under the
    cached parent: a delete of the prefix takes them too, and the parent is never evicted before them."""
    tier = HostTier(1 << 20, prefault=False)
    store = TieredStore([tier], layout=TINY)
    tokens = prompt(16, 3)
    received = [receive(store, b) for b in blobs(tokens)]
    store.put_chunks([received[0][0]], ROOT, NS, TINY, lent=[received[0][1]])
    store.put_chunks([c for c, _ in received[1:]], ROOT, NS, TINY, lent=[b for _, b in received[1:]])
    nodes = [store.index.nodes[c.key] for c, _ in received]
    assert [n.parent for n in nodes] == [None, nodes[0], nodes[1]] and [n.depth for n in nodes] == [0, 1, 2]
    assert store.delete(tokens[:C], namespace=NS) == 3 and len(tier) == 0


def test_a_chain_under_another_namespaces_chunk_is_refused():
    """Keys are salted by the namespace's root: a chunk hung under another namespace's chunk is not this
    namespace's, whatever it claims."""
    tier = HostTier(1 << 20, prefault=False)
    store = TieredStore([tier], layout=TINY)
    tokens = prompt(17, 2)
    first, second = (receive(store, b) for b in blobs(tokens))
    store.put_chunks([first[0]], ROOT, NS, TINY, lent=[first[1]])
    other_root = root_key(TINY.fingerprint, "other")
    with pytest.raises(ParentMissingError, match="namespace"):
        store.put_chunks([second[0]], other_root, "other", TINY, lent=[second[1]])
    assert len(store.index) == 1 and store.stats()["namespaces"] == {NS: TINY.chunk_bytes}


def test_a_wrong_root_is_refused_and_a_chunk_stored_again_replaces_its_copy():
    tier = HostTier(1 << 20, prefault=False)
    store = TieredStore([tier], layout=TINY)
    tokens = prompt(18, 2)
    first, second = (receive(store, b) for b in blobs(tokens))
    with pytest.raises(ValueError, match="not the root of namespace"):
        store.put_chunks([second[0]], first[0].key, NS, TINY)  # the parent passed as the root
    store.put_chunks([first[0]], ROOT, NS, TINY, lent=[first[1]])
    store.take_back([second[1]])
    tier.commit(tier.prepare(first[0], TINY))  # the same chunk again: one copy, its old extent freed
    assert len(tier) == 1 and tier.used_bytes == sum(e.nbytes for e in tier._entries.values())
    assert torch.equal(store.get(tokens[:C], namespace=NS).kv, kv_for_tokens(TINY, tokens)[:, :, :, :C])


@pytest.mark.parametrize("summary_first", [True, False])
def test_chunks_sharing_one_lent_extent_each_keep_their_own_kv(summary_first):
    """KV of several chunks placed in one lent extent: one chunk may take the extent over, but what it copies in
    (its summary, its slot) must not land on the other chunks' KV, and KV strided over several chunks is copied."""
    tokens = prompt(20, 3)
    want = kv_for_tokens(TINY, tokens)
    n = TINY.chunk_bytes
    store = TieredStore([HostTier(1 << 20, prefault=False)], layout=TINY)
    strided = store.lend(3 * n, TINY).view(torch.float16).view(*TINY.chunk_shape[:3], 3 * C, TINY.head_dim)
    strided.copy_(want)  # put() slices it per chunk: views strided over the whole extent
    assert store.put(tokens, strided).stored == 3
    assert torch.equal(store.get(tokens).kv, want)

    store = TieredStore([HostTier(1 << 20, prefault=False)], layout=TINY)
    keys = chunk_keys(ROOT, tokens[: 2 * C], C)
    buffer = store.lend(2 * n, TINY)
    chunks = []
    for i in range(2):  # one after the other in the extent
        kv = buffer[i * n : (i + 1) * n].view(torch.float16).view(TINY.chunk_shape)
        kv.copy_(want[:, :, :, i * C : (i + 1) * C])
        summary = key_summary(kv, TINY.page_tokens) if (i == 0) == summary_first else None
        chunks.append(Chunk(keys[i], keys[i - 1] if i else ROOT, tokens[i * C : (i + 1) * C], kv, summary))
    assert store.put_chunks(chunks, ROOT, NS, TINY, lent=[buffer]).stored == 2
    assert torch.equal(store.get(tokens[: 2 * C], namespace=NS).kv, want[:, :, :, : 2 * C])


@pytest.mark.parametrize("bad", ["long kv", "summary shape", "summary dtype", "checksums"])
def test_put_chunks_refuses_kv_or_a_summary_that_does_not_fit_the_layout(bad):
    """A chunk's KV holds exactly chunk_tokens tokens, its summary is the layout's and so is the number of layer
    checksums it carries: anything else would be stored and break every later get of the prefix (the tier
    decodes the layout's shape; a blob would carry checksums for other layers)."""
    tokens = prompt(21, 2)
    keys = chunk_keys(ROOT, tokens, C)
    kv = kv_for_tokens(TINY, tokens)
    chunk = Chunk(keys[0], ROOT, tokens[:C], kv if bad == "long kv" else kv[:, :, :, :C].contiguous())
    if bad.startswith("summary"):
        summary = key_summary(chunk.kv, TINY.page_tokens)
        chunk.summary = summary[..., :4] if bad == "summary shape" else summary.float()
    if bad == "checksums":
        chunk.layer_xxh3 = ("0" * 16,) * (TINY.num_layers + 1)
    store = TieredStore([HostTier(1 << 20, prefault=False)], layout=TINY)
    match = {"long kv": "tokens, a chunk", "checksums": "layer checksums"}.get(bad, "key summary")
    with pytest.raises(LayoutError, match=match):
        store.put_chunks([chunk], ROOT, NS, TINY)
    assert len(store.index) == 0 and store.tiers[0].used_bytes == 0


def test_the_headroom_a_put_keeps_never_evicts_the_chunks_it_stored():
    """The headroom after a put (room to lend the next body of this size) is made by evicting other chunks, not
    the ones the put reports stored: in a tier that holds little more than the put, it keeps them all."""
    tokens = prompt(22, 3)
    size = sum(len(b) for b in blobs(tokens))
    for wait in (True, False):
        store = TieredStore([HostTier(4 * lend_size(TINY, len(blobs(tokens)[0])), prefault=False)], layout=TINY)
        received = [receive(store, b) for b in blobs(tokens)]
        result = store.put_chunks([c for c, _ in received], ROOT, NS, TINY, wait=wait,
                                  lent=[lent for _, lent in received], headroom=size)
        assert result.stored == 3 and store.lookup(tokens, namespace=NS).tokens == 3 * C
