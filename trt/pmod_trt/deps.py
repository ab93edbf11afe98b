"""TensorRT, loaded only when an engine is built or opened; its absence is one line.

``pip install 'pmod[trt]'`` installs ``tensorrt`` (PyPI's package fetches NVIDIA's wheels)
and ``cuda-python``. Neither is needed to import ``pmod_trt``.
"""

from __future__ import annotations

import importlib
import re
import sys

from pmod.errors import PmodError, first_line

INSTALL = "pip install 'pmod[trt]' on a machine with an NVIDIA GPU and driver"
#: The TensorRT versions this code is written and tested for: 10.x from 10.1 (user-managed
#: context memory sized per shape, shape-tensor TopK K). The ``trt`` extra pins the same.
SUPPORTED = ((10, 1), (11,))


def tensorrt(what: str):
    """The ``tensorrt`` module, or a one-line error saying that ``what`` needs a GPU and TensorRT."""
    try:
        trt = importlib.import_module("tensorrt")
    except ImportError as e:  # also the stub's "could not find the TensorRT libraries"
        detail = "tensorrt is not installed" if e.name == "tensorrt" else f"tensorrt does not load: {first_line(e)}"
        raise PmodError(f"{what} needs an NVIDIA GPU with TensorRT ({detail}): {INSTALL}") from None
    except OSError as e:  # a wheel whose CUDA libraries are missing
        raise PmodError(f"{what} needs an NVIDIA GPU with TensorRT (tensorrt does not load: "
                        f"{first_line(e)}): {INSTALL}") from None
    version = getattr(trt, "__version__", "?")
    low, high = SUPPORTED
    if not low <= version_tuple(version) < high:
        raise PmodError(f"{what} is written for TensorRT {low[0]}.{low[1]} to {high[0]} (exclusive), found {version}: "
                        f"pip install 'tensorrt>={low[0]}.{low[1]},<{high[0]}'")
    return trt


def version_tuple(version: str) -> tuple[int, ...]:
    """``"10.9.0.34"`` -> ``(10, 9, 0, 34)``; ``"11.0.0b1"`` -> ``(11, 0, 0)`` (stops at the first non-number)."""
    out = []
    for part in str(version).split("."):
        m = re.match(r"\d+", part)
        if m is None:
            break
        out.append(int(m.group()))
        if m.end() != len(part):
            break
    return tuple(out)


_logger = None


def logger(trt):
    """The process's one TensorRT logger (builders and runtimes should share one).

    Warnings and errors go to stderr (through tqdm, so a progress bar stays intact); the
    errors are also kept in ``.errors`` so a failure can be reported in one line.
    """
    global _logger
    if _logger is None or _logger.trt is not trt:
        Severity = trt.ILogger.Severity

        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.trt = trt
                self.errors: list[str] = []

            def log(self, severity, msg):
                if int(severity) <= int(Severity.ERROR):
                    self.errors.append(str(msg).strip())
                if int(severity) <= int(Severity.WARNING):
                    from tqdm import tqdm

                    tqdm.write(f"TensorRT: {str(msg).strip()}", file=sys.stderr)

        _logger = Logger()
    return _logger
