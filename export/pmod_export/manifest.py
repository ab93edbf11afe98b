"""``manifest.json`` of an ONNX export directory: what each graph is and how to feed it.

Written by ``pmod export onnx`` from the graphs it wrote, read (and checked against the
files and the graphs) by every runtime that loads the directory. See docs/EXPORT.md.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pmod.config import FORMAT_VERSION, PmodConfig
from pmod.errors import PmodError
from pmod.schedule import capacities, check_retention

MANIFEST = "manifest.json"
FORMAT = "pmod-onnx"
MANIFEST_VERSION = 1
GRAPHS = ("embed", "vision", "prefill", "decode")
REQUIRED_GRAPHS = ("embed", "decode")
_FIX = "re-export it with 'pmod export onnx'"


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

    @classmethod
    def from_dict(cls, d: dict) -> "GraphSpec":
        return cls(file=d["file"], external_data=d.get("external_data"),
                   inputs=[TensorSpec(**t) for t in d["inputs"]], outputs=[TensorSpec(**t) for t in d["outputs"]])


@dataclass
class Manifest:
    dtype: str
    max_vision_tokens: int
    max_context: int
    opset: int
    capacities: list[int]  # C_l = pmod.schedule.capacities(config, max_vision_tokens, retention)
    layer_ratios: list  # r_l at that retention, None for dense layers (informative)
    kv: dict  # num_layers, num_key_value_heads, head_dim, layout
    config: dict  # the source checkpoint's config.json
    graphs: dict[str, GraphSpec]
    pmod_format_version: int = FORMAT_VERSION
    lint: dict = field(default_factory=dict)
    retention: float = 1.0  # the dial the graphs were built at (absent in older manifests: 1)

    @property
    def pmod_config(self) -> PmodConfig:
        return PmodConfig.from_dict(self.config)

    def to_dict(self) -> dict:
        d = {"format": FORMAT, "manifest_version": MANIFEST_VERSION}
        d.update(asdict(self))
        return d

    def write(self, directory: Path) -> None:
        (Path(directory) / MANIFEST).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def read_manifest(directory) -> Manifest:
    """Read and check ``manifest.json`` and that every file it lists exists."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PmodError(f"export directory {directory} does not exist")
    path = directory / MANIFEST
    if not path.is_file():
        hint = (" (it is a pmod checkpoint: use --backend torch or mlx, or export it first)"
                if (directory / "config.json").is_file() else "")
        raise PmodError(f"{directory} has no {MANIFEST}, so it is not an ONNX export{hint}: "
                        "write one with 'pmod export onnx --model DIR --out DIR --max-vision-tokens N'")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PmodError(f"{path} is not valid JSON ({e}); {_FIX}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise PmodError(f"{path} is not a pmod ONNX manifest (format {d.get('format') if isinstance(d, dict) else None!r}); {_FIX}")
    if d.get("manifest_version") != MANIFEST_VERSION:
        raise PmodError(f"{path}: manifest version {d.get('manifest_version')!r} is not supported by this pmod "
                        f"(expects {MANIFEST_VERSION}); {_FIX}")
    if d.get("pmod_format_version") != FORMAT_VERSION:
        raise PmodError(f"{path}: pmod format version {d.get('pmod_format_version')!r} is not supported "
                        f"(expects {FORMAT_VERSION}); {_FIX}")
    try:
        m = Manifest(
            dtype=d["dtype"], max_vision_tokens=int(d["max_vision_tokens"]), max_context=int(d["max_context"]),
            opset=int(d["opset"]), capacities=list(d["capacities"]), layer_ratios=list(d["layer_ratios"]),
            kv=dict(d["kv"]), config=dict(d["config"]), pmod_format_version=d["pmod_format_version"],
            graphs={k: GraphSpec.from_dict(v) for k, v in d["graphs"].items()}, lint=d.get("lint", {}),
            retention=check_retention(d.get("retention", 1.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise PmodError(f"{path} lacks or mangles {e}; {_FIX}") from None
    except PmodError as e:
        raise PmodError(f"{path}: {e}; {_FIX}") from None
    unknown = [g for g in m.graphs if g not in GRAPHS]
    missing = [g for g in REQUIRED_GRAPHS if g not in m.graphs]
    if unknown or missing:
        raise PmodError(f"{path} lists graphs {sorted(m.graphs)}: "
                        + (f"unknown {unknown}" if unknown else f"'{missing[0]}' is missing") + f"; {_FIX}")
    if m.max_vision_tokens and "prefill" not in m.graphs:
        raise PmodError(f"{path} declares max_vision_tokens {m.max_vision_tokens} but no prefill graph; {_FIX}")
    config = m.pmod_config
    want = capacities(config, m.max_vision_tokens, m.retention)
    if m.capacities != want:
        raise PmodError(f"{path}: capacities {m.capacities} do not match the schedule of its config for "
                        f"N = {m.max_vision_tokens} at retention {m.retention:g} ({want}); {_FIX}")
    for name, g in m.graphs.items():
        for f in (g.file, g.external_data):
            if f and not (directory / f).is_file():
                raise PmodError(f"{directory / f} is missing (graph '{name}' in {MANIFEST}); {_FIX}")
    return m


def check_io(manifest_path: Path, graph: str, spec: GraphSpec, actual_inputs, actual_outputs) -> None:
    """Refuse a graph whose inputs/outputs differ from the manifest's (name, order, dtype, rank, fixed dims).

    ``actual_*``: ``[(name, dtype, shape)]`` as the runtime sees the graph (dynamic dims as
    strings or None).
    """
    for side, want, got in (("input", spec.inputs, actual_inputs), ("output", spec.outputs, actual_outputs)):
        want_names, got_names = [t.name for t in want], [n for n, _, _ in got]
        if want_names != got_names:
            diff = sorted(set(want_names) ^ set(got_names)) or ["(order)"]
            raise PmodError(f"{manifest_path} does not match {spec.file}: {side}s differ at {diff[0]} "
                            f"({len(want_names)} listed, {len(got_names)} in the graph); {_FIX}")
        for t, (_, dtype, shape) in zip(want, got):
            fixed_ok = len(shape) == len(t.shape) and all(
                not isinstance(a, int) or not isinstance(b, int) or a == b for a, b in zip(t.shape, shape))
            if dtype != t.dtype or not fixed_ok:
                raise PmodError(f"{manifest_path} does not match {spec.file}: {side} '{t.name}' is "
                                f"{dtype} {list(shape)} in the graph, {t.dtype} {t.shape} in the manifest; {_FIX}")
