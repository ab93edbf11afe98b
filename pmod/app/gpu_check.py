"""``python scripts/gpu_check.py --out DIR``: everything a lent GPU should run, in one command.

Stages, each reported ``ok``, ``failed`` or ``skipped`` with its reason (one failing stage
does not stop the others), in ``DIR/gpu_check.json`` and ``DIR/gpu_check.md``:

* ``runtimes``: what each runtime package reports (``pmod info --system``'s facts).
* ``checkpoint``: the preset's config alone: torch draws its seeded random weights on the device
  (``seeded_weights``; a 7B model in seconds, nothing built on the host or the disk).
* ``torch``: torch on ``--device`` (dense and p-MoD) against the float32 CPU run of the same
  weights (drawn the same way, then moved to the CPU) on a short prompt: largest logit error, greedy tokens where the top-1 margin is clear, and
  the layers whose caches hold other tokens (a routing tie decided otherwise in float16).
* ``onnx``, ``trt``: ONNX Runtime on CUDA and TensorRT, when installed and given a GPU: the
  preset's checkpoint built (once, cached), exported (and built), then the same comparison
  against torch on the CPU on that checkpoint; skipped with the reason otherwise.
* ``bench``: ``pmod bench`` on the backends that passed (none without torch), dense vs p-MoD at each vision count
  (prefill and decode timed by CUDA events on a GPU, KV bytes held against ``pmod.flops``,
  memory), its JSON, table and plot; torch alone on the drawn weights, with ONNX Runtime or
  TensorRT on the built checkpoint.

Prepared and tested on the CPU (``--device cpu --preset tiny`` runs in the test suite) so that
a GPU only has to run it: ``--device cuda --preset next-7b`` there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from pmod.app.bench import check_schema, format_table, make_plan, preset_checkpoint, run_bench, write_plot
from pmod.app.bench.cache import onnx_export, trt_engines
from pmod.app.bench.presets import RANDOM_PRESETS, SEED, preset_config_dir
from pmod.app.bench.worker import make_prompt
from pmod.app.registry import RUNTIMES, load, open_engine
from pmod.errors import PmodError, first_line
from pmod.format import FLOAT_DTYPES

#: the greedy comparison: tokens decoded after the prompt
STEPS = 8


class Skip(Exception):
    """A stage that cannot run here; its message says why."""


def _compare(engine, ref, emb, mask) -> dict:
    """Logits of ``engine`` against ``ref`` (same prompt, greedy on ``ref``'s tokens)."""
    got, want = [engine.prefill(inputs_embeds=emb, vision_mask=mask)], [ref.prefill(inputs_embeds=emb, vision_mask=mask)]
    for _ in range(STEPS):
        token = int(np.argmax(want[-1]))
        got.append(engine.decode(token))
        want.append(ref.decode(token))
    held = [np.array_equal(a, b) for a, b in zip(engine.kept_positions(), ref.kept_positions())]
    got, want = np.array(got), np.array(want)
    top2 = np.sort(want, axis=-1)[:, -2:]
    scale = max(1.0, float(np.abs(want).max()))
    err = float(np.abs(got - want).max())
    clear = (top2[:, 1] - top2[:, 0]) > 4 * err
    same = bool((np.argmax(got, -1) == np.argmax(want, -1))[clear].all())
    return dict(max_abs_err=err, rel_err=err / scale, greedy_equal=same, clear_steps=int(clear.sum()),
                kv_lengths_equal=engine.kv_lengths() == ref.kv_lengths(),
                layers_keeping_other_tokens=[l for l, same in enumerate(held) if not same])


def _check_against_cpu(path, backend: str, tol: float, n_vision: int, engine_path=None, seeded: bool = False,
                       **kwargs) -> dict:
    """``backend`` (dense and p-MoD; opened on ``engine_path``, an export of ``path``, where
    given) against torch float32 on the CPU on ``path`` (``seeded``: both draw the preset's
    weights), on one short prompt."""
    out, seed = {}, dict(seeded_weights=SEED) if seeded else {}
    for mode in ("dense", "pmod"):
        ref = open_engine(path, backend="torch", dtype="float32", dense=mode == "dense", **seed)
        engine = open_engine(engine_path or path, backend=backend, dense=mode == "dense", **seed, **kwargs)
        emb, mask = make_prompt(ref, n_vision, 16)
        out[mode] = r = _compare(engine, ref, emb, mask)
        del ref, engine  # one CPU float32 copy of a 7B model at a time
        if not (r["rel_err"] <= tol and r["greedy_equal"] and r["kv_lengths_equal"]):
            raise PmodError(f"{backend} {mode} differs from the CPU float32 run: {r}")
    return out


def run_checks(args) -> list[dict]:
    """Every stage, in order: ``{name, status, reason?, seconds, details?}``."""
    stages, ctx = [], {}
    gpu = args.device != "cpu"
    dtype = args.dtype or ("float16" if gpu else "float32")
    tol = {"float32": 1e-4, "float16": 3e-2, "bfloat16": 1.5e-1}[dtype]

    def stage(name, fn):
        t0 = time.perf_counter()
        try:
            entry = dict(name=name, status="ok", details=fn())
        except Skip as e:
            entry = dict(name=name, status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001 - a failing stage is reported, the others still run
            entry = dict(name=name, status="failed", reason=first_line(e),
                         where=traceback.format_exception(e)[-2].strip() if not isinstance(e, PmodError) else None)
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        stages.append(entry)
        print(f"gpu_check: {name}: {entry['status']}" + (f" ({entry['reason']})" if "reason" in entry else ""),
              file=sys.stderr, flush=True)
        return entry["status"] == "ok"

    def runtimes():
        for name, (target, extra) in RUNTIMES.items():
            try:
                ctx[name] = load(target, extra, f"the {name} runtime is not installed")()
            except Exception as e:  # noqa: BLE001 - reported per runtime
                ctx[name] = dict(error=first_line(e))
        return {name: ctx[name] for name in RUNTIMES}

    def checkpoint():
        ctx["path"] = path = preset_config_dir(args.preset)
        return dict(path=str(path), weights="seeded, drawn by torch on the device")

    def built():
        """The preset's checkpoint on disk, for the exported backends (built on first use)."""
        if "built" not in ctx:
            ctx["built"] = preset_checkpoint(args.preset, dtype)
        return ctx["built"]

    n_check = min(min(args.vision), 64)  # a short prompt: the float32 CPU run of a 7B model stays quick

    def torch_stage():
        return _check_against_cpu(ctx["path"], "torch", tol, n_check, seeded=True, dtype=dtype, device=args.device)

    def onnx_stage():
        if not gpu:
            raise Skip("ONNX Runtime on CUDA needs --device cuda (the CPU path is tested by the suite)")
        if not ctx.get("export", {}).get("onnxruntime"):
            raise Skip("onnxruntime is not installed")
        providers = ctx["export"]["providers"]
        if "CUDAExecutionProvider" not in providers:
            raise Skip(f"onnxruntime has no CUDAExecutionProvider (providers: {', '.join(providers)}): "
                       "pip install onnxruntime-gpu")
        export = onnx_export(built(), max(args.vision), dtype, 1.0)
        return _check_against_cpu(built(), "onnx", tol, n_check, engine_path=export)

    def trt_stage():
        if not gpu:
            raise Skip("TensorRT needs --device cuda")
        if not ctx.get("trt", {}).get("tensorrt"):
            raise Skip("tensorrt is not installed (pip install 'pmod[trt]' on a machine with an NVIDIA GPU)")
        engines = trt_engines(built(), max(args.vision), dtype, 1.0)
        return _check_against_cpu(built(), "trt", tol, n_check, engine_path=engines)

    def bench():
        backends = ["torch"] + [b for b in ("onnx", "trt") if ctx.get(f"{b}_ok")]
        plan = make_plan(SimpleNamespace(
            model=None, preset=args.preset, backend=",".join(backends), vision_tokens=",".join(map(str, args.vision)),
            text_tokens=args.text_tokens, decode_tokens=args.decode_tokens, repeat=args.repeat, dtype=dtype,
            profile=False, retention=None, json=None, plot=None, device=args.device, seeded_weights=backends == ["torch"]))
        doc = run_bench(plan)
        check_schema(doc)
        (args.out / "bench.json").write_text(json.dumps(doc, indent=1) + "\n")
        (args.out / "bench.md").write_text(format_table(doc) + "\n")
        try:
            write_plot(doc, args.out / "bench.png")
        except PmodError as e:  # matplotlib missing: the table and JSON still stand
            print(f"gpu_check: no plot ({e})", file=sys.stderr)
        return dict(backends=backends, rows=len(doc["results"]))

    def no_bench():
        raise Skip("the torch stage failed: its figures would not be worth having")

    stage("runtimes", runtimes)
    if stage("checkpoint", checkpoint):
        torch_ok = stage("torch", torch_stage)
        ctx["onnx_ok"] = stage("onnx", onnx_stage)
        ctx["trt_ok"] = stage("trt", trt_stage)
        stage("bench", bench if torch_ok else no_bench)
    return stages


def summary(stages: list[dict], args) -> str:
    lines = [f"# gpu_check: preset {args.preset}, device {args.device}", "",
             "| stage | status | seconds | reason |", "|---|---|---:|---|"]
    for s in stages:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s.get('reason') or ''} |")
    if any(s["name"] == "bench" and s["status"] == "ok" for s in stages):
        lines += ["", (args.out / "bench.md").read_text().rstrip()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json/.md and the bench files")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a rehearsal)")
    p.add_argument("--preset", default="next-7b", choices=RANDOM_PRESETS)
    p.add_argument("--dtype", choices=list(FLOAT_DTYPES), help="default: float16 on a GPU, float32 on the CPU")
    p.add_argument("--vision-tokens", default="576,1440,2880")
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    try:
        args.vision = [int(v) for v in args.vision_tokens.split(",")]
    except ValueError:
        print(f"gpu_check.py: error: --vision-tokens takes whole numbers, got {args.vision_tokens!r}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("bench.json", "bench.md", "bench.png"):  # nothing of an earlier run passes for this one's
        (args.out / name).unlink(missing_ok=True)
    stages = run_checks(args)
    (args.out / "gpu_check.json").write_text(json.dumps(dict(preset=args.preset, device=args.device,
                                                             stages=stages), indent=1) + "\n")
    text = summary(stages, args)
    (args.out / "gpu_check.md").write_text(text)
    print(text)
    return 1 if any(s["status"] == "failed" for s in stages) else 0
