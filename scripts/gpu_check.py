"""Check kvtier's Triton sparse-attention kernel on a CUDA GPU and time it against dense attention.

Needs only torch, triton and numpy besides kvtier itself (run from the repository root, or with kvtier on
PYTHONPATH): ``python scripts/gpu_check.py [--lengths 32768,131072] [--skip-timing]``. Prints one JSON object:

- ``checks``: the kernel against the PyTorch reference (fp16, bf16, fp32; awkward lengths, GQA, a cached
  prefix; every other head with pooled keys), max abs error and pass/fail per case; and the index estimated on
  the GPU against the one estimated on the CPU;
- ``timings``: per length, the sparse kernel (vertical-slash index estimated on the GPU, estimation timed
  separately) against ``scaled_dot_product_attention`` (FlashAttention backend where torch offers it) on
  the same fp16/bf16 inputs, with the density and the speedup ratio;
- ``tiers``: the store's CUDA paths (a DeviceTier pool in GPU memory, a pinned HostTier and a DiskTier below
  it; chunks put from and fetched into GPU tensors, demoted and promoted), each get checked equal to what was
  put and timed against a plain copy of the same bytes between the same memories.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kvtier.kernels import build_index, sparse_attention  # noqa: E402
from kvtier.kvstore import DeviceTier, DiskTier, HostTier, TieredStore  # noqa: E402
from kvtier.layout import KVLayout  # noqa: E402
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


ESTIMATION_PATTERNS = [
    HeadPattern("vertical_slash", vertical=300, slash=500), HeadPattern("vertical_slash", mass=0.9),
    HeadPattern("block_sparse", blocks=8), HeadPattern("a_shape", sink=64, local=512),
    HeadPattern("vertical_slash", mass=0.95, pool=True, pool_shift=1.0), HeadPattern("block_sparse", mass=0.9),
    HeadPattern("dense"), HeadPattern("vertical_slash", vertical=100, slash=200, pool=True),
]


def check_estimation(device: str) -> list[dict]:
    """The index estimated on the GPU against the one estimated on the CPU (every pattern kind, fixed and
    adaptive budgets, pooled keys; 4,000 tokens): the share of (row, key) pairs on which their masks agree.
    fp32 runs the same arithmetic on both; bf16 runs the probe's GEMM in bf16 on the GPU, in fp32 on the CPU."""
    from kvtier.bench.sparse import synthetic_qkv

    q, k, _ = synthetic_qkv(len(ESTIMATION_PATTERNS), 2, 4000, 64)
    out = []
    for dtype, need in ((torch.float32, 0.999), (torch.bfloat16, 0.99)):
        on_cpu = estimate_index(q.to(dtype), k.to(dtype), ESTIMATION_PATTERNS)
        on_gpu = estimate_index(q.to(device, dtype), k.to(device, dtype), ESTIMATION_PATTERNS).to("cpu")
        agree = float((on_cpu.to_mask() == on_gpu.to_mask()).float().mean())
        out.append({"case": f"estimate_index cpu vs {device}, {str(dtype)[6:]}", "mask_agreement": agree,
                    "density_cpu": on_cpu.density(), "density_gpu": on_gpu.density(), "ok": agree >= need})
    return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int = 3, setup=None) -> float:
    """Best wall time of ``fn`` over ``repeat`` calls after a warm-up; ``setup`` runs untimed before each."""
    fn()
    sync()
    best = math.inf
    for _ in range(repeat):
        if setup is not None:
            setup()
            sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def long_inputs(device: str, n: int, heads: int, kv_heads: int, dim: int):
    """Synthetic distance-decaying bf16 q, k, v on ``device`` (as ``kvtier bench sparse`` uses) and the dense
    causal SDPA over them (KV heads repeated, which keeps SDPA on FlashAttention): the timings' baseline."""
    from kvtier.bench.sparse import synthetic_qkv

    q, k, v = (x.to(device, torch.bfloat16) for x in synthetic_qkv(heads, kv_heads, n, dim))
    group = heads // kv_heads
    k_full, v_full = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q, k_full, v_full, is_causal=True)

    return q, k, v, dense


