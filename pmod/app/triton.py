"""``pmod export triton``: a Triton Inference Server model repository over the pmod engine.

The repository holds one model for Triton's Python backend (docs/TRITON.md)::

    REPO/README.md                how to start tritonserver on it and call it
    REPO/NAME/config.pbtxt        decoupled (one response per piece of text), instances, queue limit
    REPO/NAME/1/model.py          the TritonPythonModel: hands Triton's calls to :class:`TritonServing`
    REPO/NAME/1/pmod_model.json   the backend, dtype and model directory (absolute, or ``model``)
    REPO/NAME/1/model/            with ``copy``: the checkpoint, export or engine directory itself

Triton runs ``model.py`` in a Python process of its own (the backend's stub), which imports pmod:
the serving code lives here, versioned and tested with pmod, and ``model.py`` stays a shim.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import traceback
from contextlib import closing
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from pmod import prompt
from pmod.app.generate import Sampler, SamplerArgs
from pmod.app.registry import BACKENDS, RUNTIMES, load
from pmod.app.serve.openai import MAX_IMAGES, Defaults
from pmod.app.session import Session, open_session
from pmod.errors import BadSetting, PmodError, first_line
from pmod.format import atomic_dir, read_config
from pmod.jsonfile import read_json_object
from pmod.static.manifest import ENGINE_FORMAT, EXPORT_FORMAT, read_manifest

FORMAT = "pmod-triton"
SETTINGS_FILE = "pmod_model.json"
COPY_DIR = "model"
DEFAULT_NAME = "pmod"
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_DEVICE = re.compile(r"cpu|cuda(?::(\d+))?")
#: backend -> (its runtime in ``registry.RUNTIMES``, the key of its library in that ``runtime_info()``, the library)
_LIBRARY = {"mlx": ("mlx", "version", "mlx"), "torch": ("export", "torch", "torch"),
            "onnx": ("export", "onnxruntime", "onnxruntime"), "trt": ("trt", "tensorrt", "tensorrt")}

MODEL_PY = '''"""Triton Python-backend model over pmod, written by 'pmod export triton' (../../README.md).

