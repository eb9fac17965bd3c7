import dataclasses
from pathlib import Path
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvtier.errors import CapacityError, LayoutError, TierError, TokenError
from kvtier.kvstore.chunk import Chunk
from kvtier.kvstore import DiskTier, HostTier, MetaTier, TieredStore
from kvtier.kvstore.keys import root_key
from kvtier.layout import KVLayout

from .helpers import TINY, footprint, kv_for_tokens

C = TINY.chunk_tokens


FP = footprint(TINY)


def prompt(seed, n_chunks, extra=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 1000, n_chunks * C + extra).tolist()


def host(n_chunks):
    return HostTier(n_chunks * FP, prefault=False)


def check_invariants(store: TieredStore) -> None:
    for t, tier in enumerate(store.tiers):
        held = [n for n in store.index.nodes.values() if n.tiers >> t & 1]
        assert len(held) == len(tier)
        assert all(tier.contains(n.key) for n in held)
        assert tier.used_bytes <= tier.capacity_bytes
    for node in store.index.nodes.values():
        assert node.tiers, "a node no tier holds"
        assert node.parent is None or node.parent.key in store.index.nodes, "an orphan"
        assert node.pins == 0


def test_put_lookup_get_round_trip():
    store = TieredStore([host(20)], layout=TINY)
    tokens = prompt(0, 3, extra=5)
    kv = kv_for_tokens(TINY, tokens)
    res = store.put(tokens, kv)
    assert (res.stored, res.present, res.dropped) == (3, 0, 0)
    assert store.lookup(tokens).tokens == 3 * C
    assert store.lookup(tokens[: 2 * C + 3]).tokens == 2 * C
    got = store.get(tokens)
    assert got.tokens == 3 * C and torch.equal(got.kv, kv[:, :, :, : 3 * C])
    # a longer prompt sharing the prefix stores only its new chunks
    longer = tokens[: 3 * C] + prompt(1, 2)
    res = store.put(longer, kv_for_tokens(TINY, longer))
    assert (res.stored, res.present) == (2, 3)
    # another prompt diverging inside chunk 1 shares only chunk 0
    other = tokens[:C] + [7] * (2 * C)
    assert store.lookup(other).tokens == C
    check_invariants(store)


def test_get_into_caller_buffer_and_layers():
    store = TieredStore([host(10)], layout=TINY)
    tokens = prompt(0, 2)
    kv = kv_for_tokens(TINY, tokens)
    store.put(tokens, kv)
    out = torch.zeros((1, 2, 2, 3 * C, 8), dtype=torch.float16)
    res = store.get(tokens + [1] * C, out, layers=range(1, 2))
    assert res.tokens == 2 * C and res.kv is out
    assert torch.equal(out[:, :, :, : 2 * C], kv[1:2]) and not out[:, :, :, 2 * C :].any()


def test_leaf_first_eviction_and_no_orphans():
    store = TieredStore([host(4)], layout=TINY)
    a = prompt(0, 3)
    store.put(a, kv_for_tokens(TINY, a))
    b = prompt(1, 2)
    store.put(b, kv_for_tokens(TINY, b))  # needs 1 slot: evicts a's deepest chunk, not its first
    assert store.lookup(a).tokens == 2 * C
    assert store.lookup(b).tokens == 2 * C
    check_invariants(store)
    c = prompt(2, 4)
    store.put(c, kv_for_tokens(TINY, c))
    assert store.lookup(c).tokens == 4 * C and store.lookup(a).tokens == 0 and store.lookup(b).tokens == 0
    check_invariants(store)


def test_pins_protect_chunks():
    store = TieredStore([host(3)], layout=TINY)
    a = prompt(0, 2)
    store.put(a, kv_for_tokens(TINY, a))
    assert store.pin(a) == 2
    b = prompt(1, 3)
    res = store.put(b, kv_for_tokens(TINY, b))
    assert res.stored == 1 and res.dropped == 2  # only one slot was free; pinned chunks stayed
    assert store.lookup(a).tokens == 2 * C
    assert store.delete(a) == 0  # pinned chunks are not deleted
    assert store.unpin(a) == 2
    res = store.put(b, kv_for_tokens(TINY, b))
    assert res.stored == 2 and store.lookup(a).tokens == 0
    check_invariants(store)


