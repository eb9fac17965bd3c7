"""Request traces for the hit-rate replay: the Mooncake loader and LMCache-style generators.

A trace is a list of requests; each request names the content of its prompt's *full* blocks by block ids
(as Mooncake's ``hash_ids``): two requests share the KV of their common leading ids. Block ids identify a
block's content given its prefix, so the store's chained keys (:func:`kvtier.kvstore.keys.chain_block_keys`)
give equal keys exactly for equal prefixes. A partial last block has no id: it is never cached.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvtier.bench.args import BenchInputError

DEFAULT_MOONCAKE = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "mooncake_conversation.jsonl"
"""``../shared/traces/mooncake_conversation.jsonl`` relative to the repository."""


@dataclass(frozen=True)
class Request:
    """One prompt: ``blocks`` ids of its full blocks, ``tokens`` its input length (partial tail included)."""

    blocks: tuple[int, ...]
    tokens: int


@dataclass(frozen=True)
class Trace:
    name: str
    block_tokens: int
    requests: list[Request]

    @property
    def input_tokens(self) -> int:
        return sum(r.tokens for r in self.requests)


def load_mooncake(path: str | Path = DEFAULT_MOONCAKE, block_tokens: int = 512, limit: int | None = None) -> Trace:
    """A Mooncake trace: one JSON object a line with ``input_length`` (an integer), ``hash_ids`` (a list of
    integers that fit in 64 bits, signed) and, optionally, ``timestamp`` (a number); keeps the ids of the
    ``input_length // block_tokens`` full blocks. Requests are replayed in file order, so a timestamp less than
    an earlier line's is refused (it is never sorted). ``limit``: the first requests only (at least 1). A file
    that cannot be read, a line that is not such an object, or a file with no request is a ValueError naming the
    file (and line)."""
    if limit is not None and limit < 1:
        raise BenchInputError(f"limit must be at least 1 request, got {limit}")
    requests = []
    latest = -math.inf  # the largest timestamp so far
    try:
        f = open(path)
    except OSError as exc:
        raise BenchInputError(f"cannot read the trace {path}: {exc.strerror}") from None
    with f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(requests) >= limit:
                break
            try:
                n, ids, timestamp = _mooncake_request(json.loads(line))
            except (ValueError, KeyError, TypeError) as exc:
                raise BenchInputError(f"{path}:{number}: not a Mooncake request (input_length and hash_ids): "
                                 f"{type(exc).__name__}: {exc}") from None
            if n < 0 or len(ids) * block_tokens < n:
                raise BenchInputError(f"{path}:{number}: a request of {n} tokens has {len(ids)} blocks of {block_tokens}")
            if timestamp is not None:
                if timestamp < latest:
                    raise BenchInputError(f"{path}:{number}: timestamp {timestamp} is before an earlier line's {latest}: "
                                     "requests are replayed in file order, so the trace must be sorted by time")
                latest = timestamp
            requests.append(Request(tuple(ids[: n // block_tokens]), n))
    if not requests:
        raise BenchInputError(f"{path}: the trace has no requests")
    return Trace(Path(path).stem, block_tokens, requests)


def _mooncake_request(row: object) -> tuple[int, list[int], int | float | None]:
    """``input_length``, ``hash_ids`` and ``timestamp`` (None when absent) of one parsed trace line; a KeyError
    or TypeError when one is missing or of another type (a string, a float, a bool, an id beyond 64 bits)."""
    if not isinstance(row, dict):
        raise TypeError(f"a line must be a JSON object, not {type(row).__name__}")
    n, ids, timestamp = row["input_length"], row["hash_ids"], row.get("timestamp")
    if type(n) is not int:
        raise TypeError(f"input_length must be an integer, got {n!r}")
    if type(ids) is not list or not all(type(i) is int and -2**63 <= i < 2**63 for i in ids):
        raise TypeError("hash_ids must be a list of integers from -2**63 to 2**63 - 1")
    if timestamp is not None and (type(timestamp) not in (int, float) or not math.isfinite(timestamp)):
        raise TypeError(f"timestamp must be a finite number, got {timestamp!r}")
    return n, ids, timestamp


class _Ids:
    """Small integer ids for hashable block descriptions."""

    def __init__(self) -> None:
        self._ids: dict[object, int] = {}

    def __call__(self, what: object) -> int:
        return self._ids.setdefault(what, len(self._ids))


def multi_round_qa(users: int = 100, rounds: int = 10, concurrent: int = 20, system_tokens: int = 1000,
                   history_tokens: int = 8000, question_tokens: int = 100, answer_tokens: int = 200,
                   block_tokens: int = 256, seed: int = 0) -> Trace:
    """LMCache's multi-round QA: every prompt is a shared system prompt, the user's own context
    (``history_tokens``), and all earlier questions and answers of that user, plus a new question.

    ``concurrent`` users are active at once; each request comes from one of them at random, and a user who
    has asked ``rounds`` questions is replaced by a new one. Prompt ``r`` of a user extends prompt ``r-1``
    by its answer and a new question, so its blocks are the shared system blocks, then the user's stream.
    """
    rng = random.Random(seed)
    ids = _Ids()
    shared = system_tokens // block_tokens
    system_ids = [ids(("system", j)) for j in range(shared)]
    requests = []
    active = {u: 0 for u in range(min(concurrent, users))}
    next_user = len(active)
    while active:
        user = rng.choice(sorted(active))
        r = active[user]
        n = system_tokens + history_tokens + r * (question_tokens + answer_tokens) + question_tokens
        blocks = system_ids + [ids(("user", user, j)) for j in range(shared, n // block_tokens)]
        requests.append(Request(tuple(blocks), n))
        active[user] = r + 1
        if active[user] == rounds:
            del active[user]
            if next_user < users:
                active[next_user] = 0
                next_user += 1
    return Trace(f"multi-round-qa-u{users}-r{rounds}", block_tokens, requests)


RepeatMode = Literal["tile", "interleave", "random"]


def long_doc_qa(documents: int = 40, document_tokens: int = 10000, question_tokens: int = 50, repeats: int = 2,
                mode: RepeatMode = "random", block_tokens: int = 256, seed: int = 0) -> Trace:
    """LMCache's long-document QA: each prompt is one document plus a fresh question; every document is
    asked about ``repeats`` times, ordered by ``mode``: ``tile`` (all documents, then all again),
    ``interleave`` (each document ``repeats`` times in a row) or ``random`` (a seeded shuffle)."""
    if mode == "tile":
        order = list(range(documents)) * repeats
    elif mode == "interleave":
        order = [d for d in range(documents) for _ in range(repeats)]
    elif mode == "random":
        order = list(range(documents)) * repeats
        random.Random(seed).shuffle(order)
    else:
        raise ValueError(f"mode must be tile, interleave or random, got {mode!r}")
    ids = _Ids()
    shared = document_tokens // block_tokens
    n = document_tokens + question_tokens
    requests = []
    for q, doc in enumerate(order):
        blocks = [ids(("doc", doc, j)) for j in range(shared)]
        blocks += [ids(("question", q, j)) for j in range(shared, n // block_tokens)]
        requests.append(Request(tuple(blocks), n))
    return Trace(f"long-doc-qa-{mode}", block_tokens, requests)
