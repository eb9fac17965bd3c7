"""Fixtures for the compression tests: real KV from SmolLM2 running over real English text."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def real_text_ids(smollm2) -> torch.Tensor:
    """``[1, 600]`` token ids of held-out English prose."""
    from kvtier.bench.text import english_text

    _, tokenizer = smollm2
    return tokenizer(english_text("heldout")[:8000], return_tensors="pt").input_ids[:, :600]


@pytest.fixture(scope="session")
def real_kv(smollm2, real_text_ids) -> torch.Tensor:
    """The fp16 KV of SmolLM2 over 256 real tokens as one chunk ``[30, 2, 3, 256, 64]``."""
    from transformers import DynamicCache

    model, _ = smollm2
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(real_text_ids[:, :256], cache=cache, use_cache=True)
    layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
    return torch.stack(layers).to(torch.float16)
