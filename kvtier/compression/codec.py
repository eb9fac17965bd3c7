"""The codec contract: how a chunk's KV tensor becomes the tensors stored in a tier, and back.

A codec turns one chunk ``kv`` of shape ``[L, T, H, C, D]`` (layers, tensors per token e.g. k/v, KV heads,
chunk tokens, head_dim; the layout's dtype) into a dict of named tensors. Every encoded tensor is
**layer-major**: its first dimension is ``L``, so the parts of one layer are ``t[l]`` of each tensor and a
tier can read or decode one layer without the rest. ``decode`` writes into a caller-provided tensor, so a
fetch lands in the engine's buffer without an extra allocation.

Codecs are registered by name; :func:`get_codec` builds one from a name and parameters, and the chunk
blob records both (``codec.name``, ``codec.params()``) so a reader always knows how to decode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from kvtier.errors import CodecError

_REGISTRY: dict[str, type["Codec"]] = {}


class Codec(ABC):
    """Encode/decode a chunk's KV. Subclasses set ``name`` and ``lossless`` and take keyword parameters."""

    name: ClassVar[str]
    lossless: ClassVar[bool]

    def params(self) -> dict[str, Any]:
        """Keyword parameters that rebuild this codec with ``get_codec(name, **params)``."""
        return {}

    def encoded_nbytes(self, shape: tuple[int, ...], dtype: torch.dtype) -> int:
        """Bytes the encoded tensors of a ``shape`` chunk take (exact for fixed-rate codecs; lossless ones
        give an estimate). The metadata-only store uses it to account capacity without any data."""
        return int(torch.Size(shape).numel()) * dtype.itemsize

    @abstractmethod
    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        """``kv``: ``[L, T, H, C, D]`` -> named layer-major tensors (first dim ``L``). A part may be a view of
        ``kv`` itself (the raw codec's is); whoever needs its bytes makes it contiguous."""

    @abstractmethod
    def decode(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        """Write the KV held by ``parts`` (first dim ``L'``) into ``out`` of shape ``[L', T, H, C, D]``.

        Raise CodecError when the parts are not what this codec produces.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{type(self).__name__}({args})"


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make ``cls`` available to :func:`get_codec` under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def available_codecs() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_codec(name: str, **params: Any) -> Codec:
    """Build the codec called ``name``; CodecError names the known ones when it does not exist."""
    _load_builtin()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise CodecError(f"unknown codec {name!r}; known codecs: {', '.join(sorted(_REGISTRY))}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise CodecError(f"bad parameters for codec {name!r}: {exc}") from None


def _load_builtin() -> None:
    """Import the modules that register the built-in codecs (once all of them exist)."""
    global _builtin_loaded
    if _builtin_loaded:
        return
    import importlib

    missing = False
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if not (exc.name or "").startswith("kvtier"):
                raise
            missing = True
    _builtin_loaded = not missing


_builtin_loaded = False
_BUILTIN_MODULES = ("kvtier.compression.quant", "kvtier.compression.lossless")


def expect_parts(parts: dict[str, torch.Tensor], names: tuple[str, ...], codec: str) -> None:
    """Raise CodecError unless ``parts`` holds exactly ``names``."""
    if set(parts) != set(names):
        raise CodecError(f"codec {codec!r} expects tensors {sorted(names)}, got {sorted(parts)}")


@register_codec
class RawCodec(Codec):
    """No change: the KV tensor itself, stored as ``kv``."""

    name = "raw"
    lossless = True

    def encode(self, kv: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"kv": kv}

    def decode(self, parts: dict[str, torch.Tensor], out: torch.Tensor) -> None:
        expect_parts(parts, ("kv",), self.name)
        src = parts["kv"]
        if src.shape != out.shape:
            raise CodecError(f"raw codec: stored shape {tuple(src.shape)} does not match {tuple(out.shape)}")
        if src.data_ptr() != out.data_ptr():  # a tier may have read the bytes straight into ``out``
            out.copy_(src)
