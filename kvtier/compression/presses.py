"""Token eviction ("presses", after NVIDIA's kvpress): drop the cached tokens that matter least.

A press scores every cached token per layer, batch row and **KV head** (``score`` -> ``[B, H_kv, N]``);
the lowest-scoring tokens are dropped until each layer keeps its budget (``compression_ratio``: the
fraction of tokens dropped, or ``budget``: tokens kept). Each KV head keeps its own tokens, so a
grouped-query model keeps its memory advantage: the cache stays ``[B, H_kv, kept, D]`` per layer.

Presses work after the prefill, on a transformers ``DynamicCache`` and the hidden states the model
returned with ``output_hidden_states=True`` (see :func:`prefill`): queries and attention weights are
recomputed from those, so H2O and SnapKV need no eager attention and one prefill can be compressed by
several presses. Llama-family attention (``q_proj``, RoPE, ``input_layernorm``) is assumed.

After compression the cache is shorter than the text it holds, and with PyramidKV its layers differ in
length. :func:`forward_continue` and :func:`greedy_generate` continue from such a cache: they pass the
tokens' true positions (RoPE) and use an attention function that builds each layer's causal mask from
that layer's own length, avoiding transformers#35168. Rows of a batch must be unpadded (equal lengths).

Presses:

- :class:`StreamingLLMPress`: ``sinks`` first tokens + the most recent ones (Xiao et al., 2023);
- :class:`H2OPress`: attention accumulated over all prefill queries (averaged per token) + a recent ``window``
  (Zhang et al., 2023);
- :class:`SnapKVPress`: attention of the last ``window`` queries, pooled over ``kernel`` tokens; the window
  is kept (Li et al., 2024);
- :class:`PyramidKVPress`: SnapKV scores with budgets decreasing linearly from the first to the last layer,
  averaging the uniform budget (Cai et al., 2024).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from kvtier.integrations import require_transformers

require_transformers()

RAGGED_ATTENTION = "kvtier_ragged_sdpa"
PRESSED = "kvtier_pressed"  # the attribute a press sets on a cache it compressed (such KV must never be stored)


def _ragged_sdpa(module, query, key, value, attention_mask, **kwargs):
    """SDPA whose causal mask is aligned to the end of this layer's keys: the ``q`` new queries follow
    every cached token. ``query`` ``[B, H, q, D]``, ``key``/``value`` ``[B, H_kv, cached + q, D]``."""
    q, k = query.shape[2], key.shape[2]
    mask = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None] if q > 1 else None
    return sdpa_attention_forward(module, query, key, value, mask, **kwargs)


AttentionInterface.register(RAGGED_ATTENTION, _ragged_sdpa)


@dataclass
class Prefill:
    """What a press needs from a prefill of ``N`` tokens.

    ``cache``: the model's ``DynamicCache``; ``hidden_states``: ``L + 1`` tensors ``[B, N, hidden]``, entry
    ``l`` the input of layer ``l``; ``logits``: ``[B, N, vocab]``.
    """

    cache: DynamicCache
    hidden_states: tuple[torch.Tensor, ...]
    logits: torch.Tensor


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor) -> Prefill:
    """Run ``input_ids`` ``[B, N]`` through ``model`` and keep what a press needs."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids, cache=cache, use_cache=True, output_hidden_states=True)
    return Prefill(cache, out.hidden_states, out.logits)


@torch.no_grad()
def forward_continue(model, cache: DynamicCache, input_ids: torch.Tensor, position: int) -> torch.Tensor:
    """Feed ``input_ids`` ``[B, q]`` after a (possibly compressed, possibly ragged) ``cache`` whose text
    ended at token ``position - 1``; return logits ``[B, q, vocab]``. The cache grows by ``q`` per layer."""
    q = input_ids.shape[1]
    positions = torch.arange(position, position + q, device=input_ids.device).expand(input_ids.shape[0], q)
    config = model.config
    saved = config._attn_implementation
    config._attn_implementation = RAGGED_ATTENTION
    try:
        return model(input_ids, cache=cache, use_cache=True, position_ids=positions).logits
    finally:
        config._attn_implementation = saved


