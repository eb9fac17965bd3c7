"""Fuzzing: schemathesis, from the app's own OpenAPI schema, against a real server (bench endpoints on): no
5xx, and every response conforms to the schema (status code, content type, body)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kvtier.api import Client, create_app
from kvtier.api.wire import CONTENT_TYPE, frame_prefix
from kvtier.config import KVTierConfig

from .helpers import KEYS, LAYOUT, kv_for, make_config, prompt

SERVER = {"bench_endpoints": True, "max_body_bytes": 1 << 16, "max_tokens_per_request": 4096, "max_chunks_per_batch": 8}

# framed bodies: random bytes, or a length prefix followed by bytes that may or may not be a blob
schemathesis.openapi.media_type(CONTENT_TYPE, st.one_of(
    st.binary(max_size=256), st.binary(max_size=256).map(lambda b: frame_prefix(len(b)) + b)))
schema = schemathesis.openapi.from_dict(
    create_app(KVTierConfig(tiers=[{"kind": "host", "capacity_bytes": 1 << 16}], server=SERVER)).openapi())


@pytest.fixture
def config(tmp_path) -> KVTierConfig:
    return make_config(tmp_path, server=SERVER)


@pytest.fixture
def seeded(url) -> str:
    """The server's URL, with alice's layout attached and a prompt cached."""
    with Client(url, LAYOUT, api_key=KEYS["alice"]) as c:
        c.put(prompt(2 * LAYOUT.chunk_tokens), kv_for(2 * LAYOUT.chunk_tokens))
    return url


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors_and_schema_conforming_responses(case, seeded):
    key = KEYS["admin"] if case.path.startswith(("/v1/admin", "/metrics")) else KEYS["alice"]
    if isinstance(case.body, dict) and "layout" in case.body:
        case.body["layout"] = LAYOUT.fingerprint  # the attached layout: reach past the 404 (tested elsewhere)
    if case.query and "layout" in case.query:
        case.query["layout"] = LAYOUT.fingerprint
    case.call_and_validate(base_url=seeded, headers={"Authorization": f"Bearer {key}"}, checks=[
        not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance])
