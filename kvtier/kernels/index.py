"""The sparse index every pattern produces and every sparse-attention kernel reads.

Queries are the last ``q_len`` of ``k_len`` positions (a cached prefix of ``P = k_len - q_len`` keys comes
first), so local query row ``i`` sits at absolute position ``P + i`` and may see keys ``j <= P + i``.
Query rows are cut into blocks of ``BLOCK = 64`` rows (``NQB = ceil(q_len / 64)``; query block ``m`` holds
local rows ``64m .. 64m+63``); keys into aligned blocks of 64 positions (key block ``b`` holds keys
``64b .. 64b+63``). For every batch row, head and query block the index lists

- ``block_idx[b, h, m, :block_count[b, h, m]]``: key blocks read in full (ascending);
- ``col_idx[b, h, m, :col_count[b, h, m]]``: single key positions read besides (ascending, never inside one
  of the listed blocks).

Entries past the counts are ``-1``. All four tensors are int32; ``block_idx`` is ``[B, H, NQB, MB]`` and
``col_idx`` ``[B, H, NQB, MC]`` with ``MB, MC >= 1``. The attention a query row computes is over the listed keys
that are also causal (``j <= P + i``, ``j < k_len``); a row left with no key outputs zeros.

Pooled keys (optional, per head: ``build_index(..., pool=...)``): every key block that a query block does not
read and that is fully visible to all its rows (``64b + 63 <= P + 64m``) joins its softmax as ONE pseudo-key,
the mean of the block's 64 keys with the mean of its 64 values, its logit raised by ``log(n_b)``, ``n_b`` the
block's keys not read as columns (blocks whose keys are all columns are not pooled): a first-order estimate
of the mass and value of what the query block skips. A head's ``pool_shift`` (``build_index(...,
pool_shift=...)``, default 0) lowers its pooled logits by that many nats (raises them if negative):
``log(n_b) - pool_shift``. Listed per
query block as ``pool_idx [B, H, NQB, MP]`` (key blocks, ascending, ``-1`` past ``pool_count [B, H, NQB]``),
both int32, and ``pool_size`` (float32: the pooled key's weight ``n_b * exp(-pool_shift)``, which the kernels
add to its logit as ``log(pool_size)``; 0 past the count); None when no head pools.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.errors import KVTierError

BLOCK = 64
"""Rows of a query block and keys of a key block."""


class SparseAttentionError(KVTierError, ValueError):
    """Inputs of sparse attention that do not fit together (shapes, devices, dtypes, index, pattern names)."""


@dataclass(frozen=True)
class SparseIndex:
    """Per query block: key blocks read in full plus single key columns. See the module docstring."""

    block_idx: torch.Tensor
    block_count: torch.Tensor
    col_idx: torch.Tensor
    col_count: torch.Tensor
    q_len: int
    k_len: int
    pool_idx: torch.Tensor | None = None
    pool_count: torch.Tensor | None = None
    pool_size: torch.Tensor | None = None

    @property
    def pooled(self) -> bool:
        """Whether some head has pooled keys (``pool_idx``, ``pool_count``, ``pool_size`` are set)."""
        return self.pool_idx is not None

    @property
    def batch(self) -> int:
        return self.block_idx.shape[0]

    @property
    def heads(self) -> int:
        return self.block_idx.shape[1]

    @property
    def num_q_blocks(self) -> int:
        return self.block_idx.shape[2]

    @property
    def prefix(self) -> int:
        """Cached keys before the first query: ``k_len - q_len``."""
        return self.k_len - self.q_len

    @property
    def device(self) -> torch.device:
        return self.block_idx.device

    def row_positions(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute positions of the first and last query row of every query block: two int64 ``[NQB]``."""
        return row_positions(self.q_len, self.k_len, self.device)

    def head_density(self) -> torch.Tensor:
        """Share of the causal (query, key) pairs the index computes, per head: float64 ``[B, H]``. A pooled key
        counts as one key for every row of its query block (so the share can exceed 1 only in theory)."""
        first, last = self.row_positions()
        first, last = first[:, None], last[:, None]
        kb_start = self.block_idx.long() * BLOCK
        kb_end = (kb_start + BLOCK - 1).clamp(max=self.k_len - 1)
        slots = torch.arange(self.block_idx.shape[-1], device=self.device)
        in_blocks = _visible_pairs(kb_start, kb_end, first, last) * (slots < self.block_count[..., None])
        cols = self.col_idx.long()
        slots = torch.arange(self.col_idx.shape[-1], device=self.device)
        in_cols = _visible_pairs(cols, cols, first, last) * (slots < self.col_count[..., None])
        kept = in_blocks.sum((-1, -2)) + in_cols.sum((-1, -2))
        if self.pooled:
            kept = kept + (self.pool_count.long() * (last - first + 1)[:, 0]).sum(-1)
        causal = _visible_pairs(torch.zeros(1, device=self.device, dtype=torch.long),
                                torch.full((1,), self.k_len - 1, device=self.device), first[:, 0], last[:, 0]).sum()
        return kept.double() / causal.double()

    def density(self) -> float:
        """Share of all causal (query, key) pairs the index computes, over every batch row and head."""
        return float(self.head_density().mean())

    def to_mask(self, first_block: int = 0, end_block: int | None = None) -> torch.Tensor:
        """The (query, key) pairs computed, causality applied: bool ``[B, H, rows, k_len]`` for query blocks
        ``first_block .. end_block - 1`` (rows ``64 * first_block`` up to ``min(64 * end_block, q_len)``)."""
        end_block = self.num_q_blocks if end_block is None else end_block
        sel = slice(first_block, end_block)
        b, h, n = self.batch, self.heads, end_block - first_block
        num_kb = -(-self.k_len // BLOCK)
        blocks = torch.zeros(b, h, n, num_kb + 1, dtype=torch.bool, device=self.device)
        slots = torch.arange(self.block_idx.shape[-1], device=self.device)
        valid = slots < self.block_count[:, :, sel, None]
        blocks.scatter_(-1, torch.where(valid, self.block_idx[:, :, sel].long(), num_kb), True)
        keys = blocks[..., :num_kb].repeat_interleave(BLOCK, dim=-1)[..., : self.k_len]
        keys = torch.cat([keys, torch.zeros_like(keys[..., :1])], dim=-1)
        slots = torch.arange(self.col_idx.shape[-1], device=self.device)
        valid = slots < self.col_count[:, :, sel, None]
        keys.scatter_(-1, torch.where(valid, self.col_idx[:, :, sel].long(), self.k_len), True)
        keys = keys[..., : self.k_len]
        rows_end = min(end_block * BLOCK, self.q_len)
        mask = keys.repeat_interleave(BLOCK, dim=2)[:, :, : rows_end - first_block * BLOCK]
        query_pos = torch.arange(first_block * BLOCK, rows_end, device=self.device) + self.prefix
        return mask & (torch.arange(self.k_len, device=self.device)[None, :] <= query_pos[:, None])

    def check(self, batch: int, heads: int, q_len: int, k_len: int, device: torch.device) -> None:
        """Raise SparseAttentionError unless this index is for these shapes and this device."""
        want = (batch, heads, -(-q_len // BLOCK))
        if (self.q_len, self.k_len) != (q_len, k_len) or tuple(self.block_idx.shape[:3]) != want:
            raise SparseAttentionError(
                f"the sparse index is for batch={self.batch}, heads={self.heads}, q_len={self.q_len}, "
                f"k_len={self.k_len}; the inputs have batch={batch}, heads={heads}, q_len={q_len}, k_len={k_len}"
            )
        if self.device != device:
            raise SparseAttentionError(f"the sparse index is on {self.device}; the inputs are on {device}")
        pool = (self.pool_idx, self.pool_count, self.pool_size)
        if self.pooled and (any(t is None for t in pool) or tuple(self.pool_count.shape) != want
                            or self.pool_idx.shape != self.pool_size.shape or tuple(self.pool_idx.shape[:3]) != want):
            raise SparseAttentionError("the sparse index's pooled keys are inconsistent: pool_idx, pool_count and "
                                       f"pool_size must all be set, shaped [{batch}, {heads}, {want[2]}, ...]")

    def to(self, device: torch.device | str) -> "SparseIndex":
        pool = [None if t is None else t.to(device) for t in (self.pool_idx, self.pool_count, self.pool_size)]
        return SparseIndex(self.block_idx.to(device), self.block_count.to(device), self.col_idx.to(device),
                           self.col_count.to(device), self.q_len, self.k_len, *pool)


def row_positions(q_len: int, k_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute positions of the first and last query row of every query block: two int64 ``[NQB]``."""
    num_qb = -(-q_len // BLOCK)
    first = torch.arange(num_qb, device=device) * BLOCK
    last = (first + BLOCK - 1).clamp(max=q_len - 1)
    return first + (k_len - q_len), last + (k_len - q_len)


def _visible_pairs(key_start: torch.Tensor, key_end: torch.Tensor, first: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Pairs (p, j) with ``first <= p <= last``, ``key_start <= j <= key_end`` and ``j <= p`` (broadcasting)."""
    lo = torch.maximum(first, key_start)
    hi = torch.minimum(last, key_end)
    n = (hi - lo + 1).clamp(min=0)
    rising = n * (lo - key_start + 1) + n * (n - 1) // 2
    flat_rows = (last - torch.maximum(first, key_end + 1) + 1).clamp(min=0)
    return rising + flat_rows * (key_end - key_start + 1).clamp(min=0)


def compact(keep: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` where ``keep``, moved to the front in their order: (int32 ``[..., max(1, most kept)]`` -1 padded,
    int32 counts ``[...]``). ``keep`` and ``values`` have the same shape."""
    counts = keep.sum(-1)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    order = torch.sort(keep.to(torch.int8), dim=-1, descending=True, stable=True).indices[..., :width]
    picked = values.gather(-1, order)
    if picked.shape[-1] < width:
        picked = torch.nn.functional.pad(picked, (0, width - picked.shape[-1]), value=-1)
    slots = torch.arange(width, device=keep.device)
    picked = torch.where(slots < counts[..., None], picked, -1)
    return picked.to(torch.int32).contiguous(), counts.to(torch.int32).contiguous()


def build_index(block_mask: torch.Tensor, columns: torch.Tensor | None, q_len: int, k_len: int,
                column_groups: torch.Tensor | None = None, pool: torch.Tensor | None = None,
                pool_shift: torch.Tensor | None = None) -> SparseIndex:
    """The compact SparseIndex of a block selection plus key columns.

    block_mask: bool ``[B, H, NQB, NKB]`` (``NKB = ceil(k_len / 64)``), True = read key block in full.
    columns: int ``[B, H, C]`` (the same columns for every query block) or ``[B, H, NQB, C]``; ``-1`` = unused;
      duplicates allowed. None = no columns.
    column_groups: int64 ``[NQB]``: columns are ``[B, H, NG, C]`` and query block ``m`` reads
      ``columns[:, :, column_groups[m]]`` (sorted once per group, not once per query block).
    pool: bool ``[H]``: heads whose skipped, fully visible key blocks become pooled keys (module docstring);
      None or all False = no pooled keys.
    pool_shift: float ``[H]``: nats taken from the pooled logits of each head (``pool_size = n_b * exp(-shift)``);
      None = 0.
    Blocks and columns past the causal edge of a query block are dropped, and so are columns inside a kept
    block, so the index never counts a key twice.
    """
    if q_len < 1 or k_len < q_len:
        raise SparseAttentionError(f"need 1 <= q_len <= k_len, got q_len={q_len}, k_len={k_len}")
    num_qb, num_kb = -(-q_len // BLOCK), -(-k_len // BLOCK)
    if block_mask.dim() != 4 or block_mask.shape[2:] != (num_qb, num_kb):
        raise SparseAttentionError(
            f"block_mask must be [B, H, {num_qb}, {num_kb}] for q_len={q_len}, k_len={k_len}, "
            f"got {tuple(block_mask.shape)}"
        )
    device = block_mask.device
    first, last = row_positions(q_len, k_len, device)
    kb = torch.arange(num_kb, device=device)
    blocks = block_mask.bool() & (kb * BLOCK <= last[:, None])
    block_idx, block_count = compact(blocks, kb.expand_as(blocks))
    if columns is None:
        columns = torch.full((*block_mask.shape[:2], 1), -1, dtype=torch.long, device=device)
    if columns.dim() == 3:
        columns = columns[:, :, None, :]
    columns = torch.sort(columns.long(), dim=-1).values
    repeated = torch.cat([torch.zeros_like(columns[..., :1], dtype=torch.bool),
                          columns[..., 1:] == columns[..., :-1]], dim=-1)
    if column_groups is not None:
        columns, repeated = columns[:, :, column_groups], repeated[:, :, column_groups]
    shape = (*block_mask.shape[:3], columns.shape[-1])
    columns, repeated = columns.expand(shape), repeated.expand(shape)
    in_block = blocks.gather(-1, columns.clamp(0, k_len - 1) // BLOCK)
    keep = (columns >= 0) & (columns <= last[:, None]) & ~repeated & ~in_block
    col_idx, col_count = compact(keep, columns)
    if pool is None or not bool(pool.any()):
        return SparseIndex(block_idx, block_count, col_idx, col_count, q_len, k_len)
    in_cols = torch.zeros(*blocks.shape[:3], num_kb + 1, dtype=torch.long, device=device)  # columns per key block
    in_cols.scatter_add_(-1, torch.where(keep, columns // BLOCK, num_kb), torch.ones_like(columns))
    size = BLOCK - in_cols[..., :num_kb]  # [B, H, NQB, NKB]
    visible = kb * BLOCK + BLOCK - 1 <= first[:, None]  # [NQB, NKB]: seen by every row of the query block
    pooled = visible & ~blocks & (size > 0) & pool.to(device).view(1, -1, 1, 1)
    pool_idx, pool_count = compact(pooled, kb.expand_as(pooled))
    weight = size.gather(-1, pool_idx.long().clamp(min=0)).float()
    if pool_shift is not None:
        weight = weight * torch.exp(-pool_shift.to(device=device, dtype=torch.float32)).view(1, -1, 1, 1)
    pool_size = torch.where(pool_idx >= 0, weight, 0.0)
    return SparseIndex(block_idx, block_count, col_idx, col_count, q_len, k_len, pool_idx, pool_count, pool_size)


def block_means(x: torch.Tensor) -> torch.Tensor:
    """Float32 means of ``x [B, Hkv, k_len, D]`` over aligned 64-key blocks: ``[B, Hkv, NKB, D]`` (the last,
    possibly short, block over its own keys; it is never pooled). The pooled keys and values of an index."""
    num_kb = -(-x.shape[2] // BLOCK)
    padded = torch.nn.functional.pad(x.float(), (0, 0, 0, num_kb * BLOCK - x.shape[2]))
    sizes = (x.shape[2] - torch.arange(num_kb, device=x.device) * BLOCK).clamp(max=BLOCK)
    return padded.view(*x.shape[:2], num_kb, BLOCK, x.shape[-1]).sum(3) / sizes[:, None]


def dense_index(batch: int, heads: int, q_len: int, k_len: int, device: torch.device | str = "cpu") -> SparseIndex:
    """An index that reads every causal key: sparse attention over it equals dense causal attention."""
    mask = torch.ones(batch, heads, -(-q_len // BLOCK), -(-k_len // BLOCK), dtype=torch.bool, device=device)
    return build_index(mask, None, q_len, k_len)
