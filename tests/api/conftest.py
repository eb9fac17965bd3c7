"""Fixtures of the API tests: a fresh server per test (see helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kvtier.config import KVTierConfig

from .helpers import make_config, serve


@pytest.fixture
def config(tmp_path) -> KVTierConfig:
    return make_config(tmp_path)


@pytest.fixture
def url(config) -> Iterator[str]:
    with serve(config) as u:
        yield u