def test_an_unpin_undoes_its_own_pin_only_and_a_pin_covers_chunks_put_later():
    """One caller pins a prompt while two of its three chunks are cached; the third is put (pinned too: it is
    the pinned prompt's); a second caller pins the whole prompt. The first caller's unpin leaves the second's pins
    on every chunk, and an unpin of tokens never pinned takes nobody's pin."""
    store = TieredStore([host(6)], layout=TINY)
    a = prompt(2, 3)
    kv = kv_for_tokens(TINY, a)
    store.put(a[: 2 * C], kv[:, :, :, : 2 * C])
    assert store.pin(a) == 2
    store.put(a, kv)
    assert store.delete(a) == 0  # the third chunk came after the pin, and is pinned as well
    assert store.pin(a) == 3
    assert store.unpin(a) == 3 and store.unpin(a[: 2 * C]) == 0
    assert store.delete(a) == 0 and store.lookup(a).tokens == 3 * C  # the second pin still holds all three
    assert store.unpin(a) == 3 and store.unpin(a) == 0
    assert store.delete(a) == 1 and store.lookup(a).tokens == 2 * C
    check_invariants(store)


def test_demotion_and_promotion(tmp_path):
    store = TieredStore([host(2), DiskTier(tmp_path, 100 * FP)], layout=TINY)
    a, b = prompt(0, 2), prompt(1, 2)
    store.put(a, kv_for_tokens(TINY, a))
    store.put(b, kv_for_tokens(TINY, b))  # a is demoted to disk
    assert [r.tiers for r in store.lookup(a).chunks] == [["disk"], ["disk"]]
    got = store.get(a)
    assert got.tiers == ["disk", "disk"] and torch.equal(got.kv, kv_for_tokens(TINY, a))
    assert [r.tiers for r in store.lookup(a).chunks] == [["host", "disk"], ["host", "disk"]]  # promoted
    assert [r.tiers for r in store.lookup(b).chunks] == [["disk"], ["disk"]]  # b made room
    assert store.get(a).tiers == ["host", "host"]
    s = store.stats()
    assert s["promotions"] == 2 and s["demotions"] == 4
    check_invariants(store)


def test_prefetch_promotes(tmp_path):
    store = TieredStore([host(2), DiskTier(tmp_path, 100 * FP)], layout=TINY)
    a, b = prompt(0, 2), prompt(1, 2)
    store.put(a, kv_for_tokens(TINY, a))
    store.put(b, kv_for_tokens(TINY, b))
    assert store.prefetch(a) == 2
    assert [r.tiers for r in store.lookup(a).chunks] == [["host", "disk"], ["host", "disk"]]


@pytest.mark.parametrize("move", ["prefetch that demotes", "demotion that demotes"])
def test_a_move_that_makes_room_by_moving_keeps_each_chunk_its_own_kv(tmp_path, move):
    """A chunk read for a move stays put while making room moves another chunk (which needs its own buffer)."""
    hosts = [host(1)] if move == "prefetch that demotes" else [host(1), HostTier(FP, prefault=False, name="host1")]
    store = TieredStore(hosts + [DiskTier(tmp_path, 100 * FP)], layout=TINY)
    prompts = [prompt(i, 1) for i in range(len(hosts) + 1)]
    for p in prompts:  # each put demotes the one before (down to the disk)
        store.put(p, kv_for_tokens(TINY, p))
    if move == "prefetch that demotes":
        assert store.prefetch(prompts[0]) == 1  # read from disk, then the host's chunk is demoted to make room
    for p in prompts:
        got = store.get(p)
        assert got.tokens == C and torch.equal(got.kv, kv_for_tokens(TINY, p)), got.tiers
    check_invariants(store)


def test_restart_recovers_from_disk(tmp_path):
    layout2 = KVLayout("other", num_layers=1, kv_heads=1, head_dim=8, dtype="float32", chunk_tokens=16, page_tokens=8)
    store = TieredStore([host(8), DiskTier(tmp_path, 100 * FP)], layout=TINY, write_through=[False, True])
    a = prompt(0, 3, extra=3)
    store.put(a, kv_for_tokens(TINY, a), namespace="t1")
    store.put(a, kv_for_tokens(layout2, a), layout=layout2)
    again = TieredStore([host(8), DiskTier(tmp_path, 100 * FP)], layout=TINY)
    assert again.lookup(a, namespace="t1").tokens == 3 * C
    assert again.lookup(a).tokens == 0  # another namespace
    assert again.lookup(a, layout=layout2).tokens == 3 * C
    got = again.get(a, namespace="t1")
    assert torch.equal(got.kv, kv_for_tokens(TINY, a)[:, :, :, : 3 * C])
    assert again.namespace_bytes["t1"] == 3 * TINY.chunk_bytes
    check_invariants(again)


