"""Request and response bodies of the service (JSON; chunk data travels as binary, see :mod:`kvtier.api.wire`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

FINGERPRINT = r"^[0-9a-f]{32}$"
CHUNK_KEY = FINGERPRINT  # a chunk key, like a fingerprint: 16 bytes in lowercase hex
Fingerprint = Annotated[str, Field(pattern=FINGERPRINT, description="a layout fingerprint (POST /v1/layouts)")]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1, strict=True)]  # a JSON integer: not true, "5" or 1.0


class Layout(BaseModel):
    """A model's KV layout (:class:`kvtier.layout.KVLayout`)."""

    model_id: str = Field(min_length=1, max_length=512)
    num_layers: int = Field(gt=0, le=4096)
    kv_heads: int = Field(gt=0, le=4096)
    head_dim: int = Field(gt=0, le=65536)
    dtype: str = "float16"
    chunk_tokens: int = Field(default=256, gt=0, le=1 << 20)
    tensors: list[str] = Field(default=["k", "v"], min_length=1, max_length=8)
    tp_rank: int = Field(default=0, ge=0)
    tp_size: int = Field(default=1, gt=0)
    page_tokens: int = Field(default=32, gt=0)


class Limits(BaseModel):
    max_body_bytes: int
    max_tokens_per_request: int
    max_chunks_per_batch: int


class AttachResponse(BaseModel):
    fingerprint: Fingerprint
    root: str = Field(description="hex key of this tenant's root for the layout: the parent of a prompt's first chunk")
    chunk_tokens: int
    chunk_bytes: int
    limits: Limits


class TokensRequest(BaseModel):
    layout: Fingerprint
    tokens: list[TokenId]


class ChainRequest(TokensRequest):
    parent: str | None = Field(default=None, pattern=CHUNK_KEY, description=(
        "the key of a cached chunk that these tokens follow (a prompt too long for one request goes in several); "
        "default: the tokens start the prompt. A key that is not one of this tenant's cached chunks is a 409"))


class FetchRequest(ChainRequest):
    start_chunk: int = Field(default=0, ge=0, description="the first chunk to return (the batch holds at most "
                                                          "max_chunks_per_batch chunks)")
    layer_start: int | None = Field(default=None, ge=0, description="first layer to fetch (default 0)")
    layer_stop: int | None = Field(default=None, gt=0, description="one past the last layer (default all)")


class ChunkInfo(BaseModel):
    index: int
    key: str
    tiers: list[str]


class LookupResponse(BaseModel):
    tokens: int = Field(description="cached prefix length, a multiple of chunk_tokens")
    chunks: list[ChunkInfo]


class PutResponse(BaseModel):
    stored: int
    present: int
    dropped: int


class CountResponse(BaseModel):
    chunks: int


class TenantStats(BaseModel):
    tenant: str
    used_bytes: int
    quota_bytes: int | None
    requests: dict[str, int] = Field(description="requests served per endpoint")
    lookup_tokens: int
    hit_tokens: int
    put_chunks: int
    fetched_chunks: int
    bytes_in: int
    bytes_out: int


class AdminStats(BaseModel):
    store: dict
    tenants: list[TenantStats]


class FlushRequest(BaseModel):
    tenant: str | None = Field(default=None, description="the tenant to flush (default every tenant)")


class Health(BaseModel):
    status: str
    tiers: list[str]


class ErrorBody(BaseModel):
    error: str = Field(description="the kind of error")
    detail: str = Field(description="what was wrong")
