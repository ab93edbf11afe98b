"""MLX runtime of p-MoD models (Metal on Apple silicon, MLX's CPU backend elsewhere)."""

from .blas import load_fast_blas

load_fast_blas()  # before anything imports mlx.core

from .engine import MLXEngine, runtime_info  # noqa: E402
from .loader import load  # noqa: E402

__all__ = ["MLXEngine", "load", "runtime_info"]
