"""The torch backend against what a torch user runs today, on the same weights, in one process.

``python scripts/torch_vs_transformers.py --preset next-proxy`` times transformers'
``LlamaForCausalLM`` (``sdpa`` attention, its ``DynamicCache``; the dense model) next to the
torch backend's dense twin and its p-MoD model: per vision count, the bench's prompt
(:func:`pmod.app.bench.worker.make_prompt`) is prefilled from an empty context, then decoded
greedily. Each of the three gets one warm-up, then ``repeat`` passes taken in turn, so that
drift in the machine's speed reaches all three alike, each with the others' contexts
dropped; the table gives medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


from pmod.app.bench.presets import RANDOM_PRESETS, preset_checkpoint
from pmod.app.bench.report import fmt_ms
from pmod.app.bench.worker import make_prompt, timed_pass
from pmod.app.registry import open_engine, tool
from pmod.errors import PmodError
from pmod.format import FLOAT_DTYPES

RUNS = ("transformers", "pmod dense", "pmod p-MoD")


def compare(path, vision: list[int], text: int, n_decode: int, repeat: int, dtype: str, device: str | None,
            profile=None) -> list:
    """Rows ``{vision_tokens, run, prefill_s, decode_tok_s}``, medians over ``repeat`` passes.

    ``profile(vision_tokens, run, table)``: where given, each run gets one more pass per vision
    count under torch's profiler, whose op table (self time, by input shapes) it is handed."""
    peer = tool("transformers_peer", "the transformers comparison")(path, dtype=dtype, device=device)
    models = {"transformers": peer,
              "pmod dense": open_engine(path, backend="torch", dtype=dtype, device=device, dense=True),
              "pmod p-MoD": open_engine(path, backend="torch", dtype=dtype, device=device)}
    rows = []
    for n in vision:
        emb, mask = make_prompt(models["pmod dense"], n, text)

        def run(name):
            model = models[name]
            for other in models.values():  # nothing of another run's context held meanwhile
                if other is not model:  # (timed_pass resets its own)
                    other.reset()
            return timed_pass(model, emb, None if name == "transformers" else mask, n_decode)

        times = {name: [] for name in models}
        for i in range(1 + repeat):  # a warm-up pass each, then the timed ones
            for name in models:
                t = run(name)
                if i:
                    times[name].append(t)
        if profile is not None:
            for name in models:
                with tool("torch_op_profile", "--profile")(device) as ops:
                    run(name)
                profile(n, name, ops.table())
        for name in RUNS:
            prefill = statistics.median(t[0] for t in times[name])
            decode = statistics.median(t[1] for t in times[name])
            rows.append(dict(vision_tokens=n, run=name, prefill_s=prefill,
                             decode_tok_s=n_decode / decode if n_decode else None))
    return rows


def format_table(rows: list) -> str:
    """Markdown: per vision count, the three runs, with prefill speedups over transformers."""
    base = {r["vision_tokens"]: r for r in rows if r["run"] == "transformers"}
    lines = ["| vision tokens | run | prefill (ms) | vs transformers | decode (tok/s) | vs transformers |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        b = base[r["vision_tokens"]]
        dec = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"
        dec_x = "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s'] / b['decode_tok_s']:.2f}x"
        lines.append(f"| {r['vision_tokens']} | {r['run']} | {fmt_ms(r['prefill_s'])} | "
                     f"{b['prefill_s'] / r['prefill_s']:.2f}x | {dec} | {dec_x} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="torch_vs_transformers.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="next-proxy", choices=RANDOM_PRESETS)
    p.add_argument("--model", help="a pmod checkpoint directory instead of a preset")
    p.add_argument("--vision-tokens", default="576,1440,2880")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=list(FLOAT_DTYPES))
    p.add_argument("--device", help="cpu (default) or cuda")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--profile", action="store_true",
                   help="after the timed passes, one more per run and vision count under torch's profiler: "
                        "its table of ops by self time (attention kernels, masks, gathers, KV copies)")
    args = p.parse_args(argv)
    try:
        vision = [int(v) for v in args.vision_tokens.split(",")]
        if args.repeat < 1 or args.decode_tokens < 0 or any(v < 0 for v in vision):
            raise ValueError
    except ValueError:
        print("torch_vs_transformers.py: error: --vision-tokens takes whole numbers >= 0, --repeat >= 1, "
              "--decode-tokens >= 0", file=sys.stderr)
        return 2
    try:
        path = args.model or preset_checkpoint(args.preset, args.dtype)
        show = (lambda n, run, table: print(f"### {run}, {n} vision tokens: prefill + {args.decode_tokens} "
                                            f"greedy steps\n{table}", flush=True)) if args.profile else None
        rows = compare(path, vision, args.text_tokens, args.decode_tokens, args.repeat, args.dtype, args.device,
                       show)
    except PmodError as e:
        print(f"torch_vs_transformers.py: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if args.json:
        doc = dict(model=str(path), text_tokens=args.text_tokens, decode_tokens=args.decode_tokens,
                   repeat=args.repeat, dtype=args.dtype, device=args.device or "cpu", rows=rows)
        try:
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        except OSError as e:
            print(f"torch_vs_transformers.py: error: cannot write --json {args.json}: {e.strerror or e}",
                  file=sys.stderr)
            return 2
    return 0
