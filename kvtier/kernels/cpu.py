"""Sparse attention that is fast on a CPU: per head, query blocks of similar size are processed together;
their keys (whole blocks plus single columns) are gathered into one ``[n, S, D]`` tensor and attended with
two batched matmuls. Nothing of size ``q_len x k_len`` is ever built; work and memory follow the index."""

from __future__ import annotations

import torch

from kvtier.kernels.index import BLOCK, SparseIndex

CHUNK_SCORES = 1 << 20
"""Score entries (floats) of one batched step: a few MB, so that the softmax runs in cache."""


def cpu_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                         scale: float) -> torch.Tensor:
    """Sparse attention over ``index``; same contract and result as ``reference_sparse_attention``.

    q: ``[B, H, q_len, D]``; k, v: ``[B, Hkv, k_len, D]``; computes in float32, returns q's dtype.
    """
    batch, heads, q_len, dim = q.shape
    k_len, group = k.shape[2], heads // k.shape[1]
    num_qb = index.num_q_blocks
    query_pos = (torch.arange(num_qb * BLOCK) + index.prefix).view(num_qb, BLOCK)
    out = torch.empty(batch, heads, num_qb * BLOCK, dim, dtype=torch.float32)
    block_counts = index.block_count.tolist()
    col_counts = index.col_count.tolist()
    for b in range(batch):
        for h in range(heads):
            keys = k[b, h // group].float()
            values = v[b, h // group].float()
            queries = torch.zeros(num_qb * BLOCK, dim)
            queries[:q_len] = q[b, h].float() * scale
            queries = queries.view(num_qb, BLOCK, dim)
            rows_out = out[b, h].view(num_qb, BLOCK, dim)
            bc, cc = block_counts[b][h], col_counts[b][h]
            order = sorted(range(num_qb), key=lambda m: -(bc[m] * BLOCK + cc[m]))
            start = 0
            while start < num_qb:
                width = max(1, bc[order[start]] * BLOCK + cc[order[start]])
                sel = order[start: start + max(1, CHUNK_SCORES // (BLOCK * width))]
                start += len(sel)
                sel_t = torch.tensor(sel)
                key_pos = _key_positions(index, b, h, sel_t, max(bc[m] for m in sel), max(cc[m] for m in sel))
                gather = key_pos.clamp(max=k_len - 1).flatten()
                kg = keys.index_select(0, gather).view(len(sel), -1, dim)
                vg = values.index_select(0, gather).view(len(sel), -1, dim)
                scores = torch.bmm(queries[sel_t], kg.transpose(1, 2))
                scores.masked_fill_(key_pos[:, None, :] > query_pos[sel_t][:, :, None], float("-inf"))
                probs = torch.softmax(scores, dim=-1)
                rows_out[sel_t] = torch.bmm(probs, vg).nan_to_num_(0.0)
    return out[:, :, :q_len].to(q.dtype)


def _key_positions(index: SparseIndex, b: int, h: int, sel: torch.Tensor, max_blocks: int, max_cols: int) -> torch.Tensor:
    """Key positions read by query blocks ``sel`` of (b, h): int64 ``[len(sel), 64 * max_blocks + max_cols]``;
    unused slots hold ``k_len + 2**30`` so that the causal test masks them."""
    unused = index.k_len + (1 << 30)
    blocks = index.block_idx[b, h, sel, :max_blocks].long()
    slots = torch.arange(max_blocks)
    blocks = torch.where(slots < index.block_count[b, h, sel, None], blocks, -1)
    pos = (blocks[:, :, None] * BLOCK + torch.arange(BLOCK)).flatten(1)
    pos = torch.where((blocks[:, :, None] >= 0).expand(-1, -1, BLOCK).flatten(1) & (pos < index.k_len), pos, unused)
    cols = index.col_idx[b, h, sel, :max_cols].long()
    cols = torch.where(torch.arange(max_cols) < index.col_count[b, h, sel, None], cols, unused)
    return torch.cat([pos, cols], dim=1)
