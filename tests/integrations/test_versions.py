"""A transformers too old for the ``cache=`` keyword is refused, not silently run without the cache."""

from __future__ import annotations

import importlib

import pytest

from kvtier.integrations import require_transformers


def test_installed_transformers_is_accepted():
    require_transformers()


@pytest.mark.parametrize("version", ["5.17.0", "4.57.6", "5.23.0"])
def test_older_transformers_is_a_clear_error(monkeypatch, version):
    # An older install cannot be produced here. (The module is looked up now: transformers may have replaced its
    # entry in sys.modules since this file was imported.)
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", version)
    with pytest.raises(ImportError, match=f"transformers >= 5.24.*found {version}"):
        require_transformers()


def test_newer_and_dev_versions_are_accepted(monkeypatch):
    for version in ("5.24.0", "5.30.0.dev0", "6.0.0"):
        monkeypatch.setattr(importlib.import_module("transformers"), "__version__", version)
        require_transformers()
