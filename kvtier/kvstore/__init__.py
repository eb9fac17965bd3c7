"""The tiered KV store: keys, chunk format, prefix index, policies, tiers and the TieredStore."""

from kvtier.kvstore.chunk import Chunk, blob_bytes, decode_blob
from kvtier.kvstore.keys import chain_block_keys, chunk_keys, root_key
from kvtier.kvstore.store import ChunkRef, GetResult, LookupResult, PutResult, TieredStore
from kvtier.kvstore.tiers import DeviceTier, DiskTier, HostTier, MetaTier, Tier

__all__ = [
    "Chunk", "ChunkRef", "DeviceTier", "DiskTier", "GetResult", "HostTier", "LookupResult", "MetaTier",
    "PutResult", "Tier", "TieredStore", "blob_bytes", "chain_block_keys", "chunk_keys", "decode_blob", "root_key",
]
