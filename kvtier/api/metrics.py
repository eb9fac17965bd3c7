"""Prometheus metrics of one app, in its own CollectorRegistry (several apps can live in one process).

Request metrics are recorded as requests pass; the store's own counters (hits and misses per tier,
evictions, bytes read and written, occupancy) are read from it at scrape time, so they are never out of step.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from kvtier.api.budget import ByteBudget
from kvtier.kvstore.store import TieredStore

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The service's metrics; ``registry`` is what ``/metrics`` exposes."""

    def __init__(self, stores: dict[str, TieredStore], budget: ByteBudget) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvtier_requests", "requests served", ["endpoint", "status"], registry=r)
        self.latency = Histogram("kvtier_request_seconds", "request latency, first byte in to last byte out",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.bytes_in = Counter("kvtier_bytes_received", "request body bytes", ["endpoint"], registry=r)
        self.bytes_out = Counter("kvtier_bytes_sent", "response body bytes", ["endpoint"], registry=r)
        self.in_flight = Gauge("kvtier_requests_in_flight", "requests being served", registry=r)
        self.store_queue = Gauge("kvtier_store_queue_depth",
                                 "store operations waiting for or holding the store's lock", registry=r)
        self.chunks_moved = Counter("kvtier_chunks", "chunks moved through the API", ["direction"], registry=r)
        Gauge("kvtier_bytes_in_flight", "chunk bytes held by requests (see server.max_bytes_in_flight)",
              registry=r).set_function(lambda: budget.held)
        Gauge("kvtier_requests_waiting_for_bytes", "requests waiting for room under server.max_bytes_in_flight",
              registry=r).set_function(lambda: budget.waiting)
        r.register(_StoreCollector(stores))


class _StoreCollector:
    """The stores' counters and occupancy, read when scraped; labelled by partition (see partitions.py)."""

    def __init__(self, stores: dict[str, TieredStore]) -> None:
        self.stores = stores

    def describe(self) -> list[Metric]:
        return []  # collected lazily; nothing to check for name clashes up front

    def collect(self) -> Iterator[Metric]:
        stats = {name: store.stats() for name, store in self.stores.items()}
        per_tier = {
            "tier_hits": ("chunks served from the tier", lambda t, s: s["hits"]),
            "tier_misses": ("reads of a chunk the tier did not hold", lambda t, s: t.stats.misses),
            "tier_evictions": ("chunks evicted from the tier", lambda t, s: s["evictions"]),
            "tier_corrupt": ("chunks found corrupt and deleted", lambda t, s: s["corrupt"]),
            "tier_read_bytes": ("bytes read from the tier", lambda t, s: s["bytes_read"]),
            "tier_written_bytes": ("bytes written to the tier", lambda t, s: s["bytes_written"]),
        }
        for name, (doc, value) in per_tier.items():
            family = CounterMetricFamily(f"kvtier_{name}", doc, labels=["partition", "tier"])
            for part, store in self.stores.items():
                for tier, s in zip(store.tiers, stats[part]["tiers"]):
                    family.add_metric([part, s["name"]], value(tier, s))
            yield family
        for name, key, doc in (("tier_used_bytes", "used_bytes", "bytes held"),
                               ("tier_capacity_bytes", "capacity_bytes", "capacity"),
                               ("tier_chunks", "chunks", "chunks held")):
            family = GaugeMetricFamily(f"kvtier_{name}", doc, labels=["partition", "tier"])
            for part in self.stores:
                for s in stats[part]["tiers"]:
                    family.add_metric([part, s["name"]], s[key])
            yield family
        for key, doc in (("lookup_tokens", "tokens looked up"), ("hit_tokens", "tokens found cached"),
                         ("promotions", "chunks copied up to the first tier"),
                         ("demotions", "chunks moved down a tier on eviction"),
                         ("drops", "chunks that left the store"),
                         ("verify_failures", "fetched chunks that failed verification")):
            family = CounterMetricFamily(f"kvtier_store_{key}", doc, labels=["partition"])
            for part in self.stores:
                family.add_metric([part], stats[part][key])
            yield family
        family = GaugeMetricFamily("kvtier_store_chunks", "chunks indexed", labels=["partition"])
        for part in self.stores:
            family.add_metric([part], stats[part]["chunks"])
        yield family
