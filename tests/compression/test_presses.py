"""Presses on the real SmolLM2 model: exact budgets, sinks and windows kept, per-KV-head selection, batch
rows independent, recomputed attention equal to the model's, and a cache the model continues from."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from kvtier.compression.presses import (
    H2OPress,
    LayerInputs,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    forward_continue,
    greedy_generate,
    prefill,
)

pytestmark = pytest.mark.model

N = 160  # context tokens per row
PRESSES = [StreamingLLMPress(), H2OPress(window=16), SnapKVPress(window=16), PyramidKVPress(window=16)]
IDS = [type(p).__name__ for p in PRESSES]


@pytest.fixture(scope="module")
def batch(real_text_ids) -> torch.Tensor:
    """Two rows of real text, ``[2, N + 48]``: context then continuation."""
    return torch.cat([real_text_ids[:, : N + 48], real_text_ids[:, 300 : 300 + N + 48]])


@pytest.fixture(scope="module")
def context(smollm2, batch):
    model, _ = smollm2
    return prefill(model, batch[:, :N])


def compressed(model, context, press):
    cache = copy.deepcopy(context.cache)
    press.compress(model, cache, context.hidden_states)
    return cache


def kept_positions(original: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Which of the ``original`` ``[B, H, N, D]`` tokens each row of ``kept`` ``[B, H, K, D]`` is: ``[B, H, K]``."""
    match = (kept[:, :, :, None, :] == original[:, :, None, :, :]).all(dim=-1)
    assert bool((match.sum(dim=-1) >= 1).all())
    return match.float().argmax(dim=-1)


@pytest.mark.parametrize("press", PRESSES, ids=IDS)
@pytest.mark.parametrize("ratio,budget", [(0.25, None), (0.6, None), (0.0, 50)])
def test_each_layer_keeps_exactly_its_budget(smollm2, context, press, ratio, budget):
    model, _ = smollm2
    press = dataclasses.replace(press, compression_ratio=ratio, budget=budget)
    cache = compressed(model, context, press)
    kept = budget if budget is not None else round(N * (1 - ratio))
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    for layer in cache.layers:
        assert layer.keys.shape[:2] == (2, 3) and layer.values.shape == layer.keys.shape  # per KV head, GQA kept
    if isinstance(press, PyramidKVPress):
        assert sum(lengths) == kept * len(lengths)
        assert lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]
        assert min(lengths) >= min(press.window, kept) and max(lengths) <= N
    else:
        assert lengths == [kept] * len(lengths)


@pytest.mark.parametrize("press", PRESSES, ids=IDS)
def test_sinks_and_window_are_kept(smollm2, context, press):
    model, _ = smollm2
    press = dataclasses.replace(press, compression_ratio=0.7)
    cache = compressed(model, context, press)
    for original, layer in zip(context.cache.layers, cache.layers):
        positions = kept_positions(original.keys, layer.keys)
        assert bool((positions[..., 1:] > positions[..., :-1]).all())  # token order, no repeats
        assert torch.equal(layer.values, original.values.gather(2, positions[..., None].expand(-1, -1, -1, 64)))
        keep = positions.shape[-1]
        if isinstance(press, StreamingLLMPress):
            want = torch.cat([torch.arange(press.sinks), torch.arange(N - (keep - press.sinks), N)])
            assert bool((positions == want).all())
        else:
            assert bool((positions[..., -press.window :] == torch.arange(N - press.window, N)).all())


def test_kv_heads_and_rows_choose_their_own_tokens(smollm2, context):
    model, _ = smollm2
    cache = compressed(model, context, SnapKVPress(compression_ratio=0.5, window=16))
    differ_heads = differ_rows = 0
    for original, layer in zip(context.cache.layers, cache.layers):
        positions = kept_positions(original.keys, layer.keys)
        differ_heads += int(not torch.equal(positions[:, 0], positions[:, 1]))
        differ_rows += int(not torch.equal(positions[0], positions[1]))
    assert differ_heads > 0 and differ_rows > 0


def test_batch_rows_are_compressed_independently(smollm2, batch, context):
    model, _ = smollm2
    press = H2OPress(compression_ratio=0.5, window=16)
    together = compressed(model, context, press)
    alone = compressed(model, prefill(model, batch[1:, :N]), press)
    for a, b in zip(together.layers, alone.layers):
        assert torch.allclose(a.keys[1:], b.keys, atol=1e-5) and torch.allclose(a.values[1:], b.values, atol=1e-5)