@torch.no_grad()
def greedy_generate(model, cache: DynamicCache, input_ids: torch.Tensor, position: int, steps: int) -> torch.Tensor:
    """Feed ``input_ids`` ``[B, q]`` at ``position`` (see :func:`forward_continue`), then generate ``steps``
    tokens greedily; return them ``[B, steps]``."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps!r}")
    tokens = [input_ids.new_empty((input_ids.shape[0], 0))]
    logits = forward_continue(model, cache, input_ids, position)
    position += input_ids.shape[1]
    for step in range(steps):
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
        tokens.append(nxt)
        if step + 1 < steps:
            logits = forward_continue(model, cache, nxt, position)
            position += 1
    return torch.cat(tokens, dim=1)


@dataclass
class LayerInputs:
    """One layer's view of a prefill, handed to :meth:`Press.score`.

    ``keys``/``values``: the cached ``[B, H_kv, N, D]`` (keys after RoPE); ``hidden``: the attention input
    ``[B, N, hidden]`` (after ``input_layernorm``); ``cos``/``sin``: RoPE tables ``[B, N, D]``.
    """

    layer: int
    attention: torch.nn.Module
    hidden: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]

    def queries(self, start: int, stop: int) -> torch.Tensor:
        """Queries of tokens ``start..stop-1`` after RoPE, as the model computed them: ``[B, H_q, stop - start, D]``."""
        B = self.hidden.shape[0]
        D = self.attention.head_dim
        q = self.attention.q_proj(self.hidden[:, start:stop]).view(B, stop - start, -1, D).transpose(1, 2)
        cos, sin = self.cos[:, None, start:stop], self.sin[:, None, start:stop]
        half = D // 2
        rotated = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
        return q * cos + rotated * sin

    def attention_weights(self, start: int, stop: int) -> torch.Tensor:
        """Causal softmax attention of queries ``start..stop-1`` over keys ``0..stop-1`` (the later ones are
        masked anyway), grouped by the KV head each query head reads: ``[B, H_kv, groups, stop - start, stop]``."""
        q = self.queries(start, stop)
        B, Hq, n, D = q.shape
        Hkv = self.keys.shape[1]
        keys = self.keys[:, :, :stop]
        logits = torch.einsum("bkgqd,bknd->bkgqn", q.view(B, Hkv, Hq // Hkv, n, D), keys) * self.attention.scaling
        future = torch.arange(stop, device=q.device)[None, :] > torch.arange(start, stop, device=q.device)[:, None]
        return logits.masked_fill_(future, float("-inf")).softmax(dim=-1)


def _tokens(n: object, least: int) -> bool:
    """Whether ``n`` is a whole number (an int, not a bool) of at least ``least``."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= least


