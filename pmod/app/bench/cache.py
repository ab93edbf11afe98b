"""What ``pmod bench`` builds once and keeps: the cache folder, its keys, and the ONNX
graphs and TensorRT engines of a checkpoint (``pmod export onnx`` / ``pmod trt build`` in
subprocesses, once per checkpoint, N, dtype, retention and target)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pmod.config import FORMAT_VERSION
from pmod.static.manifest import MANIFEST_VERSION
from pmod.app.bench.processes import note, run_pmod

CACHE_ENV = "PMOD_CACHE"


def cache_root() -> Path:
    """``$PMOD_CACHE``, else ``$XDG_CACHE_HOME/pmod``, else ``~/.cache/pmod``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "pmod"


def digest(obj) -> str:
    """A short hash of ``obj`` (JSON with sorted keys): the key of a cached build."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _identity(ckpt: Path) -> dict:
    """What a cached export depends on: the checkpoint's place and its files' sizes and times."""
    files = sorted(p for p in ckpt.iterdir() if p.is_file())
    return dict(path=str(ckpt.resolve()), files=[(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def onnx_export(ckpt: Path, max_vision: int, dtype: str, retention: float = 1.0, target: str = "ort") -> Path:
    """``pmod export onnx`` of ``ckpt`` for ``N = max_vision`` at ``retention`` (its ratios are
    built in) for ``target``, once per (checkpoint, N, dtype, retention, target, manifest version)."""
    key = digest(dict(ckpt=_identity(ckpt), N=max_vision, dtype=dtype, retention=retention, format=FORMAT_VERSION,
                      target=target, manifest=MANIFEST_VERSION))
    out = cache_root() / "bench" / "onnx" / f"{ckpt.name}-N{max_vision}-{dtype}-S{retention:g}-{target}-{key}"
    if not out.is_dir():
        note(f"exporting ONNX graphs (N = {max_vision}, {dtype}, retention {retention:g}, target {target}) once to {out}")
        run_pmod(["export", "onnx", "--model", str(ckpt), "--out", str(out), "--max-vision-tokens", str(max_vision),
                  "--dtype", dtype, "--retention", str(retention), "--target", target], "the ONNX export")
    return out


def trt_engines(ckpt: Path, max_vision: int, dtype: str | None, retention: float = 1.0) -> Path:
    """``pmod trt build`` over the cached ONNX export, once per (checkpoint, N, precision, retention)."""
    precision = {"float16": "fp16", "bfloat16": "bf16"}.get(dtype or "float32", "fp32")
    graphs = onnx_export(ckpt, max_vision, "float16" if precision == "fp16" else "float32", retention, "trt")
    out = graphs.parent.parent / "trt" / f"{graphs.name}-{precision}"
    if not out.is_dir():
        note(f"building TensorRT engines ({precision}) once to {out}")
        run_pmod(["trt", "build", "--onnx", str(graphs), "--out", str(out), "--precision", precision,
                  "--no-progress"], "the TensorRT build")
    return out
