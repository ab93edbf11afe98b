"""One (backend, mode) of ``pmod bench``, measured in its own interpreter.

``python -m pmod.app.bench --worker SPEC`` (SPEC is JSON from the parent): MLX (with the
OpenBLAS it loads into the global symbol scope) and torch cannot share a process safely,
and a process of its own makes the peak resident memory that of one backend and mode.
For each vision count: one warm-up, then ``repeat`` passes of reset, prefill, greedy
decode; results go to stdout as :mod:`pmod.app.bench.processes` messages.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from pmod.errors import PmodError
from pmod.flops import kv_bytes, prefill_flops
from pmod.app.bench.presets import SEED
from pmod.app.bench.processes import emit, proc_kib
from pmod.app.bench.profile import profile_prefill


def _best_seconds(fn, min_time: float) -> float:
    """Fastest of repeated calls after a warm-up, repeating until ``min_time`` has passed."""
    fn()
    best, spent = float("inf"), 0.0
    while spent < min_time or best == float("inf"):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
    return best


def matmul_peak(engine) -> dict | None:
    """The engine's best float32 matmul GFLOP/s on this machine (square sizes from 512 up), with its
    ``matmul_probe``; None where it has none (TensorRT)."""
    best = None
    for n in (512, 1024, 2048, 4096, 8192):
        probe = engine.matmul_probe(n)
        if probe is None:
            return None
        sec = _best_seconds(probe, min_time=0.1)
        gflops = 2 * n**3 / sec / 1e9
        if best is None or gflops > best["gflops"]:
            best = dict(gflops=gflops, size=n, dtype="float32")
        if 8 * sec > 1.0:  # the next size would take over a second per call
            break
    return best


def _reset_peak() -> None:
    """Reset this process's resident-memory high-water mark (Linux); elsewhere it only grows."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss() -> int | None:
    peak = proc_kib("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def make_prompt(engine, n_vision: int, n_text: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings ``[T, H]`` and vision mask of a prompt laid out as a real one: the first
    quarter of the (random) text tokens, the vision block (random rows at the scale of the
    token embeddings), then the rest of the text."""
    rng = np.random.default_rng([seed, n_vision, n_text])
    H = engine.config.hidden_size
    text = engine.embed(rng.integers(0, engine.config.vocab_size, n_text)) if n_text else np.zeros((0, H), np.float32)
    scale = float(text.std()) if n_text else 0.0
    vision = ((scale or 1.0) * rng.standard_normal((n_vision, H))).astype(np.float32)
    lead = n_text // 4
    mask = np.zeros(n_vision + n_text, dtype=bool)
    mask[lead:lead + n_vision] = True
    return np.concatenate([text[:lead], vision, text[lead:]]), mask


def timed_pass(model, emb, mask, n_decode: int, after_prefill=None) -> tuple[float, float]:
    """Prefill then greedy decode from an empty context: (prefill s, decode s), each timed by the
    model's ``stopwatch`` (CUDA events on a GPU). ``mask`` None: a model that takes embeddings
    only (the transformers peer); ``after_prefill`` runs untimed."""
    model.reset()
    with model.stopwatch() as prefill:
        logits = model.prefill(inputs_embeds=emb) if mask is None else model.prefill(inputs_embeds=emb, vision_mask=mask)
    if after_prefill is not None:
        after_prefill()
    token = int(np.argmax(logits))
    with model.stopwatch() as decode:
        for _ in range(n_decode):
            token = model.decode_greedy(token)
    return prefill.seconds, decode.seconds


def _one_pass(engine, emb, mask, n_decode: int) -> tuple[float, float, int]:
    """:func:`timed_pass` and the KV bytes held after the prefill."""
    held = []
    prefill, decode = timed_pass(engine, emb, mask, n_decode, lambda: held.append(engine.kv_bytes()))
    return prefill, decode, held[0]


def run_worker(spec: dict) -> None:
    """Measure one (backend, mode) over the vision counts of ``spec``; results go to stdout."""
    backend, mode = spec["backend"], spec["mode"]
    # open_engine imports the runtime package first: pmod_mlx loads its BLAS before mlx.core,
    # the torch engine imports torch through pmod_export.torch_loader.
    from pmod.app.registry import open_engine

    eager = backend in ("mlx", "torch")  # exports carry their own dtype and retention
    retention = spec["retention"]
    engine = open_engine(spec["path"], backend=backend, dtype=spec["dtype"] if eager else None,
                         device=spec.get("device"), seeded_weights=spec.get("seeded_weights"),
                         dense=mode == "dense", retention=retention if eager else None)
    config, dense = engine.config, mode == "dense"
    rt = engine.runtime_info()
    kv_dtype = rt["kv_dtype"]
    emit(info=dict(device=rt["device"], dtype=spec["dtype"] or kv_dtype, kv_dtype=kv_dtype, blas=rt["blas"]))
    n_text, n_decode = spec["text"], spec["decode"]
    for n in spec["vision"]:
        emb, mask = make_prompt(engine, n, n_text, spec["seed"])
        _reset_peak()
        engine.device_memory(reset=True)
        _one_pass(engine, emb, mask, n_decode)  # warm-up
        passes = [_one_pass(engine, emb, mask, n_decode) for _ in range(spec["repeat"])]
        prefill = [p[0] for p in passes]
        median = statistics.median(prefill)
        flops = prefill_flops(config, n, n_text, dense=dense, retention=retention)
        decode_s = statistics.median(p[1] for p in passes)
        emit(row=dict(
            backend=backend, mode=mode, vision_tokens=n, text_tokens=n_text,
            prefill_s=dict(median=median, min=min(prefill), max=max(prefill)),
            decode_tok_s=n_decode / decode_s if n_decode and decode_s > 0 else None,
            kv_bytes=int(passes[-1][2]), kv_bytes_analytic=kv_bytes(config, n, n_text, dense, kv_dtype, retention),
            peak_mem_bytes=_peak_rss(), peak_device_bytes=engine.device_memory(), prefill_flops=flops["total"],
            gflops=flops["total"] / median / 1e9))
        if spec["profile"] and engine.profiles_layers:
            # where MLX runs its Metal kernels, a p-MoD profile runs with them and again with
            # their MLX twins, to show what they save; elsewhere once (kernels: None)
            for kernels in engine.kernel_settings():
                prof = profile_prefill(engine, emb, mask, spec["repeat"])
                for layer, fl in zip(prof["layers"], flops["layers"]):
                    layer.update(layer=fl["layer"], mod=fl["ratio"] is not None, tokens=fl["tokens"])
                emit(profile=dict(backend=backend, mode=mode, vision_tokens=n, text_tokens=n_text,
                                  kernels=kernels, **prof))
    if spec["peak"]:
        emit(peak=matmul_peak(engine))


def worker_main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--worker":
        print("usage: python -m pmod.app.bench --worker SPEC_JSON (started by 'pmod bench')", file=sys.stderr)
        return 2
    try:
        run_worker(json.loads(argv[1]))
    except PmodError as e:
        emit(error=str(e))
        return 2
    return 0
