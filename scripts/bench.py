#!/usr/bin/env python
"""The README's benchmark table: run ``pmod bench`` (or read its JSON) and print it as Markdown.

    python scripts/bench.py --preset next-proxy --backend mlx,torch,onnx     # runs pmod bench
    python scripts/bench.py --from-json bench.json --readme README.md       # rewrites README's table

Arguments other than the three below go to ``pmod bench`` unchanged (its own table, progress
and notes still appear). ``--json OUT`` keeps pmod bench's JSON. ``--readme FILE`` replaces the text
between ``<!-- bench -->`` and ``<!-- /bench -->`` in FILE with the table; without it the
table goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from pmod.app.bench import check_schema, fmt_bytes, fmt_ms, retention_note, speedups
from pmod.app.cli import main as pmod_main
from pmod.errors import PmodError

BEGIN, END = "<!-- bench -->", "<!-- /bench -->"


def markdown(doc: dict) -> str:
    """One row per (backend, vision tokens): dense next to p-MoD."""
    cfg, m = doc["config"], doc["machine"]
    what = f"preset `{cfg['preset']}`" if cfg["preset"] else f"`{Path(cfg['model']).name}`"
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items() if v and k != "pmod")
    lines = [f"{what}{retention_note(cfg)}, {cfg['text_tokens']} text tokens, {cfg['decode_tokens']} decode steps, "
             f"median of {cfg['repeat']}; {m['cpu'] or m['machine']} ({m['cpu_count']} CPUs); {versions}.", "",
             "| backend | vision tokens | prefill dense (ms) | prefill p-MoD (ms) | speedup | decode dense (tok/s) "
             "| decode p-MoD (tok/s) | KV dense | KV p-MoD | peak mem dense | peak mem p-MoD "
             "| p-MoD GFLOP/s (% of matmul peak) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = {(r["backend"], r["mode"], r["vision_tokens"]): r for r in doc["results"]}
    up = speedups(doc)
    for (b, n), s in up.items():
        d, p = rows[(b, "dense", n)], rows[(b, "pmod", n)]
        peak = doc["backends"][b].get("matmul_peak")
        share = f" ({100 * p['gflops'] / peak['gflops']:.0f}%)" if peak else ""
        tok = lambda r: "-" if r["decode_tok_s"] is None else f"{r['decode_tok_s']:.1f}"  # noqa: E731
        lines.append(f"| {b} | {n} | {fmt_ms(d['prefill_s']['median'])} | {fmt_ms(p['prefill_s']['median'])} "
                     f"| {s:.2f}x | {tok(d)} | {tok(p)} | {fmt_bytes(d['kv_bytes'])} | {fmt_bytes(p['kv_bytes'])} "
                     f"| {fmt_bytes(d['peak_mem_bytes'])} | {fmt_bytes(p['peak_mem_bytes'])} | {p['gflops']:.1f}{share} |")
    return "\n".join(lines)


def _read(path) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise SystemExit(f"scripts/bench.py: cannot read {path}: {e.strerror or e}") from None


def replace_block(path: Path, table: str) -> None:
    text = _read(path)
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise SystemExit(f"scripts/bench.py: {path} has no {BEGIN} ... {END} block to replace")
    path.write_text(text[:start + len(BEGIN)] + "\n" + table + "\n" + text[end:])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--from-json", metavar="FILE", help="a 'pmod bench --json' file instead of a new run")
    p.add_argument("--json", metavar="OUT", help="keep pmod bench's JSON here (default: a temporary file)")
    p.add_argument("--readme", metavar="FILE", help=f"replace the {BEGIN} block of FILE with the table")
    args, bench_args = p.parse_known_args(argv)
    if args.from_json:
        try:
            doc = json.loads(_read(args.from_json))
        except json.JSONDecodeError as e:
            raise SystemExit(f"scripts/bench.py: {args.from_json} is not JSON ({e})") from None
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(args.json) if args.json else Path(tmp) / "bench.json"
            rc = pmod_main(["bench", *bench_args, "--json", str(out)])
            if rc:
                return rc
            doc = json.loads(out.read_text())
    try:
        check_schema(doc)
    except PmodError as e:
        raise SystemExit(f"scripts/bench.py: {args.from_json}: {e}") from None
    table = markdown(doc)
    if args.readme:
        replace_block(Path(args.readme), table)
        print(f"wrote the table into {args.readme}", file=sys.stderr)
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
