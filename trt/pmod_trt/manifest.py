"""The two manifests pmod_trt reads: an ONNX export's (input) and an engine directory's (output).

``OnnxExport`` is read straight from the JSON ``pmod export onnx`` writes (docs/EXPORT.md,
``manifest.json``, format ``pmod-onnx`` version 1): pmod_trt may not import pmod_export, so
the checks here are the ones a build needs (format, version, keys, capacities against the
schedule, listed files present); the export's own reader checks the graphs themselves.

``EngineManifest`` is what ``pmod trt build`` writes next to the engines (format
``pmod-trt``): the export's facts the runtime needs (config, N, context, capacities, dtype,
each graph's inputs and outputs), plus the TensorRT version, the GPU (name, compute
capability), the precision and every engine's optimisation profiles. An engine is
specific to the TensorRT version and the GPU model it was built with; :func:`check_compatible`
refuses any other pairing with one line that says to rebuild.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pmod.config import FORMAT_VERSION, PmodConfig
from pmod.errors import PmodError
from pmod.schedule import capacities, check_retention

from .profiles import Profile

MANIFEST = "manifest.json"
ONNX_FORMAT, ONNX_VERSION = "pmod-onnx", 1
TRT_FORMAT, TRT_VERSION = "pmod-trt", 1
GRAPHS = ("embed", "vision", "prefill", "decode")
_REEXPORT = "re-export it with 'pmod export onnx'"
_REBUILD = "rebuild it with 'pmod trt build --onnx EXPORT_DIR --out DIR'"


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, float16, int32, bool
    shape: list  # ints, and strings for dynamic dimensions


def _specs(items) -> list[TensorSpec]:
    return [TensorSpec(name=str(t["name"]), dtype=str(t["dtype"]), shape=list(t["shape"])) for t in items]


@dataclass
class OnnxGraph:
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    external_data: str | None = None


@dataclass
class OnnxExport:
    """An ONNX export directory's manifest (the fields a TensorRT build uses)."""

    path: Path
    dtype: str
    max_vision_tokens: int
    max_context: int
    capacities: list[int]
    layer_ratios: list
    kv: dict
    config: dict
    graphs: dict[str, OnnxGraph]
    retention: float = 1.0  # the dial its capacities were built at

    @property
    def pmod_config(self) -> PmodConfig:
        return PmodConfig.from_dict(self.config)


def _load_json(path: Path, fix: str) -> dict:
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PmodError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(d, dict):
        raise PmodError(f"{path} is not a JSON object; {fix}")
    return d


def _retention(d: dict, path: Path, fix: str) -> float:
    """The manifest's ``retention`` (absent: 1, the trained schedule)."""
    try:
        return check_retention(d.get("retention", 1.0))
    except PmodError as e:
        raise PmodError(f"{path}: {e}; {fix}") from None


