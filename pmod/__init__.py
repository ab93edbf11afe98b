"""pmod: the shared core of the p-MoD runtime (numpy + safetensors only)."""

from .config import FORMAT_VERSION, PmodConfig
from .engine import BACKENDS, Engine, open_engine
from .errors import PmodError
from .schedule import capacities, kept_count, layer_ratios, mod_layers

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "Engine", "FORMAT_VERSION", "PmodConfig", "PmodError", "capacities",
    "kept_count", "layer_ratios", "mod_layers", "open_engine",
]