def test_restart_drops_orphans_and_corrupt_files(tmp_path):
    store = TieredStore([DiskTier(tmp_path, 100 * FP)], layout=TINY)
    a = prompt(0, 4)
    store.put(a, kv_for_tokens(TINY, a))
    keys = store.keys(a)
    Path(store.tiers[0]._file(keys[1])).write_bytes(b"garbage")  # chunk 1 unreadable: 2 and 3 are orphans
    again = TieredStore([DiskTier(tmp_path, 100 * FP)], layout=TINY)
    assert again.lookup(a).tokens == C
    assert len(again.tiers[0]) == 1 and again.tiers[0].stats.corrupt == 1
    check_invariants(again)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_disk_chunk_is_a_miss(tmp_path, damage):
    store = TieredStore([DiskTier(tmp_path, 100 * FP)], layout=TINY)
    a = prompt(0, 3)
    kv = kv_for_tokens(TINY, a)
    store.put(a, kv)
    path = Path(store.tiers[0]._file(store.keys(a)[1]))
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 3] ^= 0xFF
    else:
        data = data[:-200]
    path.write_bytes(bytes(data))
    got = store.get(a)
    assert got.tokens == C and torch.equal(got.kv[:, :, :, :C], kv[:, :, :, :C])
    assert store.lookup(a).tokens == C  # the corrupt chunk and its descendant are gone
    assert store.stats()["tiers"][0]["corrupt"] == 1
    check_invariants(store)


def _flip_summary(tier: DiskTier, key: bytes) -> None:
    """Damage the key summary of ``key``'s file (its last tensor), not its KV."""
    path = Path(tier._file(key))
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x55
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("move", ["promotion", "demotion"])
def test_a_summary_found_corrupt_during_a_move_drops_the_chunk_cleanly(tmp_path, move):
    """The disk tier deletes a chunk whose summary fails its checksum when the move asks for it: the move stops,
    nothing is left in a tier without an index entry, and later puts evict as usual."""
    if move == "promotion":
        store = TieredStore([host(1), DiskTier(tmp_path / "d", 100 * FP)], layout=TINY)
    else:
        probe = TieredStore([DiskTier(tmp_path / "probe", 100 * FP)], layout=TINY)
        probe.put(prompt(9, 1), kv_for_tokens(TINY, prompt(9, 1)))
        one = probe.tiers[0].used_bytes
        store = TieredStore([DiskTier(tmp_path / "d0", one, name="d0"), DiskTier(tmp_path / "d1", 100 * one)],
                            layout=TINY)
    a, b, c = prompt(1, 1), prompt(2, 1), prompt(3, 1)
    store.put(a, kv_for_tokens(TINY, a))
    if move == "promotion":
        store.put(b, kv_for_tokens(TINY, b))  # a demoted to the disk, with its summary
        _flip_summary(store.tiers[1], store.keys(a)[0])
        got = store.get(a)  # served (its KV is good); promoting it reads the summary
        assert torch.equal(got.kv, kv_for_tokens(TINY, a))
    else:
        _flip_summary(store.tiers[0], store.keys(a)[0])
        store.put(b, kv_for_tokens(TINY, b))  # evicting a demotes it, which reads the summary
    assert store.lookup(a).tokens == 0
    check_invariants(store)
    store.put(c, kv_for_tokens(TINY, c))  # evicts from the tier the move was heading for
    assert store.lookup(c).tokens == C
    check_invariants(store)


def test_write_through_and_delete(tmp_path):
    store = TieredStore([host(8), DiskTier(tmp_path, 100 * FP)], layout=TINY, write_through=[False, True])
    a = prompt(0, 3)
    store.put(a, kv_for_tokens(TINY, a))
    assert all(r.tiers == ["host", "disk"] for r in store.lookup(a).chunks)
    assert store.delete(a[: 2 * C]) == 2  # chunk 1 and its subtree (chunk 2)
    assert store.lookup(a).tokens == C
    assert len(store.tiers[1]) == 1
    check_invariants(store)


