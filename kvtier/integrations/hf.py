"""Hugging Face transformers adapter: reuse cached prefixes from a TieredStore, or from the kvtier service
through a :class:`~kvtier.api.client.Client` (the same calls), prefill only the rest.

For a batch of prompts the adapter

1. looks up each prompt's longest cached prefix (whole chunks, at most ``n - 1`` tokens: the last token is
   always computed, so the model yields its logits);
2. chooses one suffix length ``S`` for the batch: the longest uncached suffix. Every row computes its last
   ``S`` tokens and takes the ``n_i - S`` tokens before them from the store (``n_i - S`` is at most what is
   cached for it). Rows are left-padded to a common length ``T``, so the batch is an ordinary left-padded
   batch whose first ``T - S`` positions are already in the cache: the same padding, masks and position ids
   as ``generate`` uses, and no more compute than padding the suffixes would cost (every row computes ``S``
   tokens either way);
3. fetches the prefixes with one ``get`` per prompt (batch 1: into a reused buffer) and rebuilds a
   ``DynamicCache`` from them layer by layer (pad positions hold zeros and are masked out);
4. runs the suffix (``prefill``: one forward, for a plain decode loop; ``generate``: ``model.generate``,
   which skips the cached positions by itself);
5. stores each prompt's new full chunks (``put_chunks``, starting after the fetched ones).

Exactness: the cached KV is the KV the model computed for the same tokens at the same positions, so the
result equals a run without the store up to floating-point summation order (fp32 logits within 1e-4 on
SmolLM2, greedy tokens identical: ``tests/integrations``).

Keys: the layout fingerprint (:func:`model_layout`) names the model id, a digest of its weights, buffers and
config, its attention (dense, or kvtier sparse prefill and its patterns), dtype, shapes and chunk size, so chunks
made by another model, configuration, attention or chunk size are never served. The layout follows the model on
every call: switching sparse prefill on or off, changing the weights in place or the dtype switches the chunks
served (the weights are digested again only when a parameter changed).

``generate`` with several beams or returned sequences repeats the rebuilt cache as ``generate`` repeats the
rows, and stores each prompt's KV from its first row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from kvtier.compression.presses import PRESSED
from kvtier.errors import CapacityError, ParentMissingError, StoreUnavailableError
from kvtier.integrations import require_transformers
from kvtier.kvstore.chunk import Chunk
from kvtier.kvstore.keys import as_tokens
from kvtier.kvstore.store import TieredStore
from kvtier.layout import DTYPES, KVLayout

if TYPE_CHECKING:
    from kvtier.api.client import Client

Prompt = Sequence[int] | torch.Tensor
T = TypeVar("T")
log = logging.getLogger(__name__)


# Config fields that name or run the model without changing what it computes: left out of the digest.
_NOT_COMPUTED = {"_name_or_path", "_commit_hash", "transformers_version", "_attn_implementation",
                 "_attn_implementation_autoset", "use_cache", "output_attentions", "output_hidden_states",
                 "return_dict", "torchscript", "dtype", "torch_dtype"}


def model_digest(model: torch.nn.Module) -> str:
    """16 hex characters of BLAKE2b over every parameter's and buffer's name, shape, dtype and bytes, and the
    text config's fields that change what the model computes (RoPE scaling, norm epsilon, sliding window, ...):
    two checkpoints of one architecture, or one checkpoint loaded with another RoPE configuration, never share
    a digest (about 0.5 s for 135M fp32 parameters)."""
    h = hashlib.blake2b(digest_size=8)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # 0-d too (Gemma)
    config = model.config.get_text_config(decoder=True).to_dict()
    h.update(json.dumps({k: v for k, v in config.items() if k not in _NOT_COMPUTED}, sort_keys=True,
                        default=str).encode())
    return h.hexdigest()


def weights_stamp(model: torch.nn.Module) -> tuple:
    """Cheap evidence that no weight changed since the last stamp (then :func:`model_digest` need not run again):
    per parameter and buffer, its name, shape, dtype, device, storage address and in-place write counter, and a
    digest of 16 of its values. The values catch what the rest misses: a ``.data`` swap or a ``model.to()``
    round trip counts no in-place write, and the new storage may reuse the old address."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    meta = tuple((n, tuple(t.shape), t.dtype, t.device, t.data_ptr(), t._version) for n, t in tensors)
    with torch.no_grad():
        samples = [t.detach().reshape(-1)[:: max(1, t.numel() // 16)][:16].float() for _, t in tensors if t.numel()]
    values = torch.cat(samples).cpu().numpy().tobytes() if samples else b""
    return meta, hashlib.blake2b(values, digest_size=16).digest()


def attention_tag(model: torch.nn.Module) -> str:
    """``""`` for the model's own attention; ``"+sparse@<digest>"`` while kvtier sparse prefill is on (its KV is
    an approximation, never to be served to a dense run), the digest covering every layer's head patterns and
    the prefill length from which they apply."""
    from kvtier.sparse_attn.integration import sparse_state

    layers = [None if s is None or s.patterns is None else (s.patterns, s.min_tokens) for s in sparse_state(model)]
    if not any(layers):
        return ""  # dense (an observer alone attends densely)
    return f"+sparse@{hashlib.blake2b(repr(layers).encode(), digest_size=4).hexdigest()}"


def model_layout(model: torch.nn.Module, chunk_tokens: int = 256, model_id: str | None = None,
                 digest: str | None = None) -> KVLayout:
    """The KVLayout of a decoder-only transformers model: ``model_id`` (default: the last part of the
    config's name or path) plus :func:`model_digest` (``digest``, when the caller has it) and
    :func:`attention_tag`, layers, KV heads, head_dim, the model's dtype and ``chunk_tokens``."""
    cfg = model.config.get_text_config(decoder=True)
    dtype = next(name for name, d in DTYPES.items() if d == model.dtype)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    name = model_id or Path(getattr(model.config, "_name_or_path", "")).name or cfg.model_type
    page = min(32, chunk_tokens & -chunk_tokens)  # a power of two that divides chunk_tokens
    return KVLayout(f"{name}@{digest or model_digest(model)}{attention_tag(model)}", num_layers=cfg.num_hidden_layers,
                    kv_heads=kv_heads, head_dim=head_dim, dtype=dtype, chunk_tokens=chunk_tokens, page_tokens=page)


def _set_layer(cache, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make ``keys``/``values`` (``[B, H, N, D]``) layer ``layer``'s cached KV. A full-attention
    ``DynamicLayer`` takes the tensors as they are (``update`` would copy them into a fresh allocation: at 4k
    tokens of SmolLM2 that is 188 MB of page faults per request); other layer kinds go through ``update``."""
    from transformers.cache_utils import DynamicLayer

    target = cache.layers[layer]
    if type(target) is DynamicLayer and not target.is_initialized:
        target.lazy_initialization(keys, values)
        target.keys, target.values = keys, values
    else:
        cache.update(keys, values, layer)


@dataclass
class Loaded:
    """A batch ready for its suffix: ``input_ids``/``attention_mask`` ``[B, T]`` (left-padded), ``cache``
    holding positions ``[0, T - suffix)``, ``reused[i]`` tokens of prompt ``i`` taken from the store,
    ``fetched[i]`` tokens fetched for it (whole chunks, >= reused), ``tiers[i]`` the tier of each chunk."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    cache: object
    reused: list[int]
    suffix: int
    fetched: list[int]
    tiers: list[list[str]]
    layout: KVLayout  # of the attention the batch is run with

    @property
    def position_ids(self) -> torch.Tensor:
        """``[B, T]``: 0.. along each prompt's real tokens (1 on padding), as ``generate`` computes them."""
        return (self.attention_mask.long().cumsum(-1) - 1).masked_fill(self.attention_mask == 0, 1)


@dataclass
class Prefilled:
    """``logits``: ``[B, suffix, vocab]`` for the last ``suffix`` positions of the padded batch."""

    loaded: Loaded
    logits: torch.Tensor
    cache: object


class HFKVCache:
    """Serve a transformers causal LM's prompts from a TieredStore or a service's Client (see the module
    docstring). With a Client, ``namespace`` must be ``""``: the API key names the tenant."""

    def __init__(self, model: torch.nn.Module, store: TieredStore | Client, chunk_tokens: int = 256,
                 namespace: str = "", model_id: str | None = None, pad_token_id: int = 0) -> None:
        require_transformers()
        self.model = model
        self.store = store
        self.namespace = namespace
        self.chunk_tokens = chunk_tokens
        self.model_id = model_id
        self._stamp: tuple = ()
        self._digest = ""
        self._layouts: dict[tuple[str, torch.dtype], KVLayout] = {}  # by attention tag and dtype
        self.pad_token_id = pad_token_id
        self._buffer: torch.Tensor | None = None
        self.timings: dict[str, float] = {}

    @property
    def layout(self) -> KVLayout:
        """The layout of the model as it is now: its weights (digested again when :func:`weights_stamp` says a
        parameter or buffer may have changed), dtype and attention (:func:`attention_tag`); attached on first use."""
        stamp = weights_stamp(self.model)
        if stamp != self._stamp:
            self._digest, self._stamp = model_digest(self.model), stamp
            self._layouts.clear()
        which = (attention_tag(self.model), self.model.dtype)
        layout = self._layouts.get(which)
        if layout is None:
            layout = model_layout(self.model, self.chunk_tokens, self.model_id, self._digest)
            self._unless_unavailable(lambda: self.store.attach(layout), None)  # a Client attaches on first use too
            self._layouts[which] = layout
        return layout

    # ------------------------------------------------------------------ load

    def load(self, prompts: Sequence[Prompt]) -> Loaded:
        """Look up and fetch the cached prefixes of ``prompts`` and build the batch and its cache. For one
        prompt the cache views this adapter's fetch buffer until its first forward: run it before the next
        ``load`` (:meth:`prefill` and :meth:`generate` do). A store that cannot answer (a service down) is a miss:
        the model computes the whole prompt, and a warning is logged."""
        from transformers import DynamicCache

        start = time.perf_counter()
        ids = [as_tokens(p) for p in prompts]
        if not ids or any(len(p) == 0 for p in ids):
            raise ValueError("give at least one prompt, each of at least one token")
        vocab = self.model.get_input_embeddings().num_embeddings
        for i, top in enumerate(int(p.max()) for p in ids):
            if top >= vocab:
                raise ValueError(f"prompt {i} holds token id {top}, beyond the model's vocabulary of {vocab}")
        if self.pad_token_id >= vocab:
            raise ValueError(f"pad_token_id {self.pad_token_id} is beyond the model's vocabulary of {vocab}")
        layout = self.layout
        C = layout.chunk_tokens
        cached = [min(self._unless_unavailable(lambda: self.store.lookup(p, self.namespace, layout).tokens, 0),
                      len(p) - 1) for p in ids]
        suffix = max(len(p) - c for p, c in zip(ids, cached))
        wanted = [max(0, len(p) - suffix) for p in ids]
        fetched, tiers, buffers = [], [], []
        for p, w in zip(ids, wanted):
            n = -(-w // C) * C
            out = self._scratch(n, layout) if len(ids) == 1 else None
            got = self._unless_unavailable(
                lambda: self.store.get(p[:n], out=out, namespace=self.namespace, layout=layout), None) if n else None
            fetched.append(got.tokens if got else 0)
            tiers.append(got.tiers if got else [])
            buffers.append(got.kv if got else None)
        if any(f < w for f, w in zip(fetched, wanted)):  # a chunk vanished or failed verification meanwhile
            suffix = max(len(p) - min(f, len(p) - 1) for p, f in zip(ids, fetched))
            wanted = [max(0, len(p) - suffix) for p in ids]
        total = max(len(p) for p in ids)
        prefix = total - suffix
        batch = len(ids)
        input_ids = torch.full((batch, total), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((batch, total), dtype=torch.long)
        for i, p in enumerate(ids):
            input_ids[i, total - len(p):] = torch.from_numpy(p.astype(np.int64))
            mask[i, total - len(p):] = 1
        cache = DynamicCache(config=self.model.config)
        if prefix:
            L, _, H, _, D = layout.chunk_shape
            for layer in range(L):
                if batch == 1:  # no padding: views of the fetch buffer
                    kv = buffers[0][layer, :, :, :prefix].unsqueeze(1)
                else:
                    kv = torch.zeros((2, batch, H, prefix, D), dtype=layout.torch_dtype)
                    for i, (buf, w) in enumerate(zip(buffers, wanted)):
                        if w:
                            kv[:, i, :, prefix - w:] = buf[layer, :, :, :w]
                _set_layer(cache, layer, kv[0], kv[1])
        self.timings["load_s"] = time.perf_counter() - start
        return Loaded(input_ids, mask, cache, wanted, suffix, fetched, tiers, layout)

    def _scratch(self, tokens: int, layout: KVLayout) -> torch.Tensor:
        """A reused fetch buffer ``[L, T, H, >= tokens, D]``: allocating (and page-faulting) hundreds of MB per
        request costs more than the copy. A batch-1 cache from :meth:`load` holds views of it until its first
        forward (which concatenates into new tensors), so run it before the next ``load``."""
        L, T, H, _, D = layout.chunk_shape
        b = self._buffer
        if b is None or b.shape[3] < tokens or b.dtype != layout.torch_dtype or (*b.shape[:3], b.shape[4]) != (L, T, H, D):
            self._buffer = torch.empty((L, T, H, tokens, D), dtype=layout.torch_dtype)
        return self._buffer

    # ------------------------------------------------------------------ run

    @torch.no_grad()
    def prefill(self, prompts: Sequence[Prompt], store: bool = True) -> Prefilled:
        """Load, then one forward over the suffix; the returned cache continues a plain decode loop (feed the
        next tokens with ``attention_mask`` extended by ones and ``position_ids`` continuing each row)."""
        loaded = self.load(prompts)
        start = time.perf_counter()
        s = loaded.suffix
        out = self.model(input_ids=loaded.input_ids[:, -s:], attention_mask=loaded.attention_mask,
                         position_ids=loaded.position_ids[:, -s:], cache=loaded.cache, use_cache=True)
        self.timings["prefill_s"] = time.perf_counter() - start
        if store:
            self.store_prompts(prompts, out.cache, loaded)
        return Prefilled(loaded, out.logits, out.cache)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Prompt], store: bool = True, **kwargs):
        """``model.generate`` on the left-padded batch with the rebuilt cache; returns its output (pass
        ``return_dict_in_generate=True`` for scores) and the :class:`Loaded` batch. The prompts' new chunks
        are stored afterwards."""
        loaded = self.load(prompts)
        kwargs.setdefault("pad_token_id", self.pad_token_id)
        config = kwargs.get("generation_config") or self.model.generation_config
        copies = max(kwargs.get("num_beams") or config.num_beams or 1,
                     kwargs.get("num_return_sequences") or config.num_return_sequences or 1)
        if copies > 1 and loaded.suffix < loaded.input_ids.shape[1]:  # generate repeats each row, not a cache
            loaded.cache.batch_repeat_interleave(copies)
        out = self.model.generate(input_ids=loaded.input_ids, attention_mask=loaded.attention_mask,
                                  cache=loaded.cache, **kwargs)
        if store:
            self.store_prompts(prompts, loaded.cache, loaded)
        return out, loaded

    # ------------------------------------------------------------------ store

    def store_prompts(self, prompts: Sequence[Prompt], cache, loaded: Loaded | None = None) -> int:
        """Put the new full chunks of every prompt, read from ``cache``: laid out as in ``loaded``, or (None)
        row ``i`` holding prompt ``i`` from position 0; a cache of ``k`` rows per prompt (beams, several returned
        sequences) holds prompt ``i`` in row ``i * k``. Best effort: a prompt the store cannot hold (a
        CapacityError) is skipped, and nothing is stored while the store is unavailable (a service down: logged).
        Returns the number of chunks stored."""
        start = time.perf_counter()
        layout = self.layout if loaded is None else loaded.layout  # the attention that computed the KV
        C = layout.chunk_tokens
        rows = cache.layers[0].keys.shape[0]
        if rows % len(prompts):
            raise ValueError(f"a cache of {rows} rows does not hold {len(prompts)} prompts")
        if getattr(cache, PRESSED, False):
            raise ValueError("this cache was compressed by a press: its positions no longer hold the prompt's tokens, "
                             "and its KV is not the model's for them; it cannot be stored")
        lengths = {layer.keys.shape[2] for layer in cache.layers}
        prompt_ids = [as_tokens(p) for p in prompts]
        width = max(map(len, prompt_ids)) if loaded is None else loaded.input_ids.shape[1]
        if len(lengths) != 1 or min(lengths) < width:
            raise ValueError(f"the cache holds {sorted(lengths)} positions per layer, the prompts need {width} in "
                             "every layer (a cropped or compressed cache cannot be stored)")
        per = rows // len(prompts)
        stored = 0
        try:
            root = self.store.root(self.namespace, layout)
            for i, ids in enumerate(prompt_ids):
                keys = self.store.keys(ids, self.namespace, layout)
                first = 0 if loaded is None else min(loaded.fetched[i] // C, len(keys))
                pad = 0 if loaded is None else loaded.input_ids.shape[1] - len(ids)
                chunk = partial(self._chunk, cache, i * per, pad, ids, keys, root=root, layout=layout)
                chunks = [chunk(j) for j in range(first, len(keys))]
                if not chunks:
                    continue
                try:
                    try:
                        stored += self.store.put_chunks(chunks, root, self.namespace, layout).stored
                    except ParentMissingError:  # the fetched prefix was evicted meanwhile: store from the start
                        stored += self.store.put_chunks([chunk(j) for j in range(len(keys))], root, self.namespace,
                                                        layout).stored
                except CapacityError as exc:
                    log.warning("prompt %d of %d tokens not stored: %s", i, len(ids), exc)
        except StoreUnavailableError as exc:
            log.warning("kvtier store unavailable, prompts not stored: %s", exc)
        self.timings["store_s"] = time.perf_counter() - start
        return stored

    @staticmethod
    def _unless_unavailable(call: Callable[[], T], default: T) -> T:
        """``call()``, or ``default`` (logged) while the store cannot answer (a service down): a miss."""
        try:
            return call()
        except StoreUnavailableError as exc:
            log.warning("kvtier store unavailable, the model runs without it: %s", exc)
            return default

    def _chunk(self, cache, row: int, pad: int, ids: np.ndarray, keys: list[bytes], j: int, root: bytes,
               layout: KVLayout) -> Chunk:
        """Chunk ``j`` of prompt ``row`` (left-padded by ``pad``): its KV ``[L, 2, H, C, D]`` copied from ``cache``."""
        C = layout.chunk_tokens
        a, b = pad + j * C, pad + (j + 1) * C
        kv = torch.stack([torch.stack((layer.keys[row, :, a:b], layer.values[row, :, a:b])) for layer in cache.layers])
        return Chunk(keys[j], keys[j - 1] if j else root, ids[j * C : (j + 1) * C], kv.to(layout.torch_dtype))
