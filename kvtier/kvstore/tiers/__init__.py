"""Storage tiers: device memory, host memory, local disk, Redis, and the metadata-only tier for replays."""

from kvtier.kvstore.tiers.base import Prepared, Tier, TierStats
from kvtier.kvstore.tiers.disk import DiskTier
from kvtier.kvstore.tiers.memory import DeviceTier, HostTier, MemoryTier
from kvtier.kvstore.tiers.meta import MetaTier

__all__ = ["DeviceTier", "DiskTier", "HostTier", "MemoryTier", "MetaTier", "Prepared", "Tier", "TierStats"]