def read_onnx_export(directory) -> OnnxExport:
    """Read an ONNX export directory's ``manifest.json`` (written by ``pmod export onnx``)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PmodError(f"ONNX export directory {directory} does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        hint = (" (it is a pmod checkpoint: export it first)" if (directory / "config.json").is_file() else "")
        raise PmodError(f"{directory} has no {MANIFEST}, so it is not an ONNX export{hint}: write one with "
                        "'pmod export onnx --model DIR --out DIR --max-vision-tokens N'")
    d = _load_json(path, _REEXPORT)
    if d.get("format") != ONNX_FORMAT:
        extra = (" (an engine directory: pass the ONNX export it was built from)"
                 if d.get("format") == TRT_FORMAT else "")
        raise PmodError(f"{path} is not a pmod ONNX manifest (format {d.get('format')!r}){extra}; {_REEXPORT}")
    if d.get("manifest_version") != ONNX_VERSION or d.get("pmod_format_version") != FORMAT_VERSION:
        raise PmodError(f"{path}: manifest version {d.get('manifest_version')!r} / pmod format version "
                        f"{d.get('pmod_format_version')!r} are not supported by this pmod (expects {ONNX_VERSION} / "
                        f"{FORMAT_VERSION}); {_REEXPORT}")
    try:
        graphs = {str(k): OnnxGraph(file=str(v["file"]), external_data=v.get("external_data"),
                                    inputs=_specs(v["inputs"]), outputs=_specs(v["outputs"]))
                  for k, v in d["graphs"].items()}
        m = OnnxExport(path=directory, dtype=str(d["dtype"]), max_vision_tokens=int(d["max_vision_tokens"]),
                       max_context=int(d["max_context"]), capacities=[int(c) for c in d["capacities"]],
                       layer_ratios=list(d["layer_ratios"]), kv=dict(d["kv"]), config=dict(d["config"]), graphs=graphs,
                       retention=_retention(d, path, _REEXPORT))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PmodError(f"{path} lacks or mangles {e}; {_REEXPORT}") from None
    unknown = sorted(set(m.graphs) - set(GRAPHS))
    missing = [g for g in ("embed", "decode") + (("prefill",) if m.max_vision_tokens else ()) if g not in m.graphs]
    if unknown or missing:
        what = f"unknown graph {unknown[0]!r}" if unknown else f"graph '{missing[0]}' is missing"
        raise PmodError(f"{path}: {what}; {_REEXPORT}")
    want = capacities(m.pmod_config, m.max_vision_tokens, m.retention)
    if m.capacities != want:
        raise PmodError(f"{path}: capacities {m.capacities} do not match the schedule of its config for "
                        f"N = {m.max_vision_tokens} at retention {m.retention:g} ({want}); {_REEXPORT}")
    for name, g in m.graphs.items():
        for f in (g.file, g.external_data):
            if f and not (directory / f).is_file():
                raise PmodError(f"{directory / f} is missing (graph '{name}' in {MANIFEST}); {_REEXPORT}")
    return m


# ----------------------------------------------------------------------------- engine manifest
@dataclass
class EngineSpec:
    file: str  # <graph>.engine
    onnx: str  # the graph it was built from (file name in the export)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    profiles: list[Profile]

    def to_dict(self) -> dict:
        return {"file": self.file, "onnx": self.onnx, "inputs": [asdict(t) for t in self.inputs],
                "outputs": [asdict(t) for t in self.outputs], "profiles": [p.to_dict() for p in self.profiles]}

    @classmethod
    def from_dict(cls, d: dict) -> "EngineSpec":
        return cls(file=str(d["file"]), onnx=str(d["onnx"]), inputs=_specs(d["inputs"]), outputs=_specs(d["outputs"]),
                   profiles=[Profile.from_dict(p) for p in d["profiles"]])


@dataclass
class EngineManifest:
    tensorrt_version: str
    gpu: dict  # {"name": str, "compute_capability": "major.minor"}
    precision: str  # fp32 | fp16 | bf16
    dtype: str  # the export's (engine inputs and outputs, KV cache)
    max_vision_tokens: int
    max_context: int
    capacities: list[int]
    layer_ratios: list
    kv: dict
    config: dict
    engines: dict[str, EngineSpec]
    build: dict = field(default_factory=dict)  # strongly_typed, workspace_gb, timing_cache, source
    pmod_format_version: int = FORMAT_VERSION
    retention: float = 1.0  # the export's

    @property
    def pmod_config(self) -> PmodConfig:
        return PmodConfig.from_dict(self.config)

    def to_dict(self) -> dict:
        d = {"format": TRT_FORMAT, "manifest_version": TRT_VERSION, "pmod_format_version": self.pmod_format_version,
             "tensorrt_version": self.tensorrt_version, "gpu": dict(self.gpu), "precision": self.precision,
             "dtype": self.dtype, "max_vision_tokens": self.max_vision_tokens, "max_context": self.max_context,
             "capacities": list(self.capacities), "layer_ratios": list(self.layer_ratios),
             "retention": self.retention, "kv": dict(self.kv),
             "config": dict(self.config), "build": dict(self.build),
             "engines": {k: v.to_dict() for k, v in self.engines.items()}}
        return d

    def write(self, directory) -> None:
        (Path(directory) / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_engine_manifest(directory) -> EngineManifest:
    """Read and check an engine directory's ``manifest.json`` and that every engine file exists."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PmodError(f"engine directory {directory} does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        hint = (" (a pmod checkpoint: export it with 'pmod export onnx', then build engines)"
                if (directory / "config.json").is_file() else "")
        raise PmodError(f"{directory} has no {MANIFEST}, so it is not a TensorRT engine directory{hint}: "
                        "build one with 'pmod trt build --onnx EXPORT_DIR --out DIR'")
    d = _load_json(path, _REBUILD)
    if d.get("format") != TRT_FORMAT:
        hint = (" (an ONNX export: use --backend onnx, or build engines from it with 'pmod trt build')"
                if d.get("format") == ONNX_FORMAT else "")
        raise PmodError(f"{path} is not a pmod TensorRT manifest (format {d.get('format')!r}){hint}; {_REBUILD}")
    if d.get("manifest_version") != TRT_VERSION or d.get("pmod_format_version") != FORMAT_VERSION:
        raise PmodError(f"{path}: manifest version {d.get('manifest_version')!r} / pmod format version "
                        f"{d.get('pmod_format_version')!r} are not supported by this pmod (expects {TRT_VERSION} / "
                        f"{FORMAT_VERSION}); {_REBUILD}")
    try:
        m = EngineManifest(
            tensorrt_version=str(d["tensorrt_version"]),
            gpu={"name": str(d["gpu"]["name"]), "compute_capability": str(d["gpu"]["compute_capability"])},
            precision=str(d["precision"]), dtype=str(d["dtype"]), max_vision_tokens=int(d["max_vision_tokens"]),
            max_context=int(d["max_context"]), capacities=[int(c) for c in d["capacities"]],
            layer_ratios=list(d["layer_ratios"]), kv=dict(d["kv"]), config=dict(d["config"]),
            engines={str(k): EngineSpec.from_dict(v) for k, v in d["engines"].items()}, build=dict(d.get("build", {})),
            retention=_retention(d, path, _REBUILD))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PmodError(f"{path} lacks or mangles {e}; {_REBUILD}") from None
    missing = [g for g in ("embed", "decode") + (("prefill",) if m.max_vision_tokens else ()) if g not in m.engines]
    if missing:
        raise PmodError(f"{path}: engine '{missing[0]}' is missing; {_REBUILD}")
    want = capacities(m.pmod_config, m.max_vision_tokens, m.retention)
    if m.capacities != want:
        raise PmodError(f"{path}: capacities {m.capacities} do not match the schedule of its config for "
                        f"N = {m.max_vision_tokens} at retention {m.retention:g} ({want}); {_REBUILD}")
    for name, e in m.engines.items():
        if not (directory / e.file).is_file():
            raise PmodError(f"{directory / e.file} is missing (engine '{name}' in {MANIFEST}); {_REBUILD}")
    return m


def check_compatible(m: EngineManifest, directory, tensorrt_version: str, gpu: dict) -> None:
    """Refuse engines built with another TensorRT version or for another GPU, in one line.

    TensorRT engines are not portable: by default a plan runs only with the TensorRT version
    that built it, on the GPU model it was built for (same compute capability is not enough).
    """
    built = f"TensorRT {m.tensorrt_version} on {m.gpu['name']} (compute capability {m.gpu['compute_capability']})"
    here = f"TensorRT {tensorrt_version} on {gpu['name']} (compute capability {gpu['compute_capability']})"
    if (m.tensorrt_version != str(tensorrt_version) or m.gpu["name"] != gpu["name"]
            or m.gpu["compute_capability"] != gpu["compute_capability"]):
        raise PmodError(f"{directory} holds engines built with {built}, and this machine has {here}: engines run "
                        f"only where they were built; {_REBUILD} here")
