"""``pmod bench``: plan, export once, run a worker per (backend, mode), report."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from pmod.errors import PmodError
from pmod.app.bench.cache import onnx_export, trt_engines
from pmod.app.bench.plan import MODES, Plan, make_plan, missing
from pmod.app.bench.presets import SEED
from pmod.app.bench.processes import note, spawn_worker
from pmod.app.bench.report import format_profile, format_table, mode_label, write_plot
from pmod.app.bench.schema import check_schema


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name, dists in (("pmod", ["pmod"]), ("numpy", ["numpy"]), ("mlx", ["mlx"]), ("torch", ["torch"]),
                        ("onnx", ["onnx"]), ("onnxruntime", ["onnxruntime", "onnxruntime-gpu"]),
                        ("tensorrt", ["tensorrt"])):
        out[name] = None
        for dist in dists:
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def _machine() -> dict:
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    total = None
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    return dict(system=platform.system(), release=platform.release(), machine=platform.machine(), cpu=cpu,
                cpu_count=os.cpu_count(), memory_bytes=total, python=platform.python_version())


def run_bench(plan: Plan) -> dict:
    """Run every (backend, mode) worker of ``plan``; return the result document (see SCHEMA)."""
    from tqdm import tqdm

    skipped, paths = [], {}
    for b in plan.backends:
        why = missing(b)
        if why is None and b == "onnx":
            from pmod.static.contract import EXPORT_DTYPES

            if (plan.dtype or "float32") not in EXPORT_DTYPES:
                why = f"the ONNX export has no {plan.dtype} (--dtype {' or '.join(EXPORT_DTYPES)})"
        if why is not None:
            skipped.append(dict(backend=b, reason=why))
            note(f"{b} skipped: {why}")
            continue
        if b == "onnx":
            paths[b] = onnx_export(plan.checkpoint, max(plan.vision), plan.dtype or "float32", plan.retention)
        elif b == "trt":
            paths[b] = trt_engines(plan.checkpoint, max(plan.vision), plan.dtype, plan.retention)
        else:
            paths[b] = plan.checkpoint
    if not paths:
        raise PmodError("no backend to run: " + "; ".join(f"{s['backend']} {s['reason']}" for s in skipped))

    backends, results, profile = {}, [], []
    with tqdm(total=len(paths) * len(MODES) * len(plan.vision), unit="run", disable=None, leave=False,
              file=sys.stderr) as bar:
        for b, path in paths.items():
            info = dict(path=str(path), matmul_peak=None)
            for i, mode in enumerate(MODES):
                bar.set_description(f"{b} {mode_label(mode)}")
                spec = dict(backend=b, mode=mode, path=str(path), dtype=plan.dtype, vision=plan.vision,
                            text=plan.text, decode=plan.decode, repeat=plan.repeat, profile=plan.profile,
                            retention=plan.retention, peak=i == 0, seed=SEED,
                            device=plan.device if b == "torch" else None,
                            seeded_weights=SEED if plan.seeded else None)
                got = spawn_worker(spec, lambda row: bar.update(1))
                info.update(got["info"] or {})
                if got["peak"] is not None:
                    info["matmul_peak"] = got["peak"]
                results += got["rows"]
                profile += got["profile"]
            backends[b] = info
    return dict(
        schema="pmod-bench/1",
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine=_machine(),
        versions=_versions(),
        config=dict(model=plan.model, preset=plan.preset, checkpoint=str(plan.checkpoint),
                    backends=plan.backends, vision_tokens=plan.vision, text_tokens=plan.text,
                    decode_tokens=plan.decode, repeat=plan.repeat, dtype=plan.dtype, profile=plan.profile,
                    retention=plan.retention, seed=SEED, model_config=plan.config.to_dict()),
        backends=backends, skipped=skipped, results=results, profile=profile)


def run_bench_command(args) -> None:
    """``pmod bench``: plan, run, print the tables, write ``--json`` and ``--plot``."""
    plan = make_plan(args)
    doc = run_bench(plan)
    check_schema(doc)
    print(format_table(doc))
    if plan.profile:
        print()
        print(format_profile(doc))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")
        except OSError as e:
            raise PmodError(f"cannot write --json {args.json}: {e.strerror or e}") from None
        note(f"wrote {args.json}")
    if args.plot:
        write_plot(doc, args.plot)
        note(f"wrote {args.plot}")
