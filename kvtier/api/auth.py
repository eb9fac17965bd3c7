"""API keys and tenants.

Keys are never stored: the config holds their sha256 digests, and a presented key is hashed and compared
with every digest in constant time (``hmac.compare_digest``, no early exit). A tenant's chunks live in its own
store namespace, which salts every chunk key, so two tenants never share, match or reach each other's chunks.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from kvtier.config import ANONYMOUS_TENANT as ANONYMOUS
from kvtier.config import KVTierConfig


def hash_key(api_key: str) -> str:
    """The sha256 hex digest a config stores for ``api_key``."""
    return hashlib.sha256(api_key.encode()).hexdigest()


def tenant_namespace(tenant: str) -> str:
    """The store namespace of a tenant (the anonymous tenant of open access uses the default namespace)."""
    return "" if tenant == ANONYMOUS else f"tenant/{tenant}"


@dataclass(frozen=True)
class Principal:
    """Who made a request: a tenant (with its namespace and quota), the admin, or both (open access)."""

    tenant: str | None
    admin: bool = False
    quota_bytes: int | None = None

    @property
    def namespace(self) -> str:
        if self.tenant is None:
            raise ValueError("the admin key is not a tenant")
        return tenant_namespace(self.tenant)


class Authenticator:
    """Maps a presented API key (the ``Authorization: Bearer KEY`` header) to a :class:`Principal`
    (None: unknown or missing key)."""

    def __init__(self, config: KVTierConfig) -> None:
        self.open_access = config.open_access
        self._entries: list[tuple[bytes, Principal]] = [
            (bytes.fromhex(t.key_sha256), Principal(t.name, quota_bytes=t.quota_bytes)) for t in config.tenants
        ]
        if config.admin_key_sha256:
            self._entries.append((bytes.fromhex(config.admin_key_sha256), Principal(None, admin=True)))

    def identify(self, key: str | None) -> Principal | None:
        if not key:
            return Principal(ANONYMOUS, admin=True) if self.open_access else None
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for expected, principal in self._entries:
            if hmac.compare_digest(digest, expected) and found is None:
                found = principal
        return found

