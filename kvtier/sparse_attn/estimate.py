"""Online estimation: the sparse index of one input, head by head, from its queries and keys.

- vertical-slash: the query blocks are cut into ``PROBES`` contiguous groups of at least ``GROUP_BLOCKS``
  blocks each; 64 queries of each group (its probe: 64 rows spread evenly over the group, its last row
  included) attend softmax over all causal keys, column scores are their sums per key, diagonal scores their
  sums per offset ``query position - key position``, and the group's query blocks read the columns and
  diagonals chosen from those (one probe at the end misses what earlier queries attend to: the columns of
  nearby paragraphs, say; a probe at the group's end misses what the group's first rows attend to). Fixed
  budgets use one group whose probe is the last 64 queries, MInference's setting: a fixed count per group
  would make the short early groups nearly dense. An input too short for two groups probes its last 64
  queries too. The first ``SINK_COLUMNS`` keys and the ``LOCAL_DIAGONALS`` nearest diagonals are always kept;
  the sink columns' weight counts toward the column scores only.
- block-sparse: per query block, the exact causal softmax of every ``BLOCK_SAMPLE``-th of its rows, summed
  per key block and averaged (``block_scores``: a quarter of the score matrix); key block 0 and the key blocks
  on each query block's diagonal are always kept.
- A-shape, dense: nothing to estimate.
- Heads with ``pool`` also get one pooled key (block means) per skipped, fully visible key block, its logit
  lowered by the head's ``pool_shift``.
- Every head reads every causal key for the last ``DENSE_LAST`` queries (a question at the end of a prompt sees
  the whole context, whatever the pattern); at 8k tokens that is 1.6% of the causal pairs.

Budgets are fixed counts, or adaptive: the fewest items (highest score first) whose scores add up to ``mass``
of the total, optionally capped by the count (FlexPrefill / XAttention style). For adaptive vertical-slash,
columns and diagonals are ranked together (each column score and each diagonal score is a share of the same
attention), so a head whose attention is one strong column does not also pay for the many diagonals that column
crosses; diagonals are ranked in bins of 64 (which read the same key blocks as any one of their diagonals), by
score per cost (``_adaptive_selection``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kvtier.kernels.index import BLOCK, SparseIndex, build_index, compact, row_positions
from kvtier.sparse_attn.config import HeadPattern, SparseConfigError
from kvtier.sparse_attn.patterns import a_shape_blocks, slash_blocks

PROBES = 8
PROBE_QUERIES = 64
GROUP_BLOCKS = 16
DENSE_LAST = 64
SINK_COLUMNS = 64
LOCAL_DIAGONALS = 64
BIN_COST = 64.0
"""The cost of a bin of 64 diagonals in the ranking of adaptive vertical-slash heads (a column costs 1)."""
BLOCK_SAMPLE = 4
"""Block-sparse heads score key blocks with the exact causal softmax of every ``BLOCK_SAMPLE``-th query row."""
_SCORE_ELEMENTS = 1 << 24  # score elements per step of block_scores on the CPU (64 MiB in fp32)


def estimate_index(q: torch.Tensor, k: torch.Tensor, patterns: list[HeadPattern], scale: float | None = None) -> SparseIndex:
    """The SparseIndex for queries ``[B, H, q_len, D]`` (the last q_len positions) over keys ``[B, Hkv, k_len, D]``,
    with ``patterns[h]`` for query head ``h``."""
    batch, heads, q_len, dim = q.shape
    k_len = k.shape[2]
    if len(patterns) != heads:
        raise SparseConfigError(f"got {len(patterns)} head patterns for {heads} query heads")
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    group = heads // k.shape[1]
    num_qb, num_kb = -(-q_len // BLOCK), -(-k_len // BLOCK)
    block_mask = torch.zeros(batch, heads, num_qb, num_kb, dtype=torch.bool, device=q.device)
    ends, groups = probe_groups(q_len, PROBES)  # columns per probe group: [B, H, groups, C]
    groups = _to_device(groups, q.device)
    columns = torch.full((batch, heads, len(ends), 1), -1, dtype=torch.long, device=q.device)
    for kind in sorted({p.kind for p in patterns}):
        hs = [h for h, p in enumerate(patterns) if p.kind == kind]
        chosen = [patterns[h] for h in hs]
        hs_t = _to_device(hs, q.device)
        if kind == "dense":
            block_mask[:, hs_t] = True
        elif kind == "a_shape":
            for h, p in zip(hs, chosen):
                block_mask[:, h] = a_shape_blocks(batch, 1, q_len, k_len, p.sink, p.local, q.device)[:, 0]
        elif kind == "vertical_slash":
            for adaptive in (False, True):
                part = [i for i, p in enumerate(chosen) if (p.mass is not None) == adaptive]
                if not part:
                    continue
                part_t = _to_device([hs[i] for i in part], q.device)
                cols, offsets = _vertical_slash(q, k, part_t, [chosen[i] for i in part], scale, adaptive,
                                                (ends, groups))
                block_mask[:, part_t] = slash_blocks(offsets, q_len, k_len)
                width = max(columns.shape[-1], cols.shape[-1])
                columns = torch.nn.functional.pad(columns, (0, width - columns.shape[-1]), value=-1)
                columns[:, part_t] = torch.nn.functional.pad(cols.long(), (0, width - cols.shape[-1]), value=-1)
        else:
            block_mask[:, hs_t] = _block_sparse(q[:, hs_t], k[:, hs_t // group], chosen, scale, q_len, k_len)
    block_mask[:, :, max(0, q_len - DENSE_LAST) // BLOCK:] = True
    pool = shift = None  # checked here, not by build_index on the device (a sync)
    if any(p.pool for p in patterns):
        pool = _to_device([bool(p.pool) for p in patterns], q.device)
        shift = _to_device([float(p.pool_shift or 0.0) for p in patterns], q.device)
    return build_index(block_mask, columns, q_len, k_len, groups, pool, shift)


def _to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small tensor of ``values`` (a list or array) on ``device``. To a GPU it goes from pinned memory without
    blocking: a plain copy would wait for the device to finish its queue, and the estimation makes a dozen."""
    t = torch.as_tensor(values, dtype=dtype)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _budgets(patterns: list[HeadPattern], count_field: str, limit: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per head: the count (cap) and the mass target (inf for fixed budgets): ``[H']`` each."""
    counts = [limit if getattr(p, count_field) is None else getattr(p, count_field) for p in patterns]
    masses = [math.inf if p.mass is None else p.mass for p in patterns]
    return _to_device(counts, device), _to_device(masses, device, torch.float64)


def select(scores: torch.Tensor, forced: torch.Tensor, count: torch.Tensor, mass: torch.Tensor,
           cost: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the items to keep: the forced ones, then by falling score (score per ``cost``, if given)
    the first ``count`` of them while the score before the item stays below ``mass`` x the total.

    scores: ``[B, H', ..., N]`` non-negative; forced, cost: broadcastable to scores; count, mass: ``[H']``.
    """
    extra = (1,) * (scores.dim() - 2)
    count = count.view(-1, *extra)
    mass = mass.view(-1, *extra)
    rank_by = scores if cost is None else scores / cost
    order = torch.sort(rank_by.masked_fill(forced, math.inf), dim=-1, descending=True).indices
    vals = scores.gather(-1, order).double()
    before = vals.cumsum(-1) - vals
    rank = torch.arange(scores.shape[-1], device=scores.device)
    take = (rank < count) & (torch.isinf(mass) | (before < mass * vals.sum(-1, keepdim=True)))
    take |= forced.expand_as(scores).gather(-1, order)
    return torch.zeros_like(take).scatter_(-1, order, take)


def probe_groups(q_len: int, probes: int = PROBES) -> tuple[list[int], torch.Tensor]:
    """Query blocks cut into ``probes`` contiguous groups of near-equal size, fewer where a group would have
    under ``GROUP_BLOCKS`` blocks: the end row (local, exclusive) of every group, and int64 ``[NQB]`` the group of
    every query block. A group's probe is :func:`probe_rows` of it (the last probe ends with the last queries of
    the input)."""
    num_qb = -(-q_len // BLOCK)
    n = max(1, min(probes, num_qb // GROUP_BLOCKS))
    ends = [min(q_len, BLOCK * -(-num_qb * (g + 1) // n)) for g in range(n)]
    block_ends = np.array([-(-e // BLOCK) for e in ends])
    groups = np.searchsorted(block_ends, np.arange(num_qb), side="right")  # numpy: torch's costs ms on CPU
    return ends, torch.from_numpy(groups)


def _vertical_slash(q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor, patterns: list[HeadPattern], scale: float,
                    adaptive: bool, probes: tuple[list[int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns ``[B, H', G, C]`` and slash offsets ``[B, H', 1, S]`` (int32, -1 padded) of query heads ``heads``
    (``[H']``) of q ``[B, H, q_len, D]`` over k ``[B, Hkv, k_len, D]``; ``patterns`` all adaptive (``mass``) or
    all fixed, as ``adaptive`` says. Adaptive heads: every query block uses the columns and diagonals of its
    group's probe (``probe_groups(q_len)``; slash offsets per query block, ``[B, H', NQB, S]``, when there is more
    than one group); fixed heads: those of the one probe at the end. ``probes``: ``probe_groups(q_len)``, its
    groups on q's device; ``G`` is its number of groups (a fixed head's one group of columns is repeated)."""
    q_len, k_len = q.shape[2], k.shape[2]
    ends = probes[0] if adaptive else probe_groups(q_len, 1)[0]
    keys = torch.arange(k_len, device=q.device)
    vertical, slash = probe_scores(q, k, heads, ends, scale, spread=len(ends) > 1)
    cap_cols, mass = _budgets(patterns, "vertical", k_len, q.device)
    cap_slash, _ = _budgets(patterns, "slash", k_len, q.device)
    keep_cols = select(vertical, keys < SINK_COLUMNS, cap_cols, torch.full_like(mass, math.inf))
    if adaptive:
        keep_cols, diags = _adaptive_selection(vertical, slash, keep_cols, cap_slash, mass)
    else:
        keep_slash = select(slash, keys < LOCAL_DIAGONALS, cap_slash, torch.full_like(mass, math.inf))
        diags, _ = compact(keep_slash, keys.expand_as(keep_slash))
    cols, _ = compact(keep_cols, keys.expand_as(keep_cols))
    if len(ends) == 1:
        return cols.expand(-1, -1, len(probes[0]), -1), diags
    return cols, diags[:, :, probes[1]]


def probe_scores(q: torch.Tensor, k: torch.Tensor, heads: torch.Tensor, ends: list[int],
                 scale: float, spread: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal scores of query heads ``heads`` (``[H']``) of q ``[B, H, q_len, D]`` over k
    ``[B, Hkv, k_len, D]``, one probe per group end in ``ends`` (local rows, exclusive): each probe row's causal
    softmax, summed over the probe's rows per key (vertical) and, for the keys after the ``SINK_COLUMNS`` that
    are always kept, per offset ``position - key`` (slash). Returns float32 ``[B, H', len(ends), k_len]`` each.
    A probe is ``probe_rows(start, end, spread)`` of its group, the group starting at the previous end.

    Counted under their diagonals as well, the sink's weight (often a large share of a row's) would rank the
    diagonals that only cross the sink: from a probe spread over a group, every diagonal bin; from the last
    rows, the farthest ones."""
    (batch, num_heads, q_len, dim), (kv_heads, k_len) = q.shape, k.shape[1:3]
    keys = torch.arange(k_len, device=q.device)
    key_t = _keys_for_scores(k)
    vertical = torch.zeros(batch, len(heads), len(ends), k_len, device=q.device)
    slash = torch.zeros_like(vertical)
    for g, end in enumerate(ends):
        local = _to_device(probe_rows(ends[g - 1] if g else 0, end, spread), q.device)
        pos = local + (k_len - q_len)
        # The probe sees keys [0, seen) only. Computing just those halves the work of 8 probes, and on a GPU the
        # unseen keys' zeros would all be added to offset 0: one address, 18x slower at 32k.
        seen = k_len - q_len + end
        picked = q[:, :, end - len(local) : end] if not spread else q[:, :, local]
        rows = picked.reshape(batch, kv_heads, -1, dim)  # a KV head's heads share keys
        scores = _scores(rows, key_t[..., :seen], scale).view(batch, num_heads, len(local), seen)
        if len(heads) < num_heads:
            scores = scores[:, heads]
        scores.masked_fill_(keys[:seen] > pos[:, None], float("-inf"))  # [B, H', rows, seen]
        probs = torch.softmax(scores, dim=-1)
        vertical[:, :, g, :seen] = probs.sum(-2)
        if seen > SINK_COLUMNS:  # the sink columns are always kept: their weight counts as columns only
            offsets = (pos[:, None] - keys[SINK_COLUMNS:seen]).clamp(min=0).flatten().expand(*probs.shape[:2], -1)
            slash[:, :, g].scatter_add_(-1, offsets, probs[..., SINK_COLUMNS:].flatten(-2))
    return vertical, slash


def probe_rows(start: int, end: int, spread: bool) -> np.ndarray:
    """The local query rows of the probe of group ``[start, end)``, ascending (int64): its last
    ``PROBE_QUERIES`` rows, or (``spread``) ``PROBE_QUERIES`` rows evenly spaced over it, its last row
    included, so that the probe sees what the whole group attends to, not only its end."""
    if not spread:
        return np.arange(max(start, end - PROBE_QUERIES), end)
    stride = max(1, (end - start) // PROBE_QUERIES)
    return np.arange(end - 1, start - 1, -stride)[:PROBE_QUERIES][::-1].copy()


def _adaptive_selection(vertical: torch.Tensor, slash: torch.Tensor, keep_cols: torch.Tensor, cap_slash: torch.Tensor,
                        mass: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns and slash offsets of adaptive heads: one ranking of columns and diagonal bins together, by mass
    per cost, the fewest covering ``mass`` of the estimated attention (within the column caps ``keep_cols`` and
    ``cap_slash`` diagonals, i.e. ``ceil(cap / 64)`` bins).

    Diagonals are taken in bins of 64 offsets (bin ``b``: offsets ``64b .. 64b + 63``; bin 0, the nearest
    diagonals, is always kept): a query block reads whole key blocks, and every diagonal of a bin reads the
    same one or two key blocks as the whole bin (the keys at offsets ``64b .. 64b + 63`` from a block of 64 rows
    span 127 keys), so a bin costs what one stray diagonal costs and covers the mass of all 64. A column costs
    one key per row, a bin ``BIN_COST``; ranked by mass alone, the bins would outrank the cheap columns. A kept
    bin is returned as its two end offsets, which read exactly the bin's key blocks.

    vertical, slash: column and diagonal scores ``[B, H', G, k_len]``; keep_cols: bool, same shape; cap_slash,
    mass: ``[H']``. Returns the kept columns (bool, like ``vertical``) and offsets ``[B, H', G, S]`` (int32, -1
    padded)."""
    k_len = vertical.shape[-1]
    num_bins = -(-k_len // BLOCK)
    bins = torch.nn.functional.pad(slash, (0, num_bins * BLOCK - k_len)).unflatten(-1, (num_bins, BLOCK)).sum(-1)
    bin_ids = torch.arange(num_bins, device=slash.device)
    keys = torch.arange(k_len, device=slash.device)
    forced_bins = bin_ids * BLOCK < LOCAL_DIAGONALS
    keep_bins = select(bins, forced_bins, -(-cap_slash // BLOCK), torch.full_like(mass, math.inf))
    cost = torch.cat([torch.ones(k_len, device=slash.device), torch.full((num_bins,), BIN_COST, device=slash.device)])
    joint = select(torch.cat([vertical, bins], -1), torch.cat([keys < SINK_COLUMNS, forced_bins]),
                   torch.full_like(cap_slash, k_len + num_bins), mass, cost)
    keep_bins &= joint[..., k_len:]
    ends = torch.stack([bin_ids * BLOCK, bin_ids * BLOCK + BLOCK - 1], -1).flatten()  # [2 * num_bins]
    keep_ends = keep_bins.repeat_interleave(2, dim=-1)
    diags, _ = compact(keep_ends, ends.expand_as(keep_ends))
    return keep_cols & joint[..., :k_len], diags


def _block_sparse(q: torch.Tensor, k: torch.Tensor, patterns: list[HeadPattern], scale: float,
                  q_len: int, k_len: int) -> torch.Tensor:
    """Key-block selection ``[B, H', NQB, NKB]`` by ``block_scores``; key block 0 and the diagonal blocks always."""
    num_kb = -(-k_len // BLOCK)
    first, last = row_positions(q_len, k_len, q.device)
    kb = torch.arange(num_kb, device=q.device)
    forced = (kb == 0) | ((kb >= first[:, None] // BLOCK) & (kb <= last[:, None] // BLOCK))
    count, mass = _budgets(patterns, "blocks", num_kb, q.device)
    return select(block_scores(q, k, scale), forced, count, mass)


def block_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The estimated attention mass of every key block for every query block: float32 ``[B, H, NQB, NKB]``, each
    query block's scores summing to 1. Per query block, the mean over its sampled rows (every
    ``BLOCK_SAMPLE``-th row, the last of each run of ``BLOCK_SAMPLE``; past the end of a short last block, its
    last row again) of the row's causal softmax summed per key block.

    q: ``[B, H, q_len, D]`` (the last q_len of k_len positions); k: ``[B, H, k_len, D]``, one per query head.
    Computed a few query blocks at a time, over the keys those blocks see.
    """
    batch, heads, q_len, dim = q.shape
    k_len = k.shape[2]
    num_qb, num_kb = -(-q_len // BLOCK), -(-k_len // BLOCK)
    per_block = BLOCK // BLOCK_SAMPLE
    rows = torch.arange(BLOCK_SAMPLE - 1, num_qb * BLOCK, BLOCK_SAMPLE, device=q.device).clamp(max=q_len - 1)
    key_t = _keys_for_scores(k)
    keys = torch.arange(k_len, device=q.device)
    out = torch.zeros(batch, heads, num_qb, num_kb, device=q.device)
    elements = _SCORE_ELEMENTS << 4 if q.is_cuda else _SCORE_ELEMENTS  # a GPU step: 1 GiB, not 512 small GEMMs at 32k
    step = max(1, elements // (batch * heads * per_block * k_len))  # query blocks at a time
    for m0 in range(0, num_qb, step):
        m1 = min(num_qb, m0 + step)
        r = rows[m0 * per_block : m1 * per_block]
        seen = k_len - q_len + min(q_len, m1 * BLOCK)
        scores = _scores(q[:, :, r], key_t[..., :seen], scale)
        scores.masked_fill_(keys[:seen] > r[:, None] + (k_len - q_len), float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # [B, H, rows, seen]
        seen_kb = -(-seen // BLOCK)
        probs = torch.nn.functional.pad(probs, (0, seen_kb * BLOCK - seen))
        out[:, :, m0:m1, :seen_kb] = probs.view(batch, heads, m1 - m0, per_block, seen_kb, BLOCK).sum((3, 5))
    return out / per_block


def _keys_for_scores(k: torch.Tensor) -> torch.Tensor:
    """``k`` ``[B, H, N, D]`` as the right operand of ``_scores``: ``[B, H, D, N]`` in the GEMM's dtype, the
    inputs' half precision on a GPU (as MInference) and fp32 on the CPU (where half-precision GEMMs are slow)."""
    return k.to(k.dtype if k.is_cuda else torch.float32).transpose(-1, -2)


def _scores(rows: torch.Tensor, key_t: torch.Tensor, scale: float) -> torch.Tensor:
    """Scaled logits, float32 ``[..., R, N]``, of query rows ``[..., R, D]`` against ``key_t`` ``[..., D, N]``
    (``_keys_for_scores``): the rows are scaled before the GEMM, ``R x D`` values instead of ``R x N``."""
    return torch.matmul((rows.float() * scale).to(key_t.dtype), key_t).float()
