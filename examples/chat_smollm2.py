"""Chat with SmolLM2-135M over several turns; each turn reuses the conversation's KV from kvtier.

Per turn it prints the prompt tokens, the tokens served from the store, and the time to first token with
kvtier and without it (a full prefill), then the reply. Run from the repository root:

    .venv/bin/python examples/chat_smollm2.py [--turns 4] [--reply-tokens 40] [--chunk-tokens 64]

With ``--url`` the KV lives in a kvtier service instead of this process (the one line that changes is the
store's): ``bash scripts/run.sh`` serves one on http://127.0.0.1:8470 with open access, so no key is needed.
"""

from __future__ import annotations

import argparse
import time

import torch

from kvtier.api import Client
from kvtier.integrations.hf import HFKVCache
from kvtier.integrations.smollm2 import load_smollm2
from kvtier.kvstore.store import TieredStore
from kvtier.kvstore.tiers.memory import HostTier

MESSAGES = [
    "Hi! In two sentences, what is a key-value cache in a transformer?",
    "Why does reusing it for a shared prefix save time?",
    "What could go wrong if two different models shared one cache?",
    "Give me a one-line summary of our conversation.",
    "Thanks. One more tip about caching?",
    "Goodbye!",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--reply-tokens", type=int, default=40)
    parser.add_argument("--chunk-tokens", type=int, default=64)
    parser.add_argument("--url", help="a kvtier service to keep the KV in, e.g. http://127.0.0.1:8470")
    parser.add_argument("--api-key", help="the tenant's API key at --url (none for open access)")
    args = parser.parse_args()

    model, tokenizer = load_smollm2(dtype=torch.float32)
    store = Client(args.url, api_key=args.api_key) if args.url else TieredStore([HostTier(1 << 30)])
    kv = HFKVCache(model, store, chunk_tokens=args.chunk_tokens)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = encode("<|im_start|>system\nYou are a concise, helpful assistant.<|im_end|>\n")
    for turn, message in enumerate(MESSAGES[: args.turns], start=1):
        prompt = prompt + encode(f"<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")
        with torch.no_grad():
            start = time.perf_counter()
            model(input_ids=torch.tensor([prompt]))
            without = time.perf_counter() - start
        pre = kv.prefill([prompt])  # stores the prompt's new chunks after the first token
        with_kv = kv.timings["load_s"] + kv.timings["prefill_s"]
        reply, cache, logits = [], pre.cache, pre.logits
        with torch.no_grad():
            while len(reply) < args.reply_tokens and (not reply or reply[-1] != end):
                reply.append(int(logits[0, -1].argmax()))
                step = model(input_ids=torch.tensor([reply[-1:]]), cache=cache, use_cache=True)
                cache, logits = step.cache, step.logits
        if reply[-1] != end:
            reply.append(end)
        print(f"turn {turn}: {len(prompt)} prompt tokens, {pre.loaded.reused[0]} reused from kvtier; "
              f"TTFT {with_kv * 1000:.0f} ms with kvtier, {without * 1000:.0f} ms without")
        print(f"  user: {message}\n  assistant: {tokenizer.decode(reply[:-1]).strip()}")
        prompt = prompt + reply + encode("\n")


if __name__ == "__main__":
    main()
