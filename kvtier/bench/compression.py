"""KV compression on SmolLM2-135M: codec ratio, speed and error; press quality; a needle test (issue 3).

Real KV comes from the real model over held-out English text (``pydoc_data``). Per codec: compression
ratio (fp16 bytes over the bytes of every tensor the codec stores: codes, scales, offsets, flags,
padding), the same at the chunk blob level (raw blob over codec blob: the blob's header, token ids and
checksums, a few KB that every codec pays alike, included), encode and decode throughput of
fp16 chunks against a plain copy of the same bytes in the same run, key/value reconstruction error and
attention-output error. Per codec and per press at each ratio: perplexity, greedy next-token agreement
and KL of a held-out continuation fed after the compressed context (teacher forcing), against the
uncompressed model, pooled over ``--windows`` consecutive windows of the text (context then continuation
each; 4 x 256 = 1024 scored positions by default, so that one flipped near-tie moves agreement by 0.001). Needle: a fact planted at several depths of a long context, asked for after
compression (``agnostic``: the context is compressed before the question is seen, as a stored prefix
would be; ``aware``: compressed with the question at its end).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from kvtier.bench.args import BenchInputError, at_least, fill_defaults, fraction, listed, one_of
from kvtier.bench.report import Report, progress
from kvtier.compression import available_codecs


# Defaults, and the smaller ones of --quick (a smoke run); an option given on the command line wins over both.
NORMAL = {"context": 2048, "continuation": 256, "windows": 4, "ratios": [0.25, 0.5, 0.75], "repeats": 5,
          "needle_context": 4096, "depths": [0.1, 0.5, 0.9]}
QUICK = {"context": 512, "continuation": 128, "windows": 2, "ratios": [0.5], "repeats": 3, "needle_context": 1024,
         "depths": [0.1, 0.9]}


def _presses() -> list[str]:
    """The press names (imported when the option is parsed: the presses need transformers)."""
    from kvtier.compression.presses import PRESSES

    return list(PRESSES)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", type=at_least(1), help="context tokens compressed (default 2048)")
    parser.add_argument("--continuation", type=at_least(1), help="held-out tokens scored after it (default 256)")
    parser.add_argument("--windows", type=at_least(1),
                        help="text windows (context + continuation each) whose scores are pooled (default 4)")
    parser.add_argument("--ratios", type=listed(fraction(below_one=True)),
                        help="press compression ratios: fractions of tokens dropped (default 0.25,0.5,0.75)")
    parser.add_argument("--codecs", type=listed(one_of(available_codecs)), default="raw,fp8,int8,int4,int2,zstd,lz4",
                        help="codecs to measure ('' = none)")
    parser.add_argument("--presses", type=listed(one_of(_presses)), default="streaming_llm,h2o,snapkv,pyramidkv",
                        help="presses to measure ('' = none)")
    parser.add_argument("--chunk-tokens", type=at_least(1), default=256, help="tokens per stored chunk (default 256)")
    parser.add_argument("--repeats", type=at_least(1), help="timing repetitions, best kept (default 5)")
    parser.add_argument("--needle-context", type=at_least(0), help="needle context tokens, 0 to skip (default 4096)")
    parser.add_argument("--depths", type=listed(fraction()),
                        help="needle depths as fractions of the context (default 0.1,0.5,0.9)")
    parser.add_argument("--needle-ratio", type=fraction(below_one=True), default=0.5,
                        help="press ratio in the needle test (default 0.5)")
    parser.add_argument("--needle-modes", type=listed(one_of(("agnostic", "aware"))), default="agnostic",
                        help="agnostic and/or aware (comma-separated)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller defaults for a smoke run: context 512, continuation 128, 2 windows, needle 1024 at "
                             "2 depths, ratio 0.5, 3 repeats (options given still apply)")


def run(args: argparse.Namespace) -> Report:
    from kvtier.bench.text import english_text
    from kvtier.compression.evaluate import Quality, reference, reference_quality
    from kvtier.integrations.smollm2 import load_smollm2

    fill_defaults(args, NORMAL, QUICK)
    report = Report("compression")
    torch.manual_seed(0)
    model, tokenizer = load_smollm2(dtype=torch.float32)
    text = english_text("heldout")
    window = args.context + args.continuation + 1
    need = args.windows * window
    ids = tokenizer(text[: 12 * need + 4000], return_tensors="pt").input_ids
    if ids.shape[1] < need:
        raise BenchInputError(f"the held-out text has {ids.shape[1]} tokens, --windows x (--context + --continuation + 1) "
                         f"= {need} needed")
    start = time.perf_counter()
    refs = []
    for w in range(args.windows):
        at = w * window
        refs.append(reference(model, ids[:, at : at + args.context], ids[:, at + args.context : at + window]))
    report.notes.append(
        f"SmolLM2-135M fp32 on CPU ({torch.get_num_threads()} threads); {args.windows} consecutive windows of held-out "
        f"pydoc_data text, each a context of {args.context} tokens then {args.continuation} tokens scored "
        f"({args.windows * args.continuation} positions pooled); reference runs {time.perf_counter() - start:.1f} s"
    )
    base_ppl = Quality.pooled([reference_quality(ref) for ref in refs]).perplexity
    report.add("uncompressed perplexity", base_ppl, "ppl")
    for name in progress(args.codecs, desc="codecs"):
        _codec_rows(report, model, refs, name, args, base_ppl)
    for name in progress(args.presses, desc="presses"):
        _press_rows(report, model, refs, name, args.ratios, base_ppl)
    if args.needle_context > 0:
        _needle_rows(report, model, tokenizer, text, args)
    return report


def _quality_rows(report: Report, label: str, quality, base_ppl: float) -> None:
    report.add(f"{label} next-token agreement", quality.agreement, "fraction", "uncompressed", 1.0)
    report.add(f"{label} perplexity", quality.perplexity, "ppl", "uncompressed", base_ppl, higher_is_better=False)
    report.add(f"{label} KL divergence", quality.kl, "nats/token", higher_is_better=False)


def _best_times(fns: list, repeats: int) -> list[float]:
    """Shortest of ``repeats`` timed calls of each of ``fns`` (after one warm-up call each), in seconds. The
    calls are interleaved, so that a baseline and what it is compared with see the same machine load."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return best


