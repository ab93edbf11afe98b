"""``pmod bench``: dense vs p-MoD, per backend: prefill latency, decode speed, KV cache, memory, FLOP/s.

docs/BENCH.md describes what is measured and how to read it. In short, for each backend,
each mode (``dense``: the plain-LLaVA twin of the same weights, ``pmod``) and each vision
token count, one prompt (some text, the vision block, the rest of the text) is prefilled
``--repeat`` times after a warm-up, each time followed by ``--decode-tokens`` greedy steps.

The modules: :mod:`.plan` (flags to settings), :mod:`.presets` and :mod:`.cache` (seeded
random-weight checkpoints, ONNX and TensorRT exports, built once), :mod:`.processes` (the
child interpreters and their messages), :mod:`.worker` (one backend and mode, measured in
its own interpreter: ``python -m pmod.app.bench --worker SPEC``), :mod:`.profile` (per-layer
times), :mod:`.run` (the whole run), :mod:`.schema` (the ``--json`` document) and
:mod:`.report` (table, profile table, plot).
"""

from pmod.app.bench.cache import cache_root, onnx_export, trt_engines
from pmod.app.bench.plan import MODES, Plan, make_plan
from pmod.app.bench.presets import PRESETS, SEED, Preset, preset_checkpoint
from pmod.app.bench.processes import MARK
from pmod.app.bench.profile import SECTIONS, LayerTimer
from pmod.app.bench.report import fmt_bytes, fmt_ms, format_profile, format_table, retention_note, speedups, write_plot
from pmod.app.bench.run import run_bench, run_bench_command
from pmod.app.bench.schema import SCHEMA, check_schema
from pmod.app.bench.worker import make_prompt, matmul_peak, run_worker

__all__ = [
    "MARK", "MODES", "PRESETS", "SCHEMA", "SECTIONS", "SEED", "LayerTimer", "Plan", "Preset", "cache_root",
    "check_schema", "fmt_bytes", "fmt_ms", "format_profile", "format_table", "make_plan", "make_prompt",
    "matmul_peak", "onnx_export", "preset_checkpoint", "retention_note", "run_bench", "run_bench_command",
    "run_worker", "speedups", "trt_engines", "write_plot",
]
