"""``kvtier bench sparse``: sparse prefill attention, speed and accuracy, each against dense in the same run.

Speed (``--lengths``): the CPU path with vertical-slash estimation included, against dense causal
``scaled_dot_product_attention`` of the same shape (the two alternate, best of ``--repeat``), on synthetic
queries and keys whose attention falls off with distance like a trained model's (a smoothed ``-log`` distance
kernel carried by RoPE-like features) plus a sink token; shapes: 8 heads x 128 and SmolLM2's 9 query / 3 KV
heads x 64. Fixed budgets ``--vertical`` and ``--slash``. The density reached is reported beside each time.

Accuracy (``--accuracy-lengths``): SmolLM2-135M on held-out English text with the searched per-head config:
per-head recall of the dense attention mass (mean, min over layers x heads), density, relative error of the
attention output (each layer fed dense inputs), greedy next-token agreement at every position (teacher-forced)
and perplexity against dense, the greedy continuation of ``CONTINUATION`` tokens after the prefill (sparse
prefill, dense decode) against dense; and a needle (``--needle-depths`` of an ``--needle-length`` context) asked for at the end.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from kvtier.bench.args import at_least, fill_defaults, fraction, listed, one_of, tokens
from kvtier.bench.report import Report, progress

SHAPES = {"8x128": (8, 8, 128), "smollm2": (9, 3, 64)}  # query heads, KV heads, head dim
NEEDLE = "The secret passphrase is 48213."
QUESTION = "\n\nWhat is the secret passphrase? The secret passphrase is"
CONTINUATION = 32


# Defaults, and the smaller ones of --quick; an option given on the command line wins over both.
NORMAL = {"lengths": [8192, 16384, 32768], "accuracy_lengths": [2048, 4096, 8192], "needle_length": 8192,
          "needle_depths": [0.1, 0.3, 0.5, 0.7, 0.9]}
QUICK = {"lengths": [4096], "accuracy_lengths": [2048], "needle_length": 4096, "needle_depths": [0.5]}
LENGTHS = listed(at_least(1, tokens))  # token counts such as 4k or 4096 ('' = none)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lengths", type=LENGTHS,
                        help="token counts of the speed part ('' = skip; default 8192,16384,32768)")
    parser.add_argument("--shapes", type=listed(one_of(SHAPES)), default="8x128,smollm2",
                        help=f"speed shapes among {list(SHAPES)}")
    parser.add_argument("--vertical", type=at_least(1), default=500, help="vertical columns kept in the speed part")
    parser.add_argument("--slash", type=at_least(1), default=1000, help="diagonals kept in the speed part")
    parser.add_argument("--repeat", type=at_least(1), default=3,
                        help="speed: dense and sparse alternate; best of this many")
    parser.add_argument("--accuracy-lengths", type=LENGTHS,
                        help="token counts on SmolLM2 ('' = skip; default 2048,4096,8192)")
    parser.add_argument("--needle-length", type=at_least(1, tokens), help="tokens of the needle test (default 8192)")
    parser.add_argument("--needle-depths", type=listed(fraction()),
                        help="where the needle goes, fractions of it ('' = skip; default 0.1,0.3,0.5,0.7,0.9)")
    parser.add_argument("--config", default="smollm2-135m", help="per-head sparse config: shipped name or JSON path")
    parser.add_argument("--min-tokens", type=at_least(1), default=1024, help="shorter prefills stay dense")
    parser.add_argument("--threads", type=at_least(0), default=0,
                        help="torch threads for dense and sparse alike (0 = default)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller defaults: 4k speed, 2k accuracy, needle at 0.5 of 4k (options given still apply)")


def run(args: argparse.Namespace) -> Report:
    fill_defaults(args, NORMAL, QUICK)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = Report("sparse")
    report.notes.append(f"torch threads: {torch.get_num_threads()}; speed budgets: vertical={args.vertical}, "
                        f"slash={args.slash}; config: {args.config}")
    for n in args.lengths:
        for shape in args.shapes:
            speed(report, shape, n, args.vertical, args.slash, args.repeat)
    lengths, depths = args.accuracy_lengths, args.needle_depths
    if lengths or depths:
        from kvtier.integrations.smollm2 import load_smollm2
        from kvtier.sparse_attn.config import load_config

        model, tokenizer = load_smollm2()
        config = load_config(args.config)
        for n in lengths:
            accuracy(report, model, tokenizer, config, n, args.min_tokens)
        if depths:
            needle(report, model, tokenizer, config, args.needle_length, depths, args.min_tokens)
    return report


def synthetic_qkv(heads: int, kv_heads: int, n: int, dim: int, seed: int = 0):
    """Queries ``[1, heads, n, dim]``, keys and values ``[1, kv_heads, n, dim]`` whose attention decays with
    distance: 3/4 of the dims carry ``cos/sin(w_f * position)`` features weighted so that the logit between
    positions ``i`` and ``j`` is a smoothed ``-log|i - j|``; the rest is noise; key 0 is a sink."""
    g = torch.Generator().manual_seed(seed)
    pairs = dim * 3 // 8
    f = torch.arange(1, pairs + 1, dtype=torch.float64)
    weight = (1 - f / (pairs + 1)) / f  # Fejer-smoothed cosine series of -log|2 sin(x / 2)|
    angle = torch.arange(n, dtype=torch.float64)[:, None] * (f * math.pi / (2 * n))
    amplitude = (2.0 * weight * math.sqrt(dim)).sqrt()
    features = torch.cat([amplitude * angle.cos(), amplitude * angle.sin()], dim=-1).float()

    def tokens(h: int) -> torch.Tensor:
        x = torch.randn(1, h, n, dim, generator=g) * 0.5
        x[..., : 2 * pairs] += features
        return x

    q, k = tokens(heads), tokens(kv_heads)
    q[..., 2 * pairs] += dim ** 0.25
    k[..., 0, 2 * pairs] += 3 * dim ** 0.25
    return q, k, torch.randn(1, kv_heads, n, dim, generator=g)


def speed(report: Report, shape: str, n: int, vertical: int, slash: int, repeat: int = 1) -> None:
    """Dense SDPA and sparse (estimation + CPU kernel) alternate ``repeat`` times; the best time of each counts
    (the machine may be shared)."""
    from kvtier.kernels import sparse_attention
    from kvtier.sparse_attn.config import HeadPattern
    from kvtier.sparse_attn.estimate import estimate_index

    heads, kv_heads, dim = SHAPES[shape]
    q, k, v = synthetic_qkv(heads, kv_heads, n, dim)
    dense_s = estimate_s = sparse_s = math.inf
    for _ in range(max(1, repeat)):
        start = time.perf_counter()
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
        dense_s = min(dense_s, time.perf_counter() - start)
        start = time.perf_counter()
        index = estimate_index(q, k, [HeadPattern("vertical_slash", vertical=vertical, slash=slash)] * heads)
        estimated = time.perf_counter()
        out = sparse_attention(q, k, v, index, backend="cpu")
        estimate_s, sparse_s = min(estimate_s, estimated - start), min(sparse_s, time.perf_counter() - start)
    label = f"{shape}.{n}"
    report.add(f"speed.{label}.sparse_s", sparse_s, "s", "dense causal SDPA", dense_s, higher_is_better=False)
    report.add(f"speed.{label}.estimate_s", estimate_s, "s")
    report.add(f"speed.{label}.density", index.density(), "fraction of causal pairs")
    report.add(f"speed.{label}.rel_error", float((out - dense).norm() / dense.norm()), "relative L2")


def _logprobs(model, ids: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-likelihoods ``[n - 1]`` and greedy predictions ``[n]``, lm_head applied in chunks."""
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0]
        nll, greedy = [], []
        for i in range(0, hidden.shape[0], chunk):
            logits = model.lm_head(hidden[i: i + chunk]).float().log_softmax(-1)
            greedy.append(logits.argmax(-1))
            targets = ids[0, i + 1: i + 1 + chunk]
            nll.append(-logits[: len(targets)].gather(-1, targets[:, None])[:, 0])
    return torch.cat(nll), torch.cat(greedy)


