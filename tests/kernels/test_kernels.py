"""The CPU path and the Triton kernel (on a CUDA GPU where there is one, else under TRITON_INTERPRET=1) against
the reference."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from kvtier.kernels import SparseAttentionError, build_index, dense_index, sparse_attention

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def attend(q, k, v, index, scale=None, backend="auto"):
    """``sparse_attention`` on the backend's device: the Triton kernel runs on CUDA tensors where a GPU is
    present (the interpreter takes CPU tensors only without one). Returns a CPU tensor."""
    if backend == "triton" and torch.cuda.is_available():
        q, k, v, index = q.cuda(), k.cuda(), v.cuda(), index.to("cuda")
    return sparse_attention(q, k, v, index, scale, backend=backend).cpu()


def make_inputs(batch, heads, kv_heads, q_len, k_len, dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=g).to(dtype)
    return q, k, v


def random_index(batch, heads, q_len, k_len, seed=0, density=0.35, columns=24):
    g = torch.Generator().manual_seed(seed)
    block_mask = torch.rand(batch, heads, -(-q_len // 64), -(-k_len // 64), generator=g) < density
    cols = torch.randint(-1, k_len, (batch, heads, columns), generator=g)
    return build_index(block_mask, cols, q_len, k_len)


CASES = [  # batch, heads, kv_heads, q_len, k_len, dim, dtype
    (1, 2, 2, 333, 333, 64, torch.float32),
    (2, 3, 1, 150, 150, 32, torch.float32),  # GQA 3:1, batch 2
    (1, 4, 2, 200, 517, 64, torch.float32),  # cached prefix of 317 keys
    (1, 4, 2, 300, 300, 64, torch.float16),
    (1, 2, 1, 190, 400, 64, torch.float16),  # fp16 + GQA + prefix
    (1, 2, 2, 130, 200, 32, torch.bfloat16),
]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}q{c[3]}k{c[4]}d{c[5]}{str(c[6])[6:]}")
def test_backend_matches_reference(backend, case):
    batch, heads, kv_heads, q_len, k_len, dim, dtype = case
    q, k, v = make_inputs(batch, heads, kv_heads, q_len, k_len, dim, dtype)
    index = random_index(batch, heads, q_len, k_len)
    expected = sparse_attention(q.float(), k.float(), v.float(), index, backend="reference")
    got = attend(q, k, v, index, backend=backend)
    assert got.dtype == dtype and got.shape == q.shape
    torch.testing.assert_close(got.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_dense_index_equals_sdpa(backend):
    q, k, v = make_inputs(1, 4, 2, 300, 700, 64, torch.float32, seed=3)
    out = attend(q, k, v, dense_index(1, 4, 300, 700), scale=0.1, backend=backend)
    causal = torch.ones(300, 700, dtype=torch.bool).tril(400)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=causal, scale=0.1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton", "reference"])
def test_rows_without_keys_are_zero(backend):
    q, k, v = make_inputs(1, 1, 1, 128, 128, 32, torch.float32)
    block_mask = torch.tensor([[[[False, False], [True, True]]]])  # query block 0 reads nothing
    out = attend(q, k, v, build_index(block_mask, None, 128, 128), backend=backend)
    assert torch.equal(out[0, 0, :64], torch.zeros(64, 32))
    assert out[0, 0, 64:].abs().sum() > 0


def test_bad_inputs_are_clear_errors():
    q, k, v = make_inputs(1, 4, 2, 100, 100, 64, torch.float32)
    index = random_index(1, 4, 100, 100)
    with pytest.raises(SparseAttentionError, match="one shape"):
        sparse_attention(q, k, v[:, :, :50], index)
    with pytest.raises(SparseAttentionError, match="multiple of KV heads"):
        sparse_attention(q[:, :3], k, v, random_index(1, 3, 100, 100))
    with pytest.raises(SparseAttentionError, match="q_len <= k_len"):
        sparse_attention(torch.cat([q, q], 2), k, v, index)
    with pytest.raises(SparseAttentionError, match="one device"):
        sparse_attention(q, k.to("meta"), v, index)
    with pytest.raises(SparseAttentionError, match="dtype"):
        sparse_attention(q, k.half(), v.half(), index)
    with pytest.raises(SparseAttentionError, match="the sparse index is for"):
        sparse_attention(q, k, v, random_index(1, 4, 90, 100))
    with pytest.raises(SparseAttentionError, match="4-D"):
        sparse_attention(q[0], k, v, index)
    with pytest.raises(SparseAttentionError, match="unknown backend"):
        sparse_attention(q, k, v, index, backend="cuda-magic")
    q48, k48, v48 = make_inputs(1, 4, 2, 100, 100, 48, torch.float32)
    with pytest.raises(SparseAttentionError, match="power of two"):
        attend(q48, k48, v48, index, backend="triton")


def test_triton_on_cpu_tensors_outside_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = make_inputs(1, 2, 2, 64, 64, 32, torch.float32)
    with pytest.raises(SparseAttentionError, match="needs CUDA tensors"):
        sparse_attention(q, k, v, random_index(1, 2, 64, 64), backend="triton")


def test_default_scale_is_inverse_sqrt_dim():
    q, k, v = make_inputs(1, 2, 2, 70, 70, 16, torch.float32)
    index = random_index(1, 2, 70, 70)
    torch.testing.assert_close(sparse_attention(q, k, v, index), sparse_attention(q, k, v, index, scale=1 / math.sqrt(16)))


def test_cpu_path_with_many_small_runs(monkeypatch):
    """Runs of query blocks whose widest block list and widest column list come from different members."""
    import kvtier.kernels.cpu as cpu

    monkeypatch.setattr(cpu, "CHUNK_SCORES", 64 * 64 * 3)
    q, k, v = make_inputs(1, 2, 1, 700, 900, 32, torch.float32)
    g = torch.Generator().manual_seed(4)
    index = build_index(torch.rand(1, 2, 11, 15, generator=g) < 0.5, torch.randint(-1, 900, (1, 2, 11, 40), generator=g),
                        700, 900)
    expected = sparse_attention(q, k, v, index, backend="reference")
    torch.testing.assert_close(sparse_attention(q, k, v, index, backend="cpu"), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [1, 3])
def test_cpu_path_batches_the_query_heads_of_a_kv_head(monkeypatch, kv_heads):
    """Heads of one KV head with different block and column counts, in runs of several query blocks each."""
    import kvtier.kernels.cpu as cpu

    monkeypatch.setattr(cpu, "CHUNK_SCORES", 3 * 64 * 64 * 6)
    q, k, v = make_inputs(1, 6, kv_heads, 500, 640, 64, torch.float32, seed=5)
    g = torch.Generator().manual_seed(6)
    density = torch.tensor([0.1, 0.9, 0.3, 0.6, 0.05, 1.0])[None, :, None, None]
    block_mask = torch.rand(1, 6, 8, 10, generator=g) < density
    columns = torch.randint(-1, 640, (1, 6, 8, 70), generator=g)
    columns[:, 1::2, :, 3:] = -1  # a few columns only for every other head
    index = build_index(block_mask, columns, 500, 640)
    expected = sparse_attention(q, k, v, index, backend="reference")
    torch.testing.assert_close(sparse_attention(q, k, v, index, backend="cpu"), expected, atol=1e-5, rtol=1e-5)


POOLED_CASES = [  # batch, heads, kv_heads, q_len, k_len, dim, dtype
    (1, 2, 2, 333, 333, 64, torch.float32),
    (2, 3, 1, 150, 150, 32, torch.float32),  # GQA 3:1, batch 2
    (1, 4, 2, 200, 517, 64, torch.float32),  # cached prefix of 317 keys
    (1, 2, 1, 190, 400, 64, torch.float16),  # fp16 + GQA + prefix
]


def pooled_index(batch, heads, q_len, k_len, seed=0, shift=None):
    """A random index whose every other head pools; columns fill key block 1 and part of block 2; ``shift``:
    the heads' ``pool_shift`` (``[H]``, None = 0)."""
    g = torch.Generator().manual_seed(seed)
    block_mask = torch.rand(batch, heads, -(-q_len // 64), -(-k_len // 64), generator=g) < 0.3
    cols = torch.cat([torch.arange(64, 150).expand(batch, heads, -1),
                      torch.randint(-1, k_len, (batch, heads, 24), generator=g)], -1)
    return build_index(block_mask, cols, q_len, k_len, pool=torch.arange(heads) % 2 == 0, pool_shift=shift)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", POOLED_CASES,
                         ids=lambda c: f"b{c[0]}h{c[1]}kv{c[2]}q{c[3]}k{c[4]}d{c[5]}{str(c[6])[6:]}")
def test_pooled_backend_matches_reference(backend, case):
    batch, heads, kv_heads, q_len, k_len, dim, dtype = case
    q, k, v = make_inputs(batch, heads, kv_heads, q_len, k_len, dim, dtype)
    index = pooled_index(batch, heads, q_len, k_len)
    assert index.pool_count.sum() > 0
    expected = sparse_attention(q.float(), k.float(), v.float(), index, backend="reference")
    got = attend(q, k, v, index, backend=backend)
    torch.testing.assert_close(got.float(), expected, atol=TOL[dtype], rtol=TOL[dtype])


def test_cpu_pooled_path_with_many_small_runs(monkeypatch):
    import kvtier.kernels.cpu as cpu

    monkeypatch.setattr(cpu, "CHUNK_SCORES", 64 * 64 * 3)
    q, k, v = make_inputs(1, 6, 3, 700, 900, 32, torch.float32, seed=2)
    index = pooled_index(1, 6, 700, 900, seed=2)
    expected = sparse_attention(q, k, v, index, backend="reference")
    torch.testing.assert_close(sparse_attention(q, k, v, index, backend="cpu"), expected, atol=1e-5, rtol=1e-5)


def brute_pooled_attention(q, k, v, index, scale, pool, shift=None):
    """Row by row, batch row 0, ``k``/``v`` with one KV head per query head: softmax over the exact keys of
    ``to_mask()`` and, for a pooling head, per key block ending at or before the query block's first row with
    ``n`` of its keys unread by that row (``n > 0``), one key: the block's mean key, logit + ``log(n)`` minus the
    head's ``shift`` (default 0), with its mean value."""
    shift = [0.0] * q.shape[1] if shift is None else shift
    q_len, k_len = q.shape[2], k.shape[2]
    mask = index.to_mask()[0]
    out = torch.zeros_like(q[0])
    for h in range(q.shape[1]):
        for i in range(q_len):
            first = (i // 64) * 64  # local first row of the query block
            keys, values, logits = k[0, h], v[0, h], k[0, h] @ q[0, h, i] * scale
            extra_logits, extra_values = [], []
            for b in range((k_len - q_len + first + 1) // 64) if pool[h] else []:
                unread = int((~mask[h, first, 64 * b: 64 * b + 64]).sum())
                if unread:
                    extra_logits.append(keys[64 * b: 64 * b + 64].mean(0) @ q[0, h, i] * scale + math.log(unread)
                                        - shift[h])
                    extra_values.append(values[64 * b: 64 * b + 64].mean(0))
            p = torch.softmax(torch.cat([logits[mask[h, i]], torch.tensor(extra_logits)]), 0)
            out[h, i] = p @ torch.cat([values[mask[h, i]], torch.stack(extra_values) if extra_values else values[:0]])
    return out


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_pooled_attention_matches_its_definition(backend):
    """Mean keys of the skipped, fully visible blocks with logit + log(n_b), n_b excluding the columns: dropping
    the log term or counting the columns (block 1 is all columns, block 2 partly) changes the result."""
    q, k, v = make_inputs(1, 2, 2, 150, 330, 16, torch.float32, seed=7)
    index = pooled_index(1, 2, 150, 330, seed=7)
    assert 0 < index.pool_count.sum() and (index.pool_size[index.pool_count > 0][:, 0] < 64).any()
    expected = brute_pooled_attention(q, k, v, index, 0.3, [True, False])
    got = sparse_attention(q, k, v, index, 0.3, backend=backend)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "reference", "triton"])
def test_pool_shift_lowers_the_pooled_logits(backend):
    """``pool_shift`` per head: pooled logit ``log(n_b) - shift``; the pooled head 0 shifted by 1.5 nats (its
    result changes), head 1 does not pool, so its shift does nothing."""
    q, k, v = make_inputs(1, 2, 2, 150, 330, 16, torch.float32, seed=7)
    plain = pooled_index(1, 2, 150, 330, seed=7)
    index = pooled_index(1, 2, 150, 330, seed=7, shift=torch.tensor([1.5, 2.0]))
    assert index.pool_size.dtype == torch.float32
    expected = brute_pooled_attention(q, k, v, index, 0.3, [True, False], [1.5, 2.0])
    got = attend(q, k, v, index, 0.3, backend=backend)[0]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[0], attend(q, k, v, plain, 0.3, backend=backend)[0, 0], atol=1e-3)


def test_inconsistent_pooled_index_is_a_clear_error():
    q, k, v = make_inputs(1, 2, 2, 150, 330, 16, torch.float32)
    index = pooled_index(1, 2, 150, 330)
    for broken in (dataclasses.replace(index, pool_size=None),
                   dataclasses.replace(index, pool_count=index.pool_count[:, :1])):
        with pytest.raises(SparseAttentionError, match="pooled keys are inconsistent"):
            sparse_attention(q, k, v, broken, backend="cpu")