def test_quota_evicts_own_chunks_only():
    store = TieredStore([host(20)], layout=TINY)
    store.set_quota("small", 2 * TINY.chunk_bytes)
    big = prompt(0, 4)
    store.put(big, kv_for_tokens(TINY, big), namespace="other")
    a, b = prompt(1, 2), prompt(2, 2)
    store.put(a, kv_for_tokens(TINY, a), namespace="small")
    store.put(b, kv_for_tokens(TINY, b), namespace="small")
    assert store.namespace_bytes["small"] <= 2 * TINY.chunk_bytes
    assert store.lookup(b, namespace="small").tokens == 2 * C
    assert store.lookup(a, namespace="small").tokens == 0
    assert store.lookup(big, namespace="other").tokens == 4 * C


def test_bad_input_changes_nothing(tmp_path):
    store = TieredStore([host(4), DiskTier(tmp_path, 8 * FP)], layout=TINY)
    a = prompt(0, 2)
    kv = kv_for_tokens(TINY, a)
    store.put(a, kv)
    before = store.stats()
    with pytest.raises(LayoutError, match="shape"):
        store.put(a, kv[:, :, :1])
    with pytest.raises(LayoutError, match="dtype"):
        store.put(a, kv.float())
    with pytest.raises(LayoutError, match="tokens"):
        store.put(a + [1], kv)
    with pytest.raises(LayoutError, match="must be a torch.Tensor"):
        store.put(a, kv.numpy())
    with pytest.raises(TokenError):
        store.put([float(x) for x in a], kv)
    with pytest.raises(TokenError):
        store.lookup(["a", "b"])
    huge = prompt(5, 20)
    with pytest.raises(CapacityError, match="capacity of every tier"):
        store.put(huge, kv_for_tokens(TINY, huge))
    with pytest.raises(LayoutError, match="out buffer"):
        store.get(a, torch.empty(3, 3))
    with pytest.raises(LayoutError, match="layers"):
        store.get(a, layers=range(1, 5))
    with pytest.raises(LayoutError, match="is on meta"):
        store.put(a, kv.to("meta"))
    after = store.stats()
    assert after["chunks"] == before["chunks"] == 2
    assert [t["used_bytes"] for t in after["tiers"]] == [t["used_bytes"] for t in before["tiers"]]
    assert torch.equal(store.get(a).kv, kv)


def test_metadata_only_mode_matches_tensor_store():
    rng = np.random.default_rng(3)
    prefixes = [prompt(i, 3) for i in range(4)]
    requests = [prefixes[rng.integers(4)][: int(rng.integers(1, 4)) * C] + prompt(100 + i, int(rng.integers(0, 3)))
                for i in range(40)]
    real = TieredStore([host(6)], layout=TINY, policy="lru")
    meta = TieredStore([MetaTier("host", 6 * FP)], layout=TINY, policy="lru", metadata_only=True)
    meta.tiers[0]._size_of[TINY.fingerprint] = FP  # the same footprint as the host tier's
    for r in requests:
        hits = []
        for store in (real, meta):
            hits.append(store.lookup(r).tokens)
            store.get(r)
            store.put(r, kv_for_tokens(TINY, r) if store is real else None)
        assert hits[0] == hits[1]
    assert real.stats()["hit_tokens"] == meta.stats()["hit_tokens"] > 0


OPS = st.lists(st.tuples(st.sampled_from(["put", "get", "delete", "pin", "prefetch"]), st.integers(0, 5),
                         st.integers(1, 4)), min_size=1, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, policy=st.sampled_from(["lru", "lfu", "s3fifo", "cost", "turn-lru", "hit-density"]),
       hosts=st.sampled_from([[3], [2, 2]]))
def test_random_operations_keep_accounting_exact(tmp_path_factory, ops, policy, hosts):
    """One or two host tiers over a disk: demotions that make room by demoting further, promotions that demote."""
    folder = tmp_path_factory.mktemp("disk")
    store = TieredStore([HostTier(n * FP, prefault=False, name=f"host{i}") for i, n in enumerate(hosts)]
                        + [DiskTier(folder, 5 * (FP + 2048))], layout=TINY, policy=policy)
    base = [prompt(i, 4) for i in range(3)]
    for op, which, n in ops:
        tokens = (base[which % 3][: 2 * C] + prompt(which, 2))[: n * C] if which >= 3 else base[which][: n * C]
        if op == "put":
            store.put(tokens, kv_for_tokens(TINY, tokens))
        elif op == "get":
            got = store.get(tokens)
            assert torch.equal(got.kv[:, :, :, : got.tokens], kv_for_tokens(TINY, tokens)[:, :, :, : got.tokens])
        elif op == "delete":
            store.delete(tokens)
        elif op == "prefetch":
            store.prefetch(tokens)
        else:
            store.pin(tokens)
            store.put(prompt(50 + which, 2), kv_for_tokens(TINY, prompt(50 + which, 2)))
            store.unpin(tokens)
        check_invariants(store)
        for tier in store.tiers:
            if isinstance(tier, DiskTier):
                on_disk = sum(p.stat().st_size for p in folder.glob("*/*.kvt"))
                assert tier.used_bytes == on_disk
            else:
                assert tier.used_bytes == sum(e.nbytes for e in tier._entries.values())


