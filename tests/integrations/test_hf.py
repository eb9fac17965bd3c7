"""The transformers adapter on the real SmolLM2-135M (fp32, CPU): outputs with the store equal those without."""

from __future__ import annotations

import copy

import pytest
import torch

from kvtier.bench.text import english_text
from kvtier.integrations.hf import HFKVCache, model_layout
from kvtier.kvstore.store import TieredStore
from kvtier.kvstore.tiers.disk import DiskTier
from kvtier.kvstore.tiers.memory import HostTier
from kvtier.sparse_attn.integration import disable_sparse_prefill, enable_sparse_prefill

pytestmark = pytest.mark.model
C = 64  # small chunks keep the prompts (and the model's prefill) short
ATOL = 1e-4


@pytest.fixture(scope="module")
def tokens(smollm2) -> list[int]:
    _, tokenizer = smollm2
    return tokenizer(english_text("heldout")[:4000]).input_ids[:320]


@pytest.fixture(scope="module")
def other_tokens(smollm2) -> list[int]:
    _, tokenizer = smollm2
    return tokenizer(english_text("tune")[:2000]).input_ids[:100]


def adapter(model, store: TieredStore | None = None, chunk_tokens: int = C) -> HFKVCache:
    return HFKVCache(model, store or TieredStore([HostTier(256 << 20)]), chunk_tokens)


@torch.no_grad()
def full_logits(model, ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([ids])).logits[0]


def test_prefill_reuses_the_cached_prefix_and_matches(smollm2, tokens) -> None:
    model, _ = smollm2
    a = adapter(model)
    first = a.prefill([tokens[:200]])
    assert first.loaded.reused == [0] and a.store.stats()["chunks"] == 3
    again = a.prefill([tokens])
    assert again.loaded.reused == [192] and again.loaded.suffix == len(tokens) - 192
    torch.testing.assert_close(again.logits[0], full_logits(model, tokens)[192:], atol=ATOL, rtol=0)
    assert a.store.stats()["chunks"] == len(tokens) // C


def test_the_adapter_works_through_the_service(smollm2, tokens) -> None:
    """An engine switches to a kvtier server by changing the line that makes its store: the adapter over a Client
    of a real server (uvicorn on 127.0.0.1) reuses the prefix, and its logits and greedy tokens are exact. The
    server takes 128 tokens a request: lookups, gets and puts of the 320-token prompt go in several."""
    from kvtier.api import Client
    from kvtier.api.auth import hash_key
    from kvtier.config import KVTierConfig
    from tests.api.helpers import serve

    model, _ = smollm2
    config = KVTierConfig(tiers=[{"kind": "host", "capacity_bytes": 256 << 20}],
                          tenants=[{"name": "engine", "key_sha256": hash_key("engine-key")}],
                          server={"max_tokens_per_request": 2 * C})
    with serve(config) as url, Client(url, api_key="engine-key") as client:
        a = adapter(model, client)
        assert a.prefill([tokens[:200]]).loaded.reused == [0]
        assert client.stats()["put_chunks"] == 3
        again = a.prefill([tokens])
        assert again.loaded.reused == [192] and again.loaded.suffix == len(tokens) - 192
        torch.testing.assert_close(again.logits[0], full_logits(model, tokens)[192:], atol=ATOL, rtol=0)
        assert client.stats()["put_chunks"] == len(tokens) // C
        out, loaded = a.generate([tokens[:250]], max_new_tokens=8, do_sample=False)
        assert loaded.reused == [192]
        assert torch.equal(out, model.generate(torch.tensor([tokens[:250]]), max_new_tokens=8, do_sample=False,
                                               pad_token_id=0))


