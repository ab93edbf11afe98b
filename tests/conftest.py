"""Shared pytest setup: the tests folder on sys.path, tiny-model fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

try:  # torch first: its MKL must bind its own BLAS symbols before OpenBLAS is loaded globally
    import torch  # noqa: F401
except ImportError:
    pass
import pmod_mlx  # noqa: E402,F401  (loads the fast BLAS before any test module imports mlx.core)

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
ROOT = TESTS.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from builders import random_tensors, tiny_config, write_checkpoint  # noqa: E402


@pytest.fixture
def tiny():
    """(config, tensors) of the default tiny p-MoD model."""
    config = tiny_config()
    return config, random_tensors(config, seed=0)


@pytest.fixture
def make_checkpoint(tmp_path):
    """Factory: ``make_checkpoint(config, tensors=None, seed=0, dtype='float32') -> Path``."""

    def make(config=None, tensors=None, seed: int = 0, dtype: str = "float32"):
        config = config or tiny_config()
        tensors = tensors if tensors is not None else random_tensors(config, seed=seed)
        return write_checkpoint(tmp_path, config, tensors, dtype=dtype)

    return make