def time_length(device: str, n: int, heads: int = 32, kv_heads: int = 8, dim: int = 128,
                vertical: int = 1000, slash: int = 6096) -> dict:
    """The sparse kernel over a fixed-budget vertical-slash index, and its estimation, against dense SDPA."""
    q, k, v, dense = long_inputs(device, n, heads, kv_heads, dim)
    patterns = [HeadPattern("vertical_slash", vertical=vertical, slash=slash)] * heads
    index = estimate_index(q, k, patterns)
    estimate_s = timed(lambda: estimate_index(q, k, patterns))
    sparse_s = timed(lambda: sparse_attention(q, k, v, index, backend="triton"))
    dense_s = timed(dense)
    rel_err = float((sparse_attention(q, k, v, index, backend="triton").float() - dense().float()).norm()
                    / dense().float().norm())
    return {"tokens": n, "shape": f"{heads}q/{kv_heads}kv x {dim} bf16", "vertical": vertical, "slash": slash,
            "density": index.density(),
            "estimate_s": estimate_s, "sparse_kernel_s": sparse_s, "dense_sdpa_s": dense_s,
            "speedup_kernel": dense_s / sparse_s, "speedup_with_estimate": dense_s / (sparse_s + estimate_s),
            "rel_err_vs_dense": rel_err}