@dataclass
class Press(ABC):
    """Token eviction by score. ``compression_ratio``: fraction of the ``N`` prefill tokens dropped per layer
    and KV head (kept: ``round(N * (1 - ratio))``); ``budget``: tokens kept instead, when given. The first
    ``sinks`` and the last ``window`` tokens are always kept (as far as the budget allows, sinks first)."""

    compression_ratio: float = 0.5
    budget: int | None = None
    sinks: int = 0
    window: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must be in [0, 1), got {self.compression_ratio!r}")
        if self.budget is not None and not _tokens(self.budget, least=1):
            raise ValueError(f"budget must be a positive whole number of tokens, got {self.budget!r}")
        if not (_tokens(self.sinks, least=0) and _tokens(self.window, least=0)):
            raise ValueError(f"sinks and window must be whole numbers of tokens >= 0, got {self.sinks!r} and "
                             f"{self.window!r}")

    def kept(self, tokens: int) -> int:
        """Tokens kept per layer and KV head out of ``tokens`` (on average over layers for PyramidKV)."""
        keep = self.budget if self.budget is not None else round(tokens * (1.0 - self.compression_ratio))
        return max(1, min(tokens, keep))

    def layer_budgets(self, tokens: int, layers: int) -> list[int]:
        """Tokens each layer keeps: the same everywhere unless a press says otherwise."""
        return [self.kept(tokens)] * layers

    @abstractmethod
    def score(self, inputs: LayerInputs) -> torch.Tensor:
        """``[B, H_kv, N]`` float scores of one layer's tokens, the highest kept."""

    @torch.no_grad()
    def layer_scores(self, model, cache: DynamicCache, hidden_states: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """:meth:`score` of every layer of ``cache`` (``N`` tokens in each). ``hidden_states``: as in
        :class:`Prefill`, at least ``N`` tokens long."""
        tokens = cache.layers[0].keys.shape[2]
        if hidden_states[0].shape[1] < tokens:
            raise ValueError(f"hidden states of {hidden_states[0].shape[1]} tokens for a cache of {tokens}: the presses "
                             "score a whole prefill (presses.prefill), not the suffix of a cached one")
        first = hidden_states[0][:, :tokens]
        positions = torch.arange(tokens, device=first.device)[None].expand(first.shape[0], -1)
        cos, sin = model.model.rotary_emb(first, positions)
        scores = []
        for index, layer in enumerate(model.model.layers):
            cached = cache.layers[index]
            if cached.keys.shape[2] != tokens:
                raise ValueError(f"layer {index} holds {cached.keys.shape[2]} tokens, layer 0 {tokens}: compress once")
            hidden = layer.input_layernorm(hidden_states[index][:, :tokens])
            scores.append(self.score(LayerInputs(index, layer.self_attn, hidden, cached.keys, cached.values, cos, sin)))
        return scores

    @torch.no_grad()
    def evict(self, cache: DynamicCache, scores: list[torch.Tensor]) -> None:
        """Keep, in every layer and KV head of ``cache``, its budget of highest-scoring tokens (sinks and window
        first), in token order. ``scores``: from :meth:`layer_scores`, which a caller may reuse across ratios."""
        tokens = cache.layers[0].keys.shape[2]
        setattr(cache, PRESSED, True)  # its positions no longer hold a prompt's tokens: never to be stored
        for cached, layer_scores, keep in zip(cache.layers, scores, self.layer_budgets(tokens, len(scores))):
            ranked = layer_scores.clone()
            sinks = min(self.sinks, keep)
            window = min(self.window, keep - sinks)
            ranked[..., :sinks] = float("inf")
            ranked[..., tokens - window :] = float("inf")
            kept = ranked.topk(keep, dim=-1).indices.sort(dim=-1).values  # [B, H_kv, keep]
            gather = kept[..., None].expand(-1, -1, -1, cached.keys.shape[-1])
            cached.keys = cached.keys.gather(2, gather)
            cached.values = cached.values.gather(2, gather)

    def compress(self, model, cache: DynamicCache, hidden_states: tuple[torch.Tensor, ...]) -> None:
        """Score and evict: ``cache`` keeps :meth:`layer_budgets` tokens per layer and KV head, in place."""
        self.evict(cache, self.layer_scores(model, cache, hidden_states))


@dataclass
class StreamingLLMPress(Press):
    """Keep the first ``sinks`` tokens (attention sinks) and the most recent ones."""

    sinks: int = 4

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        B, H, N, _ = inputs.keys.shape
        return torch.arange(N, dtype=torch.float32, device=inputs.keys.device).expand(B, H, N)


@dataclass
class H2OPress(Press):
    """Heavy hitters: the attention each token received from every prefill query, summed over the query heads
    of its KV head and averaged over the queries that see the token (as kvpress's ObservedAttention: a plain
    sum favours early tokens for being seen by more queries; measured here, the average keeps the
    continuation closer to the uncompressed model). The last ``window`` tokens are kept too (H2O's recent
    tokens). ``block``: queries per step, bounding memory to ``block x N`` weights per head."""

    window: int = 64
    block: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if not _tokens(self.block, least=1):
            raise ValueError(f"block must be a positive whole number of queries, got {self.block!r}")

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        N = inputs.tokens
        total = torch.zeros(inputs.keys.shape[:3], dtype=torch.float32, device=inputs.keys.device)
        for start in range(0, N, self.block):
            stop = min(N, start + self.block)
            total[..., :stop] += inputs.attention_weights(start, stop).sum(dim=(2, 3))
        return total / torch.arange(N, 0, -1, dtype=torch.float32, device=total.device)  # queries seeing each token


@dataclass
class SnapKVPress(Press):
    """Attention of the last ``window`` queries (the observation window) averaged over them and the query
    heads of each KV head, smoothed by an average pool of ``kernel`` tokens; the window itself is kept."""

    window: int = 64
    kernel: int = 5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1:
            raise ValueError(f"window (the observation window) must be >= 1 token, got {self.window!r}")
        if not _tokens(self.kernel, least=1) or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be a positive odd number of tokens (a centred pool), got {self.kernel!r}")

    def score(self, inputs: LayerInputs) -> torch.Tensor:
        N = inputs.tokens
        scores = inputs.attention_weights(N - min(self.window, N), N).mean(dim=(2, 3))  # [B, H_kv, N]
        B, H, _ = scores.shape
        return F.avg_pool1d(scores.view(B * H, 1, N), self.kernel, stride=1, padding=self.kernel // 2,
                            count_include_pad=False).view(B, H, N)


@dataclass
class PyramidKVPress(SnapKVPress):
    """SnapKV scores; layer budgets fall linearly from the first to the last layer (beyond the window),
    the last layer keeping ``1 / beta`` of the first's share. The budgets average the uniform one."""

    beta: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1.0 <= self.beta < math.inf:
            raise ValueError(f"beta (the first layer's share over the last's) must be finite and >= 1, got {self.beta!r}")

    def layer_budgets(self, tokens: int, layers: int) -> list[int]:
        mean = self.kept(tokens)
        window = min(self.window, mean)
        spare = mean - window  # tokens per layer beyond the window, on average
        top = min(2 * spare / (1 + 1 / self.beta), tokens - window)  # the first layer's share, at most all it has
        bottom = 2 * spare - top
        shares = torch.linspace(top, bottom, layers, dtype=torch.float64) if layers > 1 else torch.tensor([float(spare)])
        budgets = shares.floor().long()
        short = spare * layers - int(budgets.sum())  # hand out the rounding remainder, largest fractions first
        budgets[(shares - budgets).argsort(descending=True)[:short]] += 1
        return [window + int(b) for b in budgets]


PRESSES: dict[str, type[Press]] = {
    "streaming_llm": StreamingLLMPress,
    "h2o": H2OPress,
    "snapkv": SnapKVPress,
    "pyramidkv": PyramidKVPress,
}
"""Press classes by name, as the benchmark reports them."""

__all__ = [
    "H2OPress", "LayerInputs", "PRESSES", "Prefill", "Press", "PyramidKVPress", "RAGGED_ATTENTION", "SnapKVPress",
    "StreamingLLMPress", "forward_continue", "greedy_generate", "prefill",
]