def _codec_rows(report: Report, model, refs: list, name: str, args, base_ppl: float) -> None:
    """Ratio, throughput against a copy and reconstruction errors of one codec on the first window's KV;
    attention-output error (mean) and next-token quality (pooled) over all windows."""
    from kvtier.compression import get_codec
    from kvtier.compression.evaluate import (Quality, attention_output_error, cache_to_kv, codec_roundtrip,
                                             continuation_quality, kv_to_cache)

    codec = get_codec(name)
    step = args.chunk_tokens
    kv = cache_to_kv(refs[0].prefill.cache)
    chunks = [kv[:, :, :, s : s + step].to(torch.float16).contiguous() for s in range(0, kv.shape[3], step)]
    nbytes = sum(c.nbytes for c in chunks)
    copies = [torch.empty_like(c) for c in chunks]
    encoded = [codec.encode(c) for c in chunks]

    def copy_all() -> None:
        for src, dst in zip(chunks, copies):
            dst.copy_(src)

    def encode_all() -> None:
        for chunk in chunks:
            codec.encode(chunk)

    def decode_all() -> None:
        for parts, dst in zip(encoded, copies):
            codec.decode(parts, dst)

    copy_gbps, encode_gbps, decode_gbps = (nbytes / t / 1e9 for t in _best_times([copy_all, encode_all, decode_all], args.repeats))
    roundtrips = [codec_roundtrip(codec, cache_to_kv(ref.prefill.cache), step, torch.float16) for ref in refs]
    decoded, stored = roundtrips[0]  # the first window's: kv above
    exact = bool(torch.equal(decoded, kv.to(torch.float16)))
    report.add(f"{name} compression ratio", nbytes / stored, "x fp16", "fp16 bytes", 1.0)
    report.add(f"{name} blob ratio", _blob_size(chunks[0], get_codec("raw")) / _blob_size(chunks[0], codec),
               "x raw blob", "raw blob", 1.0)
    report.add(f"{name} encode", encode_gbps, "GB/s", "copy", copy_gbps)
    report.add(f"{name} decode", decode_gbps, "GB/s", "copy", copy_gbps)
    report.add(f"{name} round trip bit-exact (vs fp16)", float(exact), "bool")
    for index, tensor in ((0, "key"), (1, "value")):
        err = (decoded[:, index].float() - kv[:, index]).norm() / kv[:, index].norm()
        report.add(f"{name} {tensor} error", float(err), "relative L2", higher_is_better=False)
    errors, qualities = [], []
    for ref, (window_kv, _) in zip(refs, roundtrips):
        errors.append(attention_output_error(model, ref, kv_to_cache(model, window_kv)))
        qualities.append(continuation_quality(model, ref, kv_to_cache(model, window_kv)))
    report.add(f"{name} attention output error", sum(errors) / len(errors), "relative L2", higher_is_better=False)
    _quality_rows(report, name, Quality.pooled(qualities), base_ppl)


