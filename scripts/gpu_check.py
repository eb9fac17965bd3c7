"""Check kvtier's Triton sparse-attention kernel on a CUDA GPU and time it against dense attention.

Needs only torch, triton and numpy besides kvtier itself (run from the repository root, or with kvtier on
PYTHONPATH): ``python scripts/gpu_check.py [--lengths 32768,131072] [--skip-timing]``. Prints one JSON object:

- ``checks``: the kernel against the PyTorch reference (fp16, bf16, fp32; awkward lengths, GQA, a cached
  prefix; every other head with pooled keys), max abs error and pass/fail per case;
- ``timings``: per length, the sparse kernel (vertical-slash index estimated on the GPU, estimation timed
  separately) against ``scaled_dot_product_attention`` (FlashAttention backend where torch offers it) on
  the same fp16/bf16 inputs, with the density and the speedup ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from kvtier.kernels import build_index, sparse_attention  # noqa: E402
from kvtier.sparse_attn.config import HeadPattern  # noqa: E402
from kvtier.sparse_attn.estimate import estimate_index  # noqa: E402

TOL = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-4}
CASES = [  # batch, heads, kv_heads, q_len, k_len, head_dim, dtype
    (1, 4, 4, 1000, 1000, 64, torch.float16),
    (1, 8, 2, 777, 2049, 128, torch.float16),  # GQA + cached prefix
    (2, 4, 1, 1500, 1500, 128, torch.bfloat16),
    (1, 4, 2, 600, 1300, 64, torch.bfloat16),
    (1, 2, 2, 700, 700, 64, torch.float32),  # IEEE fp32 dots: tight tolerance
]


def check_case(device: str, batch, heads, kv_heads, q_len, k_len, dim, dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(q_len + k_len)
    q = torch.randn(batch, heads, q_len, dim, generator=g).to(device, dtype)
    k = torch.randn(batch, kv_heads, k_len, dim, generator=g).to(device, dtype)
    v = torch.randn(batch, kv_heads, k_len, dim, generator=g).to(device, dtype)
    blocks = torch.rand(batch, heads, -(-q_len // 64), -(-k_len // 64), generator=g) < 0.3
    cols = torch.randint(-1, k_len, (batch, heads, 100), generator=g)
    index = build_index(blocks, cols, q_len, k_len, pool=torch.arange(heads) % 2 == 0).to(device)
    got = sparse_attention(q, k, v, index, backend="triton").float()
    expected = sparse_attention(q.float(), k.float(), v.float(), index, backend="reference")
    err = float((got - expected).abs().max())
    return {"case": f"b{batch} h{heads} kv{kv_heads} q{q_len} k{k_len} d{dim} {str(dtype)[6:]}",
            "max_abs_err": err, "ok": err <= TOL[dtype] * 4}


def timed(fn, repeat: int = 3) -> float:
    fn()
    torch.cuda.synchronize()
    best = math.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def time_length(device: str, n: int, heads: int = 32, kv_heads: int = 8, dim: int = 128,
                vertical: int = 1000, slash: int = 6096) -> dict:
    """Synthetic distance-decaying inputs (as ``kvtier bench sparse`` uses), bf16."""
    from kvtier.bench.sparse import synthetic_qkv

    q, k, v = (x.to(device, torch.bfloat16) for x in synthetic_qkv(heads, kv_heads, n, dim))
    patterns = [HeadPattern("vertical_slash", vertical=vertical, slash=slash)] * heads
    index = estimate_index(q, k, patterns)
    estimate_s = timed(lambda: estimate_index(q, k, patterns), repeat=1)
    sparse_s = timed(lambda: sparse_attention(q, k, v, index, backend="triton"))

    group = heads // kv_heads
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # keeps SDPA on FlashAttention

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

    dense_s = timed(dense)
    rel_err = float((sparse_attention(q, k, v, index, backend="triton").float() - dense().float()).norm()
                    / dense().float().norm())
    return {"tokens": n, "shape": f"{heads}q/{kv_heads}kv x {dim} bf16", "density": index.density(),
            "estimate_s": estimate_s, "sparse_kernel_s": sparse_s, "dense_sdpa_s": dense_s,
            "speedup_kernel": dense_s / sparse_s, "speedup_with_estimate": dense_s / (sparse_s + estimate_s),
            "rel_err_vs_dense": rel_err}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--skip-timing", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")
    import triton

    device = "cuda"
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "checks": [check_case(device, *case) for case in CASES], "timings": []}
    result["all_ok"] = all(c["ok"] for c in result["checks"])
    if not args.skip_timing:
        for n in (int(x) for x in args.lengths.split(",") if x):
            result["timings"].append(time_length(device, n))
            torch.cuda.empty_cache()
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["all_ok"] else 1)


if __name__ == "__main__":
    main()
