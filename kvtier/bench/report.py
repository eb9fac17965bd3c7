"""The benchmark convention every ``kvtier bench NAME`` follows.

A benchmark returns a :class:`Report`: rows of ``metric, value, unit`` beside the baseline it measured in the
same run (or the reference's own value by definition, such as 1 for the uncompressed model's agreement with
itself). A row with nothing measured to compare with has no baseline, never a fixed budget or target in its
place, and so no ratio. ``ratio`` is always "better than the baseline" when above 1: ``value / baseline_value`` for
quantities where higher is better (bandwidth, hit rate), ``baseline_value / value`` for ones where lower is
better (time). ``--json`` prints ``{"benchmark": NAME, "rows": [...]}``; otherwise a table.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass
class Row:
    metric: str
    value: float
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        if self.baseline_value is None or self.value is None:
            return None
        num, den = (self.value, self.baseline_value) if self.higher_is_better else (self.baseline_value, self.value)
        if den == 0:
            return math.inf if num > 0 else None
        return num / den

    def to_dict(self) -> dict[str, Any]:
        ratio = self.ratio
        return {
            "metric": self.metric,
            "value": _clean(self.value),
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_value": _clean(self.baseline_value),
            "ratio": _clean(ratio),
        }


def _clean(x: float | None) -> float | None:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return None
    return float(f"{x:.6g}") if isinstance(x, float) else x


@dataclass
class Report:
    benchmark: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, metric: str, value: float, unit: str, baseline: str | None = None,
            baseline_value: float | None = None, higher_is_better: bool = True) -> Row:
        row = Row(metric, value, unit, baseline, baseline_value, higher_is_better)
        self.rows.append(row)
        return row

    def extend(self, rows: Iterable[Row]) -> None:
        self.rows.extend(rows)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"benchmark": self.benchmark, "rows": [r.to_dict() for r in self.rows]}
        if self.notes:
            out["notes"] = self.notes
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def to_table(self) -> str:
        header = ("metric", "value", "unit", "baseline", "baseline value", "ratio")
        lines = [header]
        for r in self.rows:
            d = r.to_dict()
            lines.append((
                d["metric"], _fmt(d["value"]), d["unit"], d["baseline"] or "", _fmt(d["baseline_value"]),
                "" if d["ratio"] is None else f"{d['ratio']:.3f}",
            ))
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
        text = [f"== kvtier bench {self.benchmark}"]
        for i, line in enumerate(lines):
            text.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip())
            if i == 0:
                text.append("  ".join("-" * w for w in widths))
        text.extend(f"note: {n}" for n in self.notes)
        return "\n".join(text)

    def print(self, as_json: bool, file=None) -> None:
        print(self.to_json() if as_json else self.to_table(), file=file or sys.stdout)


def _fmt(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def progress(iterable=None, total: int | None = None, desc: str = "", disable: bool | None = None):
    """A tqdm progress bar on stderr (hidden when stderr is not a terminal unless KVTIER_PROGRESS=1)."""
    import os

    from tqdm import tqdm

    if disable is None:
        disable = not (sys.stderr.isatty() or os.environ.get("KVTIER_PROGRESS") == "1")
    return tqdm(iterable, total=total, desc=desc, disable=disable, file=sys.stderr, leave=False)
