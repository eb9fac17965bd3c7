"""The switch that makes a transformers Llama-family model use kvtier sparse prefill attention.

``enable_sparse_prefill(model, config)`` registers the attention function ``"kvtier_sparse"`` with
transformers (``AttentionInterface`` and ``AttentionMaskInterface``), stores each layer's head patterns on its
attention module and switches the model to it. A prefill of at least ``min_tokens`` query tokens with no
padding runs sparse (estimation + kernel, cached prefix included); shorter inputs, decode steps and padded
batches run dense SDPA. ``disable_sparse_prefill`` switches back to ``"sdpa"``.

``observe_attention(model, fn)`` runs the model densely while calling ``fn(layer, query, key, value, scaling)``
in every layer: the head search and the benchmark read queries, keys and values this way.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from kvtier.kernels import sparse_attention
from kvtier.sparse_attn.config import HeadPattern, SparseConfig, SparseConfigError, load_config
from kvtier.sparse_attn.estimate import estimate_index

NAME = "kvtier_sparse"
SHIPPED = {"HuggingFaceTB/SmolLM2-135M-Instruct": "smollm2-135m"}


@dataclass
class LayerSparse:
    """What the attention function of one layer does: sparse patterns, or only call an observer."""

    patterns: list[HeadPattern] | None
    min_tokens: int = 1024
    backend: str = "auto"
    observer: Callable | None = None


def _attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """transformers attention function: query ``[B, H, q, D]``, key/value ``[B, Hkv, k, D]`` (cache included);
    returns ``([B, q, H, D], None)``. ``attention_mask`` None means causal with no padding (see ``_mask``)."""
    state: LayerSparse | None = getattr(module, "_kvtier_sparse", None)
    if state is not None and state.observer is not None:
        state.observer(module.layer_idx, query, key, value, scaling)
    sparse = (state is not None and state.patterns is not None and attention_mask is None
              and query.shape[2] >= state.min_tokens)
    if not sparse:
        return _dense(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    index = estimate_index(query, key, state.patterns, scaling)
    out = sparse_attention(query, key, value, index, scaling, state.backend)
    return out.transpose(1, 2).contiguous(), None


def _dense(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, k_len = query.shape[2], key.shape[2]
    if attention_mask is None and 1 < q_len < k_len:  # causal after a cached prefix: bottom-right aligned
        attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device).tril(k_len - q_len)[None, None]
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _mask(**kwargs):
    """Mask function: None (causal, handled by ``_attention``) when there is no padding and no special
    pattern; otherwise the SDPA mask, which sends the layer to dense attention."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    padding = kwargs.get("attention_mask")
    if (kwargs.get("allow_is_causal_skip", True) and kwargs.get("mask_function") is causal_mask_function
            and (padding is None or bool(padding.all()))):
        return None
    return sdpa_mask(**kwargs)


def register() -> None:
    """Make ``attn_implementation="kvtier_sparse"`` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)


def _attention_modules(model) -> list:
    layers = model.model.layers if hasattr(model, "model") else model.layers
    return [layer.self_attn for layer in layers]


def sparse_state(model) -> list[LayerSparse | None]:
    """Each layer's sparse attention state while ``"kvtier_sparse"`` is the model's attention (None: dense)."""
    if getattr(model.config, "_attn_implementation", None) != NAME:
        return [None] * model.config.num_hidden_layers
    return [getattr(m, "_kvtier_sparse", None) for m in _attention_modules(model)]


def _set(model, states: list[LayerSparse | None], implementation: str) -> None:
    for module, state in zip(_attention_modules(model), states):
        module._kvtier_sparse = state
    model.set_attn_implementation(implementation)


def enable_sparse_prefill(model, config: SparseConfig | str | None = None, min_tokens: int = 1024,
                          backend: str = "auto") -> SparseConfig:
    """Switch ``model`` to sparse prefill with ``config`` (a SparseConfig, a shipped name or a JSON path;
    None = the shipped config of this model). Raises SparseConfigError for a config of another shape."""
    if config is None:
        name = str(getattr(model.config, "_name_or_path", "")).lower()
        shipped = [v for k, v in SHIPPED.items() if k.split("/")[-1].lower() in name]
        if not shipped:
            raise SparseConfigError(f"no shipped sparse config for model {name!r}; pass one "
                                    "(python -m kvtier.sparse_attn.search writes one)")
        config = load_config(shipped[0])
    elif not isinstance(config, SparseConfig):
        config = load_config(config)
    config.check_model(model.config.num_hidden_layers, model.config.num_attention_heads,
                       name=f"model {getattr(model.config, '_name_or_path', '') or type(model).__name__!r}")
    register()
    _set(model, [LayerSparse(heads, min_tokens, backend) for heads in config.layers], NAME)
    return config


def disable_sparse_prefill(model) -> None:
    """Back to dense SDPA attention."""
    _set(model, [None] * model.config.num_hidden_layers, "sdpa")


@contextmanager
def observe_attention(model, fn: Callable[..., None]) -> Iterator[None]:
    """Within the block, every layer calls ``fn(layer_idx, query [B, H, q, D], key [B, Hkv, k, D], value, scaling)``
    and then attends densely. Restores the previous attention setup afterwards."""
    register()
    modules = _attention_modules(model)
    saved = [getattr(m, "_kvtier_sparse", None) for m in modules]
    implementation = model.config._attn_implementation
    _set(model, [LayerSparse(None, observer=fn)] * len(modules), NAME)
    try:
        yield
    finally:
        for module, state in zip(modules, saved):
            module._kvtier_sparse = state
        model.set_attn_implementation(implementation)
