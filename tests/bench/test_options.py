"""Benchmark options: bad values are refused by name, before any measuring, and --quick changes defaults only."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

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
    ("tiers", "--layouts", "smolm2"), ("tiers", "--layouts", "smollm2,smollm2"),
    ("sparse", "--shapes", "8x64"), ("sparse", "--lengths", "0"), ("sparse", "--lengths", "4x"),
    ("sparse", "--accuracy-lengths", "2k,0"), ("sparse", "--needle-depths", "1.5"),
    ("hitrate", "--capacities", "inf"), ("hitrate", "--capacities", "nan"), ("hitrate", "--codecs", "int3"),
    ("hitrate", "--policies", "lru,fifo"),
    ("compression", "--codecs", "int3"), ("compression", "--chunk-tokens", "0"), ("compression", "--presses", "h20"),
    ("compression", "--ratios", "0.5,O.75"), ("compression", "--ratios", "1"), ("compression", "--depths", "nan"),
    ("compression", "--needle-ratio", "-0.5"), ("compression", "--needle-modes", "agnostik"),
])
def test_a_bad_value_is_refused_naming_its_option(capsys, name, option, value):
    with pytest.raises(SystemExit):
        parse(name, [option, value])
    assert f"argument {option}" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "options", "expected"), [
    ("compression", ["--quick", "--context", "256", "--needle-context", "0"],
     {"context": 256, "needle_context": 0, "continuation": 128, "ratios": [0.5]}),
    ("compression", ["--context", "256"], {"context": 256, "continuation": 256, "needle_context": 4096}),
    ("sparse", ["--quick", "--lengths", ""], {"lengths": [], "accuracy_lengths": [2048], "needle_length": 4096}),
    ("sparse", [], {"lengths": [8192, 16384, 32768], "needle_length": 8192}),
])
def test_quick_changes_defaults_never_options_given(name, options, expected):
    module = importlib.import_module(BENCHMARKS[name])
    args = parse(name, options)
    fill_defaults(args, module.NORMAL, module.QUICK)
    assert {k: getattr(args, k) for k in expected} == expected


@pytest.mark.parametrize(("name", "options", "expected"), [
    ("sparse", ["--lengths", "4k,8192", "--shapes", "smollm2", "--needle-depths", "0,1"],
     {"lengths": [4000, 8192], "shapes": ["smollm2"], "needle_depths": [0.0, 1.0]}),
    ("compression", ["--codecs", "", "--presses", "h2o", "--ratios", "0,0.5"],
     {"codecs": [], "presses": ["h2o"], "ratios": [0.0, 0.5]}),
    ("hitrate", ["--codecs", "none", "--policies", "lru"], {"codecs": [], "policies": ["lru"]}),
    ("tiers", [], {"layouts": ["smollm2", "large"], "dir": None}),
])
def test_list_options_are_parsed_once(name, options, expected):
    args = parse(name, options)
    assert {k: getattr(args, k) for k in expected} == expected


def kvtier_bench(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", "bench", *argv], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize(("argv", "why"), [
    (["tiers", "--layouts", "smolm2"], "argument --layouts: 'smolm2' is not one of large, smollm2"),
    (["tiers", "--dir", "{file}"], "argument --dir: '{file}' is not a folder"),
    (["sparse", "--lengths", "0", "--accuracy-lengths", "", "--needle-depths", ""], "argument --lengths: 0 is less"),
    (["hitrate", "--capacities", "inf", "--no-generated"], "argument --capacities: 'inf' is not a token count"),
    (["hitrate", "--plot", "{file}/hitrate.png", "--no-generated"], "argument --plot: '{file}' is not a folder"),
    (["compression", "--presses", "h20"], "argument --presses: 'h20' is not one of"),
])
def test_a_bad_option_is_one_error_before_any_work(tmp_path, argv, why):
    """``kvtier bench NAME: error: ...``, exit 2, no traceback (the work would run before these were used)."""
    file = str(tmp_path / "afile")
    (tmp_path / "afile").touch()
    out = kvtier_bench(*[a.replace("{file}", file) for a in argv])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"kvtier bench {argv[0]}: error: {why.replace('{file}', file)}" in out.stderr, out.stderr
