#!/usr/bin/env python
"""Matmul GFLOP/s of MLX's CPU backend with the fast BLAS vs MLX's bundled reference BLAS.

    python scripts/bench_matmul.py                       # default sizes, ~1 minute
    python scripts/bench_matmul.py --sizes 1024,2944x512x1376 --dtypes float32

Each side runs in its own subprocess (the BLAS must be chosen before mlx.core is
imported): one with the fast BLAS of pmod_mlx.blas (PMOD_BLAS as in your
environment, default auto), one with PMOD_BLAS=reference. numpy float32 is shown
for reference. A size is N (N x N @ N x N), MxKxN (M x K @ K x N) or "llm"
(2944x512 @ 512x1376, a p-MoD prefill-shaped projection).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LLM = (2944, 512, 1376)
DEFAULT_SIZES = "512,1024,2048,llm"
DEFAULT_DTYPES = "float32,float16,bfloat16"


def parse_sizes(text: str) -> list[tuple[int, int, int]]:
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        if item == "llm":
            out.append(LLM)
            continue
        dims = [int(d) for d in item.split("x")]
        if len(dims) == 1:
            dims *= 3
        if len(dims) != 3 or min(dims) < 1:
            raise argparse.ArgumentTypeError(f"bad size {item!r}: use N, MxKxN or llm")
        out.append(tuple(dims))
    if not out:
        raise argparse.ArgumentTypeError("no sizes")
    return out


def size_label(s) -> str:
    m, k, n = s
    if tuple(s) == LLM:
        return f"{m}x{k} @ {k}x{n}"
    return f"{m}^3" if m == k == n else f"{m}x{k} @ {k}x{n}"


def timed(fn, min_time: float) -> float:
    """Best seconds per call: a warm-up call, then repeats until min_time has passed."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    if first >= min_time:  # slow path (reference BLAS): one sample is plenty
        return first
    best, spent = first, 0.0
    for _ in range(50):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if spent >= min_time:
            break
    return best


def worker_numpy(args) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    res = {"numpy": {}}
    for s in args.sizes:
        m, k, n = s
        a = rng.standard_normal((m, k), dtype=np.float32)
        b = rng.standard_normal((k, n), dtype=np.float32)
        sec = timed(lambda: a @ b, args.min_time)
        res["numpy"][size_label(s)] = 2 * m * k * n / sec / 1e9
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        res["numpy_blas"] = f"{deps.get('name')} {deps.get('version')}"
    except Exception:
        res["numpy_blas"] = "?"
    return res


def worker_mlx(args) -> dict:
    from pmod_mlx import blas  # importing pmod_mlx loads the fast BLAS before mlx.core

    info = blas.load_fast_blas()  # loaded once: this returns what was loaded
    import mlx.core as mx
    import numpy as np

    info["mlx_sgemm"] = blas.mlx_sgemm_provider()
    mx.set_default_device(mx.cpu)
    rng = np.random.default_rng(0)
    res = {"blas": info, "mlx": {}}
    for dt in args.dtypes:
        for s in args.sizes:
            m, k, n = s
            a = mx.array(rng.standard_normal((m, k), dtype=np.float32)).astype(getattr(mx, dt))
            b = mx.array(rng.standard_normal((k, n), dtype=np.float32)).astype(getattr(mx, dt))
            mx.eval(a, b)
            sec = timed(lambda: mx.eval(mx.matmul(a, b)), args.min_time)
            res["mlx"][f"{dt}|{size_label(s)}"] = 2 * m * k * n / sec / 1e9
    return res


def run_worker(args, kind: str, env_blas: str | None = None) -> dict:
    """One measurement in a fresh interpreter: ``kind`` is "mlx" or "numpy".

    numpy gets its own process: its OpenBLAS (scipy-openblas, a separate thread pool)
    and MLX's keep their worker threads spinning for a while after each call, and on
    a 2-core machine each pool then slows the other down.
    """
    env = dict(os.environ)
    if env_blas is not None:
        env["PMOD_BLAS"] = env_blas
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind,
           "--sizes", ",".join("x".join(map(str, s)) for s in args.sizes),
           "--dtypes", ",".join(args.dtypes), "--min-time", str(args.min_time)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise SystemExit(f"{kind} worker failed (rc {out.returncode}):\n{out.stdout}\n{out.stderr}")


def fmt(x) -> str:
    return "-" if x is None else (f"{x:.0f}" if x >= 100 else f"{x:.1f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes(DEFAULT_SIZES),
                   help=f"comma-separated N, MxKxN or llm (default {DEFAULT_SIZES})")
    p.add_argument("--dtypes", type=lambda t: [d.strip() for d in t.split(",") if d.strip()],
                   default=DEFAULT_DTYPES.split(","), help=f"default {DEFAULT_DTYPES}")
    p.add_argument("--min-time", type=float, default=0.3,
                   help="seconds of repeats per cell (a slower single call counts alone)")
    p.add_argument("--no-reference", action="store_true", help="skip the PMOD_BLAS=reference run")
    p.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    p.add_argument("--worker", choices=("mlx", "numpy"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for d in args.dtypes:
        if d not in ("float32", "float16", "bfloat16"):
            p.error(f"unsupported dtype {d!r}")
    if args.worker:
        res = worker_mlx(args) if args.worker == "mlx" else worker_numpy(args)
        print("@@RESULT@@" + json.dumps(res))
        return

    t0 = time.perf_counter()
    fast = run_worker(args, "mlx")
    ref = None if args.no_reference else run_worker(args, "mlx", env_blas="reference")
    fast.update(run_worker(args, "numpy"))
    info = fast["blas"]
    threads = f", {info['threads']} threads" if info.get("threads") else ""
    print(f"BLAS: {info['name']}{threads}" + (f"  [{info['detail']}]" if info.get("detail") else ""))
    if info.get("reason"):
        print(f"  reason: {info['reason']}")
    print(f"  MLX cblas_sgemm -> {info.get('mlx_sgemm') or '?'}")
    if ref is not None:
        print(f"  'ref' = PMOD_BLAS=reference -> {ref['blas'].get('mlx_sgemm') or ref['blas']['name']}")
    coretype = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if k in os.environ}
    if coretype:
        print(f"  env: {coretype}")
    print(f"  numpy float32 uses {fast.get('numpy_blas', '?')}")
    print("GFLOP/s (higher is better)")

    cols = []
    for dt in args.dtypes:
        short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}[dt]
        cols.append((f"mlx {short}", lambda lab, dt=dt: fast["mlx"].get(f"{dt}|{lab}")))
        if ref is not None:
            cols.append((f"{short} ref", lambda lab, dt=dt: ref["mlx"].get(f"{dt}|{lab}")))
            if dt == "float32":
                cols.append(("x", lambda lab: (fast["mlx"][f"float32|{lab}"] / ref["mlx"][f"float32|{lab}"])))
    cols.append(("numpy f32", lambda lab: fast["numpy"].get(lab)))
    labels = [size_label(s) for s in args.sizes]
    w0 = max(len("size"), *(len(lab) for lab in labels))
    widths = [max(len(name), 6) for name, _ in cols]
    print("  ".join(["size".ljust(w0)] + [name.rjust(w) for (name, _), w in zip(cols, widths)]))
    for lab in labels:
        cells = []
        for (name, get), w in zip(cols, widths):
            v = get(lab)
            cells.append(((fmt(v) + "x") if name == "x" else fmt(v)).rjust(w))
        print("  ".join([lab.ljust(w0)] + cells))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.json:
        print(json.dumps({"fast": fast, "reference": ref}, indent=1))


if __name__ == "__main__":
    main()
