"""How much of the dense attention a sparse index keeps, and how far its output is from dense."""

from __future__ import annotations

import torch

from kvtier.kernels.index import BLOCK, SparseIndex


def attention_recall(q: torch.Tensor, k: torch.Tensor, indices: list[SparseIndex], scale: float,
                     block_step: int = 1) -> torch.Tensor:
    """Share of the dense causal attention mass that each index keeps, averaged over query rows.

    q: ``[B, H, q_len, D]``; k: ``[B, Hkv, k_len, D]``. Returns float64 ``[len(indices), B, H]`` in [0, 1].
    ``block_step`` > 1 averages over every ``block_step``-th query block only (always including the last):
    an unbiased sample that costs ``1 / block_step`` of the work. Dense probabilities are computed one
    query block (64 rows) at a time, never for all rows at once.
    """
    batch, heads, q_len, _ = q.shape
    k_len, group = k.shape[2], heads // k.shape[1]
    keys = k.float().repeat_interleave(group, dim=1)
    num_qb = -(-q_len // BLOCK)
    chosen = [m for m in range(num_qb) if m % block_step == (num_qb - 1) % block_step]
    kept = torch.zeros(len(indices), batch, heads, dtype=torch.float64)
    rows = 0
    for m in chosen:
        r0, r1 = m * BLOCK, min((m + 1) * BLOCK, q_len)
        pos = torch.arange(r0, r1, device=q.device) + (k_len - q_len)
        scores = torch.matmul(q[:, :, r0:r1].float(), keys.transpose(-1, -2)) * scale
        scores.masked_fill_(torch.arange(k_len, device=q.device) > pos[:, None], float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        for j, index in enumerate(indices):
            kept[j] += (probs * index.to_mask(m, m + 1)).sum((-1, -2)).double().cpu()
        rows += r1 - r0
    return kept / rows


def output_error(out: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """Relative L2 error of each head's attention output: out, dense ``[B, H, rows, D]`` -> float64 ``[B, H]``."""
    out, dense = out.double(), dense.double()
    return (out - dense).norm(dim=(-1, -2)) / dense.norm(dim=(-1, -2))
