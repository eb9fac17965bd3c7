"""Option types the benchmarks share: argparse refuses a bad value with a message naming the option."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(minimum: int) -> Callable[[str], int]:
    """An integer of at least ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
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
    except ValueError:
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


def fill_defaults(args: argparse.Namespace, normal: dict[str, object], quick: dict[str, object]) -> None:
    """Give each option in ``normal`` that was not given (None) its ``quick`` value when ``args.quick``, else its
    ``normal`` one: ``--quick`` changes defaults, never an option given on the command line."""
    for name, value in normal.items():
        if getattr(args, name) is None:
            setattr(args, name, quick.get(name, value) if args.quick else value)
