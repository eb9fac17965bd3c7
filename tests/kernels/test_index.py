"""SparseIndex construction against a brute-force reading of its definition."""

from __future__ import annotations

import math

import pytest
import torch

from kvtier.kernels import BLOCK, SparseAttentionError, build_index, dense_index


def brute_mask(block_mask, columns, q_len, k_len):
    """[B, H, q_len, k_len]: key j is read by local row i iff its block is selected or it is a column, j <= P + i."""
    batch, heads = block_mask.shape[:2]
    prefix = k_len - q_len
    mask = torch.zeros(batch, heads, q_len, k_len, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                m = i // BLOCK
                cols = columns[b, h] if columns.dim() == 3 else columns[b, h, m]
                keys = torch.arange(min(k_len, prefix + i + 1))  # the causal keys of row i
                mask[b, h, i, : len(keys)] = block_mask[b, h, m, keys // BLOCK] | torch.isin(keys, cols)
    return mask


@pytest.mark.parametrize("q_len,k_len,per_block", [(70, 70, False), (100, 230, True), (1, 65, False), (129, 129, True)])
def test_build_index_matches_brute_force(q_len, k_len, per_block):
    g = torch.Generator().manual_seed(q_len + k_len)
    nqb, nkb = -(-q_len // BLOCK), -(-k_len // BLOCK)
    block_mask = torch.rand(2, 3, nqb, nkb, generator=g) < 0.3
    shape = (2, 3, nqb, 9) if per_block else (2, 3, 9)
    columns = torch.randint(-1, k_len, shape, generator=g)
    index = build_index(block_mask, columns, q_len, k_len)
    expected = brute_mask(block_mask, columns, q_len, k_len)
    assert torch.equal(index.to_mask(), expected)
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    torch.testing.assert_close(index.head_density(), expected.sum((-1, -2)).double() / causal.sum())
    # invariants of the compact form: ascending, -1 padded, columns never inside a listed block, all causal
    for b in range(2):
        for h in range(3):
            for m in range(nqb):
                blocks = index.block_idx[b, h, m, : index.block_count[b, h, m]].tolist()
                cols = index.col_idx[b, h, m, : index.col_count[b, h, m]].tolist()
                assert blocks == sorted(set(blocks)) and cols == sorted(set(cols))
                assert all(c // BLOCK not in blocks for c in cols)
                last = k_len - q_len + min(q_len - 1, m * BLOCK + BLOCK - 1)
                assert all(x * BLOCK <= last for x in blocks) and all(c <= last for c in cols)
                assert (index.block_idx[b, h, m, index.block_count[b, h, m]:] == -1).all()
                assert (index.col_idx[b, h, m, index.col_count[b, h, m]:] == -1).all()


def test_dense_index_covers_every_causal_pair():
    index = dense_index(1, 2, 100, 300)
    assert torch.equal(index.to_mask()[0, 0], torch.ones(100, 300, dtype=torch.bool).tril(200))
    assert index.density() == pytest.approx(1.0)
    assert index.col_count.sum() == 0


def test_partial_masks_equal_slices_of_the_full_mask():
    g = torch.Generator().manual_seed(1)
    index = build_index(torch.rand(1, 2, 4, 5, generator=g) < 0.5, torch.randint(0, 300, (1, 2, 7), generator=g), 200, 300)
    assert torch.equal(index.to_mask(1, 3), index.to_mask()[:, :, 64:192])
    assert torch.equal(index.to_mask(3, 4), index.to_mask()[:, :, 192:])


def test_build_index_rejects_bad_shapes():
    with pytest.raises(SparseAttentionError, match="block_mask must be"):
        build_index(torch.ones(1, 1, 2, 2, dtype=torch.bool), None, 200, 200)
    with pytest.raises(SparseAttentionError, match="q_len <= k_len"):
        build_index(torch.ones(1, 1, 1, 1, dtype=torch.bool), None, 60, 50)


def test_column_groups_equal_columns_per_query_block():
    g = torch.Generator().manual_seed(7)
    block_mask = torch.rand(1, 2, 5, 6, generator=g) < 0.3
    columns = torch.randint(-1, 350, (1, 2, 3, 11), generator=g)  # 3 groups of columns
    groups = torch.tensor([0, 0, 1, 2, 2])
    grouped = build_index(block_mask, columns, 300, 350, groups)
    per_block = build_index(block_mask, columns[:, :, groups], 300, 350)
    assert torch.equal(grouped.to_mask(), per_block.to_mask())
    assert torch.equal(grouped.to_mask(), brute_mask(block_mask, columns[:, :, groups], 300, 350))


def brute_pool(block_mask, columns, q_len, k_len, pool):
    """{(b, h, m): [(key block, n_b), ...]}: blocks not selected, ending at or before the first row of query
    block m, with n_b = 64 minus the distinct columns inside them (n_b = 0: not pooled)."""
    prefix, out = k_len - q_len, {}
    for b in range(block_mask.shape[0]):
        for h in range(block_mask.shape[1]):
            for m in range(block_mask.shape[2]):
                cols = columns[b, h] if columns.dim() == 3 else columns[b, h, m]
                pooled = []
                for kb in range(block_mask.shape[3]):
                    if pool[h] and kb * BLOCK + BLOCK - 1 <= prefix + m * BLOCK and not block_mask[b, h, m, kb]:
                        n = BLOCK - len({c for c in cols.tolist() if c >= 0 and c // BLOCK == kb})
                        pooled += [(kb, n)] if n else []
                out[b, h, m] = pooled
    return out


def test_pool_shift_scales_the_pooled_weights_of_its_heads():
    g = torch.Generator().manual_seed(5)
    block_mask = torch.rand(1, 3, 5, 5, generator=g) < 0.3
    columns = torch.randint(-1, 300, (1, 3, 40), generator=g)
    pool = torch.tensor([True, True, False])
    plain = build_index(block_mask, columns, 300, 300, pool=pool)
    index = build_index(block_mask, columns, 300, 300, pool=pool, pool_shift=torch.tensor([0.0, 1.0, 3.0]))
    assert torch.equal(index.pool_idx, plain.pool_idx) and torch.equal(index.pool_count, plain.pool_count)
    assert index.pool_size.dtype == torch.float32 and plain.pool_count[0, 1].sum() > 0
    factor = torch.tensor([1.0, math.exp(-1.0), 1.0]).view(1, 3, 1, 1)  # head 2 does not pool: nothing to scale
    torch.testing.assert_close(index.pool_size, plain.pool_size * factor)


@pytest.mark.parametrize("q_len,k_len,per_block", [(300, 300, False), (130, 517, True), (70, 70, False)])
def test_pooled_blocks_and_sizes_match_brute_force(q_len, k_len, per_block):
    g = torch.Generator().manual_seed(q_len)
    nqb, nkb = -(-q_len // BLOCK), -(-k_len // BLOCK)
    block_mask = torch.rand(2, 3, nqb, nkb, generator=g) < 0.3
    shape = (2, 3, nqb, 90) if per_block else (2, 3, 90)
    columns = torch.randint(-1, k_len, shape, generator=g)
    columns[..., :64] = torch.arange(64) + 64  # key block 1 wholly read as columns: never pooled
    pool = torch.tensor([True, False, True])
    index = build_index(block_mask, columns, q_len, k_len, pool=pool)
    expected = brute_pool(block_mask, columns, q_len, k_len, pool)
    for (b, h, m), pooled in expected.items():
        n = index.pool_count[b, h, m]
        assert list(zip(index.pool_idx[b, h, m, :n].tolist(), index.pool_size[b, h, m, :n].tolist())) == pooled
        assert (index.pool_idx[b, h, m, n:] == -1).all() and (index.pool_size[b, h, m, n:] == 0).all()
    assert index.pool_count.sum() > 0 and all(kb != 1 for pooled in expected.values() for kb, _ in pooled)
    # density: the exact pairs plus one key per row for every pooled block
    rows = torch.tensor([min(BLOCK, q_len - m * BLOCK) for m in range(nqb)])
    extra = (index.pool_count.long() * rows).sum(-1)
    causal = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len).sum()
    exact = brute_mask(block_mask, columns, q_len, k_len).sum((-1, -2))
    torch.testing.assert_close(index.head_density(), (exact + extra).double() / causal)
    unpooled = build_index(block_mask, columns, q_len, k_len)
    assert not unpooled.pooled and torch.equal(unpooled.to_mask(), index.to_mask())  # recall counts exact keys only
