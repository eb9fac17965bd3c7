"""The stores behind the service: every tenant with a quota gets a partition of its own.

A tenant's ``quota_bytes`` is its partition of the largest tier, and it gets the same share of every other tier
(``quota / largest capacity``), as a separate :class:`TieredStore` (its own memory pool, disk subfolder, Redis key prefix). Its
puts can then only ever evict its own chunks, and no other tenant's traffic can evict, demote or delay its
chunks: nothing about one tenant's chunks can be learnt through another's. Tenants without a quota (and the
anonymous tenant of open access) share one store over what the quotas leave.
"""

from __future__ import annotations

from kvtier.api.auth import ANONYMOUS, tenant_namespace
from kvtier.config import SHARED_PARTITION as SHARED
from kvtier.config import KVTierConfig, build_store
from kvtier.kvstore.store import TieredStore


class Partitions:
    """Maps a namespace to the store that holds it."""

    def __init__(self, config: KVTierConfig) -> None:
        total = max(t.capacity_bytes for t in config.tiers)
        self.stores: dict[str, TieredStore] = {}
        self._by_namespace: dict[str, TieredStore] = {}
        reserved = 0
        for tenant in config.tenants:
            if tenant.quota_bytes is not None:
                share = tenant.quota_bytes / total
                store = build_store(config, share=share, partition=tenant.name)
                # A partition's tiers may hold more KV than its bytes (memory-only chunks beside those on disk, a
                # lossy codec): the quota also bounds the tenant's KV itself, so what it keeps is what it pays for.
                store.set_quota(tenant_namespace(tenant.name), tenant.quota_bytes)
                self.stores[tenant.name] = store
                self._by_namespace[tenant_namespace(tenant.name)] = store
                reserved += tenant.quota_bytes
        sharers = [t.name for t in config.tenants if t.quota_bytes is None] + ([ANONYMOUS] if config.open_access else [])
        if sharers:
            shared = build_store(config, share=1 - reserved / total)
            self.stores[SHARED] = shared
            for name in sharers:
                self._by_namespace[tenant_namespace(name)] = shared

    def for_namespace(self, namespace: str) -> TieredStore:
        return self._by_namespace[namespace]

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


def merged_stats(stores: dict[str, TieredStore]) -> dict:
    """The stores' counters added up (``tiers`` and ``namespaces`` per partition under ``partitions``)."""
    per = {name: store.stats() for name, store in stores.items()}
    total: dict = {}
    for stats in per.values():
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    total["token_hit_rate"] = total["hit_tokens"] / total["lookup_tokens"] if total.get("lookup_tokens") else 0.0
    total["partitions"] = per
    return total
