"""`pmod export triton` against a real tritonserver: the one nvidia-pytriton ships (CPU, Python backend).

One server, started once for the module on free localhost ports, serves two repositories: the
embedded model on mlx (written with --copy) and a tiny text model's ONNX export on onnx (written
as a pointer). Replies streamed over gRPC and HTTP must equal what a pmod Session gives for the
same prompt and settings. Where the server cannot run here (nvidia-pytriton or tritonclient not
installed, no stub for this Python, missing libraries) the server tests skip, saying which.

The Python backend of tritonserver 2.51 (nvidia-pytriton 0.7.0) is built with pybind11 2.10, which
misreads numpy 2 arrays (string tensors arrive garbled, outputs empty); its stub then gets a venv
whose numpy is < 2, made once in pytest's cache, with this interpreter's packages (pmod) behind it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import queue
import re
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from builders import tiny_checkpoint

from pmod import prompt
from pmod.app.cli import main
from pmod.app.generate import Sampler, SamplerArgs
from pmod.app.models import resolve_model
from pmod.app.serve.openai import Defaults
from pmod.app.session import open_session
from pmod.app.triton import MODEL_PY, Request, export_triton, placement
from pmod.errors import BadSetting, PmodError
from pmod.image import load_image

HAS_MLX = importlib.util.find_spec("mlx") is not None
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("torch") is not None
PYTRITON = "nvidia-pytriton==0.7.0"
PYVER = f"{sys.version_info[0]}.{sys.version_info[1]}"
QUESTION = "what colour is the circle ?"
MAX_TOKENS = 24
START_TIMEOUT_S = 90
TYPES = {"max_tokens": np.int32, "temperature": np.float32, "top_p": np.float32, "seed": np.int64}
needs_mlx = pytest.mark.skipif(not HAS_MLX, reason="mlx is not installed")


# ----------------------------------------------------------------------------- writing repositories
@pytest.fixture
def any_runtime(monkeypatch):
    """Writing a repository without the backend's runtime installed (its check has a test of its own)."""
    import pmod.app.triton as triton

    monkeypatch.setattr(triton, "check_backend", lambda backend: None)


