"""TieredStore: the prefix-keyed KV cache over a list of tiers, fastest first.

Data path:

- ``put(tokens, kv)``: key the full chunks (:mod:`kvtier.kvstore.keys`), skip those already cached, encode
  each new one for the first tier that can ever hold it, evict there until it fits (an evicted chunk is
  demoted to the next tier, or leaves the store when it is in the last), commit; write-through tiers get a
  copy too. Nothing is stored after a chunk that could not be.
- ``lookup(tokens)``: the longest run of leading chunk keys in the index (any tier).
- ``get(tokens, out)``: lookup, then fetch each chunk from the fastest tier holding it straight into the
  caller's buffer, verify it (its key must equal ``H(parent || tokens)`` for the expected parent), and
  promote chunks fetched from a lower tier to the first one. A copy that fails verification is deleted and
  the next tier's copy tried; a chunk with no good copy left ends the hit there.

Eviction is leaf-first: a chunk is not evicted from a tier while a child of it is there, nor dropped from the
store while it has children anywhere, so the cache never holds a chunk whose prefix it lost. Pinned chunks
are never evicted. One lock serialises every operation, copies included.

Key summaries (per page min/max/mean of the keys, for retrieval attention) are made when first needed: a
memory tier holds a chunk with an empty slot for its summary, filled when :meth:`TieredStore.summaries` asks
for it; a chunk gets its summary before it is written to a tier that stores it with the chunk (disk, Redis).

A receiver of blobs (the service) can :meth:`TieredStore.lend` bytes of the first tier's memory, receive a
blob into them, and :meth:`TieredStore.put_chunks` a chunk whose KV lies there: the tier takes the bytes
over instead of copying them. With ``wait=False`` both return None instead of waiting for the lock or doing
I/O, so an event loop may call them. A sender (the service's fetch) can :meth:`TieredStore.borrow_keys` the
chunks of a prompt: their KV as views of the first tier's memory, pinned until released, so the bytes go out
without a copy here; it never waits either.

Every request also has a turn (:meth:`TieredStore.turn_of`: how many earlier prompts its prompt continues),
which the store keeps on the nodes it uses and, for a while, on the keys it dropped. The store counts how
often a prompt at each turn was continued and tells the tier policies the request's chance of being
continued (``turn-lru`` and ``hit-density`` use it).

``metadata_only=True`` runs the same index, policies and capacity accounting with :class:`MetaTier`-like
tiers and no tensors: trace replays drive exactly the production logic.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch

from kvtier.compression.quant import MAX_MAGNITUDE, largest_magnitude
from kvtier.errors import CapacityError, LayoutError, ParentMissingError, TierError
from kvtier.kvstore.chunk import Chunk, key_summary, max_blob_bytes
from kvtier.kvstore.index import Node, PrefixIndex
from kvtier.kvstore.keys import TokenLike, as_tokens, chain_key, chunk_keys, root_key
from kvtier.kvstore.policies import EvictionPolicy, make_policy
from kvtier.kvstore.tiers.base import Prepared, Tier
from kvtier.kvstore.tiers.meta import MetaTier
from kvtier.layout import KVLayout

log = logging.getLogger(__name__)

GHOST_FACTOR = 2
"""The store remembers the turn of up to this many dropped chunks per chunk it holds."""

MAX_TURN = 15
"""Turns from this one on share their continuation statistics."""

SCRATCH_LAYOUTS = 4
"""Layouts whose idle chunk buffers (for moves between tiers) the store keeps."""


@dataclass
class ChunkRef:
    """A cached chunk of a prompt: its index in the prompt, key, and the tiers holding it (fastest first)."""

    index: int
    key: bytes
    tiers: list[str]


@dataclass
class LookupResult:
    tokens: int
    chunks: list[ChunkRef]


@dataclass
class GetResult:
    """``tokens`` fetched (a multiple of chunk_tokens) into ``kv`` (``[L', T, H, >= tokens, D]``, or the
    per-chunk tensors given to :meth:`TieredStore.get_keys`);
    ``tiers``: the tier each chunk came from; ``layer_xxh3``: per chunk, the checksums of its fetched layers as
    verified when it was read from a blob (:attr:`Chunk.layer_xxh3`), or None."""

    tokens: int
    kv: torch.Tensor | list[torch.Tensor] | None
    tiers: list[str]
    layer_xxh3: list[tuple[str, ...] | None] = field(default_factory=list)


@dataclass
class Borrowed:
    """:meth:`TieredStore.borrow_keys`: ``tokens`` cached, in ``chunks`` whose KV are views of a tier's memory
    (with their layer checksums, as a get gives them), from ``tiers``; ``release(wait=True) -> bool`` unpins them
    (once; with ``wait=False``, only if the store's lock is free: False otherwise, and nothing done)."""

    tokens: int
    chunks: list[Chunk]
    tiers: list[str]
    release: Callable[..., bool]


@dataclass
class PutResult:
    """``stored`` new chunks, ``present`` already cached, ``dropped`` full chunks that found no room."""

    stored: int
    present: int
    dropped: int


@dataclass
class _Counters:
    lookups: int = 0
    lookup_tokens: int = 0
    hit_tokens: int = 0
    gets: int = 0
    get_tokens: int = 0
    puts: int = 0
    put_chunks: int = 0
    put_bytes: int = 0
    verify_failures: int = 0
    commit_failures: int = 0
    promotions: int = 0
    demotions: int = 0
    drops: int = 0
    tier_hits: dict[str, int] = field(default_factory=dict)


class TieredStore:
    """A prefix cache of KV chunks over ``tiers`` (fastest first).

    ``policy``: an eviction policy name for every tier, or one per tier (``lru``, ``lfu``, ``s3fifo``,
    ``cost``, ``turn-lru``, ``hit-density``). ``write_through``: per tier, also write every new chunk there (e.g.
    to a persistent disk).
    ``layout``: the default layout for calls that name none; other layouts can be attached.
    """

    def __init__(self, tiers: Sequence[Tier], layout: KVLayout | None = None,
                 policy: str | Sequence[str] = "lru", write_through: bool | Sequence[bool] = False,
                 metadata_only: bool = False, summaries: bool = True) -> None:
        if not tiers:
            raise ValueError("a TieredStore needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be distinct, got {names}")
        if metadata_only and not all(isinstance(t, MetaTier) for t in tiers):
            raise ValueError("metadata_only needs MetaTier tiers")
        self.tiers = list(tiers)
        self.metadata_only = metadata_only
        self.keep_summaries = summaries and not metadata_only
        n = len(self.tiers)
        policies = [policy] * n if isinstance(policy, str) else list(policy)
        wt = [write_through] * n if isinstance(write_through, bool) else list(write_through)
        if len(policies) != n or len(wt) != n:
            raise ValueError(f"give one policy and one write_through flag per tier ({n} tiers)")
        self.policies: list[EvictionPolicy] = [make_policy(p, t.capacity_bytes) for p, t in zip(policies, self.tiers)]
        self.write_through = wt
        self._lock = threading.RLock()
        self.index = PrefixIndex()
        self._dropped_turns: OrderedDict[bytes, int] = OrderedDict()  # key -> turn, oldest first
        self._prompts = [0] * (MAX_TURN + 1)  # per turn: new prompts, and how many of them were continued
        self._continued = [0] * (MAX_TURN + 1)
        self.layouts: dict[str, KVLayout] = {}
        self.layout = layout
        if layout is not None:
            self.attach(layout)
        self.namespace_bytes: dict[str, int] = {}
        self.quotas: dict[str, int] = {}
        self.counters = _Counters(tier_hits={t.name: 0 for t in self.tiers})
        self._scratch: OrderedDict[str, list[torch.Tensor]] = OrderedDict()  # idle chunk buffers, per layout used last
        self._pinned_prompts: Counter[tuple[bytes, ...]] = Counter()  # pins per pinned prompt (its chunk keys)
        self._pins: Counter[bytes] = Counter()  # pins per chunk key of those prompts, cached or still to come
        for t in self.tiers:
            t.keep_summaries = self.keep_summaries
        self._recover()

    # ------------------------------------------------------------------ public API

    def attach(self, layout: KVLayout) -> str:
        """Register a layout (so chunks of it can be stored); returns its fingerprint."""
        with self._lock:
            self.layouts.setdefault(layout.fingerprint, layout)
        return layout.fingerprint

    def root(self, namespace: str = "", layout: KVLayout | None = None) -> bytes:
        """The parent key of the first chunk of every prompt of ``namespace`` and ``layout``."""
        return root_key(self._layout(layout).fingerprint, namespace)

    def check_parent(self, key: bytes, namespace: str = "", layout: KVLayout | None = None) -> None:
        """ParentMissingError unless ``key`` is the root of ``namespace`` and ``layout`` or a chunk cached in them:
        a prompt's tokens after that chunk can then be keyed from it (``chunk_keys(key, tokens, ...)``)."""
        layout = self._layout(layout)
        if key != self.root(namespace, layout):
            with self._lock:
                self._parent_node(key, namespace, layout)

    def keys(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> list[bytes]:
        """Chunk keys of the full chunks of ``tokens``."""
        layout = self._layout(layout)
        return chunk_keys(self.root(namespace, layout), as_tokens(tokens), layout.chunk_tokens)

    def lookup(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> LookupResult:
        """The longest cached prefix of ``tokens``, in whole chunks."""
        layout = self._layout(layout)
        ids = as_tokens(tokens)  # an iterator is read once
        return self.lookup_keys(self.keys(ids, namespace, layout), layout, n_tokens=len(ids))

    def lookup_keys(self, keys: Sequence[bytes], layout: KVLayout | None = None, n_tokens: int | None = None) -> LookupResult:
        layout = self._layout(layout)
        with self._lock:
            nodes = self.index.match(keys)
            refs = [ChunkRef(i, n.key, self._tier_names(n)) for i, n in enumerate(nodes)]
            self.counters.lookups += 1
            self.counters.lookup_tokens += len(keys) * layout.chunk_tokens if n_tokens is None else n_tokens
            self.counters.hit_tokens += len(nodes) * layout.chunk_tokens
        return LookupResult(len(nodes) * layout.chunk_tokens, refs)

    def turn_of(self, deepest: Node | None, rest: Sequence[bytes]) -> tuple[int, bool]:
        """How many earlier prompts a prompt continues, and whether it continues one, given ``deepest``, the
        last node of its cached prefix (None: nothing cached), and ``rest``, the keys of its chunks after it.

        A prompt that extends or repeats a chunk no cached prompt continues (the end of an earlier prompt, or
        what is left of it) is one turn past that chunk's: a repeat is a next turn that added less than a
        chunk (the partial last chunk is never cached). One that ends inside a prefix other prompts continue
        is at the prefix's turn; one that branches off such a prefix (a shared system prompt) starts afresh
        at 0. Dropped chunks keep their turn for a while, so a conversation whose earlier turns were evicted
        is still recognised: a prompt that holds one is one turn past it, if that is more.
        """
        if deepest is None or (rest and deepest.children):
            turn, continues = 0, False
        elif deepest.children:
            turn, continues = deepest.turn, False
        else:
            turn, continues = deepest.turn + 1, True
        for key in reversed(rest):
            dropped = self._dropped_turns.get(key)
            if dropped is not None:
                return (dropped + 1, True) if dropped + 1 > turn else (turn, continues)
        return turn, continues

    def continuation(self, turn: int) -> float:
        """The fraction of the new prompts at ``turn`` seen so far that a later prompt continued (with one
        continued and one not continued prompt as a prior). A prompt whose chunks were dropped can be counted as
        continued by more than one later prompt: the count is capped at the prompts', so this stays below 1."""
        t = min(turn, MAX_TURN)
        return (min(self._continued[t], self._prompts[t]) + 1) / (self._prompts[t] + 2)

    def put(self, tokens: TokenLike, kv: torch.Tensor | None, namespace: str = "",
            layout: KVLayout | None = None) -> PutResult:
        """Store the full chunks of ``tokens`` whose KV is ``kv``: ``[L, T, H, len(tokens), D]`` in the
        layout's dtype (None only in metadata-only mode). A partial last chunk is not stored."""
        layout = self._layout(layout)
        ids = as_tokens(tokens)
        C = layout.chunk_tokens
        n_full = len(ids) // C
        if self.metadata_only:
            if kv is not None:
                raise ValueError("a metadata-only store takes kv=None")
        else:
            layout.check_kv(kv, len(ids))
            if kv.shape[3] != len(ids):
                raise LayoutError(f"kv holds {kv.shape[3]} tokens but {len(ids)} token ids were given")
            self._check_kv(kv)
        root = self.root(namespace, layout)
        keys = chunk_keys(root, ids, C)
        chunks = []
        for i, key in enumerate(keys):
            part = None if kv is None else kv[:, :, :, i * C : (i + 1) * C]
            chunks.append(Chunk(key, keys[i - 1] if i else root, ids[i * C : (i + 1) * C], part))
        return self._put_chain(chunks, root, layout, namespace, n_full)

    def get(self, tokens: TokenLike, out: torch.Tensor | None = None, layers: range | None = None,
            namespace: str = "", layout: KVLayout | None = None) -> GetResult:
        """Fetch the longest cached prefix of ``tokens`` into ``out`` (``[len(layers), T, H, >= n, D]``;
        allocated when None). ``layers`` (default all) selects a contiguous range of layers."""
        layout = self._layout(layout)
        root = self.root(namespace, layout)
        return self.get_keys(chunk_keys(root, as_tokens(tokens), layout.chunk_tokens), root, out, layers, layout)

    def get_keys(self, keys: Sequence[bytes], root: bytes, out: torch.Tensor | list[torch.Tensor] | None = None,
                 layers: range | None = None, layout: KVLayout | None = None) -> GetResult:
        """Like :meth:`get` for chunk keys whose first parent is ``root``; ValueError when the cached ones are not
        such a chain (another root, keys out of order): a copy's parent would not match, and that is no reason to
        drop it as corrupt. ``out`` may also be one tensor per key, chunk ``i`` going to ``out[i]``
        (``[len(layers), T, H, C, D]``)."""
        layout = self._layout(layout)
        layers = layout.check_layers(layers)
        C = layout.chunk_tokens
        if isinstance(out, list) and len(out) != len(keys):
            raise LayoutError(f"{len(out)} output tensors for {len(keys)} chunk keys: give one per key")
        with self._lock:
            nodes = self._chain(keys, root)
            if out is None and not self.metadata_only:
                out = torch.empty((len(layers),) + layout.chunk_shape[1:3] + (len(nodes) * C, layout.head_dim),
                                  dtype=layout.torch_dtype)
            if isinstance(out, list):
                for part in out[: len(nodes)]:
                    layout.check_out(part, layers, C)
            elif out is not None:
                layout.check_out(out, layers, len(nodes) * C)
            turn, _ = self.turn_of(nodes[-1] if nodes else None, keys[len(nodes):])
            fetched: list[tuple[Node, int, Chunk]] = []
            parent = root
            for i, node in enumerate(nodes):
                part = out[i] if isinstance(out, list) else None if out is None else out[:, :, :, i * C : (i + 1) * C]
                got = self._fetch(node, parent, part, layers)
                if got is None:
                    break
                fetched.append((node, *got))
                parent = node.key
            self._served(fetched, layers, layout, turn)
        return GetResult(len(fetched) * C, out, [self.tiers[t].name for _, t, _ in fetched],
                         [chunk.layer_xxh3 for _, _, chunk in fetched])

    def borrow_keys(self, keys: Sequence[bytes], root: bytes, layers: range | None = None,
                    layout: KVLayout | None = None) -> Borrowed | None:
        """Like :meth:`get_keys` without a copy and without waiting: the cached chunks with their KV
        (``[len(layers), T, H, C, D]``) as views of the first tier's own memory, pinned (out of eviction's and
        deletion's reach) until ``Borrowed.release``. None, with nothing read or pinned, when the lock is taken or a
        chunk's copy cannot be viewed in the first tier (:meth:`Tier.view`: a raw chunk in host memory) or fails
        verification there: :meth:`get_keys` then reads it (and drops a bad copy). The views stay valid while pinned
        unless the chunk is dropped anyway (its prefix found corrupt); the bytes then sent fail the reader's
        checksums."""
        layout = self._layout(layout)
        layers = layout.check_layers(layers)
        if not self._lock.acquire(blocking=False):
            return None
        try:
            nodes = self._chain(keys, root)
            fetched: list[tuple[Node, int, Chunk]] = []
            parent = root
            for node in nodes:
                chunk = self.tiers[0].view(node.key, layers) if node.tiers & 1 else None
                if chunk is None or not _verified(chunk, parent, node.key):
                    return None
                fetched.append((node, 0, chunk))
                parent = node.key
            self._served(fetched, layers, layout, self.turn_of(nodes[-1] if nodes else None, keys[len(nodes):])[0])
            for node in nodes:
                node.pins += 1
        finally:
            self._lock.release()
        return Borrowed(len(nodes) * layout.chunk_tokens, [chunk for _, _, chunk in fetched],
                        [self.tiers[0].name] * len(nodes), partial(self._unpin, nodes))

    def _chain(self, keys: Sequence[bytes], root: bytes) -> list[Node]:
        """The cached run of ``keys``' leading chunks, checked to hang from ``root`` (ValueError otherwise)."""
        nodes = self.index.match(keys)
        expected = root
        for node in nodes:
            parent = node.parent.key if node.parent is not None else root_key(node.layout, node.namespace)
            if parent != expected:
                raise ValueError(f"chunk {node.key.hex()} is cached under {parent.hex()}, not under "
                                 f"{expected.hex()}: the keys are not a chain from root {root.hex()}")
            expected = node.key
        return nodes

    def _served(self, fetched: list[tuple[Node, int, Chunk]], layers: range, layout: KVLayout, turn: int) -> None:
        """Account a get that served ``fetched`` (whose last chunk's turn is ``turn``): touches, promotions, counts."""
        self._after_get(fetched, layers, layout, self.continuation(turn))
        self.counters.gets += 1
        self.counters.get_tokens += len(fetched) * layout.chunk_tokens

    def _unpin(self, nodes: list[Node], wait: bool = True) -> bool:
        """Undo a borrow's pins; False (nothing done) when ``wait=False`` and the lock is taken."""
        if not self._lock.acquire(blocking=wait):
            return False
        try:
            for node in nodes:
                node.pins -= 1
        finally:
            self._lock.release()
        return True

    def put_chunks(self, chunks: Sequence[Chunk], root: bytes, namespace: str = "",
                   layout: KVLayout | None = None, wait: bool = True, lent: Sequence[torch.Tensor] = (),
                   headroom: int = 0) -> PutResult | None:
        """Store a chain of chunks built elsewhere (e.g. received by the service). Each chunk's parent must be
        the previous chunk's key (the first's: ``root`` or a cached chunk) and its key ``H(parent || tokens)``.
        Chunks whose KV lies in bytes from :meth:`lend` are taken over; of ``lent`` (bytes lent for this put),
        the rest is given back. Then, unless the put was refused, the first tier evicts until it could lend
        ``headroom`` bytes again (the next put of this size is received in place; a lend itself never evicts).

        ``wait=False``: None (and nothing done) when the lock is taken or the put might do I/O: a chunk not in
        lent bytes, a write-through tier, or the namespace's quota to make room in; the headroom is then
        made by evicting only chunks that need no demotion.
        """
        layout = self._layout(layout)
        if wait:  # the summaries a disk or Redis tier needs are made outside the lock
            return self._put_lent(list(chunks), root, namespace, layout, lent, headroom, demote=True)
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if not self._in_memory_only(chunks, namespace, layout):
                return None
            return self._put_lent(list(chunks), root, namespace, layout, lent, headroom, demote=False)
        finally:
            self._lock.release()

    def lend(self, nbytes: int, layout: KVLayout | None = None, wait: bool = True) -> torch.Tensor | None:
        """``nbytes`` bytes (uint8 ``[nbytes]``) of the first tier's free memory to receive a raw blob of
        ``layout`` into, with room for its key summary after them; :meth:`put_chunks` of a chunk whose KV lies
        there stores it without a copy. Nothing is evicted for it: None when ``nbytes`` cannot be a raw blob of
        ``layout``, the first tier cannot lend (not a CPU memory tier with the raw codec) or has no free extent
        that large, and with ``wait=False`` when the lock is taken. Bytes no put takes over go back through
        :meth:`take_back`, or through the put they were lent for."""
        layout = self._layout(layout)
        if not layout.chunk_bytes <= nbytes <= max_blob_bytes(layout) or not self._lock.acquire(blocking=wait):
            return None  # not the size of a raw blob of this layout
        try:
            return self.tiers[0].lend(nbytes, layout)
        finally:
            self._lock.release()

    def take_back(self, buffers: Sequence[torch.Tensor]) -> None:
        """Return bytes from :meth:`lend` that no put took over."""
        with self._lock:
            for b in buffers:
                self.tiers[0].take_back(b)

    def _put_lent(self, chunks: list[Chunk], root: bytes, namespace: str, layout: KVLayout,
                  lent: Sequence[torch.Tensor], headroom: int, demote: bool) -> PutResult:
        """Put ``chunks``, give back the lent bytes none of them took over, and (after a put that was not refused)
        evict until ``headroom`` bytes could be lent again, never the put's own chunks: what it reports stored
        stays stored."""
        stored = False
        try:
            result = self._put_verified(chunks, root, namespace, layout)
            stored = True
            return result
        finally:
            with self._lock:
                self.take_back(lent)
                room = self.tiers[0].lend_nbytes(headroom, layout) if headroom and stored else 0
                if room and room <= self.tiers[0].capacity_bytes:
                    with _pinned(self.index.match([c.key for c in chunks])):  # what this put stored
                        self._make_room(0, room, demote)

    def _in_memory_only(self, chunks: Sequence[Chunk], namespace: str, layout: KVLayout) -> bool:
        """Whether a put of ``chunks`` surely writes to the first tier's lent bytes only (and evicts nothing for a
        quota)."""
        quota = self.quotas.get(namespace)
        return (not any(self.write_through[1:])
                and all(c.kv is not None and self.tiers[0].lent(c.kv) for c in chunks)
                and (quota is None or self.namespace_bytes.get(namespace, 0) + len(chunks) * layout.chunk_bytes <= quota))

    def _put_verified(self, chunks: list[Chunk], root: bytes, namespace: str, layout: KVLayout) -> PutResult:
        if root != self.root(namespace, layout):
            raise ValueError(f"root {root.hex()} is not the root of namespace {namespace!r} and layout "
                             f"{layout.fingerprint}")
        self._cached_parent(chunks, root, namespace, layout)  # fails fast; checked again under the lock
        check_chain(chunks, layout, with_kv=not self.metadata_only)
        if not self.metadata_only:
            for c in chunks:
                self._check_kv(c.kv)
        return self._put_chain(list(chunks), root, layout, namespace, len(chunks))

    def put_keys(self, keys: Sequence[bytes], root: bytes, namespace: str = "", layout: KVLayout | None = None) -> PutResult:
        """Metadata-only: store chunks known only by their chained keys (e.g. a trace's block hashes)."""
        if not self.metadata_only:
            raise ValueError("put_keys is for metadata-only stores; put chunks with their KV otherwise")
        layout = self._layout(layout)
        chunks = [Chunk(k, keys[i - 1] if i else root, None) for i, k in enumerate(keys)]
        return self._put_chain(chunks, root, layout, namespace, len(chunks))

    def pin(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> int:
        """Protect the full chunks of ``tokens`` from eviction and deletion, those cached now and those put
        later, until :meth:`unpin` of the same tokens; returns the chunks cached (and pinned) now. Pins nest."""
        keys = tuple(self.keys(tokens, namespace, layout))
        with self._lock:
            self._pinned_prompts[keys] += 1
            self._pins.update(keys)
            nodes = self.index.match(keys)
            for n in nodes:
                n.pins += 1
            return len(nodes)

    def unpin(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> int:
        """Undo one :meth:`pin` of the same ``tokens`` (nothing when they are not pinned: another prompt's pins
        on the same chunks stay); returns the cached chunks it unpinned."""
        keys = tuple(self.keys(tokens, namespace, layout))
        with self._lock:
            if not self._pinned_prompts[keys]:
                return 0
            _decrement(self._pinned_prompts, [keys])
            _decrement(self._pins, keys)  # drops the keys no pin covers any more
            nodes = self.index.match(keys)
            for n in nodes:
                n.pins -= 1
            return len(nodes)

    def delete(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> int:
        """Delete the last full chunk of ``tokens`` and everything cached below it (its subtree), except
        pinned chunks and their ancestors; returns the number of chunks deleted (0 if it is not cached).
        ``delete(prompt[:chunk_tokens])`` deletes every cached prompt that starts like ``prompt``."""
        keys = self.keys(tokens, namespace, layout)
        with self._lock:
            node = self.index.get(keys[-1]) if keys else None
            return self._delete_subtree(node) if node is not None else 0

    def delete_namespace(self, namespace: str) -> int:
        """Delete every unpinned chunk of a namespace; returns how many."""
        with self._lock:
            roots = [n for n in self.index.nodes.values() if n.parent is None and n.namespace == namespace]
            return sum(self._delete_subtree(n) for n in roots)

    def set_quota(self, namespace: str, nbytes: int | None) -> None:
        """Limit a namespace to ``nbytes`` of uncompressed KV (None: no limit); its own least valuable
        chunks are dropped to stay under it."""
        with self._lock:
            if nbytes is None:
                self.quotas.pop(namespace, None)
            else:
                self.quotas[namespace] = int(nbytes)

    def summaries(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> list[torch.Tensor]:
        """Key summaries (``[L, H, P, 3, D]``: per page min, max, mean) of the cached prefix, without its KV."""
        keys = self.keys(tokens, namespace, layout)
        with self._lock:
            out = []
            for node in self.index.match(keys):
                t = _lowest_bit(node.tiers)
                s = self._summary(node, t)
                if s is None and self.keep_summaries and node.tiers >> t & 1 and self.tiers[t].summary_on_demand:
                    s = self._summary_from_kv(node, t)
                if s is None:
                    break
                out.append(s)
            return out

    def prefetch(self, tokens: TokenLike, namespace: str = "", layout: KVLayout | None = None) -> int:
        """Promote the cached prefix of ``tokens`` to the first tier; returns the chunks now there."""
        layout = self._layout(layout)
        keys = self.keys(tokens, namespace, layout)
        with self._lock:
            nodes = self.index.match(keys)
            promoted = []
            with _pinned(nodes):
                try:
                    parent = self.root(namespace, layout)
                    for node in nodes:
                        if not node.tiers & 1:
                            with self._scratch_for(layout) as buf:
                                got = self._fetch(node, parent, buf, range(layout.num_layers))
                                if got is None or not self._promote(node, got[1], layout, got[0]):
                                    break
                            promoted.append(node)
                        parent = node.key
                    return sum(1 for n in nodes if n.tiers & 1)
                finally:
                    for node in reversed(promoted):
                        self._admit(0, node, layout)

    def stats(self) -> dict:
        """Counters, hit rate and per-tier occupancy."""
        with self._lock:
            c = self.counters
            return {
                "chunks": len(self.index),
                "lookups": c.lookups,
                "lookup_tokens": c.lookup_tokens,
                "hit_tokens": c.hit_tokens,
                "token_hit_rate": c.hit_tokens / c.lookup_tokens if c.lookup_tokens else 0.0,
                "gets": c.gets,
                "get_tokens": c.get_tokens,
                "puts": c.puts,
                "put_chunks": c.put_chunks,
                "put_bytes": c.put_bytes,
                "promotions": c.promotions,
                "demotions": c.demotions,
                "drops": c.drops,
                "verify_failures": c.verify_failures,
                "commit_failures": c.commit_failures,
                "tiers": [
                    {
                        "name": t.name, "kind": type(t).__name__, "codec": t.codec.name,
                        "chunks": len(t), "used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes,
                        "hits": c.tier_hits[t.name], "corrupt": t.stats.corrupt, "evictions": t.stats.evictions,
                        "bytes_read": t.stats.bytes_read, "bytes_written": t.stats.bytes_written,
                    }
                    for t in self.tiers
                ],
                "namespaces": dict(self.namespace_bytes),
            }

    def close(self) -> None:
        """Close every tier, once the operation in progress (if any) is done; first copy down to a persistent
        tier every prefix of chunks held there (:meth:`_persist_prefixes`), so that a restart finds them."""
        with self._lock:
            self._persist_prefixes()
            for t in self.tiers:
                t.close()

    def __enter__(self) -> "TieredStore":
        return self  # ``with TieredStore(...) as store:``, as ``with Client(...) as store:``

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ helpers

    def _layout(self, layout: KVLayout | None) -> KVLayout:
        layout = layout or self.layout
        if layout is None:
            raise LayoutError("no layout given and the store has no default layout")
        if layout.fingerprint not in self.layouts:
            self.attach(layout)
        return layout

    def _tier_names(self, node: Node) -> list[str]:
        return [t.name for i, t in enumerate(self.tiers) if node.tiers >> i & 1]

    def _check_kv(self, kv: torch.Tensor) -> None:
        """KV may come from the CPU, a CUDA device (every tier copies from it: offloading GPU KV to a host or
        disk tier is the common case) or a tier's own device. With a lossy tier it must be finite and within the
        lossy codecs' range: the codec refuses the rest, and it would only find out when the chunk is demoted to
        that tier."""
        allowed = {"cpu", "cuda"} | {getattr(t, "device", torch.device("cpu")).type for t in self.tiers}
        if kv.device.type not in allowed:
            raise LayoutError(f"kv is on {kv.device}; this store takes tensors on {sorted(allowed)}")
        if any(not t.codec.lossless for t in self.tiers) and not largest_magnitude(kv) <= MAX_MAGNITUDE:
            raise LayoutError(f"kv holds inf, nan or values beyond +-{MAX_MAGNITUDE:g}, which the store's lossy tiers "
                              "cannot encode")

    @contextmanager
    def _scratch_for(self, layout: KVLayout) -> Iterator[torch.Tensor | None]:
        """A chunk buffer (``layout.chunk_shape``; None in metadata-only mode) for one move between tiers, from
        the read until the commit: a tier's prepared chunk may still view it. A move that makes room by moving
        another chunk (a demotion that demotes further down, a promotion that demotes) gets a buffer of its own.
        Idle buffers are kept for the ``SCRATCH_LAYOUTS`` layouts that moved chunks last, so that layouts come
        and go without their buffers adding up."""
        if self.metadata_only:
            yield None
            return
        free = self._scratch.get(layout.fingerprint)
        buf = free.pop() if free else torch.empty(layout.chunk_shape, dtype=layout.torch_dtype)
        try:
            yield buf
        finally:
            self._scratch.setdefault(layout.fingerprint, []).append(buf)
            self._scratch.move_to_end(layout.fingerprint)
            while len(self._scratch) > SCRATCH_LAYOUTS:
                self._scratch.popitem(last=False)

    def _cached_parent(self, chunks: Sequence[Chunk], root: bytes, namespace: str, layout: KVLayout) -> Node | None:
        """The node of the first chunk's parent when the chain continues a cached prefix (None when it starts
        at ``root``); ParentMissingError when that parent is not cached in this namespace and layout."""
        if not chunks or chunks[0].parent == root:
            return None
        return self._parent_node(chunks[0].parent, namespace, layout)

    def _parent_node(self, key: bytes, namespace: str, layout: KVLayout) -> Node:
        """The node of ``key`` if it is cached in ``namespace`` and ``layout``; ParentMissingError otherwise."""
        node = self.index.get(key)
        if node is None or node.namespace != namespace or node.layout != layout.fingerprint:
            raise ParentMissingError(f"parent {key.hex()} is neither the root nor cached in this namespace and layout "
                                     "(never put, or evicted)")
        return node

    def _put_chain(self, chunks: list[Chunk], root: bytes, layout: KVLayout, namespace: str, n_full: int) -> PutResult:
        if any(not self.tiers[i].summary_on_demand for i in self._put_tiers()):
            for chunk in chunks:  # outside the lock, so that concurrent puts overlap; the unlocked peek at the index
                if chunk.key not in self.index:  # costs at worst a summary of a chunk another put stores meanwhile
                    self._summarise(chunk, layout)
        with self._lock:
            nodes = self.index.match([c.key for c in chunks])
            new = chunks[len(nodes):]
            self._check_capacity(len(new), layout)
            parent = nodes[-1] if nodes else None
            if parent is None:
                parent = self._cached_parent(chunks, root, namespace, layout)
            path = list(nodes) + ([parent] if parent is not None and parent not in nodes else [])
            turn, continues = self.turn_of(parent, [c.key for c in new])
            if new or continues:  # a new prompt, or a repeat of a prompt's end (its next turn)
                self._prompts[min(turn, MAX_TURN)] += 1
                if continues:
                    self._continued[min(turn - 1, MAX_TURN)] += 1
            for n in path:
                n.pins += 1
                n.turn = max(n.turn, turn)
            added: list[Node] = []
            try:
                for chunk in new:
                    if not self._quota_room(namespace, layout):
                        break
                    chunk.namespace = namespace
                    tiers_mask = self._store_new(chunk, layout)
                    if not tiers_mask:
                        break
                    if parent is not None and self.index.nodes.get(parent.key) is not parent:
                        for i in range(len(self.tiers)):  # making room found a copy of its prefix corrupt, and the
                            if tiers_mask >> i & 1:  # prefix lost it all: nothing is stored below it
                                self.tiers[i].delete(chunk.key)
                        break
                    node = self.index.add(chunk.key, parent, namespace, layout.fingerprint)
                    node.tiers = tiers_mask
                    node.turn = turn
                    self._dropped_turns.pop(chunk.key, None)
                    node.pins += 1 + self._pins[chunk.key]  # this put's, and those of pinned prompts it continues
                    added.append(node)
                    self.namespace_bytes[namespace] = self.namespace_bytes.get(namespace, 0) + layout.chunk_bytes
                    parent = node
            finally:
                for node in reversed(added):  # deepest first: parents end up newer than children
                    for i in range(len(self.tiers)):
                        if node.tiers >> i & 1:
                            self._admit(i, node, layout)
                for n in path + added:
                    n.pins -= 1
            self.counters.puts += 1
            self.counters.put_chunks += len(added)
            self.counters.put_bytes += len(added) * layout.chunk_bytes
        return PutResult(stored=len(added), present=len(nodes), dropped=n_full - len(nodes) - len(added))

    def _put_tiers(self) -> list[int]:
        """The tiers a put writes to when the first tier takes the chunk."""
        return [0] + [i for i in range(1, len(self.tiers)) if self.write_through[i]]

    def _summarise(self, chunk: Chunk, layout: KVLayout) -> None:
        """Give ``chunk`` its key summary, unless it has one or this store keeps none."""
        if self.keep_summaries and chunk.kv is not None and chunk.summary is None:
            chunk.summary = key_summary(chunk.kv, layout.page_tokens)

    def _prepare(self, t: int, chunk: Chunk, layout: KVLayout) -> Prepared:
        """Encode ``chunk`` for tier ``t``, with its summary first if that tier stores it with the chunk."""
        if not self.tiers[t].summary_on_demand:
            self._summarise(chunk, layout)
        return self.tiers[t].prepare(chunk, layout)

    def _check_capacity(self, n_new: int, layout: KVLayout) -> None:
        if n_new == 0:
            return
        need = [n_new * t.codec.encoded_nbytes(layout.chunk_shape, layout.torch_dtype) for t in self.tiers]
        if all(n > t.capacity_bytes for n, t in zip(need, self.tiers)):
            raise CapacityError(
                f"a put of {n_new} new chunks needs about {min(need)} bytes, more than the capacity of every tier ("
                + ", ".join(f"{t.name}: {t.capacity_bytes}" for t in self.tiers) + "); nothing was stored"
            )

    def _store_new(self, chunk: Chunk, layout: KVLayout) -> int:
        """Commit a new chunk to the first tier that takes it (plus write-through tiers); returns the tier mask."""
        mask = 0
        for i, tier in enumerate(self.tiers):
            if mask and not self.write_through[i]:
                continue
            prepared = self._prepare(i, chunk, layout)
            if not prepared.reserved and (prepared.nbytes > tier.capacity_bytes or not self._make_room(i, prepared.nbytes)):
                continue
            if self._commit(i, prepared):
                mask |= 1 << i
        return mask

    def _admit(self, t: int, node: Node, layout: KVLayout) -> None:
        """Tell tier ``t``'s policy it now holds ``node`` (sized as that tier's encoding of a chunk)."""
        size = self.tiers[t].codec.encoded_nbytes(layout.chunk_shape, layout.torch_dtype)
        self.policies[t].insert(node.key, size, node.depth, self.continuation(node.turn))

    def _commit(self, t: int, prepared) -> bool:
        """Commit to tier ``t``; a tier that fails (disk full, Redis down) just does not take the chunk."""
        try:
            self.tiers[t].commit(prepared)
        except (TierError, OSError) as exc:
            log.warning("tier %s failed to store a chunk: %s", self.tiers[t].name, exc)
            self.counters.commit_failures += 1
            return False
        return True

    def _make_room(self, t: int, nbytes: int, demote: bool = True) -> bool:
        """Evict from tier ``t`` until ``nbytes`` fit; ``demote=False``: only chunks that need no demotion."""
        tier = self.tiers[t]
        candidates = _Candidates(self, t, demote)
        while not tier.can_fit(nbytes):
            key = self.policies[t].victim(candidates)
            if key is None:
                return False
            if not self._evict(self.index.nodes[key], t):
                candidates.failed.add(key)
        return True

    def _evictable(self, key: bytes, t: int) -> bool:
        node = self.index.nodes[key]
        if node.pins or node.has_children_in(1 << t):
            return False
        stays = node.tiers & ~(1 << t) or t + 1 < len(self.tiers)
        return bool(stays) or not node.children

    def _evict(self, node: Node, t: int) -> bool:
        """Take ``node`` out of tier ``t``, demoting it to tier t+1 unless a lower tier has it already.
        Refuses (False) when that would drop from the store a chunk that still has children."""
        kept = node.tiers & ~(1 << t)
        if not node.tiers >> (t + 1) and t + 1 < len(self.tiers) and self._demote(node, t):
            kept = True
        if not node.tiers >> t & 1:
            return True  # found corrupt while demoting: already gone from tier t
        if not kept and node.children:
            return False
        self._drop(node, t)
        self.tiers[t].stats.evictions += 1
        return True

    def _demote(self, node: Node, t: int) -> bool:
        """Copy ``node``'s chunk from tier ``t`` to tier t+1. False when it was not copied; a copy in tier ``t``
        found corrupt on the way is then gone from it too (``node.tiers`` says so)."""
        layout = self.layouts[node.layout]
        with self._scratch_for(layout) as buf:
            if buf is None:
                chunk = Chunk(node.key, b"", None)
            else:
                chunk = self.tiers[t].get(node.key, buf)
                if chunk is None:
                    self._missed(node, t)
                    return False
                chunk.summary = self._summary(node, t)
                if not node.tiers >> t & 1:
                    return False  # its summary was corrupt: the tier deleted the chunk
                chunk.namespace = node.namespace
            target = self.tiers[t + 1]
            prepared = self._prepare(t + 1, chunk, layout)
            if prepared.nbytes > target.capacity_bytes:
                return False
            with _pinned([node]):
                if not self._make_room(t + 1, prepared.nbytes):
                    return False
            if not self._commit(t + 1, prepared):
                return False
        node.tiers |= 1 << (t + 1)
        self._admit(t + 1, node, layout)
        self.counters.demotions += 1
        return True

    def _drop(self, node: Node, t: int) -> None:
        """Remove ``node``'s chunk from tier ``t``."""
        self.tiers[t].delete(node.key)
        self._forget(node, t)

    def _forget(self, node: Node, t: int) -> None:
        """Tier ``t`` no longer holds ``node``; when no tier does, remove it (and what hangs below) from the index."""
        self.policies[t].remove(node.key)
        node.tiers &= ~(1 << t)
        if node.tiers:
            return
        for child in list(node.children or ()):  # a prefix that is gone makes its descendants useless
            self._delete_subtree(child, force=True)
        self.index.remove(node)
        self._dropped_turns[node.key] = node.turn
        while len(self._dropped_turns) > GHOST_FACTOR * max(len(self.index), 1):
            self._dropped_turns.popitem(last=False)
        self.namespace_bytes[node.namespace] -= self.layouts[node.layout].chunk_bytes
        self.counters.drops += 1

    def _delete_subtree(self, top: Node, force: bool = False) -> int:
        """Delete ``top`` and its descendants, deepest first; unless ``force``, pinned chunks and their
        ancestors stay. Returns the number deleted."""
        count = 0
        for node in list(PrefixIndex.subtree(top)):
            if not force and (node.pins or node.children):
                continue
            for t in range(len(self.tiers)):
                if node.tiers >> t & 1:
                    self._drop(node, t)
            count += 1
        return count

    def _quota_room(self, namespace: str, layout: KVLayout) -> bool:
        """Drop the namespace's own chunks until one more fits its quota; False if that is impossible."""
        quota = self.quotas.get(namespace)
        if quota is None:
            return True
        while self.namespace_bytes.get(namespace, 0) + layout.chunk_bytes > quota:
            victim = None
            for t in reversed(range(len(self.tiers))):
                victim = self.policies[t].victim(
                    lambda k: (n := self.index.nodes[k]).namespace == namespace and not n.pins and not n.children)
                if victim is not None:
                    break
            if victim is None:
                return False
            self._delete_subtree(self.index.nodes[victim])
        return True

    def _summary(self, node: Node, t: int) -> torch.Tensor | None:
        """``node``'s key summary from tier ``t`` (a tier that finds it corrupt deletes the chunk: forget it)."""
        summary = self.tiers[t].summary(node.key)
        if summary is None:
            self._missed(node, t)
        return summary

    def _summary_from_kv(self, node: Node, t: int) -> torch.Tensor | None:
        """Compute ``node``'s key summary from its KV in tier ``t`` and keep it there."""
        layout = self.layouts[node.layout]
        with self._scratch_for(layout) as buf:
            if self.tiers[t].get(node.key, buf) is None:
                self._missed(node, t)
                return None
            summary = key_summary(buf, layout.page_tokens)
        self.tiers[t].set_summary(node.key, summary)
        return summary

    def _fetch(self, node: Node, parent: bytes, out: torch.Tensor | None, layers: range) -> tuple[int, Chunk] | None:
        """Read ``node``'s chunk from the fastest tier holding it into ``out`` and verify it: its parent must be
        ``parent`` and its key ``H(parent || tokens)``. A copy that fails is deleted and the next tier tried; so
        is a tier that cannot be read just now, which keeps its copy. Returns ``(tier index, chunk)``, or None
        when no tier gave a good copy."""
        for t, tier in enumerate(self.tiers):
            if not node.tiers >> t & 1:
                continue
            if self.metadata_only:
                return t, Chunk(node.key, parent, None)
            chunk = tier.get(node.key, out, layers)
            if chunk is not None and _verified(chunk, parent, node.key):
                return t, chunk
            if chunk is not None:
                self.counters.verify_failures += 1
                tier.delete(node.key)
            self._missed(node, t)
        return None

    def _missed(self, node: Node, t: int) -> None:
        """After a read of ``node`` from tier ``t`` gave nothing: forget the copy if the tier no longer has it
        (deleted as corrupt, here or by the tier); one that cannot be read just now is kept."""
        if not self.tiers[t].contains(node.key):
            self._forget(node, t)

    def _after_get(self, fetched: list[tuple[Node, int, Chunk]], layers: range, layout: KVLayout,
                   reuse: float) -> None:
        """Touch what was fetched (deepest first) for a request whose prompt is continued with probability
        ``reuse``, and promote chunks that came from a lower tier."""
        for node, t, _ in reversed(fetched):
            self.counters.tier_hits[self.tiers[t].name] += 1
            for i, policy in enumerate(self.policies):
                if node.tiers >> i & 1:
                    policy.touch(node.key, reuse)
        if len(layers) != layout.num_layers:
            return  # a partial fetch cannot be promoted
        promoted = []
        with _pinned(node for node, _, _ in fetched):
            try:
                for node, t, chunk in fetched:
                    if t > 0 and node.key in self.index and self._promote(node, chunk, layout, t):
                        promoted.append(node)
            finally:
                for node in reversed(promoted):  # deepest first, as a put does
                    self._admit(0, node, layout)

    def _promote(self, node: Node, chunk: Chunk, layout: KVLayout, source: int) -> bool:
        """Copy a verified chunk (read from tier ``source``) into tier 0; the caller admits it to tier 0's
        policy (deepest first, once the whole prefix is promoted)."""
        if node.tiers & 1:
            return True
        chunk.namespace = node.namespace
        if self.keep_summaries:
            chunk.summary = self._summary(node, source)
            if not node.tiers >> source & 1:
                return False  # its summary was corrupt: the source tier deleted the chunk
        top = self.tiers[0]
        prepared = self._prepare(0, chunk, layout)
        if prepared.nbytes > top.capacity_bytes or not self._make_room(0, prepared.nbytes):
            return False
        if not self._commit(0, prepared):
            return False
        node.tiers |= 1
        self.counters.promotions += 1
        return True

    def _persist_prefixes(self) -> None:
        """Copy down to a persistent tier every chunk that only faster tiers hold but that has a descendant in a
        persistent tier (without write-through, a hot prefix stays in memory while its continuations are demoted):
        a restart rebuilds the index by walking down from each prompt's first chunk, and would delete those
        descendants as orphans. Best effort, and it evicts nothing (every chunk is pinned meanwhile: making room
        could drop the very ancestors the walk needs): a chunk that finds no free room is logged."""
        persistent = sum(1 << t for t, tier in enumerate(self.tiers) if tier.persistent)
        if not persistent or self.metadata_only:
            return
        needed: set[Node] = set()
        for node in sorted(self.index.nodes.values(), key=lambda n: -n.depth):  # children before their parents
            kept = node.tiers & persistent or node in needed
            if kept and node.parent is not None and not node.parent.tiers & persistent:
                needed.add(node.parent)
        with _pinned(self.index.nodes.values()):
            for node in sorted(needed, key=lambda n: n.depth):
                while not node.tiers & persistent:
                    t = node.tiers.bit_length() - 1  # the slowest tier holding it
                    if t + 1 == len(self.tiers) or not self._demote(node, t):
                        log.warning("chunk %s could not be written to a persistent tier: the chunks below it there "
                                    "will not survive a restart", node.key.hex())
                        break

    def _recover(self) -> None:
        """Rebuild the index from the persistent tiers: walk down from each prompt's first chunk, so a chunk
        whose prefix is lost (an orphan) is never indexed; delete orphans; evict what exceeds a capacity."""
        found: dict[bytes, tuple[Chunk, KVLayout, int]] = {}
        for t, tier in enumerate(self.tiers):
            if tier.persistent:
                for chunk, layout in tier.scan():
                    _, _, mask = found.get(chunk.key, (chunk, layout, 0))
                    found[chunk.key] = (chunk, layout, mask | 1 << t)
        if not found:
            return
        children: dict[bytes, list[bytes]] = {}
        queue: deque[bytes] = deque()
        for key, (chunk, layout, _) in found.items():
            if chunk.parent == root_key(layout.fingerprint, chunk.namespace):
                queue.append(key)
            else:
                children.setdefault(chunk.parent, []).append(key)
        order = []
        while queue:
            key = queue.popleft()
            chunk, layout, mask = found[key]
            self.attach(layout)
            node = self.index.add(key, self.index.get(chunk.parent), chunk.namespace, layout.fingerprint)
            node.tiers = mask
            self.namespace_bytes[chunk.namespace] = self.namespace_bytes.get(chunk.namespace, 0) + layout.chunk_bytes
            order.append(node)
            queue.extend(children.pop(key, ()))
        for orphans in children.values():
            for key in orphans:
                for t in range(len(self.tiers)):
                    if found[key][2] >> t & 1:
                        self.tiers[t].delete(key)
        for node in reversed(order):
            for t, policy in enumerate(self.policies):
                if node.tiers >> t & 1:
                    self._admit(t, node, self.layouts[node.layout])
        for t, tier in enumerate(self.tiers):
            while tier.used_bytes > tier.capacity_bytes:
                key = self.policies[t].victim(lambda k: self._evictable(k, t))
                if key is None or not self._evict(self.index.nodes[key], t):
                    break


def _decrement(counter: Counter, items: Iterable) -> None:
    """Take one off the count of each of ``items``, dropping the counts that reach zero."""
    for item in items:
        counter[item] -= 1
        if not counter[item]:
            del counter[item]


@contextmanager
def _pinned(nodes: Iterable[Node]) -> Iterator[None]:
    """Hold ``nodes`` pinned (out of eviction's and deletion's reach) for the block."""
    held = list(nodes)
    for node in held:
        node.pins += 1
    try:
        yield
    finally:
        for node in held:
            node.pins -= 1


def check_chain(chunks: Sequence[Chunk], layout: KVLayout, with_kv: bool = True) -> None:
    """Raise unless ``chunks`` is a chain of chunks of ``layout``: each one's parent the previous one's key (the
    first's is not checked here), its key ``H(parent || tokens)`` of ``chunk_tokens`` tokens (ValueError) and,
    ``with_kv``, its KV ``[L, T, H, chunk_tokens, D]``, layer checksums and key summary (if any) of the layout
    (LayoutError)."""
    expected = chunks[0].parent if chunks else b""
    for c in chunks:
        if c.parent != expected:
            raise ValueError(f"chunk {c.key.hex()} has parent {c.parent.hex()}, expected {expected.hex()}")
        tokens = as_tokens(c.tokens)
        if len(tokens) != layout.chunk_tokens:
            raise ValueError(f"chunk {c.key.hex()} has {len(tokens)} tokens, the layout needs {layout.chunk_tokens}")
        if chain_key(c.parent, _token_bytes(tokens)) != c.key:
            raise ValueError(f"chunk key {c.key.hex()} is not H(parent || tokens)")
        if with_kv:
            layout.check_kv(c.kv, layout.chunk_tokens, name=f"kv of chunk {c.key.hex()}")
            if c.kv.shape[3] != layout.chunk_tokens:
                raise LayoutError(f"kv of chunk {c.key.hex()} holds {c.kv.shape[3]} tokens, a chunk "
                                  f"{layout.chunk_tokens}")
            if c.layer_xxh3 is not None and len(c.layer_xxh3) != layout.num_layers:
                raise LayoutError(f"chunk {c.key.hex()} carries {len(c.layer_xxh3)} layer checksums for "
                                  f"{layout.num_layers} layers")
            if c.summary is not None and (tuple(c.summary.shape) != layout.summary_shape
                                          or c.summary.dtype != layout.torch_dtype):
                raise LayoutError(f"key summary of chunk {c.key.hex()} is {tuple(c.summary.shape)} "
                                  f"{c.summary.dtype}, the layout's is {layout.summary_shape} {layout.torch_dtype}")
        expected = c.key


def _verified(chunk: Chunk, parent: bytes, key: bytes) -> bool:
    """Whether a copy read for ``key`` under ``parent`` is that chunk: its parent, and ``H(parent || tokens)``."""
    return chunk.parent == parent and chain_key(parent, _token_bytes(chunk.tokens)) == key


def _token_bytes(tokens: np.ndarray) -> memoryview:
    return memoryview(np.ascontiguousarray(tokens, dtype="<i4")).cast("B")


@dataclass
class _Candidates:
    """The chunks tier ``t``'s policy may evict in one :meth:`TieredStore._make_room` (an ``Evictable``):
    evictable, not failed to evict before, and (``demote=False``) held by a lower tier too."""

    store: TieredStore
    t: int
    demote: bool
    failed: set[bytes] = field(default_factory=set)

    def __call__(self, key: bytes) -> bool:
        if key in self.failed or not self.store._evictable(key, self.t):
            return False
        return self.demote or self.t + 1 == len(self.store.tiers) or bool(self.store.index.nodes[key].tiers >> (self.t + 1))

    def held_by_children(self, key: bytes) -> bool:
        return self.store.index.nodes[key].has_children_in(1 << self.t)


def _lowest_bit(mask: int) -> int:
    return (mask & -mask).bit_length() - 1
