"""Quality harness for codecs and presses on a real model (used by ``kvtier bench compression``).

A :class:`Reference` is an uncompressed run: a context of ``N`` tokens prefilled into a cache, then ``M + 1``
continuation tokens fed with teacher forcing. A method under test changes the context's cache (a codec
round trip, or a press); the same continuation is fed after it and compared with the reference:

- perplexity of the continuation's ``M`` next tokens, greedy agreement (top-1 equal to the reference's)
  and mean KL divergence from the reference's next-token distribution (:meth:`Quality.pooled` pools them
  over several references, e.g. text windows);
- the relative error of the attention output of the first continuation queries over the context's cache.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvtier.compression.codec import Codec
from kvtier.compression.presses import LayerInputs, Prefill, forward_continue, greedy_generate, prefill


@dataclass
class Reference:
    """The uncompressed run. ``context`` ``[B, N]``, ``continuation`` ``[B, M + 1]``; ``prefill`` of the context;
    ``logits`` ``[B, M, vocab]`` predicting ``continuation[:, 1:]``; ``hidden_states``: the continuation's
    ``L + 1`` hidden states ``[B, M, hidden]`` (inputs of each layer)."""

    context: torch.Tensor
    continuation: torch.Tensor
    prefill: Prefill
    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...]

    @property
    def position(self) -> int:
        return self.context.shape[1]

    def fresh_cache(self) -> DynamicCache:
        """A copy of the context's uncompressed cache, for a method to change."""
        return copy.deepcopy(self.prefill.cache)


@torch.no_grad()
def reference(model, context: torch.Tensor, continuation: torch.Tensor) -> Reference:
    """Prefill ``context`` ``[B, N]`` and feed ``continuation`` ``[B, M + 1]`` after it, uncompressed."""
    pre = prefill(model, context)
    cache = copy.deepcopy(pre.cache)
    positions = torch.arange(context.shape[1], context.shape[1] + continuation.shape[1] - 1)[None]
    out = model(continuation[:, :-1], cache=cache, use_cache=True, position_ids=positions, output_hidden_states=True)
    return Reference(context, continuation, pre, out.logits, out.hidden_states)


@dataclass
class Quality:
    """Next-token quality over ``positions`` scored tokens: perplexity, agreement in [0, 1], KL in nats per
    token."""

    perplexity: float
    agreement: float
    kl: float
    positions: int

    @classmethod
    def pooled(cls, parts: list["Quality"]) -> "Quality":
        """The quality over all the positions of ``parts`` (e.g. several text windows) together."""
        n = sum(q.positions for q in parts)
        mean_nll = sum(math.log(q.perplexity) * q.positions for q in parts) / n
        agreement = sum(q.agreement * q.positions for q in parts) / n
        return cls(math.exp(mean_nll), agreement, sum(q.kl * q.positions for q in parts) / n, n)


@torch.no_grad()
def continuation_quality(model, ref: Reference, cache: DynamicCache) -> Quality:
    """Feed the continuation after ``cache`` (the context, changed by a method; consumed) and compare."""
    logits = forward_continue(model, cache, ref.continuation[:, :-1], ref.position)
    targets = ref.continuation[:, 1:]
    logp = logits.float().log_softmax(dim=-1)
    ref_logp = ref.logits.float().log_softmax(dim=-1)
    nll = -logp.gather(-1, targets[..., None]).mean()
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(dim=-1).mean()
    agreement = (logits.argmax(dim=-1) == ref.logits.argmax(dim=-1)).float().mean()
    return Quality(float(nll.exp()), float(agreement), float(kl), targets.numel())


@torch.no_grad()
def reference_quality(ref: Reference) -> Quality:
    """The uncompressed model on the continuation's ``M`` next tokens: its perplexity, agreement 1, KL 0."""
    logp = ref.logits.float().log_softmax(dim=-1)
    nll = -logp.gather(-1, ref.continuation[:, 1:, None]).mean()
    return Quality(float(nll.exp()), 1.0, 0.0, ref.continuation[:, 1:].numel())


