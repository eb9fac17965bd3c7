"""Sparse prefill attention kernels behind one dispatcher.

``sparse_attention(q, k, v, index)`` checks its inputs and runs one backend:

- ``"triton"``: the Triton flash-attention kernel (``triton_sparse.py``), the default on CUDA tensors when
  triton is installed (on CPU tensors under ``TRITON_INTERPRET=1`` when asked for by name: tests);
- ``"cpu"``: gathered key blocks + columns and batched matmuls (``cpu.py``), the default on CPU tensors;
- ``"reference"``: dense attention under the index's mask (``reference.py``): the ground truth, small inputs.

Only torch is required; triton is imported when the Triton backend is first used.
"""

from __future__ import annotations

import importlib.util
import math

import torch

from kvtier.kernels.index import BLOCK, SparseAttentionError, SparseIndex, build_index, dense_index

__all__ = ["BLOCK", "BACKENDS", "SparseAttentionError", "SparseIndex", "build_index", "dense_index",
           "default_backend", "sparse_attention"]

BACKENDS = ("triton", "cpu", "reference")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def default_backend(device: torch.device) -> str:
    """``"triton"`` on CUDA with triton installed, ``"reference"`` on CUDA without it, else ``"cpu"``.
    (The Triton interpreter, ``TRITON_INTERPRET=1``, runs the kernel on CPU tensors when asked by name.)"""
    if device.type == "cuda":
        return "triton" if triton_available() else "reference"
    return "cpu"


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
                     scale: float | None = None, backend: str = "auto") -> torch.Tensor:
    """Causal attention of the queries over the keys the index lists.

    q: ``[B, H, q_len, D]``, the last ``q_len`` positions; k, v: ``[B, Hkv, k_len, D]`` with ``H % Hkv == 0``
    and ``q_len <= k_len`` (the first ``k_len - q_len`` keys are a cached prefix); all one dtype (fp16, bf16,
    fp32) and one device. scale: softmax scale, default ``1 / sqrt(D)``. Returns ``[B, H, q_len, D]``.
    """
    _check(q, k, v, index)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = default_backend(q.device) if backend == "auto" else backend
    if backend == "triton":
        if not triton_available():
            raise SparseAttentionError("backend 'triton' needs the triton package, which is not installed")
        dim = q.shape[-1]
        if dim < 16 or dim > 256 or dim & (dim - 1):
            raise SparseAttentionError(f"the Triton kernel needs a head dim that is a power of two in [16, 256], got {dim}")
        from kvtier.kernels.triton_sparse import triton_sparse_attention

        return triton_sparse_attention(q, k, v, index, scale)
    if backend == "cpu":
        if q.device.type != "cpu":
            raise SparseAttentionError(f"backend 'cpu' needs CPU tensors, got {q.device}")
        from kvtier.kernels.cpu import cpu_sparse_attention

        return cpu_sparse_attention(q, k, v, index, scale)
    if backend == "reference":
        from kvtier.kernels.reference import reference_sparse_attention

        return reference_sparse_attention(q, k, v, index, scale)
    raise SparseAttentionError(f"unknown backend {backend!r}; choose one of {BACKENDS} or 'auto'")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise SparseAttentionError(f"{name} must be a 4-D tensor [batch, heads, tokens, head_dim], "
                                       f"got {getattr(x, 'shape', type(x).__name__)}")
    if k.shape != v.shape:
        raise SparseAttentionError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, heads, q_len, dim = q.shape
    if k.shape[0] != batch or k.shape[3] != dim:
        raise SparseAttentionError(f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch or head_dim")
    if k.shape[1] == 0 or heads % k.shape[1]:
        raise SparseAttentionError(f"query heads ({heads}) must be a multiple of KV heads ({k.shape[1]})")
    if not 1 <= q_len <= k.shape[2]:
        raise SparseAttentionError(f"need 1 <= q_len <= k_len, got q_len={q_len}, k_len={k.shape[2]}")
    if len({q.device, k.device, v.device}) != 1:
        raise SparseAttentionError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if len({q.dtype, k.dtype, v.dtype}) != 1 or q.dtype not in DTYPES:
        raise SparseAttentionError(f"q, k, v must share one dtype among {DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(index, SparseIndex):
        raise SparseAttentionError(f"index must be a SparseIndex, got {type(index).__name__}")
    index.check(batch, heads, q_len, k.shape[2], q.device)