def test_device_tier_over_host_and_disk(tmp_path):
    from kvtier.kvstore import DeviceTier

    device = DeviceTier(2 * FP, prefault=False)  # the CPU device here; CUDA memory where present
    store = TieredStore([device, host(2), DiskTier(tmp_path, 100 * FP)], layout=TINY)
    prompts = [prompt(i, 2) for i in range(3)]
    for p in prompts:
        store.put(p, kv_for_tokens(TINY, p))
    assert [r.tiers[0] for r in store.lookup(prompts[2]).chunks] == ["device", "device"]
    assert [r.tiers[0] for r in store.lookup(prompts[1]).chunks] == ["host", "host"]
    assert [r.tiers[0] for r in store.lookup(prompts[0]).chunks] == ["disk", "disk"]
    got = store.get(prompts[0])
    assert got.tiers == ["disk", "disk"] and torch.equal(got.kv, kv_for_tokens(TINY, prompts[0]))
    assert store.get(prompts[0]).tiers == ["device", "device"]
    check_invariants(store)


def test_a_failing_disk_write_is_a_chunk_not_taken(tmp_path):
    """A real write failure (the file-size limit makes write() fail with EFBIG) leaves the store consistent."""
    import resource
    import signal

    store = TieredStore([DiskTier(tmp_path, 100 * FP)], layout=TINY)
    a, b = prompt(0, 2), prompt(1, 2)
    store.put(a, kv_for_tokens(TINY, a))
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, old_limit[1]))
    try:
        res = store.put(b, kv_for_tokens(TINY, b))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert res.stored == 0 and res.dropped == 2
    assert store.stats()["commit_failures"] == 1
    assert not list((tmp_path / "tmp").iterdir())
    check_invariants(store)
    assert torch.equal(store.get(a).kv, kv_for_tokens(TINY, a))
    assert store.put(b, kv_for_tokens(TINY, b)).stored == 2


@pytest.mark.parametrize(("dtype", "bad"), [("float16", float("inf")), ("float32", float("nan")), ("float32", 1e30)])
def test_kv_a_lossy_tier_cannot_encode_is_refused_by_the_store(tmp_path, dtype, bad):
    """Only a lossy tier's codec cannot take inf, nan or values beyond its range, and it would see the chunk only
    when demoting it: the put is refused up front instead; a store without one keeps such KV as it is."""
    layout = dataclasses.replace(TINY, dtype=dtype)
    tokens = prompt(0, 2)
    kv = kv_for_tokens(layout, tokens)
    kv[0, 1, 0, C + 3, 2] = bad
    lossy = TieredStore([host(2), DiskTier(tmp_path, 100 * FP, codec="int4")], layout=layout)
    with pytest.raises(LayoutError, match="inf, nan or values beyond"):
        lossy.put(tokens, kv)
    assert len(lossy.index) == 0
    raw = TieredStore([host(2), DiskTier(tmp_path / "raw", 100 * FP)], layout=layout)
    assert raw.put(tokens, kv).stored == 2
    assert torch.allclose(raw.get(tokens).kv, kv, rtol=0, atol=0, equal_nan=True)


def test_a_put_after_close_leaves_the_disk_as_it_was(tmp_path):
    """A closed disk tier writes nothing more: a demotion to it is a chunk it did not take, not a crash, and no
    half-written file is left."""
    disk = DiskTier(tmp_path, 100 * FP)
    store = TieredStore([host(2), disk], layout=TINY)
    first = prompt(0, 2)
    store.put(first, kv_for_tokens(TINY, first))
    store.close()
    files = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    later = prompt(1, 2)
    assert store.put(later, kv_for_tokens(TINY, later)).stored == 2  # evicting the first prompt demotes nothing
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == files
    check_invariants(store)


