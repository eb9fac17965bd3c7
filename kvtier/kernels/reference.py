"""Ground truth for sparse attention: dense attention under the index's mask, in float32 (small inputs only)."""

from __future__ import annotations

import torch

from kvtier.kernels.index import BLOCK, SparseIndex, block_means


def reference_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                               scale: float) -> torch.Tensor:
    """Attention of every query row over exactly the (query, key) pairs of ``index.to_mask()``, plus the pooled
    keys of ``index`` (if any) in the same softmax: one per pooled key block, key and value the block's means,
    logit ``q . mean * scale + log(pool_size)`` (``n_b``, times ``exp(-pool_shift)`` of the head).

    q: ``[B, H, q_len, D]``; k, v: ``[B, Hkv, k_len, D]`` with ``H % Hkv == 0`` (query head ``h`` reads KV head
    ``h // (H // Hkv)``). Returns ``[B, H, q_len, D]`` in q's dtype; a row with no key is zero. Builds the full
    ``q_len x k_len`` mask: for tests, not for long inputs.
    """
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~index.to_mask(), float("-inf"))
    if index.pooled:
        pooled = torch.matmul(q.float(), block_means(kf).transpose(-1, -2)) * scale + _pool_bias(index)
        scores = torch.cat([scores, pooled], dim=-1)
        vf = torch.cat([vf, block_means(vf)], dim=-2)
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, vf).to(q.dtype)


def _pool_bias(index: SparseIndex) -> torch.Tensor:
    """``log(pool_size)`` for every row and pooled key block, ``-inf`` elsewhere: float32 ``[B, H, q_len, NKB]``."""
    num_kb = -(-index.k_len // BLOCK)
    size = torch.zeros(*index.pool_idx.shape[:3], num_kb + 1, device=index.device)
    size.scatter_(-1, torch.where(index.pool_idx >= 0, index.pool_idx.long(), num_kb), index.pool_size.float())
    return size[..., :num_kb].log().repeat_interleave(BLOCK, dim=2)[:, :, : index.q_len]
