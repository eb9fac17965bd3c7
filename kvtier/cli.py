"""The ``kvtier`` command: ``kvtier serve``, ``kvtier demo``, ``kvtier bench NAME [--json]``."""

from __future__ import annotations

import argparse
import importlib
import sys

from kvtier.bench import BENCHMARKS


def _bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="run a benchmark (prints a table, or JSON with --json)")
    names = bench.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for name, module_name in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("kvtier"):
                continue  # not built yet
            raise
        p = names.add_parser(name, help=(module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else None)
        p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        module.add_arguments(p)
        p.set_defaults(_bench_module=module)


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
        report = args._bench_module.run(args)
        report.print(as_json=args.json)
        return 0
    if args.command == "demo":
        from kvtier.demo import run_demo

        return run_demo(args.disk_dir)
    if args.command == "serve":
        return args.serve(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
