"""Small layouts and KV builders shared by the store tests."""

from __future__ import annotations

import numpy as np
import torch

from kvtier.kvstore import HostTier, TieredStore
from kvtier.layout import KVLayout

TINY = KVLayout("tiny", num_layers=2, kv_heads=2, head_dim=8, dtype="float16", chunk_tokens=16, page_tokens=8)


def make_kv(layout: KVLayout, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """Random KV ``[L, T, H, n_tokens, D]`` in the layout's dtype."""
    g = torch.Generator().manual_seed(seed)
    shape = (layout.num_layers, len(layout.tensors), layout.kv_heads, n_tokens, layout.head_dim)
    return torch.randn(shape, generator=g).to(layout.torch_dtype)


def kv_for_tokens(layout: KVLayout, tokens) -> torch.Tensor:
    """KV that is a deterministic function of the token *prefix* (so equal prefixes give equal KV, as in a
    real model): position ``i`` gets values derived from a rolling hash of ``tokens[: i + 1]``."""
    tokens = np.asarray(tokens, dtype=np.int64)
    h = np.cumsum((tokens + 1) * 2654435761 % 1000003) % 9973
    g = torch.tensor(h, dtype=torch.float32)
    base = torch.arange(layout.num_layers * len(layout.tensors) * layout.kv_heads * layout.head_dim, dtype=torch.float32)
    kv = torch.sin(base[:, None] * 0.01 + g[None, :] * 0.1)
    kv = kv.view(layout.num_layers, len(layout.tensors), layout.kv_heads, layout.head_dim, len(tokens))
    return kv.permute(0, 1, 2, 4, 3).contiguous().to(layout.torch_dtype)


def footprint(layout: KVLayout) -> int:
    """Bytes one chunk takes in a HostTier under a TieredStore (KV + summary slot, 256-byte aligned)."""
    tier = HostTier(1 << 20, prefault=False)
    tokens = list(range(layout.chunk_tokens))
    TieredStore([tier], layout=layout).put(tokens, kv_for_tokens(layout, tokens))
    return tier.used_bytes


def lend_size(layout: KVLayout, nbytes: int) -> int:
    """Bytes a HostTier under a TieredStore takes to lend ``nbytes`` for a blob of ``layout``."""
    return TieredStore([HostTier(1 << 20, prefault=False)], layout=layout).tiers[0].lend_nbytes(nbytes, layout)
