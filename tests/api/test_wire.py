"""fresh_bytes: a bytes object filled in place through a tensor, kept alive by the tensor."""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from kvtier.api.wire import fresh_bytes


def test_fresh_bytes_hold_what_the_tensor_wrote_and_live_as_long_as_it():
    body, view = fresh_bytes(1 << 20)
    assert type(body) is bytes and len(body) == view.numel() == 1 << 20 and view.dtype == torch.uint8
    view.copy_(torch.arange(1 << 20) % 251)
    assert body[:4] == bytes([0, 1, 2, 3]) and body[-1] == ((1 << 20) - 1) % 251
    assert sys.getrefcount(body) <= 3  # ``body``, the argument, the tensor's hold on it: no leaked reference
    del body
    gc.collect()
    assert int(view[251 * 3 + 7]) == 7  # still readable: the tensor keeps the bytes alive
    single, one = fresh_bytes(1)
    one[0] = 65
    assert single == b"A" and single is not fresh_bytes(1)[0]  # never a cached single-byte object


def test_fresh_bytes_needs_at_least_one_byte():
    with pytest.raises(ValueError, match="at least 1"):
        fresh_bytes(0)