def accuracy(report: Report, model, tokenizer, config, n: int, min_tokens: int) -> None:
    from kvtier.bench.text import english_text
    from kvtier.kernels import sparse_attention
    from kvtier.sparse_attn.estimate import estimate_index
    from kvtier.sparse_attn.integration import disable_sparse_prefill, enable_sparse_prefill, observe_attention
    from kvtier.sparse_attn.metrics import attention_recall

    ids = tokenizer(english_text("heldout"), return_tensors="pt").input_ids[:, :n]
    recalls, densities, errors = [], [], []
    bar = progress(total=model.config.num_hidden_layers, desc=f"accuracy {n}")

    def probe(layer: int, query, key, value, scaling: float) -> None:
        patterns = config.layers[layer]
        index = estimate_index(query, key, patterns, scaling)
        recalls.append(attention_recall(query, key, [index], scaling, block_step=max(1, n // 2048))[0, 0])
        densities.append(index.head_density()[0])
        out = sparse_attention(query, key, value, index, scaling)
        dense = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling,
                                                                 enable_gqa=True)
        errors.append(float((out - dense).norm() / dense.norm()))
        bar.update()

    with torch.no_grad(), observe_attention(model, probe):
        model.model(ids)
    bar.close()
    start = time.perf_counter()
    dense_nll, dense_greedy = _logprobs(model, ids)
    dense_s = time.perf_counter() - start
    enable_sparse_prefill(model, config, min_tokens=min_tokens)
    try:
        start = time.perf_counter()
        sparse_nll, sparse_greedy = _logprobs(model, ids)
        sparse_s = time.perf_counter() - start
    finally:
        disable_sparse_prefill(model)
    recall = torch.stack(recalls)
    report.add(f"accuracy.{n}.recall_mean", float(recall.mean()), "share of dense attention mass")
    report.add(f"accuracy.{n}.recall_min", float(recall.min()), "share of dense attention mass")
    report.add(f"accuracy.{n}.density", float(torch.stack(densities).mean()), "fraction of causal pairs")
    report.add(f"accuracy.{n}.attn_rel_error", sum(errors) / len(errors), "relative L2, mean over layers")
    report.add(f"accuracy.{n}.greedy_agreement", float((dense_greedy == sparse_greedy).float().mean()),
               "share of positions", "dense", 1.0)
    report.add(f"accuracy.{n}.perplexity", float(sparse_nll.mean().exp()), "ppl", "dense",
               float(dense_nll.mean().exp()), higher_is_better=False)
    report.add(f"accuracy.{n}.model_forward_s", sparse_s, "s", "dense SDPA forward", dense_s, higher_is_better=False)
    dense_next = _continue(model, ids, None, min_tokens, CONTINUATION)
    sparse_next = _continue(model, ids, config, min_tokens, CONTINUATION)
    changes = (dense_next != sparse_next).nonzero()
    same = int(changes[0]) if len(changes) else CONTINUATION
    report.add(f"accuracy.{n}.continuation_match", same / CONTINUATION,
               f"share of the {CONTINUATION} greedy tokens after the prefill equal to dense before the first change",
               "dense", 1.0)


def _continue(model, ids: torch.Tensor, config, min_tokens: int, new_tokens: int, exact: bool = True) -> torch.Tensor:
    """The ``new_tokens`` greedy tokens after ``ids`` ``[1, n]``: ``[new_tokens]`` (fewer if an end token comes
    and not ``exact``). Dense when config is None, else sparse prefill with ``config`` (decode steps are dense)."""
    from kvtier.sparse_attn.integration import disable_sparse_prefill, enable_sparse_prefill

    if config is not None:
        enable_sparse_prefill(model, config, min_tokens=min_tokens)
    try:
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens if exact else 0, do_sample=False)
    finally:
        disable_sparse_prefill(model)
    return out[0, ids.shape[1]:]


def needle(report: Report, model, tokenizer, config, n: int, depths: list[float], min_tokens: int) -> None:
    from kvtier.bench.text import english_text

    filler = tokenizer(english_text("heldout"), return_tensors="pt").input_ids[0]
    needle_ids = tokenizer(" " + NEEDLE + " ", return_tensors="pt").input_ids[0]
    question = tokenizer(QUESTION, return_tensors="pt").input_ids[0]
    room = n - len(needle_ids) - len(question)
    answer = NEEDLE.split()[-1].rstrip(".")
    found = {"dense": 0, "sparse": 0}
    for depth in progress(depths, desc="needle"):
        at = int(room * depth)
        ids = torch.cat([filler[:at], needle_ids, filler[at:room], question])[None]
        row = {}
        for mode, mode_config in (("dense", None), ("sparse", config)):
            row[mode] = answer in tokenizer.decode(_continue(model, ids, mode_config, min_tokens, 6, exact=False))
            found[mode] += row[mode]
        report.add(f"needle.{n}.depth{depth:g}.found", float(row["sparse"]), "1 = found", "dense", float(row["dense"]))
    report.add(f"needle.{n}.found", found["sparse"], f"of {len(depths)} depths", "dense", found["dense"])
