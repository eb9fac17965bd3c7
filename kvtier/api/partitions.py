"""The stores behind the service: every tenant with a quota gets a partition of its own.

A tenant's ``quota_bytes`` is its partition of the largest tier, and it gets the same share of every other tier
(``quota / largest capacity``), as a separate :class:`TieredStore` (its own memory pool, disk subfolder, Redis key prefix). Its
puts can then only ever evict its own chunks, and no other tenant's traffic can evict, demote or delay its
chunks: nothing about one tenant's chunks can be learnt through another's. Tenants without a quota (and the
anonymous tenant of open access) share one store over what the quotas leave.
"""

from __future__ import annotations

import logging
import shutil

from kvtier.api.auth import ANONYMOUS, tenant_namespace
from kvtier.config import SHARED_PARTITION as SHARED
from kvtier.config import KVTierConfig, build_store, partitions_dir
from kvtier.kvstore.store import TieredStore

log = logging.getLogger(__name__)


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
        self._drop_strays(config)

    def _drop_strays(self, config: KVTierConfig) -> None:
        """Since the last start a tenant may have got or lost a quota: its chunks found in a partition it no longer
        belongs to are deleted (its own partition cannot reach them, and they took that partition's room), and so
        is a disk partition's folder that no tenant's quota names any more (no store would account for it)."""
        for store in self.stores.values():
            for namespace in [ns for ns, n in store.namespace_bytes.items() if n and self._by_namespace.get(ns) is not store]:
                log.warning("deleted %d chunks of %s: they are in a partition it does not belong to now",
                            store.delete_namespace(namespace), namespace)
        for tier in config.tiers:
            if tier.kind != "disk" or not partitions_dir(tier).is_dir():
                continue
            for folder in sorted(partitions_dir(tier).iterdir()):
                if folder.is_dir() and folder.name not in self.stores:
                    log.warning("deleted %s: the partition of a tenant that has no quota now", folder)
                    shutil.rmtree(folder, ignore_errors=True)

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