def test_a_prefix_lost_while_making_room_stores_nothing_below_it(tmp_path):
    """put_chunks below the root (the service's put): making room for it demotes the prefix's first chunk,
    whose only copy (a middle disk tier) turns out corrupt, so the whole prompt is gone; the new chunk is not
    left in the index without its parent."""
    from kvtier.kvstore.chunk import Chunk
    from kvtier.kvstore.keys import root_key

    probe = TieredStore([DiskTier(tmp_path / "probe", 100 * FP)], layout=TINY)
    probe.put(prompt(9, 1), kv_for_tokens(TINY, prompt(9, 1)))
    middle = DiskTier(tmp_path / "middle", 2 * probe.tiers[0].used_bytes)
    store = TieredStore([host(2), middle, DiskTier(tmp_path / "last", 100 * FP, name="last")], layout=TINY)
    a = prompt(1, 3)
    kv = kv_for_tokens(TINY, a)
    store.put(a[:C], kv[:, :, :, :C])
    for other in (prompt(2, 1), prompt(3, 1)):  # the first chunk of a goes down to the middle disk
        store.put(other, kv_for_tokens(TINY, other))
    store.put(a[: 2 * C], kv[:, :, :, : 2 * C])  # its second chunk in host memory
    first, second, third = store.keys(a)
    assert store.index.get(first).tiers == 0b010
    path = Path(middle._file(first))
    data = bytearray(path.read_bytes())
    data[-300] ^= 0xFF
    path.write_bytes(bytes(data))
    chunk = Chunk(third, second, np.asarray(a[2 * C :], dtype=np.int32), kv[:, :, :, 2 * C :].contiguous())
    result = store.put_chunks([chunk], root_key(TINY.fingerprint, ""), "", TINY)
    assert result.stored == 0 and third not in store.index and store.lookup(a).tokens == 0
    check_invariants(store)


@pytest.mark.parametrize("make", [
    lambda shape: torch.empty(shape, dtype=torch.float16, device="meta"),
    lambda shape: torch.empty(shape[:3] + (1, shape[4]), dtype=torch.float16).expand(shape),
    lambda shape: torch.empty(shape, dtype=torch.float16, requires_grad=True),
], ids=["meta", "expanded", "requires_grad"])
def test_an_out_buffer_that_cannot_take_the_kv_is_refused(make):
    """A meta tensor takes no bytes (a get would report KV it never wrote), an expanded view shares its elements,
    and a leaf that requires grad cannot be written in place: each is refused before anything is fetched."""
    tokens = prompt(30, 2)
    store = TieredStore([host(4)], layout=TINY)
    store.put(tokens, kv_for_tokens(TINY, tokens))
    with pytest.raises(LayoutError, match="writable memory"):
        store.get(tokens, out=make((TINY.num_layers, 2, TINY.kv_heads, 2 * C, TINY.head_dim)))
    assert store.get(tokens).tokens == 2 * C


def test_lookup_takes_an_iterator_of_token_ids():
    tokens = prompt(31, 2)
    store = TieredStore([host(4)], layout=TINY)
    store.put(tokens, kv_for_tokens(TINY, tokens))
    assert store.lookup(iter(tokens)).tokens == 2 * C


def test_idle_move_buffers_are_kept_for_a_few_layouts_only(tmp_path):
    """Each layout whose chunks move between tiers needs a chunk buffer while they move; a service's tenants may
    attach any number of layouts, so idle buffers are kept only for the last few (and the moves stay exact)."""
    from kvtier.kvstore.store import SCRATCH_LAYOUTS

    store = TieredStore([host(1), DiskTier(tmp_path, 100 * FP)], layout=TINY)
    for i in range(SCRATCH_LAYOUTS + 3):
        layout = dataclasses.replace(TINY, model_id=f"model-{i}")
        store.attach(layout)
        for seed in (2 * i, 2 * i + 1):  # the second put demotes the first chunk: a move through a buffer
            tokens = prompt(seed, 1)
            store.put(tokens, kv_for_tokens(layout, tokens), layout=layout)
        first = prompt(2 * i, 1)
        assert torch.equal(store.get(first, layout=layout).kv, kv_for_tokens(layout, first))
    assert 0 < len(store._scratch) <= SCRATCH_LAYOUTS