def test_recomputed_attention_is_the_models(smollm2, batch):
    """``LayerInputs.attention_weights`` (what H2O and SnapKV score with) equals eager attention's weights."""
    model, _ = smollm2
    ids = batch[:, :48]
    saved = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            out = model(ids, output_attentions=True, output_hidden_states=True, use_cache=True)
    finally:
        model.config._attn_implementation = saved
    positions = torch.arange(48)[None].expand(2, -1)
    cos, sin = model.model.rotary_emb(out.hidden_states[0], positions)
    for index in (0, 17, 29):
        layer = model.model.layers[index]
        cached = out.cache.layers[index]
        inputs = LayerInputs(index, layer.self_attn, layer.input_layernorm(out.hidden_states[index]),
                             cached.keys, cached.values, cos, sin)
        with torch.no_grad():
            mine = inputs.attention_weights(16, 48)  # [B, H_kv, groups, 32, 48]
        theirs = out.attentions[index][:, :, 16:48, :48]  # [B, H_q, 32, 48]
        assert torch.allclose(mine.flatten(1, 2), theirs, atol=1e-5)


@pytest.fixture(scope="module")
def reference_logits(smollm2, batch, context) -> torch.Tensor:
    """Logits of the 48 continuation tokens after the uncompressed context ``[2, 48, vocab]``."""
    model, _ = smollm2
    with torch.no_grad():
        return model(batch[:, N:], cache=copy.deepcopy(context.cache), use_cache=True).logits


@pytest.mark.parametrize("press", PRESSES, ids=IDS)
def test_keeping_everything_changes_nothing(smollm2, batch, context, reference_logits, press):
    model, _ = smollm2
    cache = compressed(model, context, dataclasses.replace(press, compression_ratio=0.0))
    got = forward_continue(model, cache, batch[:, N:], N)
    assert torch.allclose(got, reference_logits, atol=1e-4)


@pytest.mark.parametrize("press", PRESSES, ids=IDS)
def test_model_continues_from_a_compressed_cache(smollm2, batch, context, reference_logits, press):
    """Many tokens at once give the logits of feeding them one by one (the per-layer causal mask and the
    positions are right), the cache grows by what is fed, the continuation still follows the text, and
    generation goes on."""
    model, _ = smollm2
    cache = compressed(model, context, dataclasses.replace(press, compression_ratio=0.5))
    one_by_one = copy.deepcopy(cache)
    lengths = [layer.keys.shape[2] for layer in cache.layers]
    follow = batch[:, N:]
    at_once = forward_continue(model, cache, follow, N)
    stepped = torch.cat([forward_continue(model, one_by_one, follow[:, i : i + 1], N + i) for i in range(5)], dim=1)
    assert torch.allclose(at_once[:, :5], stepped, atol=1e-4)
    assert [layer.keys.shape[2] for layer in cache.layers] == [n + follow.shape[1] for n in lengths]
    assert (at_once.argmax(-1) == reference_logits.argmax(-1)).float().mean() >= 0.75
    generated = greedy_generate(model, cache, at_once[:, -1:].argmax(-1), N + follow.shape[1], steps=3)
    assert generated.shape == (2, 3)
    nothing = greedy_generate(model, cache, generated[:, -1:], N + follow.shape[1] + 3, steps=0)  # feeds only
    assert nothing.shape == (2, 0) and cache.layers[0].keys.shape[2] == lengths[0] + follow.shape[1] + 4


@pytest.mark.parametrize(("press", "field"), [
    (lambda: SnapKVPress(kernel=4), "kernel"), (lambda: SnapKVPress(kernel=0), "kernel"),
    (lambda: SnapKVPress(window=0), "window"), (lambda: PyramidKVPress(beta=0.5), "beta"),
    (lambda: PyramidKVPress(beta=float("nan")), "beta"), (lambda: PyramidKVPress(kernel=2), "kernel"),
    (lambda: H2OPress(block=0), "block"), (lambda: H2OPress(block=-1), "block"), (lambda: H2OPress(block=2.0), "block"),
    (lambda: H2OPress(budget=2.5), "budget"), (lambda: StreamingLLMPress(sinks=2.5), "sinks"),
    (lambda: SnapKVPress(window=1.5), "window"), (lambda: StreamingLLMPress(window=True), "window"),
])
def test_parameters_that_cannot_work_are_refused_when_made(press, field):
    """An even pool has no centre, an empty observation window scores nothing, beta < 1 turns the pyramid over
    (budgets beyond the tokens), a step of no queries or a backward one scores nothing, and token counts are whole
    numbers: each is refused when the press is made, not when it compresses."""
    with pytest.raises(ValueError, match=field):
        press()
