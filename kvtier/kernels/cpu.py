"""Sparse attention that is fast on a CPU.

Per head, the query blocks are sorted by how many keys they read and processed in groups of similar size:
their keys (whole blocks plus single columns) are gathered into one ``[n, S, D]`` tensor and attended with
two batched matmuls and one softmax. Nothing of size ``q_len x k_len`` is built; work follows the index.
Two things keep it fast: every big intermediate lives in a buffer allocated once per call (fresh large
allocations cost page faults that are slower than the arithmetic), and the causal mask is applied only to
the slots that can need it (the last two key blocks of each query block and the columns).
"""

from __future__ import annotations

import torch

from kvtier.kernels.index import BLOCK, SparseIndex

CHUNK_SCORES = 1 << 20
"""Score entries of one batched step: 4 MB of float32, so the softmax runs in cache."""


def cpu_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                         scale: float) -> torch.Tensor:
    """Sparse attention over ``index``; same contract and result as ``reference_sparse_attention``.

    q: ``[B, H, q_len, D]``; k, v: ``[B, Hkv, k_len, D]``; computes in float32, returns q's dtype.
    """
    batch, heads, q_len, dim = q.shape
    group = heads // k.shape[1]
    num_qb = index.num_q_blocks
    sizes = (index.block_count.long() * BLOCK + index.col_count.long()).clamp(min=1)  # keys read, [B, H, NQB]
    widest = int(sizes.max())
    keys_cap = max(CHUNK_SCORES // BLOCK, widest)
    kbuf, vbuf = torch.empty(keys_cap * dim), torch.empty(keys_cap * dim)
    sbuf, pbuf = torch.empty(keys_cap * BLOCK), torch.empty(keys_cap * BLOCK)
    mbuf = torch.empty(keys_cap * BLOCK, dtype=torch.bool)
    query_pos = (torch.arange(num_qb * BLOCK) + index.prefix).view(num_qb, BLOCK)
    out = torch.empty(batch, heads, num_qb * BLOCK, dim)
    for b in range(batch):
        for h in range(heads):
            keys, values = k[b, h // group].float(), v[b, h // group].float()
            order = torch.sort(sizes[b, h], descending=True, stable=True).indices
            queries = torch.zeros(num_qb * BLOCK, dim)
            queries[:q_len] = q[b, h].float() * scale
            queries = queries.view(num_qb, BLOCK, dim)[order]
            head_out = torch.empty(num_qb, BLOCK, dim)
            blocks = index.block_idx[b, h][order].long()
            block_count = index.block_count[b, h][order].long()
            cols = index.col_idx[b, h][order].long()
            col_count = index.col_count[b, h][order].long()
            rows = query_pos[order]
            sorted_sizes = sizes[b, h][order].tolist()
            start = 0
            while start < num_qb:
                end = min(num_qb, start + max(1, keys_cap // sorted_sizes[start]))
                while True:  # the group's width pads every member to its most blocks and most columns
                    sel = slice(start, end)
                    n_blk, n_col = int(block_count[sel].max()), int(col_count[sel].max())
                    if (end - start) * (n_blk * BLOCK + n_col) <= keys_cap:
                        break
                    end = start + max(1, keys_cap // (n_blk * BLOCK + n_col))
                key_pos = _key_positions(blocks[sel, :n_blk], block_count[sel], cols[sel, :n_col], col_count[sel],
                                         index.k_len)
                n, width = key_pos.shape
                gather = key_pos.clamp(max=index.k_len - 1).flatten()
                kg = torch.index_select(keys, 0, gather, out=kbuf[: n * width * dim].view(n * width, dim))
                vg = torch.index_select(values, 0, gather, out=vbuf[: n * width * dim].view(n * width, dim))
                scores = sbuf[: n * BLOCK * width].view(n, BLOCK, width)
                torch.bmm(queries[sel], kg.view(n, width, dim).transpose(1, 2), out=scores)
                lo = BLOCK * max(0, int(block_count[sel].min()) - 2)  # slots before lo are visible to every row
                hidden = mbuf[: n * BLOCK * (width - lo)].view(n, BLOCK, width - lo)
                torch.gt(key_pos[:, None, lo:], rows[sel][:, :, None], out=hidden)
                scores[:, :, lo:].masked_fill_(hidden, float("-inf"))
                probs = torch.softmax(scores, dim=-1, out=pbuf[: n * BLOCK * width].view(n, BLOCK, width))
                torch.bmm(probs, vg.view(n, width, dim), out=head_out[sel])
                start = end
            out[b, h, order.repeat_interleave(BLOCK) * BLOCK + torch.arange(BLOCK).repeat(num_qb)] = \
                head_out.view(-1, dim)
    return out[:, :, :q_len].nan_to_num_(0.0).to(q.dtype)


def _key_positions(blocks: torch.Tensor, block_count: torch.Tensor, cols: torch.Tensor, col_count: torch.Tensor,
                   k_len: int) -> torch.Tensor:
    """Key positions read by a group of query blocks: int64 ``[n, 64 * max blocks + max columns]``: the
    blocks' keys in order, then the columns; unused slots hold ``k_len + 2**30`` so the causal test hides them."""
    unused = k_len + (1 << 30)
    used_block = torch.arange(blocks.shape[1]) < block_count[:, None]
    pos = (blocks[:, :, None] * BLOCK + torch.arange(BLOCK)).flatten(1)
    pos = torch.where(used_block.repeat_interleave(BLOCK, dim=1) & (pos < k_len), pos, unused)
    cols = torch.where(torch.arange(cols.shape[1]) < col_count[:, None], cols, unused)
    return torch.cat([pos, cols], dim=1)
