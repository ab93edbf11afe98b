"""The layering rule of docs/ARCHITECTURE.md, checked on the source.

core (``pmod``, numpy only) <- runtimes (``pmod_mlx``, ``pmod_export``, ``pmod_trt``: each
imports only the core) <- applications (``pmod.app``, ``pmod.tasks``: a runtime only through
``pmod.app.registry``). No import circles.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"pmod": ROOT / "pmod", "pmod_mlx": ROOT / "pmod_mlx", "pmod_export": ROOT / "export" / "pmod_export",
            "pmod_trt": ROOT / "trt" / "pmod_trt"}
RUNTIMES = ("pmod_mlx", "pmod_export", "pmod_trt")
FRAMEWORKS = ("mlx", "mlx_lm", "torch", "onnx", "onnxruntime", "tensorrt", "cuda", "cupy")
APPS = ("pmod.app", "pmod.tasks")
#: Imports the core makes inside a function (never at import time), each for a file format,
#: a tool, or the public ``pmod.open_engine`` alias.
CORE_LAZY = {
    "pmod": ("pmod.app.registry",),
    "pmod.tokenizer": ("transformers",),  # AutoTokenizer for tokenizer.model-only checkpoints
    "pmod.static.lint": ("onnx",),  # reads ONNX graphs
    "pmod.static.manifest": ("onnx",),
    "pmod.convert.sources": ("torch",),  # pytorch_model*.bin pickles
}
#: Applications that are MLX programs themselves: training the embedded model from scratch.
MLX_APPS = ("pmod.tasks.shapes.train", "pmod.tasks.shapes.batches", "pmod.tasks.shapes.losses")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg, d in PACKAGES.items():
        for f in sorted(d.rglob("*.py")):
            parts = [pkg, *f.relative_to(d).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            if parts[-1] != "__main__":
                out[".".join(parts)] = f
    return out


def _imports(name: str, path: Path) -> list[tuple[str, bool]]:
    """(imported module, at import time?) for every import statement of a module."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` blocks import nothing at run time
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            top_level |= {id(n) for n in ast.walk(node)}
            node.body = []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            mods = [f"{base}.{a.name}" for a in node.names] if not node.module else [base]
            out += [(m, id(node) in top_level) for m in mods]
    return out


def _layer(name: str) -> str:
    if name.split(".")[0] in RUNTIMES:
        return "runtime"
    return "app" if name.startswith(APPS) else "core"


def _top(name: str) -> str:
    return name.split(".")[0]


def test_imports_go_down_only():
    modules = _modules()
    problems = []
    for name, path in modules.items():
        layer = _layer(name)
        for dep, at_import in _imports(name, path):
            top = _top(dep)
            if layer == "core":
                lazy_ok = not at_import and dep.startswith(CORE_LAZY.get(name, ()))
                if (top in RUNTIMES + FRAMEWORKS + ("transformers",) or dep.startswith(APPS)) and not lazy_ok:
                    problems.append(f"core {name} imports {dep}")
            elif layer == "runtime":
                if dep.startswith(APPS) or (top in RUNTIMES and top != _top(name)):
                    problems.append(f"runtime {name} imports {dep}")
            elif (top in RUNTIMES or top in FRAMEWORKS) and name not in MLX_APPS:
                problems.append(f"application {name} imports {dep} (reach runtimes through pmod.app.registry)")
    assert not problems, "\n".join(problems)


def test_no_import_circles():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        deps = set()
        for dep, _ in _imports(name, path):
            while dep and dep not in modules:
                dep = dep.rpartition(".")[0]
            if dep and dep != name and not name.startswith(dep + "."):  # a package's own __init__ is no circle
                deps.add(dep)
        graph[name] = deps
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_core_imports_no_runtime_in_a_fresh_process():
    core = sorted(n for n in _modules() if _layer(n) == "core")
    code = (f"import json, sys\nfor m in {core!r}:\n    __import__(m)\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    loaded = json.loads(out.stdout)
    bad = [m for m in loaded if _top(m) in FRAMEWORKS + RUNTIMES + ("transformers", "tokenizers")
           or m.startswith(APPS)]
    assert not bad, f"importing the core loaded {bad}"
    assert len(core) > 20 and "pmod.static.contract" in core and "pmod.config" in core
