"""Sparse attention that is fast on a CPU.

The query heads that share one KV head (GQA) are processed together, and so are runs of consecutive query
blocks: for a run of ``n`` query blocks of ``G`` heads (``R = G * n`` rows of the batch), the keys each row reads
are gathered into one ``[R, S, D]`` buffer, padded to the run's widest member: whole key blocks with one
``index_select`` over 64-key blocks (a contiguous 64 x D copy each, not 64 row gathers), the single columns
with one row ``index_select``, the two joined with one ``cat``. Then one batched matmul, the causal mask, one
softmax and a second batched matmul. Nothing of size ``q_len x k_len`` is built; work follows the index.
What keeps it fast:

- few, large operations (a run holds up to ``CHUNK_SCORES`` scores): each torch call costs a thread-pool
  round trip, which is long on a busy machine; batching a KV head's query heads cuts the calls ``G``-fold;
- every large intermediate lives in a buffer allocated once per call (fresh large allocations cost more in
  page faults than the arithmetic);
- unused slots point into a zero block past the last key, whose positions every query row is before, so the
  causal mask hides them too; the mask is applied only to slots that can need it: a query block's last two key
  blocks, the padding and the columns (blocks are listed in ascending order, so those come last).

Pooled keys (``index.pooled``): the block means of each KV head's keys and values are computed once
(``[NKB, D]`` each, a zero row last for unused slots); a run's pooled slots follow its columns in the same
buffers, gathered with one ``index_select``, and get ``log(pool_size)`` (``-inf`` when unused) added to their scores
before the one softmax: the run's exact keys and its pooled keys are one softmax, as in the reference.
"""

from __future__ import annotations

import torch

from kvtier.kernels.index import BLOCK, SparseIndex, block_means

CHUNK_SCORES = 1 << 23
"""Score entries of one run: 32 MB of float32."""


