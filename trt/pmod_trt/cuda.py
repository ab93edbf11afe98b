"""The one place pmod_trt touches CUDA: device buffers, one stream, copies, the GPU's identity.

Binding: cuda-python's runtime API (``cuda.bindings.runtime``, or ``cuda.cudart`` before
cuda-python 12.6), which the ``trt`` extra installs. It was chosen over torch CUDA tensors so
that the TensorRT backend needs no torch (the ``export`` extra's), and because TensorRT
wants what it gives directly: raw device pointers (``set_tensor_address``) and a stream
handle (``execute_async_v3``). Everything here is a thin, checked wrapper: each call's
``cudaError_t`` becomes a one-line ``PmodError``.

Host arrays are numpy's (pageable): a host-to-device ``cudaMemcpyAsync`` from pageable memory
returns once the source has been staged, so the array may go right after the call; the
engine synchronises the stream before it reads what a device-to-host copy wrote.
"""

from __future__ import annotations

import importlib

import numpy as np

from pmod.errors import PmodError

from .deps import INSTALL

_cudart = None
#: Smallest allocation: every buffer has a real (non-null) address, even for empty tensors.
#: (cudaMalloc's addresses are 256-byte aligned, as TensorRT wants every tensor address.)
MIN_BYTES = 256


def cudart():
    """cuda-python's runtime module (loaded once), or a one-line error naming the ``trt`` extra."""
    global _cudart
    if _cudart is None:
        for name in ("cuda.bindings.runtime", "cuda.cudart"):
            try:
                _cudart = importlib.import_module(name)
                break
            except ImportError:
                continue
        else:
            raise PmodError(f"the TensorRT backend needs cuda-python (not installed): {INSTALL}")
    return _cudart


def check(result, what: str):
    """``(err, *values)`` from a cudart call -> the values (one value unwrapped); errors raise."""
    rt = cudart()
    err, values = result[0], result[1:]
    if err != rt.cudaError_t.cudaSuccess:
        raise PmodError(f"CUDA {what} failed ({getattr(err, 'name', err)})")
    return values[0] if len(values) == 1 else values


def gpu_info(what: str) -> dict:
    """``{"name", "compute_capability"}`` of the current CUDA device, or a one-line error saying
    that ``what`` needs an NVIDIA GPU."""
    rt = cudart()
    try:
        err, count = rt.cudaGetDeviceCount()
    except Exception as e:  # noqa: BLE001 - e.g. no libcuda.so to load
        raise PmodError(f"{what} needs an NVIDIA GPU, and CUDA does not start here ({e}): run it on a machine "
                        "with an NVIDIA GPU and driver") from None
    if err != rt.cudaError_t.cudaSuccess or count < 1:
        why = getattr(err, "name", err) if err != rt.cudaError_t.cudaSuccess else "no CUDA device"
        raise PmodError(f"{what} needs an NVIDIA GPU, and none is visible ({why}): run it on a machine "
                        "with an NVIDIA GPU and driver")
    device = check(rt.cudaGetDevice(), "cudaGetDevice")
    prop = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name
    if isinstance(name, (bytes, bytearray)):
        name = bytes(name).split(b"\0", 1)[0].decode(errors="replace")
    return {"name": str(name).strip(), "compute_capability": f"{prop.major}.{prop.minor}"}


class Stream:
    def __init__(self):
        self.handle = check(cudart().cudaStreamCreate(), "cudaStreamCreate")

    @property
    def ptr(self) -> int:
        """The ``cudaStream_t`` as the integer TensorRT's ``execute_async_v3`` takes."""
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            cudart().cudaStreamDestroy(self.handle)
            self.handle = None


class DeviceBuffer:
    """``nbytes`` of device memory (at least ``MIN_BYTES``), freed with the object."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), MIN_BYTES)
        self.ptr = int(check(cudart().cudaMalloc(self.nbytes), f"cudaMalloc of {self.nbytes} bytes"))

    def free(self) -> None:
        if self.ptr:
            cudart().cudaFree(self.ptr)
            self.ptr = 0

    def __del__(self):
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def to_device(ptr: int, array: np.ndarray, stream: Stream) -> None:
    """Copy a C-contiguous host array to device address ``ptr`` (asynchronously on ``stream``)."""
    if array.nbytes:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(rt.cudaMemcpyAsync(ptr, array.ctypes.data, array.nbytes, kind, stream.handle), "copy to the GPU")


def on_device(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    """Copy ``nbytes`` between device addresses (asynchronously on ``stream``)."""
    if nbytes:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice
        check(rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream.handle), "copy on the GPU")


def to_host(array: np.ndarray, ptr: int, stream: Stream) -> None:
    """Copy ``array.nbytes`` from device address ``ptr`` into a C-contiguous host array (synchronise, then read)."""
    if array.nbytes:
        rt = cudart()
        kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(rt.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, kind, stream.handle), "copy from the GPU")