The work is pmod's (pmod.app.triton.TritonServing): this file hands Triton's calls over.
"""

from pathlib import Path

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        try:
            from pmod.app.triton import TritonServing
        except ImportError as e:
            raise pb_utils.TritonModelException(
                f"pmod cannot be imported by the Python backend ({e}): start tritonserver with the Python "
                "that has pmod installed first on PATH, or set EXECUTION_ENV_PATH (see README.md)") from None
        self.serving = TritonServing.open(Path(__file__).resolve().parent, args["model_instance_kind"],
                                          int(args["model_instance_device_id"]), pb_utils)

    def execute(self, requests):
        for request in requests:
            self.serving.serve(request)
        return None  # decoupled: every response went out through the request's response sender

    def finalize(self):
        self.serving = None
'''


# ================================================================== writing a repository
def export_triton(model, backend: str, out, name: str = DEFAULT_NAME, instances: int = 1,
                  max_queue: int | None = None, device: str | None = None, dtype: str | None = None,
                  copy: bool = False) -> Path:
    """Write the repository ``out`` (atomically; it must not exist) serving ``model`` with ``backend``.

    ``model`` is what the backend opens: a pmod checkpoint (mlx, torch), an ONNX export (onnx) or a
    TensorRT engine directory (trt). The repository points at it by its absolute path, or holds a
    copy with ``copy``. ``max_queue``: requests that may wait for an instance (more are refused at
    once); None leaves the queue unbounded. ``device`` picks the instances' kind (``placement``).
    """
    if not _NAME.fullmatch(name):
        raise BadSetting(f"{{name}} must be letters, digits, '_', '-' or '.' (a directory name), got {name!r}",
                         "name")
    if instances < 1:
        raise BadSetting(f"{{instances}} must be >= 1, got {instances}", "instances")
    if max_queue is not None and max_queue < 1:
        raise BadSetting(f"{{max_queue}} must be >= 1 (leave it out for no limit), got {max_queue}", "max_queue")
    kind, gpu = placement(backend, device)
    check_backend(backend)
    model = Path(model).resolve()
    check_model(model, backend)
    out = Path(out)
    settings = {"format": FORMAT, "backend": backend, "dtype": dtype, "model": COPY_DIR if copy else str(model)}
    with atomic_dir(out) as tmp:
        version = tmp / name / "1"
        version.mkdir(parents=True)
        (tmp / name / "config.pbtxt").write_text(model_config(name, instances, max_queue, kind, gpu))
        (version / "model.py").write_text(MODEL_PY)
        (version / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n")
        if copy:
            shutil.copytree(model, version / COPY_DIR)
        (tmp / "README.md").write_text(repo_readme(out.resolve(), name))
    return out


def placement(backend: str, device: str | None) -> tuple[str, int | None]:
    """``(instance kind, GPU index or None)`` of the instances: mlx on the CPU (MLX picks Metal
    itself, which Triton does not schedule); torch on ``device`` (cpu, cuda or cuda:N; default
    cpu); onnx on the CPU or, with cuda, GPU 0; trt on GPU 0. ONNX Runtime and TensorRT run on
    the default CUDA device, so their instances are pinned to it rather than spread over GPUs."""
    if backend == "mlx":
        if device is not None:
            raise BadSetting("the mlx backend takes no {device} (MLX picks Metal or the CPU itself): drop it",
                             "device")
        return "KIND_CPU", None
    text = device if device is not None else ("cuda" if backend == "trt" else "cpu")
    m = _DEVICE.fullmatch(text)
    if m is None:
        raise BadSetting(f"{{device}} must be cpu, cuda or cuda:N, got {text!r}", "device")
    if text == "cpu":
        if backend == "trt":
            raise BadSetting("the trt backend runs on a GPU: {device} must be cuda (or cuda:0)", "device")
        return "KIND_CPU", None
    gpu = int(m[1] or 0)
    if gpu and backend != "torch":
        raise BadSetting(f"the {backend} backend runs on the default CUDA device: {{device}} must be cuda or "
                         f"cuda:0, got {text!r}", "device")
    return "KIND_GPU", gpu


def check_backend(backend: str) -> None:
    """The backend's runtime and its library load here, as its runtime's ``runtime_info`` reports
    (the runtimes import their library only when an engine opens)."""
    if backend not in _LIBRARY:
        raise PmodError(f"unknown backend {backend!r}: choose one of {', '.join(_LIBRARY)}")
    runtime, key, library = _LIBRARY[backend]
    target, extra = RUNTIMES[runtime]
    problem = f"backend {backend!r} is not installed"
    if load(target, extra, problem)().get(key) is None:
        raise PmodError(f"{problem} ({library} does not load): pip install 'pmod[{extra}]'")


def check_model(model: Path, backend: str) -> None:
    """``model`` is what ``backend`` opens: its config, export manifest or engine manifest reads."""
    if backend == "onnx":
        read_manifest(model, EXPORT_FORMAT)
    elif backend == "trt":
        read_manifest(model, ENGINE_FORMAT)
    else:
        read_config(model)


def model_config(name: str, instances: int, max_queue: int | None, kind: str, gpu: int | None) -> str:
    """``config.pbtxt``: a decoupled Python-backend model (each response one piece of the reply).

    ``max_batch_size: 0``: every request is one conversation and its tensors have no batch
    dimension. The dynamic batcher is there only for its queue policy (requests over
    ``max_queue`` are refused at once rather than left waiting)."""
    group = f"count: {instances} kind: {kind}" + (f" gpus: [ {gpu} ]" if gpu is not None else "")
    queue = ("" if max_queue is None else
             f"dynamic_batching {{\n  default_queue_policy {{ max_queue_size: {max_queue} }}\n}}\n")
    return f'''name: "{name}"
backend: "python"
max_batch_size: 0
model_transaction_policy {{ decoupled: true }}
input [
  {{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "image" data_type: TYPE_STRING dims: [ -1 ] optional: true }},
  {{ name: "max_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }},
  {{ name: "temperature" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "top_p" data_type: TYPE_FP32 dims: [ 1 ] optional: true }},
  {{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }}
]
output [
  {{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }}
]
instance_group [ {{ {group} }} ]
{queue}'''


def repo_readme(repo: Path, name: str) -> str:
    return f"""# Triton model repository `{repo.name}` (written by `pmod export triton`)

`{name}/` is a decoupled Python-backend model over pmod: send a `prompt` (and optionally `image`:
encoded image files, `max_tokens`, `temperature`, `top_p`, `seed`) and it streams the reply as
one `text` response per piece, then a final empty response flagged complete. A bad request (an
undecodable image, a prompt over the context) gets an error response of one line.

## Serving it

