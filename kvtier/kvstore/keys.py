"""Chained chunk keys.

``root = H("kvtier/1" || layout fingerprint || namespace)`` and ``key_i = H(key_{i-1} || tokens of chunk i)``
with H = BLAKE2b-128 and tokens as little-endian int32. A key therefore names a whole prefix: equal keys
mean equal layouts, namespaces and token prefixes (up to a 2^-64 collision chance, and every hit is also
verified against the tokens and parent key stored with the chunk). Only full chunks get keys.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from kvtier.errors import TokenError

KEY_BYTES = 16
_MAX_TOKEN = 2**31 - 1

TokenLike = Sequence[int] | np.ndarray | torch.Tensor


def root_key(fingerprint: str, namespace: str = "") -> bytes:
    """The parent key of a prompt's first chunk for one layout and namespace (tenant or cache salt)."""
    h = hashlib.blake2b(digest_size=KEY_BYTES)
    h.update(b"kvtier/1\x00")
    h.update(fingerprint.encode())
    h.update(b"\x00")
    h.update(namespace.encode())
    return h.digest()


def chain_key(parent: bytes, token_bytes: bytes | memoryview) -> bytes:
    """``H(parent || token_bytes)``."""
    h = hashlib.blake2b(parent, digest_size=KEY_BYTES)
    h.update(token_bytes)
    return h.digest()


def as_tokens(tokens: TokenLike) -> np.ndarray:
    """Validate token ids and return them as a contiguous 1-D int32 array (no copy when already so).

    Raises TokenError for anything but a 1-D sequence of integers in ``[0, 2^31)``.
    """
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TokenError(f"token ids must be integers, got a tensor of {tokens.dtype}")
        arr = tokens.detach().cpu().numpy()
    elif isinstance(tokens, np.ma.MaskedArray):
        raise TokenError("token ids must not be a masked array (what would a masked id be?)")
    elif isinstance(tokens, np.ndarray):
        arr = tokens
    else:
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Iterable):
            raise TokenError(f"token ids must be a sequence of integers, got {type(tokens).__name__}")
        try:  # numpy infers the dtype, checked below: floats, strings or bools are not ids
            arr = np.array(tokens if isinstance(tokens, list) else list(tokens))
        except (TypeError, ValueError, OverflowError) as exc:
            raise TokenError(f"token ids must be integers: {exc}") from None
    if arr.ndim != 1:
        raise TokenError(f"token ids must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int32)
    if arr.dtype.kind not in "iu":
        raise TokenError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.dtype != np.int32:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > _MAX_TOKEN:
            raise TokenError(f"token ids must be in [0, 2^31), got values in [{lo}, {hi}]")
        arr = arr.astype(np.int32)
    elif int(arr.min()) < 0:
        raise TokenError(f"token ids must be non-negative, got {int(arr.min())}")
    return np.ascontiguousarray(arr)


def chunk_keys(root: bytes, tokens: np.ndarray, chunk_tokens: int) -> list[bytes]:
    """Keys of the full chunks of ``tokens`` (int32 [N]): ``N // chunk_tokens`` keys; a partial tail has none."""
    n_full = len(tokens) // chunk_tokens
    data = memoryview(tokens[: n_full * chunk_tokens].astype("<i4", copy=False)).cast("B")
    step = chunk_tokens * 4
    keys = []
    parent = root
    for i in range(n_full):
        parent = chain_key(parent, data[i * step : (i + 1) * step])
        keys.append(parent)
    return keys


def chain_block_keys(root: bytes, block_ids: Iterable[int]) -> list[bytes]:
    """Keys for a trace whose prompts are given as block ids (e.g. Mooncake ``hash_ids``) instead of tokens.

    Equal leading block ids give equal keys, exactly like equal leading token chunks.
    """
    keys = []
    parent = root
    for block in block_ids:
        parent = chain_key(parent, int(block).to_bytes(8, "little", signed=True))
        keys.append(parent)
    return keys
