"""Triton kernel: mixed block + column sparse flash attention (causal, GQA, cached prefix, online softmax).

One program computes one 64-row query block of one (batch, head): it walks the key blocks of the index, then
the single key columns 64 at a time (gathered rows), then, for a pooled index, its pooled keys 64 at a time
(gathered rows of the block means, logits raised by ``log(pool_size)``), keeping a running max and sum (flash
attention).
Inputs stay in their dtype (fp16 / bf16 / fp32) for both ``tl.dot``s, which accumulate in fp32 (IEEE fp32
dots for fp32 inputs); the probabilities are cast to the value dtype for the second one, as FlashAttention
does, and the running max, sum and output accumulator are fp32. Under ``TRITON_INTERPRET=1`` bf16 inputs are
computed in fp32 instead (the interpreter holds bf16 as uint16 and gets its arithmetic wrong). Tiles are 64 x 64 with the head dim a power of two >= 16 (the
shapes a GPU's ``tl.dot`` needs). Import this module only when triton is installed.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kvtier.kernels.index import BLOCK, SparseAttentionError, SparseIndex, block_means


@triton.jit
def _cast(x, UPCAST: tl.constexpr):
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _online_softmax_step(q, k, v, keep, bias, acc, m_i, l_i, qk_scale, PRECISION: tl.constexpr):
    # q [BM, D], k [BN, D], v [BN, D]: the input dtype; keep [BM, BN]: bool; bias: added to the logits (log2 units), a
    # scalar or [1, BN]; acc [BM, D]; m_i, l_i [BM] (log2 units)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale + bias
    s = tl.where(keep, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _sparse_attn_fwd(
    Q, K, V, Out,  # [B, H, q_len, D], [B, Hkv, k_len, D] x2, [B, H, q_len, D]; last dim contiguous
    BlockIdx, BlockCount, ColIdx, ColCount,  # int32 [B, H, NQB, MB], [B, H, NQB], [B, H, NQB, MC], [B, H, NQB]
    KMean, VMean,  # fp32 [B, Hkv, NKB, D]: block means of keys and values (POOLED only)
    PoolIdx, PoolCount, PoolSize,  # int32 [B, H, NQB, MP], [B, H, NQB]; float32 [B, H, NQB, MP] (POOLED only)
    qk_scale,  # softmax scale * log2(e)
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    num_heads, group, q_len, k_len, max_blocks, max_cols, max_pool, num_kb,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    POOLED: tl.constexpr, UPCAST: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64 offsets: long inputs overflow int32
    b = bh // num_heads
    h = bh % num_heads
    kvh = h // group
    row = bh * tl.num_programs(0) + qb  # (b, h, qb) in the index tensors

    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] local query rows
    offs_n = tl.arange(0, BLOCK_N)  # [BN]
    offs_d = tl.arange(0, HEAD_DIM)  # [D]
    q_pos = offs_m + (k_len - q_len)  # [BM] absolute positions
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :]
    q = _cast(tl.load(q_ptrs, mask=offs_m[:, None] < q_len, other=0.0), UPCAST)  # [BM, D]
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    n_blocks = tl.load(BlockCount + row)
    for i in range(0, n_blocks):
        key = tl.load(BlockIdx + row * max_blocks + i) * BLOCK_N + offs_n  # [BN] key positions
        in_range = key < k_len
        k = _cast(tl.load(k_base + key[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None], other=0.0), UPCAST)
        v = _cast(tl.load(v_base + key[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0), UPCAST)
        keep = in_range[None, :] & (key[None, :] <= q_pos[:, None])  # [BM, BN]
        acc, m_i, l_i = _online_softmax_step(q, k, v, keep, 0.0, acc, m_i, l_i, qk_scale, PRECISION)

    n_cols = tl.load(ColCount + row)
    for start in range(0, n_cols, BLOCK_N):
        slot = start + offs_n  # [BN]
        in_range = slot < n_cols
        key = tl.load(ColIdx + row * max_cols + slot, mask=in_range, other=0)  # [BN] key positions
        k = _cast(tl.load(k_base + key[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None], other=0.0), UPCAST)
        v = _cast(tl.load(v_base + key[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0), UPCAST)
        keep = in_range[None, :] & (key[None, :] <= q_pos[:, None])  # [BM, BN]
        acc, m_i, l_i = _online_softmax_step(q, k, v, keep, 0.0, acc, m_i, l_i, qk_scale, PRECISION)

    if POOLED:  # every row sees every pooled key block of its query block
        mean_base = (b * (num_heads // group) + kvh) * num_kb * HEAD_DIM
        n_pool = tl.load(PoolCount + row)
        for start in range(0, n_pool, BLOCK_N):
            slot = start + offs_n  # [BN]
            in_range = slot < n_pool
            kb = tl.load(PoolIdx + row * max_pool + slot, mask=in_range, other=0)  # [BN] key blocks
            size = tl.load(PoolSize + row * max_pool + slot, mask=in_range, other=1).to(tl.float32)
            ptrs = mean_base + kb[:, None] * HEAD_DIM + offs_d[None, :]
            k = tl.load(KMean + ptrs, mask=in_range[:, None], other=0.0).to(q.dtype)
            v = tl.load(VMean + ptrs, mask=in_range[:, None], other=0.0).to(q.dtype)
            keep = in_range[None, :] & (q_pos[:, None] >= 0)  # [BM, BN]
            bias = tl.log2(size)[None, :]
            acc, m_i, l_i = _online_softmax_step(q, k, v, keep, bias, acc, m_i, l_i, qk_scale, PRECISION)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)  # rows that saw no key output zeros
    out = acc / l_safe[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < q_len)


def triton_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                            scale: float) -> torch.Tensor:
    """Sparse attention over ``index`` with the Triton kernel; same contract as ``reference_sparse_attention``.

    q: ``[B, H, q_len, D]``; k, v: ``[B, Hkv, k_len, D]``; D a power of two in [16, 256]. Returns q's dtype.
    """
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if q.device.type != "cuda" and not interpreted:
        raise SparseAttentionError(f"backend 'triton' needs CUDA tensors, got {q.device} "
                                   "(CPU tensors run only in Triton's interpreter, TRITON_INTERPRET=1)")
    batch, heads, q_len, dim = q.shape
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty_like(q)
    grid = (index.num_q_blocks, batch * heads)
    if index.pooled:
        pooled = (block_means(k).contiguous(), block_means(v).contiguous(),
                  index.pool_idx, index.pool_count, index.pool_size)
    else:  # never read (POOLED is off)
        pooled = (q, q, index.block_idx, index.block_count, index.block_idx)
    _sparse_attn_fwd[grid](
        q, k, v, out,
        index.block_idx, index.block_count, index.col_idx, index.col_count,
        *pooled,
        scale * math.log2(math.e),
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, heads // k.shape[1], q_len, k.shape[2], index.block_idx.shape[-1], index.col_idx.shape[-1],
        pooled[2].shape[-1], -(-k.shape[2] // BLOCK),
        BLOCK_M=BLOCK, BLOCK_N=BLOCK, HEAD_DIM=dim,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", POOLED=index.pooled,
        UPCAST=q.dtype == torch.bfloat16 and interpreted,
        num_warps=4, num_stages=2,
    )
    return out
