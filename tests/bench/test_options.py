"""Benchmark options: bad values are refused by name, and --quick changes defaults only."""

from __future__ import annotations

import argparse
import importlib

import pytest

from kvtier.bench import BENCHMARKS
from kvtier.bench.args import fill_defaults


def parse(name: str, options: list[str]) -> argparse.Namespace:
    module = importlib.import_module(BENCHMARKS[name])
    parser = argparse.ArgumentParser(prog=f"kvtier bench {name}")
    module.add_arguments(parser)
    return parser.parse_args(options)


@pytest.mark.parametrize(("name", "option", "value"), [
    ("tiers", "--repeat", "0"), ("tiers", "--bytes", "-5"), ("tiers", "--prompt-tokens", "100"),
    ("api", "--iterations", "0"), ("api", "--rounds", "0"), ("api", "--sizes", "0"),
    ("e2e", "--questions", "1"), ("e2e", "--turns", "1"), ("e2e", "--repeats", "0"),
    ("compression", "--repeats", "0"), ("sparse", "--repeat", "0"), ("hitrate", "--limit", "-1"),
])
def test_a_bad_value_is_refused_naming_its_option(capsys, name, option, value):
    with pytest.raises(SystemExit):
        parse(name, [option, value])
    assert f"argument {option}" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "options", "expected"), [
    ("compression", ["--quick", "--context", "256", "--needle-context", "0"],
     {"context": 256, "needle_context": 0, "continuation": 128, "ratios": "0.5"}),
    ("compression", ["--context", "256"], {"context": 256, "continuation": 256, "needle_context": 4096}),
    ("sparse", ["--quick", "--lengths", ""], {"lengths": "", "accuracy_lengths": "2048", "needle_length": 4096}),
    ("sparse", [], {"lengths": "8192,16384,32768", "needle_length": 8192}),
])
def test_quick_changes_defaults_never_options_given(name, options, expected):
    module = importlib.import_module(BENCHMARKS[name])
    args = parse(name, options)
    fill_defaults(args, module.NORMAL, module.QUICK)
    assert {k: getattr(args, k) for k in expected} == expected
