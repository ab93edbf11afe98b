"""Import torch so that it keeps its own BLAS when an OpenBLAS sits in the global symbol scope.

``pmod_mlx`` opens OpenBLAS with ``RTLD_GLOBAL`` before ``mlx.core`` (``pmod_mlx/blas.py``)
so MLX binds to it. A torch imported *after* that binds its MKL entry points to OpenBLAS
too, since the global scope is searched first; the two disagree on ``cblas_sgemm_batch``
(MKL's grouped API vs OpenBLAS's own), and torch's batched matmuls then crash (seen with
torch 2.13 + OpenBLAS 0.3.33 on a ``Linear`` over a non-contiguous 3-D input). In that
situation only, torch is imported here with ``RTLD_DEEPBIND``, which makes its libraries
prefer their own symbols. Importing this module imports torch; do it before ``import torch``.

A torch that something else imported after the OpenBLAS cannot be repaired: :func:`check`
turns the crash it would cause into a one-line error (the fix: import torch, or
``pmod_export.torch_loader``, before ``pmod_mlx``).
"""

from __future__ import annotations

import ctypes
import os
import sys

_deepbind = False  # torch was imported here with RTLD_DEEPBIND


def _global_openblas() -> str | None:
    """Path of an OpenBLAS that exports ``cblas_sgemm_batch`` in the global scope, if any."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        scope = ctypes.CDLL(None)
        fn = getattr(scope, "cblas_sgemm_batch", None)
        if fn is None:
            return None

        class DlInfo(ctypes.Structure):
            _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                        ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]

        info = DlInfo()
        if not scope.dladdr(ctypes.cast(fn, ctypes.c_void_p), ctypes.byref(info)):
            return None
        path = (info.dli_fname or b"").decode(errors="replace")
        return path if "openblas" in os.path.basename(path).lower() else None
    except (OSError, AttributeError):
        return None


def _load_order() -> list[str]:
    """Paths of the loaded shared objects in load order (``dl_iterate_phdr``)."""

    class PhdrInfo(ctypes.Structure):
        _fields_ = [("dlpi_addr", ctypes.c_void_p), ("dlpi_name", ctypes.c_char_p)]

    names: list[str] = []
    callback_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(PhdrInfo), ctypes.c_size_t, ctypes.c_void_p)

    def collect(info, size, data):
        names.append((info.contents.dlpi_name or b"").decode(errors="replace"))
        return 0

    try:
        ctypes.CDLL(None).dl_iterate_phdr(callback_type(collect), None)
    except (OSError, AttributeError):
        return []
    return names


def clash() -> str | None:
    """Why torch in this process is bound to the global OpenBLAS, or None when it is not."""
    if _deepbind or "torch" not in sys.modules:
        return None
    blas = _global_openblas()
    if blas is None:
        return None
    order = [os.path.realpath(n) for n in _load_order()]
    torch_at = next((i for i, n in enumerate(order) if "libtorch_cpu" in os.path.basename(n)), None)
    blas_at = next((i for i, n in enumerate(order) if n == os.path.realpath(blas)), None)
    if torch_at is None or blas_at is None or torch_at < blas_at:
        return None
    return (f"torch was imported after {os.path.basename(blas)} was loaded into the global symbol scope "
            "(by pmod_mlx), so its batched matmuls would crash; import torch (or pmod_export) before "
            "pmod_mlx/mlx, or run the torch backend in its own process")


def check() -> None:
    """Raise a one-line PmodError instead of letting a mis-bound torch crash the process."""
    reason = clash()
    if reason:
        from pmod.errors import PmodError

        raise PmodError(reason)


def _import_torch():
    global _deepbind
    if "torch" in sys.modules or not hasattr(os, "RTLD_DEEPBIND") or _global_openblas() is None:
        import torch
        return torch
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import torch
    finally:
        sys.setdlopenflags(flags)
    _deepbind = True
    return torch


torch = _import_torch()
