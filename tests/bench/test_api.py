"""`kvtier bench api` end to end at a small size (a real `kvtier serve` subprocess), and its in-process part: the
benchmark convention, every row present, and an in-process measurement that fails loudly, not with a timing of
an error."""

import json
import os
import secrets
import subprocess
import sys

import numpy as np
import pytest

from kvtier.api.auth import hash_key
from kvtier.bench.api_cost import put_cost
from kvtier.layout import KVLayout


def test_bench_api_runs_and_reports_every_row():
    """The caller's KVTIER_* settings would override the benchmark's own config (here: no bench endpoints, a
    disk tier): the benchmark's server and its in-process app leave them out."""
    env = {**os.environ, "KVTIER_SERVER__BENCH_ENDPOINTS": "false",
           "KVTIER_TIERS": '[{"kind": "disk", "path": "/nonexistent/kvtier", "capacity_bytes": 1000000}]'}
    out = subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", "api", "--json", "--sizes", "1",
                          "--iterations", "3", "--rounds", "1"], capture_output=True, text=True, timeout=300, check=True,
                         env=env)
    report = json.loads(out.stdout)
    assert report["benchmark"] == "api"
    rows = {r["metric"]: r for r in report["rows"]}
    for op, base in (("put", "bare sink endpoint"), ("get", "bare source endpoint")):
        for metric, unit in (("throughput", "GB/s"), ("p50 latency", "ms"), ("p99 latency", "ms")):
            row = rows.pop(f"{op} 1 MiB {metric}")
            assert row["unit"] == unit and row["baseline"] == base
            assert row["value"] > 0 and row["baseline_value"] > 0 and row["ratio"] > 0
    row = rows.pop("put 1 MiB service work beyond the sink, in process")
    assert row["unit"] == "ms" and row["baseline_value"] > 0
    assert rows == {}


def test_put_cost_times_stored_puts_and_raises_on_a_refused_call():
    key = secrets.token_hex(16)
    config = {"tiers": [{"kind": "host", "capacity_bytes": 64 << 20}],
              "tenants": [{"name": "bench", "key_sha256": hash_key(key)}],
              "server": {"bench_endpoints": True, "max_body_bytes": 16 << 20}}
    layout = KVLayout("bench", num_layers=2, kv_heads=2, head_dim=64, chunk_tokens=32)
    put, sink, floor = put_cost(config, key, layout, 4, np.random.default_rng(0))
    assert put > 0 and sink > 0 and floor > 0
    config["server"]["bench_endpoints"] = False  # the sink is gone: its 404 must not pass for a timing
    with pytest.raises(RuntimeError, match="answered \\[404\\]"):
        put_cost(config, key, layout, 2, np.random.default_rng(0))
