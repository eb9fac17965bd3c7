"""Benchmarks run by ``kvtier bench NAME``. Each module in BENCHMARKS defines

- ``add_arguments(parser: argparse.ArgumentParser) -> None``: its own options;
- ``run(args: argparse.Namespace) -> kvtier.bench.report.Report``: measure, baseline included.
"""

BENCHMARKS: dict[str, str] = {
    "tiers": "kvtier.bench.tiers",
    "compression": "kvtier.bench.compression",
    "sparse": "kvtier.bench.sparse",
    "e2e": "kvtier.bench.e2e",
    "hitrate": "kvtier.bench.hitrate",
    "api": "kvtier.bench.api",
}
