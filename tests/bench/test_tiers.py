"""`kvtier bench tiers` end to end at a small size: the benchmark convention, every row present, and the
checks the benchmark makes of its own data (it raises if a tier returns other bytes than were put)."""

import json
import subprocess
import sys


def test_bench_tiers_runs_and_reports_every_row(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "kvtier.cli", "bench", "tiers", "--json", "--layouts", "smollm2", "--bytes", "12000000",
         "--repeat", "1", "--index-chunks", "2048", "--prompt-tokens", "2048", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout)
    assert report["benchmark"] == "tiers"
    rows = {r["metric"]: r for r in report["rows"]}
    label = "[5.6 MiB chunks]"
    for name in (f"host tier {label} put", f"host tier {label} get", f"store(host) put {label}",
                 f"store(host) get {label}", f"disk tier {label} put", f"disk tier {label} get",
                 f"disk tier get (cold) {label}", f"raw file write of the KV only {label}"):
        row = rows.pop(name)
        assert row["unit"] == "GB/s" and row["value"] > 0 and row["baseline_value"] > 0
        assert abs(row["ratio"] - row["value"] / row["baseline_value"]) < 1e-3 * row["ratio"]
    lookup = [r for name, r in rows.items() if name.startswith("lookup 2048-token prompt")]
    memory = [r for name, r in rows.items() if name.startswith("index memory")]
    assert len(lookup) == 1 and lookup[0]["unit"] == "ns/token" and lookup[0]["value"] > 0
    assert len(memory) == 1 and memory[0]["unit"] == "MiB" and memory[0]["value"] > 0
    assert memory[0]["baseline"] is None and memory[0]["ratio"] is None  # no budget passed off as a measurement
    assert len(rows) == 2
