"""Exceptions raised by kvtier. Every one says what was wrong with the input, never just that it was."""


class KVTierError(Exception):
    """Base class of every error kvtier raises on purpose."""


class LayoutError(KVTierError, ValueError):
    """A tensor's shape, dtype or device does not match the KV layout, or a layout is invalid."""


class TokenError(KVTierError, ValueError):
    """Token ids that are not a 1-D sequence of non-negative integers."""


class CapacityError(KVTierError):
    """A write that cannot fit in any tier, even after evicting everything evictable."""


class CodecError(KVTierError, ValueError):
    """An unknown codec name, bad codec parameters, or data that fails to decode."""


class BlobError(KVTierError, ValueError):
    """Bytes that are not a valid kvtier chunk blob (bad header, checksum, layout or key)."""


class ConfigError(KVTierError, ValueError):
    """A configuration that cannot work (unknown tier kind, negative capacity, ...)."""


class StoreUnavailableError(KVTierError):
    """The store could not answer just now: a remote service unreachable, busy or failing (5xx). It says nothing
    about what the store holds; a caller serving a model goes on without it (the transformers adapter does)."""


class TierError(KVTierError):
    """A tier failed to store a chunk (disk full, Redis unreachable, ...). The store treats the chunk as
    not taken by that tier and carries on; nothing already stored is affected."""


class ParentMissingError(KVTierError, ValueError):
    """A put whose first chunk's parent is neither the root nor cached (e.g. evicted since the caller saw it):
    the caller should put from the prompt's start."""