The Python backend runs `{name}/1/model.py` in its own interpreter, which must import pmod:
start tritonserver with the Python that has pmod installed first on `PATH` (the backend's stub
takes its `sys.prefix` from the `python3` found there; it ignores `PYTHONPATH`), or pack that
environment and set `EXECUTION_ENV_PATH` in `{name}/config.pbtxt`'s `parameters`.

```bash
tritonserver --model-repository {repo} --http-port 8000 --grpc-port 8001 --metrics-port 8002
```

Python backends built with pybind11 < 2.12 (tritonserver 2.51 / 24.10 and older, such as the
one in `nvidia-pytriton` 0.7.0) misread numpy 2 arrays: string tensors arrive garbled. With
those, give the stub an environment with `numpy<2`, e.g. a venv made with
`python -m venv --system-site-packages ENV && ENV/bin/python -m pip install "numpy<2"`, and
put `ENV/bin` first on `PATH`.

With the server in the `nvidia-pytriton` wheel (`pip install --no-deps nvidia-pytriton`),
copy its Python backend next to the stub for your Python and point the server at it:

```bash
TS=$(python -c "import importlib.util as u; print(u.find_spec('pytriton').submodule_search_locations[0])")/tritonserver
LIBS=$TS/../../nvidia_pytriton.libs
PYVER=$(python -c "import sys; print(f'{{sys.version_info[0]}}.{{sys.version_info[1]}}')")
cp -r $TS/backends backends && cp $TS/python_backend_stubs/$PYVER/triton_python_backend_stub backends/python/
LD_LIBRARY_PATH=$(python -c "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"):$LIBS \\
  $TS/bin/tritonserver --model-repository {repo} --backend-directory $PWD/backends \\
  --http-port 8000 --grpc-port 8001 --allow-metrics=false
```

## Calling it

HTTP (the generate-stream endpoint; the plain HTTP infer endpoint refuses decoupled models):

```bash
curl -N localhost:8000/v2/models/{name}/generate_stream -d '{{"prompt": "what colour is the circle?", "max_tokens": 32}}'
```

gRPC streaming with `tritonclient[grpc]`:

```python
import queue
import numpy as np
import tritonclient.grpc as grpcclient

def tensor(name, value, dtype):
    t = grpcclient.InferInput(name, [len(value)], dtype)
    t.set_data_from_numpy(np.array(value, dtype=object if dtype == "BYTES" else None))
    return t

inputs = [tensor("prompt", [b"what colour is the circle?"], "BYTES"),
          tensor("image", [open("photo.png", "rb").read()], "BYTES"),
          tensor("max_tokens", np.array([32], np.int32), "INT32")]
pieces = queue.Queue()
client = grpcclient.InferenceServerClient("localhost:8001")
client.start_stream(callback=lambda result, error: pieces.put((result, error)))
client.async_stream_infer("{name}", inputs, enable_empty_final_response=True)
while True:
    result, error = pieces.get()
    if error is not None:
        raise SystemExit(error.message())
    if result.get_response().parameters["triton_final_response"].bool_param:
        break
    print(result.as_numpy("text")[0].decode(), end="", flush=True)
client.stop_stream()
```
"""


# ================================================================== serving (inside Triton's Python backend)
def read_settings(version_dir: Path) -> tuple[Path, dict]:
    """``(model directory, settings)`` of a repository's version directory."""
    path = Path(version_dir) / SETTINGS_FILE
    settings = read_json_object(path, fix="write the repository again with 'pmod export triton'")
    if settings.get("format") != FORMAT or settings.get("backend") not in BACKENDS:
        raise PmodError(f"{path} is not a pmod Triton settings file; write the repository again with "
                        "'pmod export triton'")
    return Path(version_dir) / settings["model"], settings  # an absolute "model" replaces the directory


def engine_options(backend: str, kind: str, device_id: int) -> dict:
    """``open_engine``'s placement arguments for an instance Triton put on ``kind`` (CPU or GPU)
    number ``device_id``: torch goes to that GPU; ONNX Runtime, which takes CUDA whenever its GPU
    build is installed, is held to the CPU on a CPU instance."""
    if backend == "torch" and kind == "GPU":
        return {"device": f"cuda:{device_id}"}
    if backend == "onnx" and kind == "CPU":
        return {"providers": ["CPUExecutionProvider"]}
    return {}


