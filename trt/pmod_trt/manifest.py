"""What pmod_trt reads and writes of the one manifest schema (:mod:`pmod.static.manifest`).

An export directory is read with the core reader and must be a ``--target trt`` export. An
engine directory (format ``pmod-trt``) carries the export's description plus ``engine``:
the TensorRT version, the GPU (name, compute capability), the precision and the build
settings, and per graph its optimisation profiles and source ONNX file. An engine is specific
to the TensorRT version and the GPU model it was built with; :func:`check_compatible`
refuses any other pairing with one line that says to rebuild.
"""

from __future__ import annotations

from pmod.errors import PmodError
from pmod.static.manifest import ENGINE_FORMAT, EXPORT_FORMAT, FIX, MANIFEST, Manifest, read_manifest

from .profiles import Profile

_REBUILD = FIX[ENGINE_FORMAT]


def read_trt_export(directory) -> Manifest:
    """An ONNX export directory ``pmod trt build`` can build from (format, version, files, target)."""
    m = read_manifest(directory, EXPORT_FORMAT)
    if m.target != "trt":
        raise PmodError(f"{directory} was exported for ONNX Runtime (--target {m.target}, with its fused attention); "
                        "TensorRT builds need 'pmod export onnx --target trt'")
    return m


def read_engine_manifest(directory) -> Manifest:
    """Read and check an engine directory's manifest: the core checks, the engine fields, the profiles."""
    m = read_manifest(directory, ENGINE_FORMAT)
    path = f"{directory}/{MANIFEST}"
    try:
        e = m.engine
        m.engine = {"tensorrt_version": str(e["tensorrt_version"]), "precision": str(e["precision"]),
                    "gpu": {"name": str(e["gpu"]["name"]), "compute_capability": str(e["gpu"]["compute_capability"])},
                    "build": dict(e.get("build") or {})}
        for g in m.graphs.values():
            g.profiles = [Profile.from_dict(p) for p in g.profiles]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise PmodError(f"{path} lacks or mangles {err}; {_REBUILD}") from None
    return m


def check_compatible(m: Manifest, directory, tensorrt_version: str, gpu: dict) -> None:
    """Refuse engines built with another TensorRT version or for another GPU, in one line.

    TensorRT engines are not portable: by default a plan runs only with the TensorRT version
    that built it, on the GPU model it was built for (same compute capability is not enough).
    """
    e = m.engine
    built = f"TensorRT {e['tensorrt_version']} on {e['gpu']['name']} (compute capability {e['gpu']['compute_capability']})"
    here = f"TensorRT {tensorrt_version} on {gpu['name']} (compute capability {gpu['compute_capability']})"
    if (e["tensorrt_version"] != str(tensorrt_version) or e["gpu"]["name"] != gpu["name"]
            or e["gpu"]["compute_capability"] != gpu["compute_capability"]):
        raise PmodError(f"{directory} holds engines built with {built}, and this machine has {here}: engines run "
                        f"only where they were built; {_REBUILD} here")