def test_keys_that_are_not_a_chain_from_the_root_are_refused_and_nothing_is_dropped(tmp_path):
    """get_keys with keys from the middle of a prompt, under another namespace's root, or out of order is a
    caller's mistake: a ValueError, and the cached copies (whose parents would not match) are not dropped."""
    tokens = prompt(40, 4)
    store = TieredStore([host(2), DiskTier(tmp_path, 100 * FP)], layout=TINY)
    store.put(tokens, kv_for_tokens(TINY, tokens))
    keys = store.keys(tokens)
    root = root_key(TINY.fingerprint, "")
    for wrong, first_parent in ((keys[2:], root), (keys, root_key(TINY.fingerprint, "other")), ([keys[1], keys[0]], root)):
        with pytest.raises(ValueError, match="not a chain"):
            store.get_keys(wrong, first_parent)
    assert store.counters.verify_failures == 0 and store.lookup(tokens).tokens == 4 * C
    assert store.get_keys(keys[2:], keys[1]).tokens == 2 * C


def test_a_store_is_a_context_manager_that_closes_its_tiers(tmp_path):
    tokens = prompt(41, 1)
    with TieredStore([host(2), DiskTier(tmp_path, 100 * FP)], layout=TINY) as store:
        store.put(tokens, kv_for_tokens(TINY, tokens))
    with pytest.raises(TierError, match="closed"):
        store.tiers[1].commit(store.tiers[1].prepare(Chunk(b"\1" * 16, b"\0" * 16, np.zeros(C, np.int32),
                                                          kv_for_tokens(TINY, prompt(42, 1))), TINY))


def test_a_restart_keeps_disk_chunks_whose_prefix_was_only_in_memory(tmp_path):
    """Without write-through a hot prefix stays in the host tier while its continuations are demoted to disk; a
    restart rebuilds the index from the disk by walking down from each prompt's first chunk, so closing the store
    writes such prefixes down: the prompt survives whole."""
    tokens = prompt(43, 4)
    kv = kv_for_tokens(TINY, tokens)
    store = TieredStore([host(2), DiskTier(tmp_path, 100 * FP)], layout=TINY)
    store.put(tokens, kv)
    for seed in range(44, 47):  # other prompts push the deeper chunks to disk; the first chunk is kept hot
        store.get(tokens[:C])
        other = prompt(seed, 1)
        store.put(other, kv_for_tokens(TINY, other))
    tiers = [ref.tiers for ref in store.lookup(tokens).chunks]
    assert tiers[0] == ["host"] and all(t == ["disk"] for t in tiers[1:])
    store.close()
    again = TieredStore([host(2), DiskTier(tmp_path, 100 * FP)], layout=TINY)
    assert torch.equal(again.get(tokens).kv, kv)
    check_invariants(again)


def test_closing_a_store_whose_disk_is_full_deletes_nothing(tmp_path):
    """Writing a memory-only prefix down needs room on the disk; making it could evict that prefix's own parent
    there (it is in host memory too), orphaning what the close meant to keep. So a close evicts nothing: every
    file on disk before it is there after it, and a restart keeps at least what a crash would.
    (Prompts of four families sharing three-chunk prefixes; the steps are a case found by random search.)"""
    def family(i: int) -> list[int]:
        base = np.random.default_rng(1000 + i % 4).integers(0, 1000, 3 * C).tolist()
        return base + np.random.default_rng(i).integers(0, 1000, (1 + i % 4) * C).tolist()

    steps = [("put", 20), ("put", 17), ("put", 18), ("put", 16), ("put", 2), ("put", 2), ("put", 17), ("put", 18),
             ("get", 7, 5), ("get", 1, 4), ("get", 1, 1), ("get", 17, 3), ("put", 13), ("get", 3, 5), ("put", 21)]
    store = TieredStore([host(3), DiskTier(tmp_path, 5 * FP)], layout=TINY)
    for step in steps:
        tokens = family(step[1])
        if step[0] == "put":
            try:
                store.put(tokens, kv_for_tokens(TINY, tokens))
            except CapacityError:
                pass
        else:
            store.get(tokens[: step[2] * C])
    before = {p.name for p in tmp_path.glob("*/*.kvt")}
    store.close()
    assert before and before <= {p.name for p in tmp_path.glob("*/*.kvt")}
    again = TieredStore([host(3), DiskTier(tmp_path, 5 * FP)], layout=TINY)
    check_invariants(again)
