"""Sparse attention that is fast on a CPU.

Per head, runs of consecutive query blocks are processed together: the keys each reads (whole key blocks, then
single columns) are gathered with ``index_select`` into one ``[n, S, D]`` buffer, padded to the run's widest
member, then one batched matmul, the causal mask, one softmax and a second batched matmul. Nothing of size
``q_len x k_len`` is built; work follows the index. What keeps it fast:

- few, large operations (a run holds up to ``CHUNK_SCORES`` scores): each torch call costs a thread-pool
  round trip, which is long on a busy machine;
- every large intermediate lives in a buffer allocated once per call (fresh large allocations cost more in
  page faults than the arithmetic);
- the causal mask is applied only to slots that can need it: a query block's last two key blocks, the
  padding and the columns (blocks are listed in ascending order, so those come last).
"""

from __future__ import annotations

import torch

from kvtier.kernels.index import BLOCK, SparseIndex

CHUNK_SCORES = 1 << 22
"""Score entries of one run: 16 MB of float32."""

HIDDEN = 1 << 40
"""Position given to unused gathered slots: greater than any query position, so the causal test hides it."""


def cpu_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                         scale: float) -> torch.Tensor:
    """Sparse attention over ``index``; same contract and result as ``reference_sparse_attention``.

    q: ``[B, H, q_len, D]``; k, v: ``[B, Hkv, k_len, D]``; computes in float32, returns q's dtype.
    """
    batch, heads, q_len, dim = q.shape
    group = heads // k.shape[1]
    num_qb = index.num_q_blocks
    block_counts, col_counts = index.block_count.tolist(), index.col_count.tolist()
    widest = BLOCK * int(index.block_count.max()) + int(index.col_count.max())  # a run's width can reach this
    cap = max(CHUNK_SCORES, BLOCK * widest)  # score entries of one run
    buffers = {"scores": torch.empty(cap), "probs": torch.empty(cap), "hidden": torch.empty(cap, dtype=torch.bool),
               "keys": torch.empty(cap // BLOCK * dim), "values": torch.empty(cap // BLOCK * dim)}
    rows = (torch.arange(num_qb * BLOCK) + index.prefix).view(num_qb, BLOCK)  # absolute query positions
    out = torch.empty(batch, heads, num_qb * BLOCK, dim)
    for b in range(batch):
        for h in range(heads):
            keys, values = k[b, h // group].float(), v[b, h // group].float()
            queries = torch.zeros(num_qb * BLOCK, dim)
            queries[:q_len] = q[b, h].float() * scale
            queries = queries.view(num_qb, BLOCK, dim)
            head_out = out[b, h].view(num_qb, BLOCK, dim)
            bc, cc = block_counts[b][h], col_counts[b][h]
            start = 0
            while start < num_qb:  # a run: as many consecutive query blocks as fit in `cap` scores
                end, most_blocks, most_cols = start + 1, bc[start], cc[start]
                while end < num_qb:  # the run is as wide as its most blocks plus its most columns
                    blocks, cols = max(most_blocks, bc[end]), max(most_cols, cc[end])
                    if (end + 1 - start) * BLOCK * (BLOCK * blocks + cols) > cap:
                        break
                    most_blocks, most_cols, end = blocks, cols, end + 1
                _attend_run(queries[start:end], keys, values, index, b, h, start, end, rows[start:end], buffers,
                            head_out[start:end])
                start = end
    return out[:, :, :q_len].nan_to_num_(0.0).to(q.dtype)


def _attend_run(queries, keys, values, index: SparseIndex, b: int, h: int, start: int, end: int, rows, buffers,
                out) -> None:
    """Attention of query blocks ``start:end`` (queries ``[n, 64, D]``, pre-scaled) into ``out [n, 64, D]``."""
    n, dim = end - start, keys.shape[1]
    block_count = index.block_count[b, h, start:end].long()
    pos = _key_positions(index.block_idx[b, h, start:end].long(), block_count, index.col_idx[b, h, start:end].long(),
                         index.col_count[b, h, start:end].long(), index.k_len)
    width = pos.shape[1]
    gather = pos.clamp(max=index.k_len - 1).flatten()
    kg = torch.index_select(keys, 0, gather, out=_view(buffers["keys"], (n * width, dim)))
    vg = torch.index_select(values, 0, gather, out=_view(buffers["values"], (n * width, dim)))
    scores = torch.bmm(queries, kg.view(n, width, dim).transpose(1, 2), out=_view(buffers["scores"], (n, BLOCK, width)))
    lo = BLOCK * max(0, int(block_count.min()) - 2)  # every slot before `lo` is a key all rows may see
    hidden = _view(buffers["hidden"], (n, BLOCK, width - lo))
    torch.gt(pos[:, None, lo:], rows[:, :, None], out=hidden)
    scores[:, :, lo:].masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(scores, dim=-1, out=_view(buffers["probs"], (n, BLOCK, width)))
    torch.bmm(probs, vg.view(n, width, dim), out=out)


def _key_positions(blocks: torch.Tensor, block_count: torch.Tensor, cols: torch.Tensor, col_count: torch.Tensor,
                   k_len: int) -> torch.Tensor:
    """Key positions read by a run of query blocks: int64 ``[n, 64 * most blocks + most columns]``, the blocks'
    keys in order then the columns; unused slots and keys past ``k_len`` hold ``HIDDEN``."""
    n_blk, n_col = int(block_count.max()), int(col_count.max())
    used = (torch.arange(n_blk) < block_count[:, None]).repeat_interleave(BLOCK, dim=1)
    pos = (blocks[:, :n_blk, None] * BLOCK + torch.arange(BLOCK)).flatten(1)
    pos = torch.where(used & (pos < k_len), pos, HIDDEN)
    cols = torch.where(torch.arange(n_col) < col_count[:, None], cols[:, :n_col], HIDDEN)
    return torch.cat([pos, cols], dim=1)


def _view(buffer: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    return buffer[:numel].view(shape)
