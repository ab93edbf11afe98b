"""``pmod.open_engine(path, backend="torch")``: the static torch model behind the shared interface.

It runs what is exported (``StaticDecoder`` in its ``shape`` and ``text`` forms,
``VisionEncoder``) on a pmod checkpoint directory, eagerly, with the chunk plan of the
exported graphs (:mod:`pmod.static`). ``device="cuda"`` (or ``"cuda:N"``) puts the weights and
every layer's KV buffers on that GPU; a step then moves only its small plan arrays in and
the logits out. Default: the CPU. ``max_vision_tokens=N``
refuses chunks over ``N`` as an export for ``N`` would; left at None there is no limit.
``retention=S`` runs the MoD layers at that dial (``pmod.schedule.layer_ratios``), as
``pmod export onnx --retention S`` would build them. ``seeded_weights=SEED`` draws seeded random
weights on the device instead of reading any (``pmod_export.model.draw_weights``; a directory
with only a config.json will do): the GPU check's 7B model.
"""

from __future__ import annotations

from . import torch_loader  # imports torch; before it, see there

from contextlib import contextmanager

import numpy as np
import torch

from pmod.engine import Engine, Stopwatch
from pmod.errors import PmodError
from pmod.schedule import check_retention
from pmod.static.cache import HostKV
from pmod.static.chunk import Planner, Step
from pmod.static.engine import StaticEngine

from .model import load

# numpy has no bfloat16: a numpy type of the same width stands in for the byte counts.
_STORAGE = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}


