"""Prefill and decode times of the mlx, torch and onnx backends on one random p-MoD model.

``python -m pmod_export.bench [--layers 8 --hidden 256 --vision 576 --text 32 --decode 32]``
builds a random checkpoint (pmod.init weights, random routers so routing is not all ties),
exports it with ``--max-vision-tokens = --vision``, and times on each backend a prefill of
one chunk (``--text`` text tokens around a block of ``--vision`` routed vision tokens) and
``--decode`` greedy decode steps; medians of ``--repeats`` runs after one warm-up. Backends
that are not installed are skipped. The logits of the backends are compared as a check.
``--dense`` adds each backend's dense twin (``dense=True``); ``--threads`` pins threads.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import pmod
from pmod.config import PmodConfig
from pmod.errors import PmodError
from pmod.format import save_checkpoint
from pmod.init import random_weights


def bench_config(layers: int, hidden: int, vocab: int, context: int) -> PmodConfig:
    return PmodConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                      num_hidden_layers=layers, num_attention_heads=hidden // 32, num_key_value_heads=hidden // 64,
                      max_position_embeddings=context, mod_target_layers="shiftedcos_decay_0.85_0.15",
                      mod_decay_span=layers - 1, mm_projector_type="linear", mm_hidden_size=hidden)


def run(args) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="pmod-bench-") as work:  # ~200 MB at the defaults
        return _run(args, Path(work))


def _run(args, work: Path) -> list[dict]:
    config = bench_config(args.layers, args.hidden, args.vocab, args.vision + args.text + args.decode + 8)
    tensors = random_weights(config, seed=0)
    rng = np.random.default_rng(1)
    for name in tensors:
        if name.endswith("router.weight"):
            tensors[name] = (rng.standard_normal(tensors[name].shape) / np.sqrt(args.hidden)).astype(np.float32)
    ckpt = save_checkpoint(work / "ckpt", config, tensors, dtype="float32")
    T = args.vision + args.text
    mask = np.zeros(T, dtype=bool)
    start = min(5, args.text)  # a few text tokens (the system prompt) before the image
    mask[start:start + args.vision] = True
    emb = tensors["language_model.embed_tokens.weight"][rng.integers(3, args.vocab, T)]
    emb[mask] = rng.standard_normal((args.vision, args.hidden)).astype(np.float32)

    engines = {}
    for backend in args.backends:
        try:
            if backend == "onnx":
                from .onnx_export import export_onnx

                t0 = time.perf_counter()
                out = export_onnx(ckpt, work / "onnx", args.vision)
                print(f"export: {time.perf_counter() - t0:.1f} s", flush=True)
                engines[backend] = pmod.open_engine(out, backend="onnx", threads=args.threads)
            elif backend == "torch":
                engines[backend] = pmod.open_engine(ckpt, backend="torch", max_vision_tokens=args.vision)
                if args.threads:
                    from .torch_loader import torch

                    torch.set_num_threads(args.threads)
            else:
                engines[backend] = pmod.open_engine(ckpt, backend=backend, dtype="float32")
        except PmodError as e:
            print(f"{backend}: skipped ({e})", flush=True)
            continue
        if args.dense:  # the plain-LLaVA twin on the same weights, for the p-MoD saving
            if backend == "onnx":
                twin = pmod.open_engine(out, backend="onnx", threads=args.threads, dense=True)
            else:
                twin = pmod.open_engine(ckpt, backend=backend, dtype="float32", dense=True)
            engines[f"{backend}-dense"] = twin

    rows, first = [], {}
    for backend, engine in engines.items():
        prefill, decode = [], []
        for rep in range(args.repeats + 1):
            engine.reset()
            t0 = time.perf_counter()
            logits = engine.prefill(inputs_embeds=emb, vision_mask=mask)
            t1 = time.perf_counter()
            first.setdefault(backend, logits)
            token = int(np.argmax(logits))
            for _ in range(args.decode):
                token = int(np.argmax(engine.decode(token)))
            t2 = time.perf_counter()
            if rep:  # the first run warms up
                prefill.append(t1 - t0)
                decode.append((t2 - t1) / args.decode)
        rows.append(dict(backend=backend, prefill_ms=1e3 * statistics.median(prefill),
                         decode_ms=1e3 * statistics.median(decode), kv=sum(engine.kv_lengths())))
    for r in rows:  # against the first backend of the same kind (p-MoD or dense)
        kind = r["backend"].endswith("-dense")
        base = next(v for k, v in first.items() if k.endswith("-dense") == kind)
        r["max_diff"] = float(np.abs(first[r["backend"]] - base).max())
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pmod_export.bench", description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--vision", type=int, default=576)
    p.add_argument("--text", type=int, default=32)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backends", nargs="+", default=["mlx", "torch", "onnx"])
    p.add_argument("--dense", action="store_true", help="also time each backend's dense twin (dense=True)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per backend (torch, onnxruntime, and OpenBLAS for MLX); default: theirs")
    args = p.parse_args(argv)
    if args.threads:  # read by OpenBLAS when pmod_mlx loads it
        import os

        os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
    rows = run(args)
    print(f"{args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: prefill {args.vision} vision + "
          f"{args.text} text tokens, {args.decode} decode steps, threads {args.threads or 'default'}")
    print(f"{'backend':12} {'prefill ms':>11} {'decode ms/token':>16} {'KV entries':>11} {'max |dlogit|':>13}")
    for r in rows:
        print(f"{r['backend']:12} {r['prefill_ms']:11.1f} {r['decode_ms']:16.2f} {r['kv']:11d} {r['max_diff']:13.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
