"""Time to first token on SmolLM2-135M with kvtier (host tier, disk tier), recompute and the ideal.

Two workloads: a shared document (4k tokens) followed by short questions, and a multi-turn chat. For every
request after the first, in the same run:

- recompute: the model's prefill of the whole prompt;
- ideal: the prefill of the uncached suffix alone, with the prefix KV already in a ``DynamicCache`` in
  memory (the same prefix length kvtier reuses);
- kvtier host / disk: :class:`kvtier.integrations.hf.HFKVCache` over a store with one host tier or one disk
  tier: lookup, fetch, rebuild the cache, prefill the suffix. The prompt's new chunks are stored after the
  first token (not timed; an engine does it off the critical path);
- kvtier service: the same adapter over a :class:`kvtier.api.Client` of a ``kvtier serve`` subprocess on
  127.0.0.1 (one host tier): the lookup and the fetch go over HTTP.

TTFT is to the logits of the last prompt token. The fast measurements (ideal, host, disk) are repeated
``--repeats`` times, interleaved, and the fastest kept (the machine is shared; the store is not changed
between repeats). The disk tier's files are usually in the page cache here.
"""

from __future__ import annotations

import argparse
import copy
import secrets
import tempfile
import time
from dataclasses import dataclass

import torch

from kvtier.api.auth import hash_key
from kvtier.api.client import Client
from kvtier.bench.api import ServerProcess
from kvtier.bench.args import at_least
from kvtier.bench.report import Report, progress

QUESTIONS = [
    "What is the main topic of the text above?",
    "Which keywords does the text above mention first?",
    "Summarise the second paragraph in one sentence.",
    "Does the text above describe any exceptions?",
    "Give one example from the text above.",
    "What should a beginner remember from it?",
]


@dataclass
class Timing:
    """One request: prompt and reused tokens, TTFT in seconds for each way of serving it."""

    workload: str
    prompt_tokens: int
    reused: int
    recompute: float
    ideal: float
    host: float
    disk: float
    service: float


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--document-tokens", type=at_least(1), default=4096, help="tokens of the shared document")
    parser.add_argument("--questions", type=at_least(2), default=4,
                        help="questions about the document (the first one is cold; at least 2)")
    parser.add_argument("--turns", type=at_least(2), default=6, help="turns of the chat (the first one is cold; at least 2)")
    parser.add_argument("--reply-tokens", type=at_least(1), default=32, help="greedy reply tokens per chat turn")
    parser.add_argument("--repeats", type=at_least(1), default=3, help="repeats of each fast (cached) measurement")
    parser.add_argument("--chunk-tokens", type=at_least(1), default=256)


_HOST_BYTES = 4 << 30  # the host tier, in process and in the service: room for every prompt's KV
_NAMES = {"ideal": "ideal", "host": "kvtier host tier", "disk": "kvtier disk tier",
          "service": "kvtier service (HTTP, host tier)"}


class _Bench:
    def __init__(self, model, tokenizer, chunk_tokens: int, repeats: int, disk_dir: str, client) -> None:
        from kvtier.integrations.hf import HFKVCache
        from kvtier.kvstore.store import TieredStore
        from kvtier.kvstore.tiers.disk import DiskTier
        from kvtier.kvstore.tiers.memory import HostTier

        self.model, self.tokenizer, self.repeats = model, tokenizer, repeats
        self.host = HFKVCache(model, TieredStore([HostTier(_HOST_BYTES)]), chunk_tokens)
        self.disk = HFKVCache(model, TieredStore([DiskTier(disk_dir, 16 << 30)]), chunk_tokens)
        self.service = HFKVCache(model, client, chunk_tokens)
        self.adapters = (self.host, self.disk, self.service)
        self.timings: list[Timing] = []

    @torch.no_grad()
    def recompute(self, ids: list[int]):
        """TTFT of a full prefill; returns (seconds, output with logits and cache)."""
        start = time.perf_counter()
        out = self.model(input_ids=torch.tensor([ids]), use_cache=True)
        return time.perf_counter() - start, out

    @torch.no_grad()
    def ideal(self, ids: list[int], full_cache, reused: int) -> float:
        """TTFT of the suffix with the first ``reused`` tokens' KV already in memory."""
        cache = copy.deepcopy(full_cache)
        cache.crop(reused - cache.get_seq_length())  # negative: drop that many tokens from the end
        start = time.perf_counter()
        self.model(input_ids=torch.tensor([ids[reused:]]), cache=cache, use_cache=True)
        return time.perf_counter() - start

    @staticmethod
    def kvtier(adapter, ids: list[int]):
        """TTFT through the adapter, leaving the store as it was; returns (seconds, Prefilled)."""
        start = time.perf_counter()
        pre = adapter.prefill([ids], store=False)
        return time.perf_counter() - start, pre

    def request(self, workload: str, ids: list[int], cold: bool):
        """Serve one prompt every way (the fast ones ``repeats`` times, interleaved, keeping the fastest: the
        machine is shared); then store the prompt. Returns the recompute output (for decoding a reply)."""
        rec_s, out = self.recompute(ids)
        if cold:
            for adapter in self.adapters:
                adapter.store_prompts([ids], out.cache)
            return out
        times: list[list[float]] = [[] for _ in self.adapters]
        ideal = []
        for _ in range(self.repeats):
            served = [self.kvtier(adapter, ids) for adapter in self.adapters]
            reused = {pre.loaded.reused[0] for _, pre in served}
            if len(reused) != 1:
                raise RuntimeError(f"the host, disk and service stores reused {[p.loaded.reused[0] for _, p in served]} "
                                   "tokens")
            ideal.append(self.ideal(ids, out.cache, *reused))
            for spent, (seconds, _) in zip(times, served):
                spent.append(seconds)
        for adapter, (_, pre) in zip(self.adapters, served):
            adapter.store_prompts([ids], pre.cache, pre.loaded)
        self.timings.append(Timing(workload, len(ids), *reused, rec_s, min(ideal), *map(min, times)))
        return out

    @torch.no_grad()
    def reply(self, out, n: int) -> list[int]:
        """Greedy decode ``n`` tokens continuing a prefill output (a plain forward loop)."""
        tokens = []
        cache = out.cache
        logits = out.logits
        for _ in range(n):
            token = int(logits[0, -1].argmax())
            tokens.append(token)
            step = self.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            cache, logits = step.cache, step.logits
        return tokens


