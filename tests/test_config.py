"""The service's configuration refuses what could not work, saying what was wrong."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvtier.config import KVTierConfig


@pytest.mark.parametrize("name", ["a,b", "", "host tier", "x" * 65])
def test_tier_names_are_plain_words(name):
    """A fetch lists the tiers it read from in one comma-separated header: a name must not hold a comma."""
    with pytest.raises(ValidationError, match="tiers.0.name"):
        KVTierConfig(tiers=[{"kind": "host", "capacity_bytes": 1 << 20, "name": name}])


def test_tier_names_must_be_distinct():
    with pytest.raises(ValidationError, match="distinct"):
        KVTierConfig(tiers=[{"kind": "host", "capacity_bytes": 1 << 20}, {"kind": "host", "capacity_bytes": 1 << 20}])