def test_the_model_runs_on_while_the_service_is_down(smollm2, tokens, caplog) -> None:
    """A cache that cannot answer is a miss, never a failed request: with the server gone the adapter computes the
    whole prompt (exact logits) and stores nothing; once a server is back it reuses again."""
    from kvtier.api import Client
    from kvtier.api.auth import hash_key
    from kvtier.config import KVTierConfig
    from tests.api.helpers import serve

    model, _ = smollm2
    config = KVTierConfig(tiers=[{"kind": "host", "capacity_bytes": 256 << 20}],
                          tenants=[{"name": "engine", "key_sha256": hash_key("engine-key")}])
    with serve(config) as url:
        client = Client(url, api_key="engine-key", retries=1, backoff=0.01)
        a = adapter(model, client)
        assert a.prefill([tokens[:200]]).loaded.reused == [0]
    down = a.prefill([tokens])  # lookup, get and put all find no server
    assert down.loaded.reused == [0] and "kvtier store unavailable" in caplog.text
    torch.testing.assert_close(down.logits[0], full_logits(model, tokens), atol=ATOL, rtol=0)
    with serve(config, port=int(url.rsplit(":", 1)[1])), client:  # back, empty (memory only)
        assert a.prefill([tokens]).loaded.reused == [0]
        assert a.prefill([tokens]).loaded.reused == [min(len(tokens) // C * C, len(tokens) - 1)]


def test_generate_gives_the_same_greedy_tokens(smollm2, tokens) -> None:
    model, _ = smollm2
    a = adapter(model)
    a.prefill([tokens[:150]])
    out, loaded = a.generate([tokens[:250]], max_new_tokens=12, do_sample=False)
    ref = model.generate(torch.tensor([tokens[:250]]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert loaded.reused == [128]
    assert torch.equal(out, ref)


def test_a_plain_forward_loop_continues_from_the_cache(smollm2, tokens) -> None:
    model, _ = smollm2
    a = adapter(model)
    a.prefill([tokens[:140]])
    pre = a.prefill([tokens[:200]])
    assert pre.loaded.reused == [128]
    cache, logits, generated = pre.cache, pre.logits, []
    with torch.no_grad():
        for _ in range(8):
            generated.append(int(logits[0, -1].argmax()))
            step = model(input_ids=torch.tensor([generated[-1:]]), cache=cache, use_cache=True)
            cache, logits = step.cache, step.logits
    ref = model.generate(torch.tensor([tokens[:200]]), max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert generated == ref[0, 200:].tolist()


def test_a_batch_with_different_cached_lengths(smollm2, tokens, other_tokens) -> None:
    model, _ = smollm2
    a = adapter(model)
    a.prefill([tokens[:270]])  # caches 4 chunks of `tokens`
    prompts = [tokens[:150], other_tokens[:90], tokens[:300]]
    pre = a.prefill(prompts, store=False)
    # the longest uncached suffix is other_tokens' 90: the others take everything before their last 90
    # tokens from the store (at most what is cached for them)
    assert pre.loaded.suffix == 90 and pre.loaded.reused == [60, 0, 210]
    for row, ids in enumerate(prompts):
        s = min(90, len(ids))
        torch.testing.assert_close(pre.logits[row, -s:], full_logits(model, ids)[-s:], atol=ATOL, rtol=0)
    out, loaded = a.generate(prompts, max_new_tokens=8, do_sample=False)
    ref = model.generate(input_ids=loaded.input_ids, attention_mask=loaded.attention_mask, max_new_tokens=8,
                         do_sample=False, pad_token_id=0)
    assert torch.equal(out, ref)
    assert a.store.stats()["chunks"] == 4 + 1  # other_tokens[:90] adds one chunk; the rest was cached


@pytest.mark.parametrize("cached", [0, 128])
def test_beam_search_and_several_sequences_store_each_prompts_own_kv(smollm2, tokens, other_tokens, cached) -> None:
    """``generate`` repeats each row for its beams or returned sequences: the rebuilt cache is repeated the
    same way, and every prompt's chunks hold its own KV (a later prefill from them is exact)."""
    model, _ = smollm2
    a = adapter(model)
    prompts = [tokens[:150], other_tokens[:90]]
    if cached:
        a.prefill([tokens[:cached + 10]])
    out, loaded = a.generate(prompts, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2,
                             pad_token_id=0)
    ref = model.generate(input_ids=loaded.input_ids, attention_mask=loaded.attention_mask, max_new_tokens=3,
                         do_sample=False, num_beams=2, num_return_sequences=2, pad_token_id=0)
    assert torch.equal(out, ref)
    pre = a.prefill([other_tokens[:90]], store=False)
    assert pre.loaded.reused == [64]
    torch.testing.assert_close(pre.logits[0], full_logits(model, other_tokens[:90])[64:], atol=ATOL, rtol=0)


def test_a_store_too_small_for_the_prompt_still_returns_the_result(smollm2, tokens) -> None:
    model, _ = smollm2
    layout = model_layout(model, C)
    a = adapter(model, TieredStore([HostTier(2 * layout.chunk_bytes + (1 << 20))]))
    pre = a.prefill([tokens[:300]])  # 4 chunks: no tier can hold them
    assert a.store.stats()["chunks"] == 0
    torch.testing.assert_close(pre.logits[0], full_logits(model, tokens[:300]), atol=ATOL, rtol=0)


def _scale_in_place(m) -> None:
    m.model.layers[3].mlp.down_proj.weight.mul_(1.05)


def _swap_data(m) -> None:  # no in-place write: a new tensor behind the same Parameter
    w = m.model.layers[0].self_attn.k_proj.weight
    w.data = w.data * 3


def _scale_rope_buffer(m) -> None:
    m.model.rotary_emb.inv_freq.mul_(0.25)


def _round_trip_bf16(m) -> None:  # the weights come back rounded, maybe at the addresses they had
    m.to(torch.bfloat16).to(torch.float32)


def _set_0d_buffer(m) -> None:
    m.model.scale.fill_(3.0)


@pytest.mark.parametrize("change", [_scale_in_place, _swap_data, _scale_rope_buffer, _round_trip_bf16, _set_0d_buffer])
def test_changed_weights_or_buffers_are_digested_again(smollm2, tokens, change) -> None:
    model, _ = smollm2
    changed = copy.deepcopy(model)
    changed.model.register_buffer("scale", torch.tensor(2.0))  # a 0-d buffer, as Gemma's embed_scale
    a = adapter(changed)
    a.prefill([tokens[:200]])
    assert a.load([tokens]).reused == [192]
    with torch.no_grad():
        change(changed)
    assert a.load([tokens]).reused == [0]


def test_chunks_of_another_model_or_chunk_size_are_never_served(smollm2, tokens) -> None:
    model, _ = smollm2
    store = TieredStore([HostTier(256 << 20)])
    adapter(model, store).prefill([tokens[:200]])
    assert adapter(model, store).load([tokens]).reused == [192]  # control: same model, same chunks
    assert adapter(model, store, chunk_tokens=2 * C).load([tokens]).reused == [0]
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.model.layers[3].mlp.down_proj.weight[0, 0] += 1e-3
    assert model_layout(other, C).fingerprint != model_layout(model, C).fingerprint
    assert adapter(other, store).load([tokens]).reused == [0]


def test_chunks_of_another_configuration_are_never_served(smollm2, tokens) -> None:
    """Same weights, other computation: a RoPE buffer (rope scaling) or a config field (the norm's epsilon)."""
    model, _ = smollm2
    store = TieredStore([HostTier(256 << 20)])
    adapter(model, store).prefill([tokens[:200]])
    scaled = copy.deepcopy(model)
    scaled.model.rotary_emb.inv_freq /= 4  # what linear rope scaling by 4 computes
    eps = copy.deepcopy(model)
    eps.config.rms_norm_eps *= 10
    for other in (scaled, eps):
        assert model_layout(other, C).fingerprint != model_layout(model, C).fingerprint
        assert adapter(other, store).load([tokens]).reused == [0]


def test_kv_of_a_sparse_prefill_is_never_served_to_a_dense_one(smollm2, tokens) -> None:
    """Sparse prefill's KV approximates the dense KV: the adapter keys it apart, following the switch."""
    model, _ = smollm2
    a = adapter(model)
    enable_sparse_prefill(model, min_tokens=64)
    try:
        a.prefill([tokens[:200]])  # 3 chunks computed with sparse attention
        sparse = a.layout
        assert a.load([tokens]).reused == [192]
    finally:
        disable_sparse_prefill(model)
    assert a.layout.fingerprint != sparse.fingerprint
    assert a.load([tokens]).reused == [0]
    pre = a.prefill([tokens[:200]])  # dense chunks of their own, exact
    assert pre.loaded.reused == [0] and a.load([tokens]).reused == [192]


def test_prefixes_fetched_from_the_disk_tier_are_exact(smollm2, tokens, tmp_path) -> None:
    model, _ = smollm2
    layout = model_layout(model, C)
    store = TieredStore([HostTier(2 * layout.chunk_bytes + (1 << 20)), DiskTier(tmp_path, 64 << 20)])
    a = adapter(model, store)
    a.prefill([tokens[:260]])  # 4 chunks: the host tier holds 2, the rest is demoted to disk
    pre = a.prefill([tokens], store=False)
    assert pre.loaded.reused == [256] and "disk" in pre.loaded.tiers[0]
    torch.testing.assert_close(pre.logits[0], full_logits(model, tokens)[256:], atol=ATOL, rtol=0)