def _turn(tokenizer, role: str, text: str) -> list[int]:
    return tokenizer(f"<|im_start|>{role}\n{text}<|im_end|>\n", add_special_tokens=False).input_ids


def run(args: argparse.Namespace) -> Report:
    from kvtier.bench.text import english_text
    from kvtier.integrations.smollm2 import load_smollm2

    torch.manual_seed(0)
    model, tokenizer = load_smollm2(dtype=torch.float32)
    text = english_text("heldout")
    report = Report("e2e")
    key = secrets.token_hex(16)
    service = {"tiers": [{"kind": "host", "capacity_bytes": _HOST_BYTES}],
               "tenants": [{"name": "e2e", "key_sha256": hash_key(key)}]}
    with ServerProcess(service) as server, Client(server.url, api_key=key, timeout=300) as client, \
            tempfile.TemporaryDirectory(prefix="kvtier-e2e-") as disk_dir:
        bench = _Bench(model, tokenizer, args.chunk_tokens, args.repeats, disk_dir, client)
        assistant = tokenizer("<|im_start|>assistant\n", add_special_tokens=False).input_ids
        # Shared document + short questions.
        document = tokenizer(text[: args.document_tokens * 8]).input_ids[: args.document_tokens]
        for q in progress(range(args.questions), desc="document QA"):
            question = tokenizer(f"\n\nQuestion: {QUESTIONS[q % len(QUESTIONS)]}\nAnswer:").input_ids
            bench.request("document-qa", document + question, cold=q == 0)
        # Multi-turn chat: each prompt is the previous one, its reply, and a new user message.
        prompt = _turn(tokenizer, "system", "You are a helpful assistant who answers from the documentation.")
        paragraphs = [p for p in text.split("\n\n") if 200 < len(p) < 1200]
        for t in progress(range(args.turns), desc="chat"):
            prompt = prompt + _turn(tokenizer, "user", f"{paragraphs[t % len(paragraphs)]}\n{QUESTIONS[t % len(QUESTIONS)]}") + assistant
            out = bench.request("chat", prompt, cold=t == 0)
            prompt = prompt + bench.reply(out, args.reply_tokens) + tokenizer("<|im_end|>\n", add_special_tokens=False).input_ids
    for workload in ("document-qa", "chat"):
        rows = [t for t in bench.timings if t.workload == workload]
        total = {k: sum(getattr(t, k) for t in rows) for k in ("recompute", "ideal", "host", "disk", "service")}
        prompt_tokens = sum(t.prompt_tokens for t in rows)
        report.add(f"{workload}: tokens reused ({len(rows)} warm requests, {prompt_tokens} prompt tokens)",
                   sum(t.reused for t in rows) / prompt_tokens, "fraction")
        report.add(f"{workload}: TTFT recompute", total["recompute"] / len(rows), "s")
        for way in ("ideal", "host", "disk", "service"):
            report.add(f"{workload}: TTFT {_NAMES[way]} vs recompute", total[way] / len(rows), "s", "recompute",
                       total["recompute"] / len(rows), higher_is_better=False)
        for way in ("host", "disk", "service"):
            report.add(f"{workload}: TTFT {_NAMES[way]} vs ideal (ratio: ideal time / kvtier time)",
                       total[way] / len(rows), "s", "ideal", total["ideal"] / len(rows), higher_is_better=False)
        report.add(f"{workload}: TTFT {_NAMES['service']} vs in process (ratio: in-process time / service time)",
                   total["service"] / len(rows), "s", _NAMES["host"], total["host"] / len(rows), higher_is_better=False)
        for i, t in enumerate(rows):
            report.notes.append(f"{workload} request {i + 1}: {t.prompt_tokens} tokens, {t.reused} reused; TTFT "
                                f"recompute {t.recompute:.3f} s, ideal {t.ideal:.3f}, host {t.host:.3f}, "
                                f"disk {t.disk:.3f}, service {t.service:.3f}")
    report.notes.append("SmolLM2-135M fp32 on CPU; TTFT = lookup + fetch + cache rebuild + suffix prefill; "
                        "fastest of the interleaved kvtier and ideal repeats; the service: `kvtier serve` with one "
                        "host tier in a subprocess on 127.0.0.1, reached through kvtier.api.Client")
    return report
