"""``manifest.json`` of an export directory (``pmod export onnx``) or an engine directory
(``pmod trt build``): one schema, one writer, one reader.

Both formats hold the same description of the graphs (target, dtype, the vision form with its
maximum ``N`` or its buckets, context, per-layer capacities and ratios, retention, KV layout,
the source config, every graph's file and I/O); an engine directory adds what TensorRT needs
(``engine``: TensorRT version, GPU, precision, build settings; per graph its optimisation
profiles and the ONNX file it was built from). The reader checks everything a runtime relies
on and refuses anything else in one line that says how to redo the directory.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pmod.config import FORMAT_VERSION, PmodConfig
from pmod.errors import PmodError
from pmod.schedule import capacities, check_retention
from pmod.static.contract import TARGETS, bucket_graph

MANIFEST = "manifest.json"
EXPORT_FORMAT, ENGINE_FORMAT = "pmod-onnx", "pmod-trt"
MANIFEST_VERSION = 2
FORMS = ("shape", "buckets")
FIX = {EXPORT_FORMAT: "re-export it with 'pmod export onnx'",
       ENGINE_FORMAT: "rebuild it with 'pmod trt build --onnx EXPORT_DIR --out DIR'"}
_WHAT = {EXPORT_FORMAT: "an ONNX export", ENGINE_FORMAT: "a TensorRT engine directory"}
_MAKE = {EXPORT_FORMAT: "write one with 'pmod export onnx --model DIR --out DIR'",
         ENGINE_FORMAT: "build one with 'pmod trt build --onnx EXPORT_DIR --out DIR'"}
_OTHER = {EXPORT_FORMAT: " (an engine directory: pass the ONNX export it was built from)",
          ENGINE_FORMAT: " (an ONNX export: use --backend onnx, or build engines from it with 'pmod trt build')"}
_CHECKPOINT = {EXPORT_FORMAT: " (it is a pmod checkpoint: use --backend torch or mlx, or export it first)",
               ENGINE_FORMAT: " (a pmod checkpoint: export it with 'pmod export onnx --target trt', then build engines)"}


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, float16, int32, bool
    shape: list  # ints, and strings for dynamic dimensions


@dataclass
class GraphSpec:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: str | None = None
    source: str | None = None  # engines: the ONNX file the engine was built from
    profiles: list | None = None  # engines: TensorRT optimisation profiles (dicts, or pmod_trt.profiles.Profile)

    def to_dict(self) -> dict:
        d = {"file": self.file, "external_data": self.external_data,
             "inputs": [asdict(t) for t in self.inputs], "outputs": [asdict(t) for t in self.outputs]}
        if self.source is not None:
            d["source"] = self.source
        if self.profiles is not None:  # read_engine_manifest holds Profile objects: written as their dicts
            d["profiles"] = [p.to_dict() if hasattr(p, "to_dict") else dict(p) for p in self.profiles]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        specs = lambda items: [TensorSpec(str(t["name"]), str(t["dtype"]), list(t["shape"])) for t in items]  # noqa: E731
        profiles = d.get("profiles")
        return cls(file=str(d["file"]), inputs=specs(d["inputs"]), outputs=specs(d["outputs"]),
                   external_data=d.get("external_data"), source=d.get("source"),
                   profiles=None if profiles is None else [dict(p) for p in profiles])


@dataclass
class Manifest:
    format: str  # EXPORT_FORMAT or ENGINE_FORMAT
    target: str  # ort | trt
    dtype: str
    max_vision_tokens: int  # N: the most routed vision tokens one chunk may carry
    max_context: int
    opset: int
    form: str  # shape: one prefill graph for any n <= N; buckets: one graph per bucket
    capacities: list[int]  # kept_count(N, r_l) per layer = pmod.schedule.capacities(config, N, retention)
    layer_ratios: list  # r_l at that retention, None for dense layers (informative)
    kv: dict  # num_layers, num_key_value_heads, head_dim, layout
    config: dict  # the source checkpoint's config.json
    graphs: dict[str, GraphSpec]
    buckets: list[int] | None = None  # form buckets: the vision slots of each prefill graph
    retention: float = 1.0
    lint: dict = field(default_factory=dict)
    engine: dict = field(default_factory=dict)  # ENGINE_FORMAT: tensorrt_version, gpu, precision, build
    pmod_format_version: int = FORMAT_VERSION

    @property
    def pmod_config(self) -> PmodConfig:
        return PmodConfig.from_dict(self.config)

    @property
    def fix(self) -> str:
        return FIX[self.format]

    def prefill_graphs(self) -> list[str]:
        """The prefill graph names this form needs (none when ``N = 0``)."""
        if not self.max_vision_tokens:
            return []
        return [bucket_graph(b) for b in self.buckets] if self.form == "buckets" else ["prefill"]

    def to_dict(self) -> dict:
        d = {"format": self.format, "manifest_version": MANIFEST_VERSION,
             "pmod_format_version": self.pmod_format_version, "target": self.target, "dtype": self.dtype,
             "max_vision_tokens": self.max_vision_tokens, "max_context": self.max_context, "opset": self.opset,
             "form": self.form, "buckets": self.buckets, "capacities": list(self.capacities),
             "layer_ratios": list(self.layer_ratios), "retention": self.retention, "kv": dict(self.kv),
             "config": dict(self.config), "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
             "lint": dict(self.lint)}
        if self.engine:
            d["engine"] = dict(self.engine)
        return d

    def write(self, directory) -> None:
        (Path(directory) / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_manifest(directory, fmt: str = EXPORT_FORMAT) -> Manifest:
    """Read and check ``directory/manifest.json`` of format ``fmt`` and that every file it lists exists."""
    directory = Path(directory)
    fix = FIX[fmt]
    if not directory.is_dir():
        raise PmodError(f"{_WHAT[fmt].split(' ', 1)[1]} {directory} does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        hint = _CHECKPOINT[fmt] if (directory / "config.json").is_file() else ""
        raise PmodError(f"{directory} has no {MANIFEST}, so it is not {_WHAT[fmt]}{hint}: {_MAKE[fmt]}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PmodError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(d, dict):
        raise PmodError(f"{path} is not a JSON object; {fix}")
    if d.get("format") != fmt:
        other = _OTHER[fmt] if d.get("format") in FIX else ""
        kind = "ONNX" if fmt == EXPORT_FORMAT else "TensorRT"
        raise PmodError(f"{path} is not a pmod {kind} manifest (format {d.get('format')!r}){other}; {fix}")
    version = d.get("manifest_version")
    if version != MANIFEST_VERSION:
        older = " (written by an older pmod, before graphs followed the vision count)" if version == 1 else ""
        raise PmodError(f"{path}: manifest version {version!r}{older} is not supported by this pmod "
                        f"(expects {MANIFEST_VERSION}); {fix}")
    if d.get("pmod_format_version") != FORMAT_VERSION:
        raise PmodError(f"{path}: pmod format version {d.get('pmod_format_version')!r} is not supported "
                        f"(expects {FORMAT_VERSION}); {fix}")
    try:
        buckets = d.get("buckets")
        m = Manifest(
            format=fmt, target=str(d["target"]), dtype=str(d["dtype"]), max_vision_tokens=int(d["max_vision_tokens"]),
            max_context=int(d["max_context"]), opset=int(d["opset"]), form=str(d["form"]),
            capacities=[int(c) for c in d["capacities"]], layer_ratios=list(d["layer_ratios"]), kv=dict(d["kv"]),
            config=dict(d["config"]), graphs={str(k): GraphSpec.from_dict(v) for k, v in d["graphs"].items()},
            buckets=None if buckets is None else [int(b) for b in buckets],
            retention=check_retention(d.get("retention", 1.0)), lint=dict(d.get("lint") or {}),
            engine=dict(d.get("engine") or {}), pmod_format_version=d["pmod_format_version"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PmodError(f"{path} lacks or mangles {e}; {fix}") from None
    except PmodError as e:
        raise PmodError(f"{path}: {e}; {fix}") from None
    _check(m, path, directory)
    return m


def _check(m: Manifest, path: Path, directory: Path) -> None:
    fix = m.fix
    if m.target not in TARGETS:
        raise PmodError(f"{path}: unknown target {m.target!r} (expects one of {', '.join(TARGETS)}); {fix}")
    if m.form not in FORMS:
        raise PmodError(f"{path}: unknown vision form {m.form!r} (expects one of {', '.join(FORMS)}); {fix}")
    if m.form == "buckets" and (not m.buckets or m.buckets != sorted(set(m.buckets)) or m.buckets[0] < 1
                                or m.buckets[-1] != m.max_vision_tokens):
        raise PmodError(f"{path}: buckets {m.buckets} must increase and end at max_vision_tokens "
                        f"{m.max_vision_tokens}; {fix}")
    need = ["embed", "decode"] + m.prefill_graphs()
    unknown = [g for g in m.graphs if g not in need and g != "vision"]
    missing = [g for g in need if g not in m.graphs]
    if unknown or missing:
        what = f"unknown graph {unknown[0]!r}" if unknown else f"graph '{missing[0]}' is missing"
        raise PmodError(f"{path} lists graphs {sorted(m.graphs)}: {what}; {fix}")
    want = capacities(m.pmod_config, m.max_vision_tokens, m.retention)
    if m.capacities != want:
        raise PmodError(f"{path}: capacities {m.capacities} do not match the schedule of its config for "
                        f"N = {m.max_vision_tokens} at retention {m.retention:g} ({want}); {fix}")
    for name, g in m.graphs.items():
        for f in (g.file, g.external_data):
            if f and not (directory / f).is_file():
                raise PmodError(f"{directory / f} is missing (graph '{name}' in {MANIFEST}); {fix}")


def check_io(manifest_path: Path, spec: GraphSpec, actual_inputs, actual_outputs, fix: str,
             ordered: bool = True) -> None:
    """Refuse a graph whose inputs/outputs differ from the manifest's (names, dtypes, ranks, fixed dims;
    with ``ordered``, the order too: ONNX Runtime binds by position as well as name).

    ``actual_*``: ``[(name, dtype, shape)]`` as the runtime sees the graph (dynamic dims as
    strings, None or negative numbers).
    """
    for side, want, got in (("input", spec.inputs, actual_inputs), ("output", spec.outputs, actual_outputs)):
        want_names, got_names = [t.name for t in want], [n for n, _, _ in got]
        if (want_names != got_names) if ordered else (set(want_names) != set(got_names)):
            diff = sorted(set(want_names) ^ set(got_names)) or ["(order)"]
            raise PmodError(f"{manifest_path} does not match {spec.file}: {side}s differ at {diff[0]} "
                            f"({len(want_names)} listed, {len(got_names)} in the graph); {fix}")
        by_name = {n: (dtype, shape) for n, dtype, shape in got}
        for t in want:
            dtype, shape = by_name[t.name]
            shape = list(shape)
            fixed_ok = len(shape) == len(t.shape) and all(
                not isinstance(a, int) or not isinstance(b, int) or b < 0 or a == b for a, b in zip(t.shape, shape))
            if dtype != t.dtype or not fixed_ok:
                raise PmodError(f"{manifest_path} does not match {spec.file}: {side} '{t.name}' is "
                                f"{dtype} {shape} in the graph, {t.dtype} {t.shape} in the manifest; {fix}")