def _blob_size(kv: torch.Tensor, codec) -> int:
    """Bytes of the chunk blob (header, token ids, checksums and the codec's parts) holding ``kv``
    ``[L, T, H, C, D]`` fp16 through ``codec``: what a tier stores, beyond what the codec ratio counts."""
    import numpy as np

    from kvtier.integrations.smollm2 import smollm2_layout
    from kvtier.kvstore.chunk import Chunk, encode_blob

    chunk = Chunk(bytes(16), bytes(16), np.zeros(kv.shape[3], dtype=np.int32), kv)
    header, buffers = encode_blob(chunk, smollm2_layout("float16", kv.shape[3]), codec)
    return len(header) + sum(b.nbytes for b in buffers)


def _press_rows(report: Report, model, refs: list, name: str, ratios: list[float], base_ppl: float) -> None:
    """Quality of one press at each ratio over all windows (attention-output error: mean; next-token quality:
    pooled); each window's scores are computed once and evicted at every ratio."""
    from kvtier.compression.evaluate import Quality, attention_output_error, continuation_quality
    from kvtier.compression.presses import PRESSES

    press = PRESSES[name]()
    start = time.perf_counter()
    scores = [press.layer_scores(model, ref.prefill.cache, ref.prefill.hidden_states) for ref in refs]
    report.add(f"{name} scoring time", (time.perf_counter() - start) / len(refs), "s per window",
               higher_is_better=False)
    for ratio in ratios:
        kept = tokens = 0
        errors, qualities = [], []
        for ref, ref_scores in zip(refs, scores):
            cache = ref.fresh_cache()
            dataclasses.replace(press, compression_ratio=ratio).evict(cache, ref_scores)
            kept += sum(layer.keys.shape[2] for layer in cache.layers)
            tokens += ref.position * len(cache.layers)
            errors.append(attention_output_error(model, ref, cache))
            qualities.append(continuation_quality(model, ref, cache))
        label = f"{name}@{ratio:g}"
        report.add(f"{label} compression ratio", tokens / kept, "x tokens", "all tokens", 1.0)
        report.add(f"{label} attention output error", sum(errors) / len(errors), "relative L2", higher_is_better=False)
        _quality_rows(report, label, Quality.pooled(qualities), base_ppl)


def _needle_rows(report: Report, model, tokenizer, text: str, args) -> None:
    """Whether the planted fact survives each codec and press, at each depth."""
    import copy

    from kvtier.compression import get_codec
    from kvtier.compression.evaluate import cache_to_kv, codec_roundtrip, kv_to_cache, needle_answer, needle_task
    from kvtier.compression.presses import PRESSES, prefill

    modes = args.needle_modes
    haystack = text[len(text) // 2 :]  # away from the text scored above
    for depth in progress(args.depths, desc="needle"):
        task = needle_task(tokenizer, haystack, args.needle_context, depth)
        n = task.context.shape[1]
        prompt = torch.cat([task.context, task.question[:, :-1]], dim=1)
        pre = prefill(model, prompt)
        asked = prompt.shape[1] - n  # question tokens in the prefill

        def context_cache():
            cache = copy.deepcopy(pre.cache)
            cache.crop(-asked)
            return cache

        answers = {"uncompressed": needle_answer(model, tokenizer, context_cache(), task, n)}
        for name in args.codecs:
            decoded, _ = codec_roundtrip(get_codec(name), cache_to_kv(context_cache()), args.chunk_tokens, torch.float16)
            answers[name] = needle_answer(model, tokenizer, kv_to_cache(model, decoded), task, n)
        for name in args.presses:
            press = PRESSES[name](compression_ratio=args.needle_ratio)
            if "agnostic" in modes:
                cache = context_cache()
                press.compress(model, cache, pre.hidden_states)
                answers[f"{name}@{args.needle_ratio:g} agnostic"] = needle_answer(model, tokenizer, cache, task, n)
            if "aware" in modes:
                cache = copy.deepcopy(pre.cache)
                press.compress(model, cache, pre.hidden_states)
                answers[f"{name}@{args.needle_ratio:g} aware"] = needle_answer(
                    model, tokenizer, cache, task, prompt.shape[1], ask=False)
        found = {method: float(task.answer in answer) for method, answer in answers.items()}
        for method, value in found.items():
            report.add(f"needle {method} @{depth:.0%}", value, "found", "uncompressed", found["uncompressed"])
        report.notes.append(f"needle at {depth:.0%} of {n} tokens, answers: "
                            + "; ".join(f"{m}={a.strip()!r}" for m, a in answers.items()))
