"""The embedded model at 8 and 4 bits against float: size, memory, speed and accuracy.

For each variant (the float16 checkpoint, ``pmod convert --quantize 8`` and ``--quantize 4``)
a fresh process loads it in MLX, answers the held-out shapes test questions greedily
(``pmod.tasks.shapes.evaluate``, as ``scripts/eval_default_model.py``), times a 64-token greedy decode after an
image prompt, and reports its peak resident memory. Prints a Markdown table.

    python scripts/quantize_eval.py [--model DIR] [--n 500] [--group-size 64] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pmod.app.cli import main as pmod_main
from pmod.app.models import resolve_model

DECODE_TOKENS = 64


def measure(model: str, n: int) -> dict:
    """In this process: accuracy on ``n`` test questions, decode tokens/s, peak RSS."""
    import numpy as np

    from pmod.tasks import shapes
    from pmod.app.session import open_session
    from pmod.tasks.shapes.evaluate import evaluate

    samples = shapes.make_samples("test", n, seed=0, questions_per_image=1)
    r = evaluate(model, samples, dense=False, dtype="float32")
    session = open_session(model, dtype="float32")
    engine = session.engine
    ids = np.arange(3, 40) % session.config.vocab_size
    rates = []
    for _ in range(3):
        engine.reset()
        logits = engine.prefill(input_ids=ids)
        t0 = time.perf_counter()
        for _ in range(DECODE_TOKENS):
            logits = engine.decode(int(np.argmax(logits)))
        rates.append(DECODE_TOKENS / (time.perf_counter() - t0))
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    return {"accuracy": sum(r["right"].values()) / len(samples), "right": r["right"], "total": r["total"],
            "decode_tok_s": sorted(rates)[1], "questions_per_s": len(samples) / r["seconds"], "peak_rss": peak}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="float pmod checkpoint (default: the embedded model)")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # the per-variant child process
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.n)))
        return 0
    base = resolve_model(args.model)
    rows = []
    with tempfile.TemporaryDirectory(prefix="pmod-quant-") as tmp:
        for bits in (None, 8, 4):
            path = base
            if bits:
                path = Path(tmp) / f"q{bits}"
                if pmod_main(["convert", str(base), str(path), "--quantize", str(bits),
                              "--group-size", str(args.group_size)]) != 0:
                    return 2
            size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
            out = subprocess.run([sys.executable, __file__, "--measure", str(path), "--n", str(args.n)],
                                 capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr, file=sys.stderr)
                return 2
            rows.append({"variant": f"{bits}-bit" if bits else "float16", "weights_bytes": size,
                         **json.loads(out.stdout.strip().splitlines()[-1])})
    print(f"| variant | weights on disk | peak RSS | decode tokens/s | questions/s | accuracy ({args.n} test questions) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['weights_bytes'] / 2**20:.2f} MiB | {r['peak_rss'] / 2**20:.0f} MiB | "
              f"{r['decode_tok_s']:.0f} | {r['questions_per_s']:.1f} | {100 * r['accuracy']:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