@torch.no_grad()
def attention_output_error(model, ref: Reference, cache: DynamicCache, queries: int = 64) -> float:
    """Relative error ``||O' - O|| / ||O||`` over all layers of the attention output of the first ``queries``
    continuation tokens over the context's cache (``O'`` over ``cache``, ``O`` over the uncompressed one)."""
    n = min(queries, ref.hidden_states[0].shape[1])
    positions = torch.arange(ref.position, ref.position + n)[None].expand(ref.context.shape[0], -1)
    cos, sin = model.model.rotary_emb(ref.hidden_states[0], positions)
    num = den = 0.0
    for index, layer in enumerate(model.model.layers):
        hidden = layer.input_layernorm(ref.hidden_states[index][:, :n])
        exact = ref.prefill.cache.layers[index]
        changed = cache.layers[index]
        q = LayerInputs(index, layer.self_attn, hidden, exact.keys, exact.values, cos, sin).queries(0, n)
        scale = layer.self_attn.scaling
        want = F.scaled_dot_product_attention(q, exact.keys, exact.values, scale=scale, enable_gqa=True)
        got = F.scaled_dot_product_attention(q, changed.keys, changed.values, scale=scale, enable_gqa=True)
        num += float((got - want).pow(2).sum())
        den += float(want.pow(2).sum())
    return (num / den) ** 0.5


def cache_to_kv(cache: DynamicCache, row: int = 0) -> torch.Tensor:
    """Batch row ``row`` of a uniform cache as one KV tensor ``[L, 2, H_kv, N, D]``."""
    return torch.stack([torch.stack([layer.keys[row], layer.values[row]]) for layer in cache.layers])


def kv_to_cache(model, kv: torch.Tensor) -> DynamicCache:
    """A fresh ``DynamicCache`` (batch 1, the model's dtype) holding ``kv`` ``[L, 2, H_kv, N, D]``."""
    cache = DynamicCache(config=model.config)
    dtype = next(model.parameters()).dtype
    for index, layer in enumerate(kv.to(dtype)):
        cache.update(layer[0][None].contiguous(), layer[1][None].contiguous(), index)
    return cache


def codec_roundtrip(codec: Codec, kv: torch.Tensor, chunk_tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Store ``kv`` ``[L, T, H, N, D]`` as ``dtype`` chunks of ``chunk_tokens`` (the last may be shorter) through
    ``codec`` and read it back; return the decoded KV (``dtype``) and the bytes stored."""
    stored = 0
    out = torch.empty(kv.shape, dtype=dtype)
    for start in range(0, kv.shape[3], chunk_tokens):
        chunk = kv[:, :, :, start : start + chunk_tokens].to(dtype).contiguous()
        parts = codec.encode(chunk)
        stored += sum(t.nbytes for t in parts.values())
        decoded = torch.empty_like(chunk)
        codec.decode(parts, decoded)
        out[:, :, :, start : start + chunk_tokens] = decoded
    return out, stored


@dataclass
class NeedleTask:
    """A fact planted at ``depth`` (fraction of the context) of real text, and a question asking for it."""

    context: torch.Tensor  # [1, N] ids: the text with the fact inside
    question: torch.Tensor  # [1, Q] ids
    answer: str


def needle_task(tokenizer, text: str, tokens: int, depth: float, secret: str = "73914") -> NeedleTask:
    """Plant "The secret number is ``secret``." at ``depth`` of ``tokens`` tokens of ``text``."""
    fact = tokenizer(f" Remember this: the secret number is {secret}. ", return_tensors="pt").input_ids
    hay = tokenizer(text, return_tensors="pt").input_ids[:, : tokens - fact.shape[1]]
    cut = int(hay.shape[1] * depth)
    context = torch.cat([hay[:, :cut], fact, hay[:, cut:]], dim=1)
    question = tokenizer("\n\nQuestion: What is the secret number?\nAnswer: The secret number is",
                         return_tensors="pt").input_ids
    return NeedleTask(context, question, secret)


def needle_answer(model, tokenizer, cache: DynamicCache, task: NeedleTask, position: int, steps: int = 6,
                  ask: bool = True) -> str:
    """Greedy answer to the needle question. ``ask=True``: the cache holds the context and the question is fed
    now; ``ask=False``: the cache holds context and question except the question's last token, fed now."""
    prompt = task.question if ask else task.question[:, -1:]
    return tokenizer.decode(greedy_generate(model, cache, prompt, position, steps)[0])
