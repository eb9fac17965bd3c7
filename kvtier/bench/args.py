"""Option types the benchmarks share: argparse refuses a bad value with a message naming the option; and the
error for input a benchmark refuses once it runs (:class:`BenchInputError`)."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from kvtier.errors import KVTierError

T = TypeVar("T")


class BenchInputError(KVTierError, ValueError):
    """Input a benchmark refuses once it runs (a malformed or empty trace, options that contradict each other):
    ``kvtier bench`` reports it as a usage error (exit status 2, no traceback); any other error is a bug."""


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def at_least(minimum: int, read: Callable[[str], int] = _integer) -> Callable[[str], int]:
    """An integer of at least ``minimum``, read by ``read`` (default: a plain integer; e.g. :func:`tokens`)."""

    def parse(text: str) -> int:
        value = read(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def tokens(text: str) -> int:
    """A token count: ``3M``, ``500k`` or ``3000000`` (at least 0)."""
    clean = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(clean[-1:], 1)
    try:
        value = int(float(clean[:-1] if scale > 1 else clean) * scale)
    except (ValueError, OverflowError):  # OverflowError: inf
        raise argparse.ArgumentTypeError(f"{text!r} is not a token count such as 3M, 500k or 3000000") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is a negative token count")
    return value


def token_list(text: str) -> list[int]:
    """Comma-separated token counts (at least one)."""
    values = [tokens(part) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError("give at least one token count")
    return values


def listed(item: Callable[[str], T]) -> Callable[[str], list[T]]:
    """Comma-separated values, each read by ``item``, none repeated; '' is none."""

    def parse(text: str) -> list[T]:
        values = [item(part.strip()) for part in text.split(",") if part.strip()]
        if len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(f"{text!r} lists a value twice")
        return values

    parse.__name__ = f"list of {item.__name__}"
    return parse


def one_of(known: Iterable[str] | Callable[[], Iterable[str]]) -> Callable[[str], str]:
    """A name among ``known`` (or among what ``known()`` returns when it is a function: a registry read when
    the option is parsed, not when the parser is built)."""

    def parse(text: str) -> str:
        names = sorted(known() if callable(known) else known)
        if text not in names:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(names)}")
        return text

    parse.__name__ = "name"
    return parse


def fraction(below_one: bool = False) -> Callable[[str], float]:
    """A number from 0 to 1 (less than 1 when ``below_one``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (0 <= value < 1 if below_one else 0 <= value <= 1):
            raise argparse.ArgumentTypeError(f"{text!r} is not from 0 to {'below ' if below_one else ''}1")
        return value

    parse.__name__ = "fraction"
    return parse


def writable_folder(text: str) -> str:
    """A folder to write in, made now if missing (so that a path that cannot be one fails before any work)."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder") from None
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot make the folder {text!r}: {exc.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write in the folder {text!r}")
    return text


def output_file(text: str) -> str:
    """A file to write, in a :func:`writable_folder` (made now if missing)."""
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    writable_folder(str(Path(text).parent))
    return text


def fill_defaults(args: argparse.Namespace, normal: dict[str, object], quick: dict[str, object]) -> None:
    """Give each option in ``normal`` that was not given (None) its ``quick`` value when ``args.quick``, else its
    ``normal`` one: ``--quick`` changes defaults, never an option given on the command line."""
    for name, value in normal.items():
        if getattr(args, name) is None:
            setattr(args, name, quick.get(name, value) if args.quick else value)