class TorchKV(HostKV):
    """:class:`HostKV`'s per-layer buffers as torch tensors on the engine's device: the decoder
    gets each layer's window (:meth:`HostKV.windows`), writes the new entries into it and reads
    it in place (nothing goes through the host). Not bound to graphs, so it has no addresses
    (``past``/``new``)."""

    def __init__(self, num_layers: int, n_kv: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.torch_dtype, self.device = dtype, device
        super().__init__(num_layers, n_kv, head_dim, _STORAGE[dtype])

    def _alloc(self, n: int) -> torch.Tensor:
        """``[n, n_kv, D]`` as a view of head-major storage ``[n_kv, n, D]``: a window's
        ``transpose(1, 2)`` ``[1, n_kv, L, D]`` is then a block per head, which the fused
        attention reads faster than entries interleaved by head (a next-proxy decode step at
        2944 entries, 2 CPU threads: 52 ms, against 69 ms sequence-major)."""
        return torch.zeros((self.n_kv, n, self.head_dim), dtype=self.torch_dtype, device=self.device).transpose(0, 1)

    def _alloc_positions(self, n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.int32, device=self.device)

    def _positions(self, l: int, n: int) -> np.ndarray:
        return self.positions[l][:n].cpu().numpy()

    @staticmethod
    def _clone(a: torch.Tensor) -> torch.Tensor:
        return a.clone()


def torch_device(name: str | None) -> torch.device:
    """``name`` ("cpu", "cuda", "cuda:1"; None: the CPU) as a device, or a one-line error when
    it does not exist here."""
    try:
        device = torch.device(name or "cpu")
    except RuntimeError:
        raise PmodError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch has no CUDA" if torch.version.cuda is None else "no NVIDIA GPU is visible"
            raise PmodError(f"device {name!r} is not available ({why}, torch {torch.__version__}): "
                            "use --device cpu, or install a CUDA build of torch on a machine with a GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise PmodError(f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise PmodError(f"device {name!r} is not supported by the torch backend: use cpu or cuda")
    return device


class CudaStopwatch(Stopwatch):
    """Seconds between two CUDA events recorded on the device's current stream around the block
    (the GPU's own clock; the host waits for the closing event)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        self._start.record(torch.cuda.current_stream(self.device))
        return self

    def __exit__(self, *exc):
        self._end.record(torch.cuda.current_stream(self.device))
        self._end.synchronize()
        self.seconds = self._start.elapsed_time(self._end) / 1e3


class OpProfile:
    """``with OpProfile(device) as p: ...``, then ``p.table(rows)``: torch.profiler's totals per op
    and input shapes over the block, by self time on the device that ran them (which attention
    kernel a call got, the masks, gathers and copies between; ``--profile`` of
    ``scripts/torch_vs_transformers.py``)."""

    def __init__(self, device: str | None = None):
        self.cuda = torch_device(device).type == "cuda"

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self._profile = profile(activities=activities, record_shapes=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self._profile.__exit__(*exc)

    def table(self, rows: int = 12) -> str:
        key = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        return self._profile.key_averages(group_by_input_shape=True).table(
            sort_by=key, row_limit=rows, max_name_column_width=44, max_shapes_column_width=72)


class TorchEngine(StaticEngine):
    np_dtype = np.dtype(np.float32)  # the chunk plan's arrays; cast to the model dtype on the way in
    check_room = Engine.check_room  # the checkpoint's context, not an export's
    profiles_layers = True

    def __init__(self, path, dtype: str | None = None, max_vision_tokens: int | None = None, dense: bool = False,
                 retention: float | None = None, device: str | None = None, seeded_weights: int | None = None):
        torch_loader.check()
        self.device = torch_device(device)
        self.profiles_layers = self.device.type == "cpu"  # the hooks read the clock as the CPU finishes
        if max_vision_tokens is not None and (not isinstance(max_vision_tokens, int) or max_vision_tokens < 0):
            raise PmodError(f"max_vision_tokens must be a non-negative integer, got {max_vision_tokens!r}")
        self.retention = check_retention(1.0 if retention is None else retention)
        self.model = load(path, dtype, self.device, seeded_weights)
        self.dense = dense  # run every layer over every token: the plain-LLaVA twin, routers unused
        self.config = c = self.model.config
        self.dtype = self.model.dtype
        self.max_vision = max_vision_tokens
        self.planner = Planner(c, max_vision_tokens, self.retention, flag="max_vision_tokens")
        self.cache = TorchKV(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, self.dtype, self.device)
        self._position = 0

    def _run_decoder(self, step: Step) -> torch.Tensor:
        form = "text" if step.graph == "decode" else "shape"
        decoder = self.model.decoder(form, self.max_vision if form == "shape" else None, retention=self.retention)
        inputs = [self._tensor(a) for a in step.feeds.values()]
        for l, s in enumerate(step.slots):
            inputs += self.cache.windows(l, s)  # the decoder writes the new entries in place
        with torch.inference_mode():
            return decoder(*inputs)[0][0]  # [V] float32, on the device

    def _host(self, logits: torch.Tensor) -> np.ndarray:
        return logits.cpu().numpy()

    def _argmax(self, logits: torch.Tensor) -> int:
        return int(logits.argmax())  # the token alone leaves the device

    def _tensor(self, a: np.ndarray) -> torch.Tensor:
        """A host array on the engine's device, floats in the model's dtype."""
        t = torch.from_numpy(a)
        return t.to(self.device, self.dtype if t.is_floating_point() else None, non_blocking=True)

    def embed(self, input_ids) -> np.ndarray:
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64).reshape(-1))
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise PmodError(f"token ids must be in [0, {self.config.vocab_size}), got {int(ids.min())}..{int(ids.max())}")
        return self.model.language_model.embed_tokens.weight[ids.to(self.device)].float().cpu().numpy()

    def encode_image(self, image) -> np.ndarray:
        encoder = self.model.vision()
        pixels = np.asarray(image.pixel_values)
        tower = encoder.tower
        want = (tower.channels, tower.image_size, tower.image_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise PmodError(f"pixel_values have shape {tuple(pixels.shape)}; the vision tower expects "
                            f"[N, {want[0]}, {want[1]}, {want[2]}] (NCHW)")
        with torch.inference_mode():
            out = encoder(self._tensor(pixels), torch.from_numpy(image.feature_index()).to(self.device))
        return out.float().cpu().numpy()

    # ------------------------------------------------------------------ the runtime
    def runtime_info(self) -> dict:
        dtype = str(self.dtype).rsplit(".", 1)[-1]  # torch.float32
        return dict(device=str(self.device), dtype=dtype, kv_dtype=dtype, blas=None, kernels=None)

    def matmul_probe(self, n: int):
        rng = np.random.default_rng(0)
        a, b = (torch.from_numpy(rng.standard_normal((n, n), dtype=np.float32)).to(self.device) for _ in range(2))
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        return lambda: (torch.mm(a, b), sync())

    def stopwatch(self):
        return CudaStopwatch(self.device) if self.device.type == "cuda" else super().stopwatch()

    def device_memory(self, reset: bool = False) -> int | None:
        if self.device.type != "cuda":
            return None
        if reset:
            torch.cuda.reset_peak_memory_stats(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))

    @contextmanager
    def profiled(self, timer):
        """Forward hooks at the layers' module boundaries, removed on exit. Torch runs eagerly on
        the CPU, so a hook sees finished work: ``timer.sync`` is left as it is, no arrays passed."""
        lm, handles, entered = self.model.language_model, [], [None]

        def enter(l):
            entered[0] = l
            timer.enter(l)

        def start(l):  # a routing layer starts at its router
            return lambda *_: enter(l)

        def route(l):  # any other at its input norm, which ends a routing layer's route
            def hook(*_):
                if entered[0] != l:
                    enter(l)
                timer.mark("route")
            return hook

        def section(name):
            return lambda *_: timer.mark(name)

        try:
            for l, layer in enumerate(lm.layers):
                if layer.ratio is not None:
                    handles.append(layer.router.register_forward_pre_hook(start(l)))
                handles.append(layer.input_layernorm.register_forward_pre_hook(route(l)))
                handles.append(layer.self_attn.register_forward_hook(section("attention")))
                handles.append(layer.mlp.register_forward_hook(section("mlp")))
            handles.append(lm.norm.register_forward_pre_hook(lambda *_: enter(None)))
            yield
        finally:
            for h in handles:
                h.remove()