def test_repository_layout(tmp_path, any_runtime):
    repo = export_triton(resolve_model(None), "mlx", tmp_path / "repo", name="shapes", instances=2, max_queue=3)
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*") if p.is_file()) == [
        "README.md", "shapes/1/model.py", "shapes/1/pmod_model.json", "shapes/config.pbtxt"]
    config = (repo / "shapes" / "config.pbtxt").read_text()
    for line in ('name: "shapes"', 'backend: "python"', "max_batch_size: 0", "model_transaction_policy { decoupled: true }",
                 '{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] }',
                 '{ name: "image" data_type: TYPE_STRING dims: [ -1 ] optional: true }',
                 '{ name: "text" data_type: TYPE_STRING dims: [ 1 ] }',
                 "instance_group [ { count: 2 kind: KIND_CPU } ]", "default_queue_policy { max_queue_size: 3 }"):
        assert line in config
    settings = json.loads((repo / "shapes" / "1" / "pmod_model.json").read_text())
    assert settings == {"format": "pmod-triton", "backend": "mlx", "dtype": None, "model": str(resolve_model(None))}
    assert (repo / "shapes" / "1" / "model.py").read_text() == MODEL_PY
    assert f"tritonserver --model-repository {repo.resolve()} " in (repo / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_no_queue_limit_and_copy(tmp_path, any_runtime):
    repo = export_triton(resolve_model(None), "mlx", tmp_path / "repo", copy=True)
    assert "dynamic_batching" not in (repo / "pmod" / "config.pbtxt").read_text()
    assert json.loads((repo / "pmod" / "1" / "pmod_model.json").read_text())["model"] == "model"
    copied = repo / "pmod" / "1" / "model"
    assert sorted(p.name for p in copied.iterdir()) == sorted(p.name for p in resolve_model(None).iterdir())


@pytest.mark.parametrize("backend, device, expected", [
    ("mlx", None, ("KIND_CPU", None)),
    ("torch", None, ("KIND_CPU", None)),
    ("torch", "cuda:1", ("KIND_GPU", 1)),
    ("onnx", "cpu", ("KIND_CPU", None)),
    ("onnx", "cuda", ("KIND_GPU", 0)),
    ("trt", None, ("KIND_GPU", 0)),
])
def test_placement(backend, device, expected):
    assert placement(backend, device) == expected


@pytest.mark.parametrize("args, message", [
    (["--backend", "mlx", "--out", "EXISTING"], "already exists"),
    (["--backend", "mlx", "--model", "/no/such/model"], "model directory /no/such/model does not exist"),
    (["--backend", "onnx"], "is not an ONNX export"),
    (["--backend", "mlx", "--instances", "0"], "--instances must be >= 1, got 0"),
    (["--backend", "mlx", "--max-queue", "0"], "--max-queue must be >= 1"),
    (["--backend", "mlx", "--device", "cuda"], "the mlx backend takes no --device"),
    (["--backend", "trt", "--device", "cpu"], "the trt backend runs on a GPU"),
    (["--backend", "torch", "--device", "gpu"], "--device must be cpu, cuda or cuda:N"),
    (["--backend", "mlx", "--name", "a/b"], "--name must be letters"),
    (["--backend", "torch"], "backend 'torch' is not installed (pmod_nowhere is missing): pip install 'pmod[export]'"),
])
def test_bad_input_is_one_line(args, message, tmp_path, monkeypatch, capsys):
    import pmod.app.registry as registry

    (tmp_path / "EXISTING").mkdir()
    if "not installed" in message:  # as on a machine without the export runtime
        monkeypatch.setitem(registry.RUNTIMES, "export", ("pmod_nowhere:runtime_info", "export"))
    else:
        monkeypatch.setattr("pmod.app.triton.check_backend", lambda backend: None)
    args = [str(tmp_path / a) if a == "EXISTING" else a for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "repo")]
    assert main(["export", "triton", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pmod: error: ") and err.count("\n") == 1 and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["EXISTING"]


def test_request_inputs():
    def get(**inputs):
        arrays = {k: np.array(v if isinstance(v, list) else [v], dtype=object if k in ("prompt", "image")
                              else TYPES[k]) for k, v in inputs.items()}
        return arrays.get

    r = Request(get(prompt=b"hi"))
    d = Defaults()
    assert (r.text, r.images, r.max_tokens, r.temp, r.top_p, r.seed) == ("hi", [], d.max_tokens, d.temp, d.top_p, d.seed)
    r = Request(get(prompt="é".encode(), image=[b"a", b"b"], max_tokens=5, temperature=0.5, top_p=0.25, seed=7))
    assert (r.text, r.images, r.max_tokens, r.temp, r.top_p, r.seed) == ("é", [b"a", b"b"], 5, 0.5, 0.25, 7)
    for inputs, message in ((dict(prompt=b"\xff"), "'prompt' is not UTF-8 text"),
                            (dict(prompt=b"a", max_tokens=0), "'max_tokens' must be >= 1, got 0"),
                            (dict(prompt=b"a", temperature=-1.0), "'temperature' must be >= 0"),
                            (dict(prompt=b"a", temperature=float("nan")), "'temperature' must be a finite number"),
                            (dict(prompt=b"a", top_p=0.0), "'top_p' must be in (0, 1]"),
                            (dict(prompt=b"a", seed=-2), "'seed' must be >= 0, got -2")):
        with pytest.raises(PmodError, match=re.escape(message)):
            Request(get(**inputs))
    with pytest.raises(BadSetting):
        placement("onnx", "cuda:1")


# ----------------------------------------------------------------------------- the real server
def _pytriton_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        pytest.skip(f"nvidia-pytriton is not installed (its tritonserver is what this test runs): "
                    f"pip install --no-deps '{PYTRITON}'")
    root = Path(spec.origin).parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        pytest.skip(f"{root}/bin/tritonserver is missing: reinstall {PYTRITON}")
    return root


def _environment(root: Path, python_bin: Path) -> dict:
    """The server's environment: its bundled libraries and libpython on the loader's path (the copied
    stub loses the wheel's relative RPATH), and the stub's Python first on PATH (it takes its
    ``sys.prefix`` from the ``python3`` found there)."""
    libs = [sysconfig.get_config_var("LIBDIR"), str(root.parent.parent / "nvidia_pytriton.libs")]
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    env["PATH"] = os.pathsep.join([str(python_bin), env.get("PATH", "")])
    return env


def _backends(root: Path, dst: Path) -> Path:
    """A backend directory: the wheel's Python backend with the stub for this Python beside it."""
    stub = root / "python_backend_stubs" / PYVER / "triton_python_backend_stub"
    if not stub.is_file():
        pytest.skip(f"{PYTRITON} has no Python backend stub for Python {PYVER} (it ships 3.8 to 3.13)")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip(f"the Python backend stub needs libpython{PYVER}.so, and this Python is built without it "
                    "(--enable-shared)")
    shutil.copytree(root / "backends", dst, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(stub, dst / "python" / "triton_python_backend_stub")
    return dst


def _stub_python(cache_dir: Path) -> Path:
    """The bin directory of the Python the stub runs: this one, or, under numpy 2, a venv with
    numpy < 2 in front of this interpreter's packages (made once, atomically, in ``cache_dir``)."""
    if int(np.__version__.split(".")[0]) < 2:
        return Path(sys.executable).parent
    env = cache_dir / f"stub-py{PYVER}"
    if (env / "ready").is_file():
        return env / "bin"
    tmp = cache_dir / f".stub-py{PYVER}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], check=True, timeout=120)
    packages = tmp / "lib" / f"python{PYVER}" / "site-packages"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                          "--only-binary=:all:", "--target", str(packages), "numpy<2"],
                         capture_output=True, text=True, timeout=300)
    if pip.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (pip.stderr.strip().splitlines() or ["pip failed"])[-1]
        pytest.skip(f"the Triton 2.51 Python backend needs numpy<2 and it could not be installed: {last}")
    # this interpreter's site directories (pmod, mlx, onnxruntime, ...) after the venv's own (numpy 1)
    dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(d)]
    (packages / "zz-pmod-host.pth").write_text(f"import site; list(map(site.addsitedir, {dirs!r}))\n")
    (tmp / "ready").write_text("")
    shutil.rmtree(env, ignore_errors=True)
    os.replace(tmp, env)
    return env / "bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _preflight(binary: Path, backends: Path, env: dict) -> None:
    """Skip, saying why, where the server binary or the stub cannot start on this machine (run with
    no model, the stub only says how many arguments it expects)."""
    for cmd in ([str(binary), "--version"], [str(backends / "python" / "triton_python_backend_stub")]):
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
        text = run.stdout + run.stderr
        if "error while loading shared libraries" in text:
            pytest.skip(f"{cmd[0]} cannot run here: {text.strip().splitlines()[-1]}")


