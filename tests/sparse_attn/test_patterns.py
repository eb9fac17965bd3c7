"""Every pattern's index against a brute-force construction from its definition, and online estimation."""

from __future__ import annotations

import math

import pytest
import torch

from kvtier.kernels import BLOCK, sparse_attention
from kvtier.sparse_attn.config import HeadPattern
from kvtier.sparse_attn.estimate import (BLOCK_SAMPLE, DENSE_LAST, GROUP_BLOCKS, SINK_COLUMNS, _adaptive_selection,
                                         block_scores, estimate_index, probe_groups, probe_rows, probe_scores, select)
from kvtier.sparse_attn.metrics import attention_recall, output_error
from kvtier.sparse_attn.patterns import a_shape_index, block_sparse_index, slash_blocks, vertical_slash_index


def mask_from_keys(keys_per_block, columns_per_block, q_len, k_len, whole_blocks=True):
    """[q_len, k_len] bool: query row i reads the blocks holding ``keys_per_block[i // 64]`` and the columns."""
    mask = torch.zeros(q_len, k_len, dtype=torch.bool)
    for i in range(q_len):
        m = i // BLOCK
        for j in keys_per_block[m]:
            mask[i, (j // BLOCK) * BLOCK: (j // BLOCK + 1) * BLOCK] = True
        for j in columns_per_block[m]:
            mask[i, j] = True
    return mask[:, :k_len] & torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)


def rows_of(m, q_len, k_len):
    return range(k_len - q_len + m * BLOCK, k_len - q_len + min(q_len, (m + 1) * BLOCK))


@pytest.mark.parametrize("q_len,k_len,sink,local", [(300, 300, 10, 100), (150, 470, 64, 64), (200, 200, 0, 1)])
def test_a_shape_matches_brute_force(q_len, k_len, sink, local):
    blocks = [[j for j in range(k_len) if j < sink or any(p - local < j <= p for p in rows_of(m, q_len, k_len))]
              for m in range(-(-q_len // BLOCK))]
    expected = mask_from_keys(blocks, [[]] * len(blocks), q_len, k_len)
    index = a_shape_index(1, 2, q_len, k_len, sink, local)
    assert torch.equal(index.to_mask()[0, 0], expected) and torch.equal(index.to_mask()[0, 1], expected)


@pytest.mark.parametrize("q_len,k_len", [(300, 300), (100, 420)])
def test_vertical_slash_matches_brute_force(q_len, k_len):
    g = torch.Generator().manual_seed(q_len)
    columns = torch.randint(-1, k_len, (1, 1, 12), generator=g)
    offsets = torch.cat([torch.tensor([[[0, 5]]]), torch.randint(-1, k_len, (1, 1, 6), generator=g)], -1)
    num_qb = -(-q_len // BLOCK)
    blocks = [[p - s for p in rows_of(m, q_len, k_len) for s in offsets[0, 0].tolist() if s >= 0 and p - s >= 0]
              for m in range(num_qb)]
    cols = [[c for c in columns[0, 0].tolist() if c >= 0]] * num_qb
    expected = mask_from_keys(blocks, cols, q_len, k_len)
    assert torch.equal(vertical_slash_index(columns, offsets, q_len, k_len).to_mask()[0, 0], expected)


def test_block_sparse_matches_brute_force():
    g = torch.Generator().manual_seed(5)
    selection = torch.rand(1, 1, 4, 6, generator=g) < 0.4
    q_len, k_len = 250, 370
    blocks = [[b * BLOCK for b in range(6) if selection[0, 0, m, b]] for m in range(4)]
    expected = mask_from_keys(blocks, [[]] * 4, q_len, k_len)
    assert torch.equal(block_sparse_index(selection, q_len, k_len).to_mask()[0, 0], expected)


def brute_select(scores, forced, count, mass, cost=None):
    keep = []
    total = sum(scores)
    cost = cost or [1.0] * len(scores)
    order = sorted(range(len(scores)), key=lambda i: (not forced[i], -scores[i] / cost[i]))
    covered = 0.0
    for rank, i in enumerate(order):
        if forced[i] or (rank < count and covered < mass * total):
            keep.append(i)
        covered += scores[i]
    return sorted(keep)


@pytest.mark.parametrize("count,mass", [(5, math.inf), (100, 0.5), (3, 0.9), (100, 1.0)])
def test_select_matches_brute_force(count, mass):
    g = torch.Generator().manual_seed(count)
    scores = torch.rand(1, 1, 40, generator=g) ** 4
    forced = torch.arange(40) < 2
    got = select(scores, forced, torch.tensor([count]), torch.tensor([mass], dtype=torch.float64))
    expected = brute_select(scores[0, 0].tolist(), forced.tolist(), count, mass)
    assert torch.nonzero(got[0, 0]).flatten().tolist() == expected


@pytest.mark.parametrize("mass", [0.3, 0.6, 0.9])
def test_select_by_score_per_cost_matches_brute_force(mass):
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(1, 1, 40, generator=g) ** 4
    cost = torch.where(torch.arange(40) % 4 == 0, 64.0, 1.0)  # every 4th item costs 64
    scores[..., ::4] *= 30
    forced = torch.arange(40) < 2
    got = select(scores, forced, torch.tensor([100]), torch.tensor([mass], dtype=torch.float64), cost)
    expected = brute_select(scores[0, 0].tolist(), forced.tolist(), 100, mass, cost.tolist())
    assert torch.nonzero(got[0, 0]).flatten().tolist() == expected
    unit = select(scores, forced, torch.tensor([100]), torch.tensor([mass], dtype=torch.float64))
    assert not torch.equal(got, unit)  # by score alone the costly items come first


@pytest.mark.parametrize("q_len,k_len", [(1000, 1000), (700, 1000), (650, 937)])
def test_the_end_offsets_of_a_diagonal_bin_read_the_blocks_of_the_whole_bin(q_len, k_len):
    for b in (0, 1, 3, 9):
        every = torch.arange(b * BLOCK, (b + 1) * BLOCK)[None, None]
        ends = torch.tensor([b * BLOCK, b * BLOCK + BLOCK - 1])[None, None]
        assert torch.equal(slash_blocks(ends, q_len, k_len), slash_blocks(every, q_len, k_len))


def planted(q_len=600, k_len=600, dim=32, column=137, offset=200, seed=0):
    """Queries and keys whose attention has one strong column and one strong diagonal."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, q_len, dim, generator=g) * 0.3
    k = torch.randn(1, 1, k_len, dim, generator=g) * 0.3
    q[..., 0] += 3.0
    k[0, 0, column, 0] += 19.0  # a key every query attends to
    prefix = k_len - q_len
    for i in range(q_len):  # query at position p matches the key at p - offset
        if prefix + i - offset >= 0:
            q[0, :, i, 1:] += 27 * k[0, 0, prefix + i - offset, 1:] / k[0, 0, prefix + i - offset, 1:].norm()
    return q, k


@pytest.mark.parametrize("pattern", [HeadPattern("vertical_slash", vertical=70, slash=66),
                                     HeadPattern("vertical_slash", mass=0.8)])
def test_estimation_finds_planted_structure(pattern):
    q, k = planted(1200, 1200)
    scale = 1 / math.sqrt(q.shape[-1])
    index = estimate_index(q, k, [pattern] * 2, scale)
    recall = attention_recall(q, k, [index], scale, block_step=3)[0]
    assert (recall > 0.9).all(), recall
    assert index.density() < 0.6, index.density()  # 0.1 of it: the last 64 rows, always read in full
    if pattern.kind == "vertical_slash":
        mask = index.to_mask()[0, 0]
        assert mask[-1, 137] and mask[-1, 1199 - 200] and mask[-1, :SINK_COLUMNS].all()


@pytest.mark.parametrize("pattern", [HeadPattern("block_sparse", mass=0.9), HeadPattern("block_sparse", blocks=3)])
def test_block_sparse_estimation_finds_planted_blocks(pattern):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1000, 32, generator=g) * 0.3
    k = torch.randn(1, 1, 1000, 32, generator=g) * 0.3
    q[..., 0] += 3.0
    k[0, 0, 320:384, 0] += 8.0  # key block 5 draws every query
    index = estimate_index(q, k, [pattern] * 2)
    mask = index.to_mask()[0, 1]
    assert mask[400:, 320:384].all() and mask[64:, :64].all()
    assert index.density() < 0.6, index.density()  # 0.13 of it: the last 64 rows, always read in full
    assert (attention_recall(q, k, [index], 1 / math.sqrt(32), block_step=2) > 0.8).all()


def test_fixed_budgets_limit_the_index():
    q, k = planted()
    index = estimate_index(q, k, [HeadPattern("vertical_slash", vertical=64, slash=64)] * 2)
    assert int(index.col_count.max()) <= 64
    # 64 nearest diagonals cover at most 2 key blocks per query block; the last 64 rows read every key block
    last = (600 - 64) // BLOCK
    assert int(index.block_count[..., :last].max()) <= 2 and (index.block_count[..., last:] == torch.arange(9, 11)).all()


def test_mixed_patterns_with_cached_prefix_run_and_match_the_reference():
    q, k = planted(q_len=200, k_len=650, offset=100)
    v = torch.randn_like(k)
    patterns = [HeadPattern("a_shape", sink=64, local=128), HeadPattern("vertical_slash", mass=0.9)]
    index = estimate_index(q, k, patterns)
    assert (index.q_len, index.k_len, index.heads) == (200, 650, 2)
    expected = sparse_attention(q, k, v, index, backend="reference")
    torch.testing.assert_close(sparse_attention(q, k, v, index, backend="cpu"), expected, atol=1e-5, rtol=1e-5)
    recall = attention_recall(q, k, [index], 1 / math.sqrt(32), block_step=2)
    assert recall.shape == (1, 1, 2) and (recall > 0).all() and (recall <= 1 + 1e-9).all()


def test_pool_flag_adds_pooled_keys_to_its_heads_only():
    q, k = planted(q_len=200, k_len=650, offset=100)
    v = torch.randn_like(k)
    patterns = [HeadPattern("a_shape", sink=64, local=128, pool=True), HeadPattern("vertical_slash", mass=0.9)]
    index = estimate_index(q, k, patterns)
    plain = estimate_index(q, k, [HeadPattern("a_shape", sink=64, local=128), patterns[1]])
    assert index.pooled and not plain.pooled and torch.equal(index.to_mask(), plain.to_mask())
    assert index.pool_count[0, 0].sum() > 0 and index.pool_count[0, 1].sum() == 0
    density, plain_density = index.head_density()[0], plain.head_density()[0]
    assert density[0] > plain_density[0] and density[1] == plain_density[1]
    expected = sparse_attention(q, k, v, index, backend="reference")
    torch.testing.assert_close(sparse_attention(q, k, v, index, backend="cpu"), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expected[:, 1], sparse_attention(q, k, v, plain, backend="reference")[:, 1])


def test_per_block_slash_offsets_equal_one_index_per_block():
    g = torch.Generator().manual_seed(9)
    q_len, k_len = 260, 400
    offsets = torch.randint(-1, k_len, (1, 2, 5, 4), generator=g)  # [B, H, NQB, S]
    per_block = slash_blocks(offsets, q_len, k_len)
    for m in range(5):
        assert torch.equal(per_block[:, :, m], slash_blocks(offsets[:, :, m], q_len, k_len)[:, :, m])


@pytest.mark.parametrize("spread", [False, True])
@pytest.mark.parametrize("q_len,k_len,heads", [(2100, 2100, [0, 1, 2, 3]), (2200, 2477, [3, 1])])
def test_probe_scores_match_a_dense_softmax(q_len, k_len, heads, spread):
    """Column and diagonal scores against every probe row's full causal softmax, summed by key and (past the sink
    columns) by offset (GQA: 4 query heads over 2 KV heads; a cached prefix; a subset of the heads, out of order)."""
    g = torch.Generator().manual_seed(k_len)
    q = torch.randn(1, 4, q_len, 16, generator=g, dtype=torch.float64).float()
    k = torch.randn(1, 2, k_len, 16, generator=g, dtype=torch.float64).float()
    ends = probe_groups(q_len)[0]
    assert len(ends) > 1
    vertical, slash = probe_scores(q, k, torch.tensor(heads), ends, 0.3, spread)
    for gi, end in enumerate(ends):
        for hi, h in enumerate(heads):
            want_v = torch.zeros(k_len, dtype=torch.float64)
            want_s = torch.zeros(k_len, dtype=torch.float64)
            for i in probe_rows(ends[gi - 1] if gi else 0, end, spread).tolist():
                p = k_len - q_len + i
                probs = torch.softmax(k[0, h // 2, : p + 1].double() @ q[0, h, i].double() * 0.3, dim=0)
                want_v[: p + 1] += probs
                probs[:SINK_COLUMNS] = 0  # the always-kept sink columns count as columns only
                want_s[: p + 1] += probs.flip(0)  # offset p - j for key j
            assert torch.allclose(vertical[0, hi, gi].double(), want_v, atol=1e-5)
            assert torch.allclose(slash[0, hi, gi].double(), want_s, atol=1e-5)


@pytest.mark.parametrize("start,end", [(0, 1024), (1088, 2100), (0, 100), (0, 40), (3000, 3077)])
def test_probe_rows(start, end):
    last = probe_rows(start, end, spread=False).tolist()
    assert last == list(range(max(start, end - 64), end))
    rows = probe_rows(start, end, spread=True).tolist()
    assert len(rows) == min(64, end - start) and rows[-1] == end - 1 and rows[0] >= start
    stride = max(1, (end - start) // 64)
    assert {b - a for a, b in zip(rows, rows[1:])} <= {stride}  # evenly spaced over the group
    assert rows[0] - start < stride + 64  # reaching back to the group's start


@pytest.mark.parametrize("q_len,k_len", [(300, 300), (250, 470), (64, 64), (1, 130)])
def test_block_scores_match_a_dense_softmax(q_len, k_len):
    """Per query block: the mean over its sampled rows of each row's causal softmax summed per key block."""
    g = torch.Generator().manual_seed(q_len + k_len)
    q = torch.randn(1, 2, q_len, 16, generator=g, dtype=torch.float64).float()
    k = torch.randn(1, 2, k_len, 16, generator=g, dtype=torch.float64).float()
    got = block_scores(q, k, 0.4)
    num_qb, num_kb = -(-q_len // BLOCK), -(-k_len // BLOCK)
    assert got.shape == (1, 2, num_qb, num_kb)
    for h in range(2):
        for m in range(num_qb):
            rows = [min(r, q_len - 1) for r in range(m * BLOCK + BLOCK_SAMPLE - 1, (m + 1) * BLOCK, BLOCK_SAMPLE)]
            want = torch.zeros(num_kb, dtype=torch.float64)
            for i in rows:
                p = k_len - q_len + i
                probs = torch.softmax(k[0, h, : p + 1].double() @ q[0, h, i].double() * 0.4, dim=0)
                want.index_add_(0, torch.arange(p + 1) // BLOCK, probs)
            assert torch.allclose(got[0, h, m].double(), want / len(rows), atol=1e-6), (h, m)


@pytest.mark.parametrize("q_len,probes,want", [(8192, 8, 8), (1200, 8, 1), (2100, 8, 2), (8192, 1, 1), (40, 8, 1)])
def test_probe_groups_cut_the_query_blocks_evenly(q_len, probes, want):
    ends, groups = probe_groups(q_len, probes)
    num_qb = -(-q_len // BLOCK)
    assert len(ends) == want and ends[-1] == q_len and groups.shape == (num_qb,)
    assert groups.tolist() == sorted(groups.tolist()) and int(groups[-1]) == want - 1
    sizes = torch.bincount(groups).tolist()
    assert (min(sizes) >= GROUP_BLOCKS or want == 1) and max(sizes) - min(sizes) <= 1
    for g, end in enumerate(ends):  # a group ends with its last block (its probe: the rows before `end`)
        assert -(-end // BLOCK) - 1 == max(m for m in range(num_qb) if groups[m] == g)


def test_adaptive_vertical_slash_keeps_what_earlier_queries_attend_to(monkeypatch):
    """The first half of the queries attends to key 300, the second half to key 1500: one probe at the end
    finds only the second; a probe per group finds both."""
    import kvtier.sparse_attn.estimate as estimate

    g = torch.Generator().manual_seed(0)
    n, dim = 2048, 32
    q = torch.randn(1, 1, n, dim, generator=g) * 0.3
    k = torch.randn(1, 1, n, dim, generator=g) * 0.3
    q[0, 0, : n // 2, 0] += 6.0
    q[0, 0, n // 2:, 1] += 6.0
    k[0, 0, 300, 0] += 12.0
    k[0, 0, 1500, 1] += 12.0
    pattern = [HeadPattern("vertical_slash", mass=0.5)]
    index = estimate_index(q, k, pattern)
    mask = index.to_mask()[0, 0]
    assert mask[400:1024, 300].all() and mask[1500:, 1500].all()
    assert attention_recall(q, k, [index], 1 / math.sqrt(dim))[0, 0, 0] > 0.7
    assert index.density() < 0.4, index.density()
    monkeypatch.setattr(estimate, "PROBES", 1)
    assert not estimate_index(q, k, pattern).to_mask()[0, 0, 600:1024, 300].all()


def test_adaptive_selection_keeps_diagonal_bins_ranked_by_score_per_cost():
    """Bin 2 (offsets 128-191) holds most of the mass in 61 weak diagonals; key 300 is one strong column. By
    score per cost the column comes before the bin; by score alone it would not fit in the mass."""
    k_len = 512
    vertical = torch.zeros(1, 1, 1, k_len)
    vertical[..., 300] = 2.0
    slash = torch.zeros(1, 1, 1, k_len)
    slash[..., :64] = 1 / 64
    slash[..., 130:191] = 0.2
    slash[..., 400] = 1.5
    keep_cols = torch.ones(1, 1, 1, k_len, dtype=torch.bool)
    cols, diags = _adaptive_selection(vertical, slash, keep_cols, torch.tensor([k_len]),
                                      torch.tensor([0.5], dtype=torch.float64))
    assert torch.nonzero(cols[0, 0, 0]).flatten().tolist() == list(range(SINK_COLUMNS)) + [300]
    assert sorted(d for d in diags[0, 0, 0].tolist() if d >= 0) == [0, 63, 128, 191]


def test_adaptive_vertical_slash_reads_whole_diagonal_bins():
    """A strong diagonal at offset 200 brings in its whole bin (offsets 192-255); a strong column stays a column."""
    q, k = planted(1200, 1200)
    index = estimate_index(q, k, [HeadPattern("vertical_slash", mass=0.8)] * 2)
    mask = index.to_mask()[0, 0]
    rows = torch.arange(600, 1100)
    for offset in (192, 200, 255):
        assert mask[rows, rows - offset].all()
    assert mask[200:, 137].all() and not mask[1000:1080, 138].any()  # rows 1088 on read every key


@pytest.mark.parametrize("pattern", [HeadPattern("a_shape", sink=64, local=64), HeadPattern("block_sparse", blocks=1),
                                     HeadPattern("vertical_slash", vertical=0, slash=0)])
def test_the_last_queries_read_every_causal_key(pattern):
    q, k = planted(q_len=700, k_len=900)
    mask = estimate_index(q, k, [pattern] * 2).to_mask()[0]
    causal = torch.ones(700, 900, dtype=torch.bool).tril(200)
    assert torch.equal(mask[:, -DENSE_LAST:], causal[-DENSE_LAST:].expand(2, -1, -1))
    assert not mask[:, : 700 - 2 * BLOCK].equal(causal[: 700 - 2 * BLOCK].expand(2, -1, -1))


def test_dense_heads_read_every_causal_key_beside_sparse_ones():
    q, k = planted(q_len=300, k_len=700)
    v = torch.randn_like(k)
    index = estimate_index(q, k, [HeadPattern("dense"), HeadPattern("a_shape", sink=0, local=64)])
    mask = index.to_mask()[0]
    causal = torch.ones(300, 700, dtype=torch.bool).tril(400)
    assert torch.equal(mask[0], causal) and not torch.equal(mask[1], causal)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1),
                                                             attn_mask=causal)
    torch.testing.assert_close(sparse_attention(q, k, v, index, backend="cpu")[:, 0], dense[:, 0], atol=1e-5, rtol=1e-5)


def test_output_error_is_the_relative_l2_error_of_each_head():
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(2, 3, 50, 8, generator=g)
    noise = torch.randn(2, 3, 50, 8, generator=g)
    out = dense + noise * torch.tensor([0.0, 0.1, 1.0])[:, None, None]
    error = output_error(out, dense)
    assert error.shape == (2, 3) and error.dtype == torch.float64
    for b in range(2):
        for h in range(3):
            want = math.sqrt(float(((out[b, h] - dense[b, h]) ** 2).sum()) / float((dense[b, h] ** 2).sum()))
            assert error[b, h].item() == pytest.approx(want, rel=1e-6)
    assert error[:, 0].eq(0).all()


@pytest.mark.parametrize("q_len,k_len", [(640, 640), (700, 700), (300, 1000), (260, 301), (64, 64), (1, 200)])
def test_shared_slash_offsets_as_a_band_equal_the_per_block_computation(q_len, k_len):
    g = torch.Generator().manual_seed(q_len + k_len)
    num_qb = -(-q_len // BLOCK)
    offsets = torch.randint(-1, k_len + 80, (2, 3, 40), generator=g)  # [B, H, S], past the keys too
    offsets[..., :3] = torch.tensor([-1, 0, k_len - 1])
    band = slash_blocks(offsets, q_len, k_len)
    per_block = slash_blocks(offsets[:, :, None].expand(-1, -1, num_qb, -1).contiguous(), q_len, k_len)
    assert per_block.shape[2] == num_qb == band.shape[2] and torch.equal(band, per_block)