class Request:
    """One request's inputs, checked; bad ones are a PmodError naming the input."""

    def __init__(self, get: Callable[[str], np.ndarray | None], defaults: Defaults | None = None):
        """``get(name)``: the named input as a numpy array, None when the request leaves it out;
        ``defaults``: for the inputs left out (``pmod server``'s by default)."""
        defaults = defaults or Defaults()
        self.text = _text(get("prompt"))
        images = get("image")
        self.images = [] if images is None else [bytes(b) for b in images.reshape(-1)]
        if len(self.images) > MAX_IMAGES:
            raise PmodError(f"'image' holds {len(self.images)} images, more than {MAX_IMAGES}")
        self.max_tokens = _scalar(get("max_tokens"), "max_tokens", defaults.max_tokens)
        self.temp = _scalar(get("temperature"), "temperature", defaults.temp)
        self.top_p = _scalar(get("top_p"), "top_p", defaults.top_p)
        self.seed = _scalar(get("seed"), "seed", defaults.seed)
        if self.max_tokens < 1:
            raise PmodError(f"'max_tokens' must be >= 1, got {self.max_tokens}")
        if not self.temp >= 0:
            raise PmodError(f"'temperature' must be >= 0, got {self.temp:g}")
        if not 0 < self.top_p <= 1:
            raise PmodError(f"'top_p' must be in (0, 1], got {self.top_p:g}")
        if self.seed is not None and self.seed < 0:
            raise PmodError(f"'seed' must be >= 0, got {self.seed}")

    def reply(self, session: Session) -> Iterator[str]:
        """The reply's pieces, from an empty context (each image gets an ``<image>`` line before the
        text unless the prompt places its markers itself, as ``pmod server`` does)."""
        message = prompt.Message("user", self.text, len(self.images))
        return session.complete([message], self.images, max_tokens=self.max_tokens,
                                sampler=Sampler(SamplerArgs(self.temp, self.top_p, self.seed)))


def _text(values: np.ndarray | None) -> str:
    if values is None or values.size != 1:
        raise PmodError("'prompt' must hold one string")
    try:
        return bytes(values.reshape(-1)[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise PmodError("'prompt' is not UTF-8 text") from None


def _scalar(values: np.ndarray | None, name: str, default):
    """The one number of input ``name`` as a Python int or float (``default`` when left out)."""
    if values is None:
        return default
    if values.size != 1:
        raise PmodError(f"'{name}' must hold one number, got {values.size}")
    v = values.reshape(-1)[0].item()
    if isinstance(v, float) and not math.isfinite(v):
        raise PmodError(f"'{name}' must be a finite number, got {v}")
    return v


class TritonServing:
    """One Triton model instance: its session, and every request answered as a stream of responses."""

    def __init__(self, session: Session, pb):
        """``pb``: the Python backend's ``triton_python_backend_utils`` module."""
        self.session, self.pb = session, pb

    @classmethod
    def open(cls, version_dir: Path, kind: str, device_id: int, pb) -> TritonServing:
        try:
            model, settings = read_settings(version_dir)
            backend = settings["backend"]
            session = open_session(model, backend=backend, dtype=settings.get("dtype"),
                                   **engine_options(backend, kind, device_id))
        except PmodError as e:  # the model fails to load with this line in the server's log
            raise pb.TritonModelException(f"pmod: {e}") from None
        return cls(session, pb)

    def serve(self, request) -> None:
        """Send ``request`` its reply, one response per piece of text, then the final flag (alone, or
        on an error response). A bad request's error is the PmodError's line; any other failure is
        ``internal error: ...`` with its traceback in the server's log. The instance serves on."""
        pb = self.pb
        sender = request.get_response_sender()
        final = None
        try:
            inputs = Request(lambda name: _input(pb, request, name))
            with closing(inputs.reply(self.session)) as pieces:
                for piece in pieces:
                    if _cancelled(sender):
                        break
                    text = pb.Tensor("text", np.array([piece.encode("utf-8")], dtype=np.object_))
                    sender.send(pb.InferenceResponse(output_tensors=[text]))
        except PmodError as e:
            final = pb.InferenceResponse(error=pb.TritonError(str(e)))
        except Exception as e:  # noqa: BLE001 - answered as an error, the instance keeps serving
            pb.Logger.log_error(f"pmod: internal error:\n{traceback.format_exc().rstrip()}")
            final = pb.InferenceResponse(error=pb.TritonError(f"internal error: {first_line(e)}"))
        sender.send(final, flags=pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def _input(pb, request, name: str) -> np.ndarray | None:
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _cancelled(sender) -> bool:
    """Whether the client cancelled (or left); Python backends before 23.10 cannot tell."""
    is_cancelled = getattr(sender, "is_cancelled", None)
    return bool(is_cancelled is not None and is_cancelled())
