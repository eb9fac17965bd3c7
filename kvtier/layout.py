"""KVLayout: the shape of one model's KV cache as kvtier stores it, and its fingerprint.

A chunk of a layout is one tensor of shape ``[layers, len(tensors), kv_heads, chunk_tokens, head_dim]``:
layer-major, so the bytes of one layer are contiguous and can be read without the rest. ``tensors``
names what a token has per layer and KV head: ``("k", "v")`` for MHA/GQA/MQA models, ``("latent",)``
for MLA models (one compressed vector per token and layer; then ``kv_heads=1`` and ``head_dim`` is the
latent width).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

import torch

from kvtier.errors import LayoutError

DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class KVLayout:
    """What a model's KV cache looks like. Two layouts with any field different never share chunks."""

    model_id: str
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: str = "float16"
    chunk_tokens: int = 256
    tensors: tuple[str, ...] = ("k", "v")
    tp_rank: int = 0
    tp_size: int = 1
    page_tokens: int = 32
    _fingerprint: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = []
        listed = not isinstance(self.tensors, str) and isinstance(self.tensors, Iterable)
        object.__setattr__(self, "tensors", tuple(self.tensors) if listed else ())
        if not isinstance(self.model_id, str) or not self.model_id:
            problems.append(f"model_id must be a non-empty string, got {self.model_id!r}")
        for name in ("num_layers", "kv_heads", "head_dim", "chunk_tokens", "tp_size", "page_tokens"):
            if not _is_int(value := getattr(self, name)) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.dtype, str) or self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if (not listed or not self.tensors or not all(isinstance(t, str) and t for t in self.tensors)
                or len(set(self.tensors)) != len(self.tensors)):
            problems.append(f"tensors must be a sequence of distinct non-empty names, got {self.tensors!r}")
        size = self.tp_size if _is_int(self.tp_size) and self.tp_size > 0 else 1
        if not _is_int(self.tp_rank) or not 0 <= self.tp_rank < size:
            problems.append(f"tp_rank must be an integer in [0, tp_size), got {self.tp_rank!r}")
        if isinstance(self.chunk_tokens, int) and isinstance(self.page_tokens, int) and self.page_tokens > 0:
            if self.chunk_tokens % self.page_tokens:
                problems.append(f"chunk_tokens {self.chunk_tokens} is not a multiple of page_tokens {self.page_tokens}")
        if problems:
            raise LayoutError("invalid KVLayout: " + "; ".join(problems))
        digest = hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:32]
        object.__setattr__(self, "_fingerprint", digest)

    @property
    def fingerprint(self) -> str:
        """32 hex characters of sha256 over every field: equal only for identical layouts."""
        return self._fingerprint

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def chunk_shape(self) -> tuple[int, int, int, int, int]:
        """``(layers, tensors, kv_heads, chunk_tokens, head_dim)``."""
        return (self.num_layers, len(self.tensors), self.kv_heads, self.chunk_tokens, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        """Bytes of KV one token takes over all layers, uncompressed."""
        return self.num_layers * len(self.tensors) * self.kv_heads * self.head_dim * self.torch_dtype.itemsize

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one uncompressed chunk's KV."""
        return self.bytes_per_token * self.chunk_tokens

    @property
    def pages_per_chunk(self) -> int:
        return self.chunk_tokens // self.page_tokens

    @property
    def summary_shape(self) -> tuple[int, int, int, int, int]:
        """Shape of a chunk's key summary (:func:`kvtier.kvstore.chunk.key_summary`), in this dtype:
        ``[layers, kv_heads, pages, 3 (min, max, mean), head_dim]``."""
        return (self.num_layers, self.kv_heads, self.pages_per_chunk, 3, self.head_dim)

    def to_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, data: dict) -> "KVLayout":
        if not isinstance(data, dict):
            raise LayoutError(f"a KVLayout is a JSON object of its fields, got {type(data).__name__}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__ and not k.startswith("_")}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise LayoutError(f"unknown KVLayout fields: {unknown}")
        try:
            return cls(**known)
        except TypeError as exc:
            raise LayoutError(f"invalid KVLayout: {exc}") from None

    def check_layers(self, layers: range | None) -> range:
        """``layers`` as a contiguous non-empty range within this layout (None: all layers); LayoutError if not."""
        if layers is None:
            return range(self.num_layers)
        if not isinstance(layers, range) or layers.step != 1 or not 0 <= layers.start < layers.stop <= self.num_layers:
            raise LayoutError(f"layers must be a contiguous non-empty range within 0..{self.num_layers}, got {layers!r}")
        return layers

    def check_out(self, out: torch.Tensor, layers: range, tokens: int) -> None:
        """Raise LayoutError unless ``out`` can take ``tokens`` tokens of ``layers``:
        ``[len(layers), tensors, kv_heads, >= tokens, head_dim]`` of this dtype."""
        want = (len(layers), len(self.tensors), self.kv_heads)
        if (not isinstance(out, torch.Tensor) or out.dim() != 5 or tuple(out.shape[:3]) != want
                or out.shape[3] < tokens or out.shape[4] != self.head_dim or out.dtype != self.torch_dtype):
            what = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else f"of type {type(out).__name__}"
            raise LayoutError(f"out buffer {what} does not fit [{want[0]}, {want[1]}, {want[2]}, >={tokens}, "
                              f"{self.head_dim}] of {self.torch_dtype}")
        if out.device.type == "meta" or out.requires_grad or any(
                stride == 0 and size > 1 for stride, size in zip(out.stride(), out.shape)):
            raise LayoutError("out buffer must be writable memory: not on the meta device, not requiring grad, and no "
                              f"element shared by several positions (an expanded view); got {out.device}, "
                              f"requires_grad={out.requires_grad}, strides {out.stride()}")

    def check_kv(self, kv: torch.Tensor, tokens: int, name: str = "kv") -> None:
        """Raise LayoutError unless ``kv`` is ``[layers, tensors, kv_heads, >= tokens, head_dim]`` of this dtype."""
        if not isinstance(kv, torch.Tensor):
            raise LayoutError(f"{name} must be a torch.Tensor, got {type(kv).__name__}")
        want = (self.num_layers, len(self.tensors), self.kv_heads, tokens, self.head_dim)
        if kv.dim() != 5 or kv.shape[:3] != want[:3] or kv.shape[4] != want[4] or kv.shape[3] < tokens:
            raise LayoutError(
                f"{name} has shape {tuple(kv.shape)}; layout {self.model_id!r} needs "
                f"[layers={want[0]}, tensors={want[1]}, kv_heads={want[2]}, tokens>={tokens}, head_dim={want[4]}]"
            )
        if kv.dtype != self.torch_dtype:
            raise LayoutError(f"{name} has dtype {kv.dtype}; layout {self.model_id!r} needs {self.torch_dtype}")


SMOLLM2_135M = KVLayout("HuggingFaceTB/SmolLM2-135M-Instruct", num_layers=30, kv_heads=3, head_dim=64)
"""The layout of the real model the tests use (fp16, 256-token chunks: 5.9 MB a chunk)."""
