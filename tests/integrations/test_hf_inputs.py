"""The transformers adapter's refusals and its state across model changes, on a tiny random Llama (fast): a cache
that no longer holds the prompt is never stored, out-of-vocabulary ids are named, a dtype switch keeps working."""

from __future__ import annotations

import pytest
import torch

from kvtier.integrations import require_transformers
from kvtier.integrations.hf import HFKVCache
from kvtier.kvstore.store import TieredStore
from kvtier.kvstore.tiers.memory import HostTier

require_transformers()

from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from kvtier.compression.presses import SnapKVPress, StreamingLLMPress, prefill  # noqa: E402

C = 16
VOCAB = 256


def tiny() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def tokens(n: int, seed: int = 1) -> list[int]:
    return torch.randint(1, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def adapter(model) -> HFKVCache:
    return HFKVCache(model, TieredStore([HostTier(64 << 20, prefault=False)]), chunk_tokens=C)


def test_a_compressed_or_cropped_cache_is_never_stored():
    """After a press the cache's positions hold the kept tokens, not the prompt's; cropped, it is shorter than
    the prompt: storing either would serve other KV under the prompt's keys."""
    model = tiny()
    kv = adapter(model)
    ids = tokens(100)
    pressed = prefill(model, torch.tensor([ids]))
    StreamingLLMPress(compression_ratio=0.04, sinks=4).compress(model, pressed.cache, pressed.hidden_states)
    with pytest.raises(ValueError, match="compressed by a press"):
        kv.store_prompts([ids], pressed.cache)
    cropped = prefill(model, torch.tensor([ids])).cache
    cropped.crop(-10)  # the last 10 positions gone
    with pytest.raises(ValueError, match="cannot be stored"):
        kv.store_prompts([ids], cropped)
    assert kv.load([ids + [7]]).reused == [0]
    whole = prefill(model, torch.tensor([ids])).cache  # control: the model's own cache of the prompt is stored
    assert kv.store_prompts([ids], whole) == 6 and kv.load([ids + [7]]).reused == [96]


def test_presses_refuse_hidden_states_shorter_than_the_cache():
    """A cached prefill runs the model on the suffix only: its hidden states cannot score the whole cache."""
    model = tiny()
    ids = tokens(100)
    full = prefill(model, torch.tensor([ids]))
    short = tuple(h[:, -4:] for h in full.hidden_states)
    with pytest.raises(ValueError, match="hidden states of 4 tokens for a cache of 100"):
        SnapKVPress(compression_ratio=0.5).compress(model, full.cache, short)
    assert isinstance(full.cache, DynamicCache) and full.cache.layers[0].keys.shape[2] == 100


def test_token_ids_beyond_the_vocabulary_are_named():
    kv = adapter(tiny())
    with pytest.raises(ValueError, match=f"prompt 1 holds token id {VOCAB}, beyond the model's vocabulary"):
        kv.prefill([tokens(20), tokens(20) + [VOCAB]])
    with pytest.raises(ValueError, match="pad_token_id"):
        HFKVCache(tiny(), TieredStore([HostTier(1 << 20, prefault=False)]), C, pad_token_id=VOCAB).prefill([tokens(5)])


def test_a_dtype_switch_between_requests_keeps_working():
    """The adapter's fetch buffer was sized by tokens only: after model.to(bfloat16) a warm request got a
    LayoutError from the old fp32 buffer."""
    model = tiny()
    kv = adapter(model)
    ids = tokens(70)
    kv.prefill([ids])
    assert kv.prefill([ids]).loaded.reused == [64]
    model.to(torch.bfloat16)
    kv.prefill([ids])
    warm = kv.prefill([ids], store=False)
    assert warm.loaded.reused == [64]
    with torch.no_grad():
        reference = model(input_ids=torch.tensor([ids])).logits[0, -1]
    assert torch.allclose(warm.logits[0, -1].float(), reference.float(), atol=5e-2)