def check_tiers(device: str, n_chunks: int = 8) -> dict:
    """Large-layout chunks (32 layers x 8 KV heads x 128 dims, 256 tokens, fp16: 32 MiB each) through the
    store's CUDA paths. Ratios are store time over baseline time inverted (>= 1: as fast as the copy)."""
    layout = KVLayout("gpu-check-32x8x128", num_layers=32, kv_heads=8, head_dim=128)
    room = layout.chunk_bytes + layout.chunk_bytes // 8  # a chunk plus its key summary, with slack
    n = n_chunks * layout.chunk_tokens
    tokens = np.arange(n, dtype=np.int32)
    shape = layout.chunk_shape[:3] + (n, layout.head_dim)
    kv = torch.randn(shape, device=device, dtype=torch.float16)
    out = torch.empty_like(kv)
    gb = kv.numel() * 2 / 1e9
    result = {}

    # DeviceTier alone: put from and get into GPU memory, against a device-to-device copy of the same bytes.
    store = TieredStore([DeviceTier(n_chunks * room)], layout=layout)
    pool = torch.empty_like(kv)
    put_s = timed(lambda: store.put(tokens, kv), setup=lambda: store.delete(tokens[: layout.chunk_tokens]))
    copy_s = timed(lambda: pool.copy_(kv))
    get_s = timed(lambda: store.get(tokens, out))
    got = store.get(tokens, out)
    result["device"] = {"pool_device": str(store.tiers[0].pool.device), "get_equal": bool(torch.equal(out, kv)),
                        "tiers": sorted(set(got.tiers)), "put_GBps": gb / put_s, "get_GBps": gb / get_s,
                        "copy_d2d_GBps": gb / copy_s, "put_ratio": copy_s / put_s, "get_ratio": copy_s / get_s}
    del store, pool
    # Pinned HostTier: a tier-level get into GPU memory, against a pinned-to-GPU copy of the same bytes.
    host = HostTier(n_chunks * room)
    store = TieredStore([host], layout=layout)
    store.put(tokens, kv)
    pinned = torch.empty(shape, dtype=torch.float16, pin_memory=device == "cuda")
    pinned.copy_(kv)
    get_s = timed(lambda: store.get(tokens, out))
    copy_s = timed(lambda: out.copy_(pinned))
    out.zero_()
    got = store.get(tokens, out)
    result["host_pinned"] = {"pool_pinned": bool(host.pool.is_pinned()), "get_equal": bool(torch.equal(out, kv)),
                             "tiers": sorted(set(got.tiers)), "get_GBps": gb / get_s, "copy_h2d_GBps": gb / copy_s,
                             "get_ratio": copy_s / get_s}
    del store, host, pinned

    # Device over host over disk: half the chunks fit the device, the rest are demoted; a get promotes.
    with tempfile.TemporaryDirectory() as folder:
        store = TieredStore([DeviceTier(n_chunks // 2 * room), HostTier(n_chunks // 4 * room),
                             DiskTier(folder, n_chunks * room)], layout=layout)
        store.put(tokens, kv)
        placed = {t.name: len(t) for t in store.tiers}
        out.zero_()
        got = store.get(tokens, out)
        again = torch.zeros_like(kv)
        second = store.get(tokens, again)
        result["device_host_disk"] = {"placed_after_put": placed, "first_get_tiers": got.tiers,
                                      "first_get_equal": bool(torch.equal(out, kv)),
                                      "second_get_tiers": second.tiers,
                                      "second_get_equal": bool(torch.equal(again, kv)), "tokens": got.tokens}
    result["ok"] = (result["device"]["get_equal"] and result["host_pinned"]["get_equal"]
                    and result["host_pinned"]["pool_pinned"] == (device == "cuda") and result["device"]["pool_device"].startswith(device)
                    and result["device_host_disk"]["first_get_equal"] and result["device_host_disk"]["second_get_equal"]
                    and result["device_host_disk"]["tokens"] == n)
    return result


def time_estimation(device: str, n: int, heads: int = 32, kv_heads: int = 8, dim: int = 128) -> dict:
    """Adaptive estimation alone (block-sparse mass 0.95; vertical-slash mass 0.9) against dense SDPA, bf16."""
    q, k, _, dense = long_inputs(device, n, heads, kv_heads, dim)
    out = {"tokens": n, "shape": f"{heads}q/{kv_heads}kv x {dim} bf16", "dense_sdpa_s": timed(dense)}
    for pattern in (HeadPattern("block_sparse", mass=0.95), HeadPattern("vertical_slash", mass=0.9)):
        out[f"estimate_{pattern.kind}_s"] = timed(lambda: estimate_index(q, k, [pattern] * heads))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768,131072")
    parser.add_argument("--budgets", default="1000:2000,1000:6096",
                        help="vertical:slash budgets of the timed vertical-slash index, comma separated")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-tiers", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")
    import triton

    device = "cuda"
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "checks": [check_case(device, *case) for case in CASES] + check_estimation(device), "timings": []}
    result["all_ok"] = all(c["ok"] for c in result["checks"])
    print(json.dumps(result, indent=1), flush=True)  # the kernel's checks, before the longer parts
    if not args.skip_tiers:
        result["tiers"] = check_tiers(device)
        result["all_ok"] = result["all_ok"] and result["tiers"]["ok"]
        print(json.dumps(result["tiers"], indent=1), flush=True)
    if not args.skip_timing:
        budgets = [tuple(int(x) for x in b.split(":")) for b in args.budgets.split(",") if b]
        for n in (int(x) for x in args.lengths.split(",") if x):
            for vertical, slash in budgets:
                result["timings"].append(time_length(device, n, vertical=vertical, slash=slash))
                print(json.dumps(result["timings"][-1], indent=1), flush=True)
                torch.cuda.empty_cache()
        for n in (int(x) for x in args.lengths.split(",") if x):
            result["timings"].append(time_estimation(device, n))
            print(json.dumps(result["timings"][-1], indent=1), flush=True)
            torch.cuda.empty_cache()
    print(json.dumps(result, indent=1))
    sys.exit(0 if result["all_ok"] else 1)


if __name__ == "__main__":
    main()