def cpu_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                         scale: float) -> torch.Tensor:
    """Sparse attention over ``index``; same contract and result as ``reference_sparse_attention``.

    q: ``[B, H, q_len, D]``; k, v: ``[B, Hkv, k_len, D]``; computes in float32, returns q's dtype.
    """
    batch, heads, q_len, dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    group = heads // kv_heads
    num_qb, num_kb = index.num_q_blocks, -(-k_len // BLOCK)
    pad = num_kb * BLOCK  # first position of the zero block: unused slots read it
    slots = torch.arange(index.block_idx.shape[-1])
    blocks = torch.where(slots < index.block_count[..., None], index.block_idx.long(), num_kb)  # [B, H, NQB, MB]
    slots = torch.arange(index.col_idx.shape[-1])
    cols = torch.where(slots < index.col_count[..., None], index.col_idx.long(), pad)  # [B, H, NQB, MC]
    pool_count = index.pool_count if index.pooled else torch.zeros_like(index.col_count)
    if index.pooled:
        slots = torch.arange(index.pool_idx.shape[-1]) < pool_count[..., None]
        pool_blocks = torch.where(slots, index.pool_idx.long(), num_kb)  # [B, H, NQB, MP]
        pool_bias = torch.where(slots, index.pool_size.float().log(), float("-inf"))  # [B, H, NQB, MP]
        means = torch.zeros(batch, kv_heads, 2, num_kb + 1, dim)  # block means of keys and values, a zero row last
        means[:, :, 0, :num_kb], means[:, :, 1, :num_kb] = block_means(k), block_means(v)
    # per query block: the most blocks, columns and pooled keys over the heads of each KV group, [B, Hkv, NQB]
    most_blocks, most_cols, most_pool = (c.view(batch, kv_heads, group, num_qb).amax(2).tolist()
                                         for c in (index.block_count, index.col_count, pool_count))
    least_blocks = index.block_count.view(batch, kv_heads, group, num_qb).amin(2).tolist()
    widest = group * _width(max(1, int(index.block_count.max())), int(index.col_count.max()), int(pool_count.max()))
    cap = max(CHUNK_SCORES, BLOCK * widest)  # score entries of one run
    buffers = {"scores": torch.empty(cap), "probs": torch.empty(cap), "hidden": torch.empty(cap, dtype=torch.bool)}
    buffers.update({name: torch.empty(cap // BLOCK * dim) for name in ("keys", "values")})
    rows = (torch.arange(num_qb * BLOCK) + index.prefix).view(num_qb, BLOCK)  # absolute query positions
    queries = torch.zeros(batch, heads, num_qb * BLOCK, dim)
    queries[:, :, :q_len] = q.float() * scale
    queries = queries.view(batch, kv_heads, group, num_qb, BLOCK, dim).transpose(2, 3).contiguous()
    out = torch.empty(batch, kv_heads, num_qb, group, BLOCK, dim)  # rows of a run: query block-major
    padded = torch.zeros(2, (num_kb + 1) * BLOCK, dim)  # keys and values of one KV head, then the zero block
    for b in range(batch):
        for kvh in range(kv_heads):
            padded[0, :k_len], padded[1, :k_len] = k[b, kvh], v[b, kvh]
            heads_of = slice(kvh * group, (kvh + 1) * group)
            mb, mc, mp = most_blocks[b][kvh], most_cols[b][kvh], most_pool[b][kvh]
            start = 0
            while start < num_qb:  # a run: as many consecutive query blocks as fit in `cap` scores
                end, width = start + 1, (max(1, mb[start]), mc[start], mp[start])
                while end < num_qb:  # the run is as wide as its most blocks, columns and pooled keys
                    wider = tuple(max(w, most[end]) for w, most in zip(width, (mb, mc, mp)))
                    if group * (end + 1 - start) * BLOCK * _width(*wider) > cap:
                        break
                    width, end = wider, end + 1
                n_blk, n_col, n_pool = width
                lo = BLOCK * max(0, min(least_blocks[b][kvh][start:end]) - 2)  # slots before it: seen by all rows
                pooled = None
                if n_pool:
                    pooled = (means[b, kvh], pool_blocks[b, heads_of, start:end, :n_pool],
                              pool_bias[b, heads_of, start:end, :n_pool])
                _attend_run(queries[b, kvh, start:end], padded, blocks[b, heads_of, start:end, :n_blk],
                            cols[b, heads_of, start:end, :n_col], rows[start:end], lo, buffers,
                            out[b, kvh, start:end], pooled)
                start = end
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(batch, heads, num_qb * BLOCK, dim)
    return out[:, :, :q_len].nan_to_num_(0.0).to(q.dtype)


def _attend_run(queries: torch.Tensor, padded: torch.Tensor, blocks: torch.Tensor, cols: torch.Tensor,
                rows: torch.Tensor, lo: int, buffers: dict[str, torch.Tensor], out: torch.Tensor,
                pooled: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """Attention of one run of ``n`` query blocks of the ``G`` heads of one KV head into ``out [n, G, 64, D]``.

    queries: ``[n, G, 64, D]`` pre-scaled; padded: ``[2, (NKB + 1) * 64, D]`` keys and values, a zero block last;
    blocks: ``[G, n, nb]`` key blocks, unused = NKB; cols: ``[G, n, nc]`` key positions, unused = NKB * 64;
    rows: ``[n, 64]`` absolute query positions; lo: every slot before it is a key all rows may see;
    pooled: None, or (block means ``[2, NKB + 1, D]`` of keys and values, a zero row last; pooled key blocks
    ``[G, n, np]``, unused = NKB; their ``log(pool_size)`` ``[G, n, np]``, unused = -inf).
    Row ``r = m * G + g`` of the run's batch is query block ``m`` of head ``g``; its slots are the ``nb`` blocks'
    keys, then the columns, then the pooled keys, each part padded to a whole number of blocks.
    """
    group, n, n_blk = blocks.shape
    dim = queries.shape[-1]
    zero_block = padded.shape[1] // BLOCK - 1
    r, n_col = group * n, _round_up(cols.shape[-1])
    n_pool = 0 if pooled is None else _round_up(pooled[1].shape[-1])
    exact = BLOCK * n_blk + n_col  # slots of real keys; the pooled ones follow
    width = exact + n_pool
    blocks = blocks.transpose(0, 1).reshape(r, n_blk)
    cols = _rows_of(cols, n_col, zero_block * BLOCK)
    # every slot as a block: the key blocks, then the zero block where the columns and pooled keys go (overwritten)
    slots = torch.nn.functional.pad(blocks, (0, (width - BLOCK * n_blk) // BLOCK), value=zero_block).flatten()
    gathered = []
    for i, name in enumerate(("keys", "values")):
        whole = torch.index_select(padded[i].view(-1, BLOCK * dim), 0, slots,
                                   out=_view(buffers[name], (slots.shape[0], BLOCK * dim))).view(r, width, dim)
        whole[:, BLOCK * n_blk: exact] = torch.index_select(padded[i], 0, cols.flatten()).view(r, n_col, dim)
        if pooled is not None:
            pool_rows = _rows_of(pooled[1], n_pool, zero_block).flatten()
            whole[:, exact:] = torch.index_select(pooled[0][i], 0, pool_rows).view(r, n_pool, dim)
        gathered.append(whole)
    keys, values = gathered
    pos = torch.cat([(blocks.view(r, n_blk, 1) * BLOCK + torch.arange(BLOCK)).view(r, -1), cols], dim=1)  # [R, exact]
    scores = torch.bmm(queries.view(r, BLOCK, dim), keys.transpose(1, 2), out=_view(buffers["scores"], (r, BLOCK, width)))
    hidden = _view(buffers["hidden"], (r, BLOCK, exact - lo))
    torch.gt(pos[:, None, lo:], rows.repeat_interleave(group, 0)[:, :, None], out=hidden)
    scores[:, :, lo:exact].masked_fill_(hidden, float("-inf"))
    if pooled is not None:  # every row of the query block sees every pooled key block
        scores[:, :, exact:] += _rows_of(pooled[2], n_pool, float("-inf")).view(r, 1, n_pool)
    probs = torch.softmax(scores, dim=-1, out=_view(buffers["probs"], (r, BLOCK, width)))
    torch.bmm(probs, values, out=out.view(r, BLOCK, dim))


def _rows_of(x: torch.Tensor, width: int, fill) -> torch.Tensor:
    """``[G, n, w]`` per (head, query block) -> ``[n * G, width]`` in the run's row order, padded with ``fill``."""
    rows = x.transpose(0, 1).reshape(x.shape[0] * x.shape[1], x.shape[-1])
    return torch.nn.functional.pad(rows, (0, width - x.shape[-1]), value=fill)


def _width(n_blk: int, n_col: int, n_pool: int) -> int:
    """Slots of one row of a run: whole blocks, then columns and pooled keys each rounded up to whole blocks."""
    return BLOCK * n_blk + _round_up(n_col) + _round_up(n_pool)


def _round_up(columns: int) -> int:
    """Column slots of a run: a whole number of blocks."""
    return -(-columns // BLOCK) * BLOCK


def _view(buffer: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = 1
    for s in shape:
        numel *= s
    return buffer[:numel].view(shape)
