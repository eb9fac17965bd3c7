"""The ``kvtier`` command: ``kvtier serve``, ``kvtier demo``, ``kvtier bench NAME [--json]``."""

from __future__ import annotations

import argparse
import importlib
import sys

from kvtier.bench import BENCHMARKS


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="run a benchmark (prints a table, or JSON with --json)",
                           description="Benchmarks: " + ", ".join(BENCHMARKS) + ". `kvtier bench NAME -h` lists options.")
    bench.add_argument("benchmark", choices=list(BENCHMARKS), metavar="NAME", help=", ".join(BENCHMARKS))
    bench.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options")


def _run_bench(name: str, options: list[str]) -> int:
    """Import only the chosen benchmark, parse its own options, run it and print the report. A bad option, or
    input the benchmark refuses (a BenchInputError: a malformed trace, contradicting options), is
    ``kvtier bench NAME: error: ...`` and exit status 2; any other error keeps its traceback (a bug)."""
    from kvtier.bench.args import BenchInputError

    module = importlib.import_module(BENCHMARKS[name])
    parser = argparse.ArgumentParser(prog=f"kvtier bench {name}", description=(module.__doc__ or "").strip())
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    module.add_arguments(parser)
    args = parser.parse_args(options)
    try:
        report = module.run(args)
    except BenchInputError as exc:
        parser.error(str(exc))
    report.print(as_json=args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvtier", description="A tiered KV-cache store for LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="store and reuse the KV of a shared prefix, print hit statistics")
    demo.add_argument("--disk-dir", default=None, help="folder for the disk tier (default: a temporary one)")
    _bench_parser(sub)
    try:
        from kvtier.api import serve_cli
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("kvtier"):
            raise
    else:
        serve_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        return _run_bench(args.benchmark, args.options)
    if args.command == "demo":
        from kvtier.demo import run_demo

        return run_demo(args.disk_dir)
    if args.command == "serve":
        return args.serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