class Server:
    """A tritonserver process on free localhost ports, its log in a file."""

    def __init__(self, binary: Path, backends: Path, repos: list[Path], env: dict, log: Path):
        self.http_port, self.grpc_port, self.log = _free_port(), _free_port(), log
        self.command = [str(binary), *(f"--model-repository={r}" for r in repos), f"--backend-directory={backends}",
                        "--http-address=127.0.0.1", f"--http-port={self.http_port}", "--grpc-address=127.0.0.1",
                        f"--grpc-port={self.grpc_port}", "--allow-metrics=false", "--exit-timeout-secs=2"]
        with open(log, "wb") as f:  # its own process group: the stubs go down with it
            self.proc = subprocess.Popen(self.command, env=env, stdout=f, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = self.log.read_text(errors="replace")
                for line in log.splitlines():
                    if "error while loading shared libraries" in line:
                        pytest.skip(f"tritonserver cannot run here: {line.strip()}")
                pytest.fail(f"tritonserver exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.http}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        pytest.fail(f"tritonserver not ready after {timeout:.0f} s:\n{self.tail()}")

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(wait)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:  # stubs left behind by a killed server
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``{name: (model directory, backend)}`` of the served models, their repositories written by
    the CLI: the embedded model on mlx (copied in) and a tiny text model's ONNX export (pointed at)."""
    tmp = tmp_path_factory.mktemp("triton")
    out = {}
    if HAS_MLX:
        assert main(["export", "triton", "--backend", "mlx", "--name", "shapes", "--copy", "--max-queue", "8",
                     "--out", str(tmp / "repo-mlx")]) == 0
        out["shapes"] = (resolve_model(None), "mlx", tmp / "repo-mlx")
    if HAS_ORT:
        _, _, ckpt = tiny_checkpoint(tmp, seed=0, tokenizer=True, max_position_embeddings=512)
        assert main(["export", "onnx", "--model", str(ckpt), "--out", str(tmp / "onnx"),
                     "--max-vision-tokens", "0"]) == 0
        assert main(["export", "triton", "--backend", "onnx", "--model", str(tmp / "onnx"), "--name", "tiny",
                     "--instances", "1", "--out", str(tmp / "repo-onnx")]) == 0
        out["tiny"] = (tmp / "onnx", "onnx", tmp / "repo-onnx")
    if not out:
        pytest.skip("neither mlx nor onnxruntime+torch is installed: no backend to serve")
    return out


@pytest.fixture(scope="module")
def server(models, tmp_path_factory, pytestconfig):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed: pip install 'tritonclient[http,grpc]'")
    pytest.importorskip("tritonclient.http", reason="tritonclient is not installed: pip install 'tritonclient[http,grpc]'")
    root = _pytriton_root()
    tmp = tmp_path_factory.mktemp("tritonserver")
    backends = _backends(root, tmp / "backends")
    env = _environment(root, _stub_python(Path(pytestconfig.cache.mkdir("triton"))))
    _preflight(root / "bin" / "tritonserver", backends, env)
    s = Server(root / "bin" / "tritonserver", backends, [repo for _, _, repo in models.values()], env, tmp / "log.txt")
    try:
        s.wait_ready(START_TIMEOUT_S)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def sessions(models):
    """The reference: a pmod Session per served model, opened here as ``pmod generate`` would."""
    return {name: open_session(model, backend=backend) for name, (model, backend, _) in models.items()}


def _served(models, name):
    if name not in models:
        pytest.skip(f"model {name!r} is not served: its backend is not installed")


def reference(session, text, images=(), max_tokens=MAX_TOKENS, temperature=0.0, top_p=1.0, seed=None) -> str:
    sampler = Sampler(SamplerArgs(float(np.float32(temperature)), float(np.float32(top_p)), seed))
    message = prompt.Message("user", text, len(images))
    return "".join(session.complete([message], list(images), max_tokens=max_tokens, sampler=sampler))


def grpc_stream(server, name, text, images=(), **params) -> tuple[list[str], str | None]:
    """``(pieces, error message or None)`` of one streamed request over gRPC."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    def tensor(key, values):
        t = grpcclient.InferInput(key, [len(values)], np_to_triton_dtype(values.dtype) if values.dtype != object
                                  else "BYTES")
        t.set_data_from_numpy(values)
        return t

    inputs = [tensor("prompt", np.array([text.encode()], dtype=object))]
    if images:
        inputs.append(tensor("image", np.array(list(images), dtype=object)))
    inputs += [tensor(k, np.array([v], dtype=TYPES[k])) for k, v in params.items()]
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    pieces = []
    try:
        client.async_stream_infer(name, inputs, enable_empty_final_response=True)
        while True:
            result, error = results.get(timeout=60)
            if error is not None:
                return pieces, error.message()
            response = result.get_response()
            if response.outputs:
                pieces.append(result.as_numpy("text")[0].decode())
            if response.parameters["triton_final_response"].bool_param:
                return pieces, None
    finally:
        client.stop_stream()
        client.close()


def http_stream(server, name, body: dict) -> list[dict]:
    """The events of one request to the HTTP generate-stream endpoint (server-sent events)."""
    request = urllib.request.Request(f"{server.http}/v2/models/{name}/generate_stream", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as r:
        return [json.loads(line[5:]) for line in r.read().decode().splitlines() if line.startswith("data:")]


def _png() -> bytes:
    from pmod.tasks import shapes

    buf = io.BytesIO()
    shapes.make_samples("demo", 1, seed=0, questions_per_image=1)[0].image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["shapes", "tiny"])
def test_grpc_stream_equals_session(server, models, sessions, name):
    _served(models, name)
    pieces, error = grpc_stream(server, name, QUESTION, max_tokens=MAX_TOKENS)
    assert error is None
    assert "".join(pieces) == reference(sessions[name], QUESTION)
    if name == "tiny":  # the random tiny model runs to max_tokens: a reply of many pieces
        assert len(pieces) > 5


def test_http_stream_equals_session(server, models, sessions):
    import tritonclient.http as httpclient

    name = "tiny" if "tiny" in models else "shapes"
    client = httpclient.InferenceServerClient(f"127.0.0.1:{server.http_port}")
    assert client.is_model_ready(name)
    config = client.get_model_config(name)
    assert config["model_transaction_policy"] == {"decoupled": True} and config["backend"] == "python"
    events = http_stream(server, name, {"prompt": QUESTION, "max_tokens": MAX_TOKENS})
    assert all("error" not in e for e in events)
    assert "".join(e.get("text", "") for e in events) == reference(sessions[name], QUESTION)


@needs_mlx
def test_image_and_sampling_equal_session(server, models, sessions):
    png = _png()
    pieces, error = grpc_stream(server, "shapes", QUESTION, [png], max_tokens=MAX_TOKENS)
    assert error is None and "".join(pieces) == reference(sessions["shapes"], QUESTION, [png])
    params = dict(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.8, seed=3)
    pieces, error = grpc_stream(server, "shapes", "how many shapes are there ?", [png], **params)
    assert error is None
    assert "".join(pieces) == reference(sessions["shapes"], "how many shapes are there ?", [png], **params)


@needs_mlx
def test_bad_requests_get_one_line_and_serving_goes_on(server, models, sessions):
    with pytest.raises(PmodError) as e:
        load_image(b"not an image")
    pieces, error = grpc_stream(server, "shapes", QUESTION, [b"not an image"])
    assert pieces == [] and error is not None and str(e.value) in error and "\n" not in error, error
    pieces, error = grpc_stream(server, "shapes", QUESTION, max_tokens=0)
    assert error is not None and "'max_tokens' must be >= 1, got 0" in error
    pieces, error = grpc_stream(server, "shapes", QUESTION, max_tokens=MAX_TOKENS)
    assert error is None and "".join(pieces) == reference(sessions["shapes"], QUESTION)


def test_prompt_over_the_context(server, models, sessions):
    _served(models, "tiny")
    pieces, error = grpc_stream(server, "tiny", "circle " * 600, max_tokens=4)
    assert pieces == [] and error is not None and "\n" not in error and "Traceback" not in error
    with pytest.raises(PmodError) as e:
        reference(sessions["tiny"], "circle " * 600, max_tokens=4)
    assert str(e.value) in error
