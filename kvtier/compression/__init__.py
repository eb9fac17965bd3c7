"""KV compression: codecs applied per tier when a chunk is stored, and token-eviction presses."""

from kvtier.compression.codec import Codec, available_codecs, get_codec, register_codec

__all__ = ["Codec", "available_codecs", "get_codec", "register_codec"]
