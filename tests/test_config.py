"""The service's configuration refuses what could not work, saying what was wrong."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from kvtier.config import KVTierConfig
from kvtier.errors import ConfigError


@pytest.mark.parametrize("name", ["a,b", "", "host tier", "x" * 65])
def test_tier_names_are_plain_words(name):
    """A fetch lists the tiers it read from in one comma-separated header: a name must not hold a comma."""
    with pytest.raises(ValidationError, match="tiers.0.name"):
        KVTierConfig(tiers=[{"kind": "host", "capacity_bytes": 1 << 20, "name": name}])


def test_tier_names_must_be_distinct():
    with pytest.raises(ValidationError, match="distinct"):
        KVTierConfig(tiers=[{"kind": "host", "capacity_bytes": 1 << 20}, {"kind": "host", "capacity_bytes": 1 << 20}])


@pytest.mark.parametrize(("config", "where"), [
    ({"tiers": [{"kind": "host", "capacity_bytes": 1 << 20, "polcy": "lfu"}]}, "tiers.0.polcy"),
    ({"server": {"prot": 9001}}, "server.prot"),
    ({"tenants": [{"name": "a", "key_sha256": "0" * 64, "quota": 5}]}, "tenants.0.quota"),
])
def test_a_misspelt_nested_key_is_refused_by_name(tmp_path, config, where):
    """A typo inside a tier, the server or a tenant must not leave the default in place of the value written."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"^invalid configuration: {where}: Extra inputs are not permitted"):
        KVTierConfig.load(path)


def test_an_unknown_codec_is_refused_by_name():
    with pytest.raises(ValidationError, match="(?s)tiers.0.codec.*unknown codec 'int3'"):
        KVTierConfig(tiers=[{"kind": "host", "capacity_bytes": 1 << 20, "codec": "int3"}])


@pytest.mark.parametrize(("content", "why"), [
    (b"[]", "must hold a JSON object, not list"), (b'"x"', "must hold a JSON object, not str"),
    (b'{"open_access": true}\xff', "cannot read config file"), (b"{", "cannot read config file"),
])
def test_a_config_file_that_is_not_a_json_object_is_a_config_error(tmp_path, content, why):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=why):
        KVTierConfig.load(path)


def test_a_config_error_is_one_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"tiers": [{"kind": "disk", "capacity_bytes": 0}], "server": {"port": 70000}}))
    with pytest.raises(ConfigError) as error:
        KVTierConfig.load(path)
    message = str(error.value)
    assert "\n" not in message and "tiers.0.capacity_bytes" in message and "server.port" in message
