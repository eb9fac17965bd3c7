"""Ground truth for sparse attention: dense attention under the index's mask, in float32 (small inputs only)."""

from __future__ import annotations

import torch

from kvtier.kernels.index import SparseIndex


def reference_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                               scale: float) -> torch.Tensor:
    """Attention of every query row over exactly the (query, key) pairs of ``index.to_mask()``.

    q: ``[B, H, q_len, D]``; k, v: ``[B, Hkv, k_len, D]`` with ``H % Hkv == 0`` (query head ``h`` reads KV head
    ``h // (H // Hkv)``). Returns ``[B, H, q_len, D]`` in q's dtype; a row with no key is zero. Builds the full
    ``q_len x k_len`` mask: for tests, not for long inputs.
    """
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    mask = index.to_mask()
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, vf).to(q.dtype)
