#!/usr/bin/env python
"""Decode tokens/s on MLX: contexts decoded one at a time vs together in one ``DecodeBatch``.

    python scripts/batch_decode_bench.py                    # the embedded model and next-proxy
    python scripts/batch_decode_bench.py --models embedded --tokens 32 --sizes 1,4

For each model, 8 requests are prefilled alone (one image of the model's shape and a text prompt
a few tokens longer per request, each with its own seed: ``pmod.app.bench.worker.make_prompt``)
and saved (``engine.save_context``). For each batch size B, B of them decode ``--tokens``
greedy tokens each:

- ``sequential``: ``engine.load_context`` once per request, then its tokens (the best case alone);
- ``round robin``: one token per request in turn, each swapped in (``load_context``) and out
  (``save_context``) around its ``decode``, as a server without batching interleaves requests;
- ``batch``: the B contexts added to one ``engine.new_batch()`` (``join``: the adds), then one
  ``step`` for all rows per token.

Every way feeds the same greedy tokens (checked). Rates are tokens over the median seconds of a
token alone (a request's decode; in round robin with its swap) or of a batch step (B tokens), so
that another process's burst on a shared machine skews them little. The first
``preset_checkpoint("next-proxy")`` builds the preset once (about a minute).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import pmod
from pmod.app.bench.plan import _one_image_tokens
from pmod.app.bench.presets import PRESETS, preset_checkpoint
from pmod.app.bench.worker import make_prompt

REQUESTS = 8


def prefill(engine, name: str):
    """The requests' saved contexts and first greedy tokens."""
    preset = PRESETS[name]
    n_vision = preset.vision[0] if preset.vision else _one_image_tokens(engine.config)
    out = []
    for i in range(REQUESTS):
        emb, mask = make_prompt(engine, n_vision, preset.text + 4 * i, seed=i)
        engine.reset()
        logits = engine.prefill(inputs_embeds=emb, vision_mask=mask)
        out.append((engine.save_context(), int(np.argmax(logits))))
    return out


def sequential(engine, started, n):
    """Each request alone in turn: the tokens fed and each token's seconds."""
    tokens, seconds = [], []
    for ctx, token in started:
        engine.load_context(ctx)
        fed = []
        for _ in range(n):
            fed.append(token)
            t0 = time.perf_counter()
            token = engine.decode_greedy(token)
            seconds.append(time.perf_counter() - t0)
        tokens.append(fed)
    return tokens, seconds


def round_robin(engine, started, n):
    """One token per request in turn, each swapped in and out: the tokens fed and each token's seconds."""
    contexts, next_tokens = [c for c, _ in started], [t for _, t in started]
    tokens, seconds = [[] for _ in started], []
    for _ in range(n):
        for i, ctx in enumerate(contexts):
            tokens[i].append(next_tokens[i])
            t0 = time.perf_counter()
            engine.load_context(ctx)
            next_tokens[i] = engine.decode_greedy(next_tokens[i])
            contexts[i] = engine.save_context()
            seconds.append(time.perf_counter() - t0)
    return tokens, seconds


def batched(engine, started, n):
    """The requests in one batch: the tokens fed, each step's seconds (a token per row) and the
    seconds of the adds."""
    batch = engine.new_batch()
    t0 = time.perf_counter()
    rows = [batch.add(ctx) for ctx, _ in started]
    join = time.perf_counter() - t0
    next_tokens = {row: token for row, (_, token) in zip(rows, started)}
    tokens, seconds = {row: [] for row in rows}, []
    for _ in range(n):
        for row, token in next_tokens.items():
            tokens[row].append(token)
        t0 = time.perf_counter()
        out = batch.step(next_tokens)
        seconds.append(time.perf_counter() - t0)
        next_tokens = {row: int(np.argmax(logits)) for row, logits in out.items()}
    return [tokens[row] for row in rows], seconds, join


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="embedded,next-proxy", help="presets (pmod bench --preset names)")
    ap.add_argument("--sizes", default="1,2,4,8", help="batch sizes (at most 8)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per request")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    n = args.tokens
    print(f"{'model':<11} {'B':>2} {'KV MiB/row':>10} {'sequential':>11} {'round robin':>12} {'batch':>9} "
          f"{'batch/seq':>9} {'join ms':>8}   (tokens/s)")
    for name in args.models.split(","):
        engine = pmod.open_engine(preset_checkpoint(name), backend="mlx")
        started = prefill(engine, name)
        kv = np.mean([ctx.nbytes for ctx, _ in started]) / 2**20
        batched(engine, started[:2], 2)  # warm-up
        for b in sizes:
            part = started[:b]
            seq_tokens, seq = sequential(engine, part, n)
            rr_tokens, rr = round_robin(engine, part, n)
            batch_tokens, steps, join = batched(engine, part, n)
            assert seq_tokens == rr_tokens == batch_tokens, "the ways decoded different tokens"
            seq, rr, bat = 1 / np.median(seq), 1 / np.median(rr), b / np.median(steps)
            print(f"{name:<11} {b:>2} {kv:>10.1f} {seq:>11.1f} {rr:>12.1f} {bat:>9.1f} "
                  f"{bat / seq:>8.2f}x {1e3 * join:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
