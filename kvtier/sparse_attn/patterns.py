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
    """Key blocks the diagonals read. offsets: int ``[B, H, S]`` or ``[B, H, 1, S]`` (the same for every query
    block) or ``[B, H, NQB, S]`` (per query block), ``-1`` = unused; returns bool ``[B, H, NQB, NKB]``.

    Diagonals shared by every query block are a band: full query block ``m`` reads key blocks ``m - d`` for a
    set of block distances ``d`` that does not depend on ``m``, so the selection is one row of distances seen
    through a strided view, not a ``[NQB, S]`` computation (the last, possibly short, block is computed apart).
    """
    num_qb, num_kb = _num_blocks(q_len, k_len)
    first, last = row_positions(q_len, k_len, offsets.device)
    s = offsets.long() if offsets.dim() == 4 else offsets.long()[:, :, None, :]  # [B, H, NQB or 1, S]
    if s.shape[2] > 1:
        return _slash_rows(s, first, last, num_kb)
    sel = _slash_band(s[:, :, 0], k_len - q_len, num_qb, num_kb)
    sel[:, :, -1] = _slash_rows(s, first[-1:], last[-1:], num_kb)[:, :, 0]
    return sel


def _slash_rows(s: torch.Tensor, first: torch.Tensor, last: torch.Tensor, num_kb: int) -> torch.Tensor:
    """Key blocks of diagonals ``s`` ``[B, H, N or 1, S]`` for the N query blocks whose first and last absolute
    rows are ``first``, ``last`` ``[N]``: bool ``[B, H, N, NKB]``."""
    hi = last[:, None] - s  # [B, H, N, S]: key of the last row
    used = (s >= 0) & (hi >= 0)
    lo_block = torch.where(used, (first[:, None] - s).clamp(min=0) // BLOCK, num_kb)
    hi_block = torch.where(used, hi // BLOCK, num_kb)
    sel = torch.zeros(*hi.shape[:3], num_kb + 1, dtype=torch.bool, device=s.device)
    sel.scatter_(-1, lo_block, True)
    sel.scatter_(-1, hi_block, True)
    return sel[..., :num_kb]


def _slash_band(s: torch.Tensor, prefix: int, num_qb: int, num_kb: int) -> torch.Tensor:
    """Key blocks of diagonals ``s`` ``[B, H, S]`` for full query blocks: bool ``[B, H, NQB, NKB]``.

    Query block ``m``'s first row ``prefix + 64m`` reads key ``prefix + 64m - s``, in key block ``m - d_lo``
    with ``d_lo = -floor((prefix - s) / 64)``; its last row, key block ``m - d_hi``. A key block before 0 is
    dropped: the diagonal then starts in block 0, which ``m - d_hi`` holds. ``rel[num_kb + d]`` marks the block
    distances; ``sel[m, kb] = rel[num_kb + m - kb]``, read reversed in ``kb`` as a strided view.
    """
    batch, heads = s.shape[:2]
    size = num_qb + num_kb + 1  # distances -num_kb < d < num_qb, then a slot for the unused ones
    rel = torch.zeros(batch, heads, size, dtype=torch.bool, device=s.device)
    for row_offset in (0, BLOCK - 1):
        d = -torch.div(prefix + row_offset - s, BLOCK, rounding_mode="floor")
        rel.scatter_(-1, torch.where((s >= 0) & (d > -num_kb) & (d < num_qb), d + num_kb, size - 1), True)
    reversed_kb = rel.as_strided((batch, heads, num_qb, num_kb), (heads * size, size, 1, 1), rel.storage_offset() + 1)
    return reversed_kb.flip(-1)


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
