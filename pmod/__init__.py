"""pmod: the open runtime for p-MoD models.

This package is the runtime-neutral core (numpy only): config, schedule, checkpoint format,
converters, image packing, prompt, FLOPs and the static-graph contract. The runtimes
(``pmod_mlx``, ``pmod_export``, ``pmod_trt``) build on it, and the applications
(:mod:`pmod.app`) on both. ``pmod.open_engine`` is the registry's, imported on first use.
"""

from pmod.config import FORMAT_VERSION, PmodConfig
from pmod.engine import Engine
from pmod.errors import PmodError
from pmod.schedule import capacities, kept_count, layer_ratios, mod_layers

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "Engine", "FORMAT_VERSION", "PmodConfig", "PmodError", "capacities",
    "kept_count", "layer_ratios", "mod_layers", "open_engine",
]


def __getattr__(name):
    """``pmod.open_engine`` and ``pmod.BACKENDS`` without the core importing the application layer."""
    if name in ("open_engine", "BACKENDS"):
        import pmod.app.registry

        return getattr(pmod.app.registry, name)
    raise AttributeError(f"module 'pmod' has no attribute {name!r}")
