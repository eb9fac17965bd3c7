import numpy as np
import pytest
import torch

from kvtier.errors import LayoutError, TokenError
from kvtier.kvstore.keys import as_tokens, chain_block_keys, chunk_keys, root_key
from kvtier.layout import KVLayout

from .helpers import TINY


def keys(tokens, layout=TINY, namespace=""):
    return chunk_keys(root_key(layout.fingerprint, namespace), as_tokens(tokens), layout.chunk_tokens)


def test_only_full_chunks_get_keys():
    assert len(keys(range(15))) == 0
    assert len(keys(range(16))) == 1
    assert len(keys(range(47))) == 2


def test_keys_chain_the_whole_prefix():
    a = keys(list(range(64)))
    b = keys(list(range(64)))
    assert a == b and len(set(a)) == 4
    changed = list(range(64))
    changed[3] = 999  # a change in chunk 0 changes every later key
    c = keys(changed)
    assert all(x != y for x, y in zip(a, c))
    changed = list(range(64))
    changed[40] = 999  # a change in chunk 2 keeps keys 0 and 1
    d = keys(changed)
    assert d[:2] == a[:2] and d[2] != a[2] and d[3] != a[3]


@pytest.mark.parametrize("field,value", [("model_id", "other"), ("dtype", "bfloat16"), ("num_layers", 3),
                                          ("kv_heads", 1), ("head_dim", 16), ("tp_rank", 1), ("chunk_tokens", 32)])
def test_layout_salts_the_keys(field, value):
    params = TINY.to_dict()
    params[field] = value
    if field == "tp_rank":
        params["tp_size"] = 2
    other = KVLayout.from_dict(params)
    assert other.fingerprint != TINY.fingerprint
    assert keys(range(64), other)[0] != keys(range(64))[0]


def test_namespace_salts_the_keys():
    assert keys(range(32), namespace="a") != keys(range(32), namespace="b")
    assert keys(range(32), namespace="a") == keys(range(32), namespace="a")


def test_token_forms_agree():
    ref = keys(list(range(40)))
    assert keys(np.arange(40, dtype=np.int64)) == ref
    assert keys(np.arange(40, dtype=np.uint16)) == ref
    assert keys(torch.arange(40)) == ref
    assert keys(tuple(range(40))) == keys(x for x in range(40)) == ref


@pytest.mark.parametrize("bad", [[1.5, 2.0], "abc", [[1, 2]], [-1, 3], [2**40], torch.zeros(4), [1, "x"], 3, None,
                                 (1.7, 2.9), (x / 2 for x in range(4)), ("5", "6"), (True, False),
                                 np.ma.masked_array([1, -1], mask=[False, True])])
def test_bad_tokens_are_clear_errors(bad):
    with pytest.raises(TokenError):
        as_tokens(bad)


def test_block_keys_share_prefixes():
    root = root_key(TINY.fingerprint)
    a = chain_block_keys(root, [0, 1, 2])
    b = chain_block_keys(root, [0, 1, 5])
    assert a[:2] == b[:2] and a[2] != b[2]


def test_invalid_layout_is_a_clear_error():
    with pytest.raises(LayoutError, match="num_layers"):
        KVLayout("m", num_layers=0, kv_heads=1, head_dim=8)
    with pytest.raises(LayoutError, match="dtype"):
        KVLayout("m", num_layers=1, kv_heads=1, head_dim=8, dtype="int8")
    with pytest.raises(LayoutError, match="page_tokens"):
        KVLayout("m", num_layers=1, kv_heads=1, head_dim=8, chunk_tokens=48, page_tokens=20)
    with pytest.raises(LayoutError, match="unknown"):
        KVLayout.from_dict({**TINY.to_dict(), "colour": "red"})


@pytest.mark.parametrize(("field", "value"), [("tp_rank", True), ("tp_size", "x"), ("tp_size", float("inf")),
                                              ("tensors", 5), ("tensors", None), ("tensors", "kv"),
                                              ("tensors", ["k", ""]), ("model_id", ["m"]), ("dtype", ["f"])])
def test_every_bad_field_is_a_layout_error(field, value):
    """From JSON as from Python: a LayoutError naming the field, never a TypeError or an equal layout whose
    fingerprint differs (tp_rank=True == 1)."""
    with pytest.raises(LayoutError, match=field):
        KVLayout.from_dict({**TINY.to_dict(), field: value})
    with pytest.raises(LayoutError, match="JSON object"):
        KVLayout.from_dict([TINY.to_dict()])
