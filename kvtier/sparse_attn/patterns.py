"""The three sparse patterns, each turned into key-block selections (and columns) of the common SparseIndex.

All functions take the query/key lengths of a prefill with a cached prefix (queries are the last ``q_len`` of
``k_len`` positions) and return a bool key-block selection ``[B, H, NQB, NKB]`` (see ``kvtier.kernels.index``).

- A-shape: the first ``sink`` keys plus a window of the ``local`` keys before each query.
- Vertical-slash: given key columns (passed to ``build_index`` as columns) and diagonals ("slashes": offsets
  ``s = query position - key position``); slash ``s`` reads, for each query block, the key blocks holding keys
  ``p - s`` for the block's rows ``p``.
- Block-sparse: a key-block selection chosen per query block (from ``estimate.py``).
"""

from __future__ import annotations

import torch

from kvtier.kernels.index import BLOCK, SparseIndex, row_positions, build_index


def _num_blocks(q_len: int, k_len: int) -> tuple[int, int]:
    return -(-q_len // BLOCK), -(-k_len // BLOCK)


def a_shape_blocks(batch: int, heads: int, q_len: int, k_len: int, sink: int, local: int,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Key blocks holding a key ``j < sink`` or a key ``p - local < j <= p`` for a row ``p`` of the query block:
    bool ``[B, H, NQB, NKB]``. sink, local in tokens."""
    num_qb, num_kb = _num_blocks(q_len, k_len)
    first, last = row_positions(q_len, k_len, torch.device(device))
    kb = torch.arange(num_kb, device=device)
    window_start = (first - local + 1).clamp(min=0) // BLOCK
    sel = (kb * BLOCK < sink) | ((kb >= window_start[:, None]) & (kb * BLOCK <= last[:, None]))
    return sel.expand(batch, heads, num_qb, num_kb)


def slash_blocks(offsets: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor:
    """Key blocks the diagonals read. offsets: int ``[B, H, S]`` (the same for every query block) or
    ``[B, H, NQB, S]`` (per query block), ``-1`` = unused; returns bool ``[B, H, NQB, NKB]``."""
    num_qb, num_kb = _num_blocks(q_len, k_len)
    first, last = row_positions(q_len, k_len, offsets.device)
    s = offsets.long() if offsets.dim() == 4 else offsets.long()[:, :, None, :]  # [B, H, NQB or 1, S]
    hi = last[:, None] - s  # [B, H, NQB, S]: key of the last row
    used = (s >= 0) & (hi >= 0)
    lo_block = torch.where(used, (first[:, None] - s).clamp(min=0) // BLOCK, num_kb)
    hi_block = torch.where(used, hi // BLOCK, num_kb)
    sel = torch.zeros(*hi.shape[:3], num_kb + 1, dtype=torch.bool, device=offsets.device)
    sel.scatter_(-1, lo_block, True)
    sel.scatter_(-1, hi_block, True)
    return sel[..., :num_kb]


def a_shape_index(batch: int, heads: int, q_len: int, k_len: int, sink: int, local: int,
                  device: torch.device | str = "cpu") -> SparseIndex:
    """The SparseIndex of A-shape for every head."""
    return build_index(a_shape_blocks(batch, heads, q_len, k_len, sink, local, device), None, q_len, k_len)


def vertical_slash_index(columns: torch.Tensor, offsets: torch.Tensor, q_len: int, k_len: int) -> SparseIndex:
    """The SparseIndex of vertical columns ``[B, H, C]`` and slash offsets ``[B, H, S]`` (``-1`` = unused), or
    both per query block (``[B, H, NQB, C]``, ``[B, H, NQB, S]``)."""
    return build_index(slash_blocks(offsets, q_len, k_len), columns, q_len, k_len)


def block_sparse_index(block_mask: torch.Tensor, q_len: int, k_len: int) -> SparseIndex:
    """The SparseIndex of a key-block selection ``[B, H, NQB, NKB]``."""
    return build_index(block_mask, None, q_len, k_len)
