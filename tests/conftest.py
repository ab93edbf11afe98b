"""Shared pytest setup: the tests folder on sys.path, tiny-model fixtures.

``PMOD_TEST_WITHOUT=mlx,torch`` (top-level packages, comma-separated) runs the suite as on a
machine without them: importing one raises ImportError, so the core's tests run and the
runtime tests skip (``pytest.importorskip``) or fail where a runtime is imported carelessly.
"""

from __future__ import annotations

import importlib.abc
import os
import sys
from pathlib import Path

import pytest


class _Without(importlib.abc.MetaPathFinder):
    """Wraps one finder of ``sys.meta_path`` so that it finds nothing for the named packages.

    Every finder answers None for them, as on a machine without them: ``import`` raises
    ModuleNotFoundError and ``importlib.util.find_spec`` returns None (which libraries such as
    transformers use to probe for optional packages, and which must not raise)."""

    def __init__(self, finder, names):
        self.finder, self.names = finder, names

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(fullname, path, target) if find else None

    def __getattr__(self, name):  # invalidate_caches, find_distributions, ...
        return getattr(self.finder, name)


_WITHOUT = {n for n in os.environ.get("PMOD_TEST_WITHOUT", "").split(",") if n}
if _WITHOUT:
    _loaded = sorted(n for n in sys.modules if n.split(".")[0] in _WITHOUT)
    if _loaded:
        raise RuntimeError(f"PMOD_TEST_WITHOUT: already imported before conftest: {_loaded}")
    sys.meta_path[:] = [_Without(f, _WITHOUT) for f in sys.meta_path]

try:  # torch first: its MKL must bind its own BLAS symbols before OpenBLAS is loaded globally
    import torch  # noqa: F401
except ImportError:
    pass
try:
    import pmod_mlx  # noqa: F401  (loads the fast BLAS before any test module imports mlx.core)
except ImportError as e:
    if not (e.name or "").startswith(("mlx", "mlx_lm")):
        raise

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
