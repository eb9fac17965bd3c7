"""Configuration: one pydantic-settings model, read from a JSON file and ``KVTIER_*`` environment variables
(nested with ``__``, e.g. ``KVTIER_SERVER__PORT=9000``).

The default is the embedded store: a host-memory tier and a local-disk tier (with write-through, so chunks
survive a restart), LRU, no lossy codec.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from kvtier.errors import ConfigError


class TierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key must not leave the default in its place

    kind: Literal["device", "host", "disk", "redis"]
    name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$",
                             description="letters, digits, '_', '.', '-' (default: the kind)")
    capacity_bytes: int = Field(gt=0)
    codec: str = "raw"
    policy: Literal["lru", "lfu", "s3fifo", "cost", "turn-lru", "hit-density"] = "lru"
    write_through: bool = False
    path: str | None = None  # disk: the folder
    fsync: bool = False  # disk: flush every file to the device
    url: str | None = None  # redis: redis://host:port/db

    @field_validator("codec")
    @classmethod
    def _known_codec(cls, name: str) -> str:
        from kvtier.compression import get_codec

        get_codec(name)  # a CodecError (a ValueError) names the known codecs
        return name

    @model_validator(mode="after")
    def _check(self) -> "TierConfig":
        if self.kind == "disk" and not self.path:
            raise ValueError("a disk tier needs a path")
        if self.kind == "redis" and not self.url:
            raise ValueError("a redis tier needs a url")
        return self


_SHA256_HEX = r"^[0-9a-fA-F]{64}$"
ANONYMOUS_TENANT = "anonymous"  # the one tenant of open access, in the default namespace
SHARED_PARTITION = "shared"  # the store of the tenants without a quota
RESERVED_TENANT_NAMES = {ANONYMOUS_TENANT: "the tenant of open access", SHARED_PARTITION: "the partition of the "
                         "tenants without a quota"}


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="letters, digits, '_', '.', '-'")
    key_sha256: str = Field(pattern=_SHA256_HEX,
                            description="sha256 hex digest of the tenant's API key (never the key itself)")
    quota_bytes: int | None = Field(default=None, gt=0, description=(
        "the tenant's partition: this many bytes of the largest tier, and the same share of every other tier, "
        "reserved for it alone (see kvtier/api/partitions.py)"))


class ServerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8470, ge=0, le=65535)
    max_body_bytes: int = Field(default=256 << 20, gt=0)
    max_tokens_per_request: int = Field(default=1 << 20, gt=0)
    max_chunks_per_batch: int = Field(default=64, gt=0)
    max_bytes_in_flight: int = Field(default=1 << 30, gt=0, description=(
        "chunk bytes held at once over all requests (put bodies, fetched chunks); a request that does not fit "
        "waits its turn, first come first served; one larger than this runs alone (see kvtier/api/budget.py)"))
    body_timeout_s: float = Field(default=30.0, gt=0, description=(
        "the longest a request body may stall: a piece must arrive within this many seconds of the last (else "
        "408), and each piece of a response must be taken by the client within it (else the response is dropped)"))
    max_layouts_per_tenant: int = Field(default=64, gt=0, description=(
        "layouts one tenant may attach (each is kept until the service restarts); one more is refused 409"))
    budget_wait_s: float = Field(default=20.0, gt=0, description=(
        "the longest a request waits for its bytes of max_bytes_in_flight before it is refused 503"))
    torch_threads: int | None = Field(default=1, gt=0,
                                      description="torch intra-op threads of `kvtier serve` (None: torch's default): "
                                                  "requests already run in parallel, and spinning intra-op threads "
                                                  "slow the copies of concurrent ones")
    bench_endpoints: bool = Field(default=False,
                                  description="serve the bare byte source/sink that `kvtier bench api` compares with")


def _default_tiers() -> list[TierConfig]:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvtier" / "disk"
    return [
        TierConfig(kind="host", capacity_bytes=2 << 30),
        TierConfig(kind="disk", capacity_bytes=20 << 30, path=str(cache), write_through=True),
    ]


class KVTierConfig(BaseSettings):
    """Everything kvtier reads at start-up."""

    model_config = SettingsConfigDict(env_prefix="KVTIER_", env_nested_delimiter="__", extra="forbid")

    tiers: list[TierConfig] = Field(default_factory=_default_tiers)
    server: ServerConfig = Field(default_factory=ServerConfig)
    tenants: list[TenantConfig] = Field(default_factory=list)
    admin_key_sha256: str | None = Field(default=None, pattern=_SHA256_HEX)
    open_access: bool = Field(default=False, description="no API keys: one anonymous tenant (for local use)")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        """``KVTIER_*`` environment variables override the values given (a config file's), field by field."""
        return env_settings, init_settings, dotenv_settings, file_secret_settings

    @model_validator(mode="after")
    def _check(self) -> "KVTierConfig":
        if not self.tiers:
            raise ValueError("at least one tier is needed")
        names = [t.name or t.kind for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be distinct, got {names}")
        tenants = [t.name for t in self.tenants]
        if len(set(tenants)) != len(tenants):
            raise ValueError(f"tenant names must be distinct, got {tenants}")
        for name in tenants:
            if name in RESERVED_TENANT_NAMES:
                raise ValueError(f"the tenant name {name!r} is reserved: it names {RESERVED_TENANT_NAMES[name]}")
        total = max(t.capacity_bytes for t in self.tiers)
        reserved = sum(t.quota_bytes or 0 for t in self.tenants)
        if reserved > total:
            raise ValueError(f"tenant quotas add up to {reserved} bytes, more than the {total} bytes of the largest tier")
        sharing = self.open_access or any(t.quota_bytes is None for t in self.tenants)
        if sharing and reserved >= total:
            raise ValueError("tenant quotas take every byte, but tenants without a quota (or open access) need "
                             "capacity left over")
        digests = [t.key_sha256.lower() for t in self.tenants] + [(self.admin_key_sha256 or "").lower()]
        if len(set(digests) - {""}) != len([d for d in digests if d]):
            raise ValueError("every tenant and the admin need a distinct API key")
        return self

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "KVTierConfig":
        """Read a JSON config file (if given); environment variables override its values. Anything wrong is a
        one-line ConfigError."""
        data = {}
        if path is not None:
            try:
                data = json.loads(Path(path).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:  # ValueError: not UTF-8 (UnicodeDecodeError), not JSON
                raise ConfigError(f"cannot read config file {path}: {exc}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"invalid configuration: {path} must hold a JSON object, not {type(data).__name__}")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ConfigError(f"invalid configuration: {_one_line(exc)}") from None


def _one_line(exc: ValueError) -> str:
    """``exc``'s message on one line: for pydantic, each error as ``where: what``, joined by ``; ``."""
    if not isinstance(exc, ValidationError):
        return " ".join(str(exc).split())
    return "; ".join(": ".join(filter(None, (".".join(map(str, e["loc"])), e["msg"]))) for e in exc.errors())


def build_tiers(config: KVTierConfig, share: float = 1.0, partition: str | None = None) -> list:
    """The tiers a config describes, fastest first; with ``share`` < 1, that fraction of every tier's capacity,
    in a place of its own for ``partition`` (a disk subfolder, a Redis key prefix). A tier that cannot be built
    (a disk folder that cannot be made, a bad Redis URL) is a ConfigError naming it."""
    tiers = []
    for tc in config.tiers:
        try:
            tiers.append(_build_tier(tc, int(tc.capacity_bytes * share), partition))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{tc.kind} tier {tc.name or tc.kind!r}: {exc}") from None
    return tiers


def partitions_dir(tc: TierConfig) -> Path:
    """The folder holding a disk tier's per-tenant partitions (one subfolder each, named after the partition)."""
    return Path(tc.path) / "partitions"


def _build_tier(tc: TierConfig, capacity: int, partition: str | None):
    """The tier ``tc`` describes, of ``capacity`` bytes, in ``partition``'s place (see :func:`build_tiers`)."""
    from kvtier.kvstore.tiers import DeviceTier, DiskTier, HostTier

    name = tc.name or tc.kind
    if tc.kind == "device":
        return DeviceTier(capacity, tc.codec, name=name)
    if tc.kind == "host":
        return HostTier(capacity, tc.codec, name=name)
    if tc.kind == "disk":
        path = partitions_dir(tc) / partition if partition else Path(tc.path)
        return DiskTier(path, capacity, tc.codec, name=name, fsync=tc.fsync)
    from kvtier.kvstore.tiers.redis import RedisTier

    prefix = f"kvtier:{partition}:" if partition else "kvtier:"
    return RedisTier(tc.url, capacity, tc.codec, name=name, prefix=prefix)


def build_store(config: KVTierConfig, layout=None, share: float = 1.0, partition: str | None = None):
    """A TieredStore for ``config`` (or for one partition of it: see :func:`build_tiers`)."""
    from kvtier.kvstore.store import TieredStore

    return TieredStore(
        build_tiers(config, share, partition), layout=layout,
        policy=[t.policy for t in config.tiers], write_through=[t.write_through for t in config.tiers],
    )
