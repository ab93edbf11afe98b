"""The JSON document of ``pmod bench --json`` and a checker for it."""

from __future__ import annotations

from pmod.app.registry import BACKENDS
from pmod.errors import PmodError
from pmod.app.bench.plan import MODES
from pmod.app.bench.profile import SECTIONS


def _t(kind, **kw) -> dict:
    return {"type": kind, **kw}


_COUNT = _t("integer", minimum=0)
_SECONDS = _t("number", minimum=0)
_ROW = _t("object", required=["backend", "mode", "vision_tokens", "text_tokens", "prefill_s", "decode_tok_s",
                              "kv_bytes", "kv_bytes_analytic", "peak_mem_bytes", "gflops"], properties={
    "backend": _t("string", enum=list(BACKENDS)),
    "mode": _t("string", enum=list(MODES)),
    "vision_tokens": _COUNT,
    "text_tokens": _COUNT,
    "prefill_s": _t("object", required=["median", "min", "max"],
                    properties={k: _SECONDS for k in ("median", "min", "max")}),
    "decode_tok_s": _t(["number", "null"], minimum=0),
    "kv_bytes": _COUNT,
    "kv_bytes_analytic": _COUNT,
    "peak_mem_bytes": _t(["integer", "null"], minimum=0),
    "peak_device_bytes": _t(["integer", "null"], minimum=0),  # a GPU's allocator (optional: older files lack it)
    "prefill_flops": _COUNT,
    "gflops": _t("number", minimum=0),
})
_LAYER = _t("object", required=["layer", "mod", "tokens", "total_s", *(f"{s}_s" for s in SECTIONS)],
            properties={"layer": _COUNT, "mod": _t("boolean"), "tokens": _COUNT, "total_s": _SECONDS,
                        **{f"{s}_s": _SECONDS for s in SECTIONS}})
_PEAK = _t(["object", "null"], required=["gflops", "size", "dtype"],
           properties={"gflops": _t("number", minimum=0), "size": _COUNT, "dtype": _t("string")})

#: The JSON written by ``--json`` (JSON Schema vocabulary; :func:`check_schema` reads this subset).
SCHEMA = _t("object", required=["schema", "machine", "versions", "config", "backends", "skipped", "results",
                                "profile"], properties={
    "schema": _t("string", enum=["pmod-bench/1"]),
    "created": _t("string"),
    "machine": _t("object", required=["system", "machine", "cpu_count"]),
    "versions": _t("object", required=["pmod", "numpy"]),
    "config": _t("object", required=["checkpoint", "backends", "vision_tokens", "text_tokens", "decode_tokens",
                                     "repeat", "dtype", "profile", "retention", "model_config"], properties={
        "vision_tokens": _t("array", items=_COUNT),
        "text_tokens": _COUNT, "decode_tokens": _COUNT, "repeat": _t("integer", minimum=1),
        "dtype": _t(["string", "null"]), "profile": _t("boolean"), "retention": _t("number", exclusiveMinimum=0),
        "model_config": _t("object"),
    }),
    "backends": _t("object", additionalProperties=_t("object", required=["path", "device", "dtype", "kv_dtype",
                                                                        "blas", "matmul_peak"],
                                                     properties={"matmul_peak": _PEAK,
                                                                 "blas": _t(["object", "null"])})),
    "skipped": _t("array", items=_t("object", required=["backend", "reason"])),
    "results": _t("array", items=_ROW),
    "profile": _t("array", items=_t("object", required=["backend", "mode", "vision_tokens", "text_tokens",
                                                        "prefill_s", "rest_s", "layers"],
                                    properties={"layers": _t("array", items=_LAYER),
                                                "kernels": _t(["boolean", "null"])})),
})

_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None),
          "integer": int, "number": (int, float)}


def check_schema(doc, schema: dict = SCHEMA, where: str = "$") -> None:
    """Raise PmodError at the first place ``doc`` breaks ``schema`` (type, enum, minimum,
    exclusiveMinimum, required, properties, additionalProperties as a schema, items)."""
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        ok = any(isinstance(doc, _TYPES[k]) and not (k in ("integer", "number") and isinstance(doc, bool))
                 for k in kinds)
        if not ok:
            raise PmodError(f"bench JSON {where}: expected {' or '.join(kinds)}, got {type(doc).__name__}")
    if "enum" in schema and doc not in schema["enum"]:
        raise PmodError(f"bench JSON {where}: {doc!r} is not one of {schema['enum']}")
    if "minimum" in schema and isinstance(doc, (int, float)) and doc < schema["minimum"]:
        raise PmodError(f"bench JSON {where}: {doc} is below {schema['minimum']}")
    if "exclusiveMinimum" in schema and isinstance(doc, (int, float)) and doc <= schema["exclusiveMinimum"]:
        raise PmodError(f"bench JSON {where}: {doc} is not above {schema['exclusiveMinimum']}")
    if isinstance(doc, dict):
        for key in schema.get("required", []):
            if key not in doc:
                raise PmodError(f"bench JSON {where}: missing {key!r}")
        props = schema.get("properties", {})
        for key, value in doc.items():
            sub = props.get(key, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                check_schema(value, sub, f"{where}.{key}")
    if isinstance(doc, list) and "items" in schema:
        for i, value in enumerate(doc):
            check_schema(value, schema["items"], f"{where}[{i}]")
