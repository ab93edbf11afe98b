"""``pmod server``: a local OpenAI-compatible chat server over one :class:`~pmod.session.Session`.

Endpoints (the mlx-lm / mlx-vlm server conventions):

- ``POST /v1/chat/completions``: OpenAI chat completions, streamed as server-sent events
  (``chat.completion.chunk`` objects, then ``data: [DONE]``) when ``stream`` is true.
  ``content`` is a string or a list of ``text`` and ``image_url`` parts; an image part becomes
  an ``<image>`` marker at its place and the parts are joined with newlines, so
  ``[image, text]`` is ``"<image>\\n" + text`` as in official LLaVA. Image URLs are
  ``data:image/...;base64,...``, ``file:///abs/path`` or ``/abs/path``; http(s) URLs are refused
  (the server makes no network requests). ``system`` (or ``developer``) messages replace the
  default system line. ``model`` is not checked: one model is served.
- ``GET /v1/models`` (and ``/v1/models/<id>``): the served model, id = its directory name.
- ``GET /health``: ``{"status": "ok"}``.

Requests are generated one at a time, in arrival order, on one compute thread (MLX state
stays on one thread); other clients wait in the queue. Bad requests get HTTP 400 with an
OpenAI error body (``{"error": {"message", "type", "param", "code"}}``) and the server keeps
serving; bodies over the limit get 413; internal errors 500 (traceback on stderr). A client
that goes away stops its generation. One line per request is logged to stderr.

Only the standard library serves HTTP; no runtime is imported until the model is opened.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import math
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from . import prompt
from .errors import PmodError
from .generate import Sampler, SamplerArgs

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
MAX_BODY_BYTES = 32 * 1024 * 1024  # a request body (base64 images included)
MAX_QUEUE = 64  # requests waiting for or in generation; more get 503
MAX_STOP = 16
MAX_IMAGES = 32  # per request (each one is decoded, up to pmod.image's pixel cap)
SOCKET_TIMEOUT_S = 120.0  # reading a request, writing a response, idle keep-alive
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# ================================================================== compute thread
class _Task:
    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn
        self.done = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the waiting thread
            self.error = e
        finally:
            self.done.set()

    def wait(self, timeout: float | None = None) -> Any:
        if not self.done.wait(timeout):
            raise TimeoutError("the compute thread is busy")
        if self.error is not None:
            raise self.error
        return self.result


class _Compute:
    """One daemon thread, for the life of the process, that runs every model call in order.

    MLX keeps per-thread state, and a thread that used MLX and then exits can abort the
    process when it ends (seen with mlx 0.32 on Linux); so the model is opened and run on this
    one thread, which never exits, whichever thread serves the HTTP requests.
    """

    _instance: "_Compute | None" = None
    _lock = threading.Lock()

    def __init__(self):
        self.tasks: queue.Queue[_Task] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="pmod-compute", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> "_Compute":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _loop(self) -> None:
        while True:
            self.tasks.get().run()

    def submit(self, fn: Callable[[], Any]) -> _Task:
        task = _Task(fn)
        if threading.current_thread() is self.thread:
            task.run()  # called from a task: run inline, not behind itself in the queue
        else:
            self.tasks.put(task)
        return task

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        return self.submit(fn).wait(timeout)


# ================================================================== requests
class RequestError(Exception):
    """A request the server refuses: HTTP status + OpenAI error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    messages: list[prompt.Message]
    images: list  # bytes (data URLs) or absolute paths, in marker order
    system: str | None
    max_tokens: int
    temp: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool = False
    include_usage: bool = False


@dataclass
class Defaults:
    max_tokens: int = 256
    temp: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


def _short(v, limit: int = 80) -> str:
    """``repr(v)`` cut to ``limit`` characters, for error messages that quote a client's value."""
    r = repr(v)
    return r if len(r) <= limit else r[:limit - 3] + "..."


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, key: str, default: float) -> float:
    v = body.get(key)
    if v is None:
        return default
    try:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    except OverflowError:
        ok = False
    if not ok:
        raise RequestError(f"'{key}' must be a number, got {_short(v)}", key)
    return float(v)


def parse_chat_request(body: Any, defaults: Defaults, max_image_bytes: int = MAX_BODY_BYTES) -> ChatRequest:
    """Check a ``/v1/chat/completions`` body; raise :class:`RequestError` naming the bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"'model' must be a string, got {_short(model)}", "model")

    # -- sampling and limits
    max_tokens = defaults.max_tokens
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if v is None:
            continue
        if not _is_int(v) or v < 1:
            raise RequestError(f"'{key}' must be an integer >= 1, got {_short(v)}", key)
        max_tokens = v
        break
    temp = _number(body, "temperature", defaults.temp)
    if temp < 0:
        raise RequestError(f"'temperature' must be >= 0, got {temp:g}", "temperature")
    top_p = _number(body, "top_p", defaults.top_p)
    if not 0 < top_p <= 1:
        raise RequestError(f"'top_p' must be in (0, 1], got {top_p:g}", "top_p")
    seed = body.get("seed", defaults.seed)
    if seed is None:
        seed = defaults.seed
    if seed is not None and (not _is_int(seed) or seed < 0):
        raise RequestError(f"'seed' must be an integer >= 0, got {_short(seed)}", "seed")
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError(f"'n' must be 1 (one choice per request), got {_short(n)}", "n")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError(f"'stop' must be a string or a list of strings, got {_short(stop)}", "stop")
    if len(stop) > MAX_STOP:
        raise RequestError(f"'stop' has {len(stop)} strings, more than {MAX_STOP}", "stop")
    stop = [s for s in stop if s]
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {_short(stream)}", "stream")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise RequestError("'stream_options' must be an object", "stream_options")
        include_usage = opts.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise RequestError("'stream_options.include_usage' must be true or false",
                               "stream_options.include_usage")

    # -- the conversation
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    messages, images, system = [], [], []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where)
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise RequestError(f"{where}.role {_short(role)} is not supported: use system, user or assistant",
                               f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""  # e.g. a tool-call turn: no text to replay
        text, imgs = _parse_content(content, f"{where}.content", max_image_bytes)
        if role != "user" and (imgs or prompt.IMAGE in text):
            raise RequestError(f"{where}: only user messages can hold images", f"{where}.content")
        if role in ("system", "developer"):
            system.append(text)
        else:
            messages.append(prompt.Message(role, text, len(imgs)))
            images.extend(imgs)
    if len(images) > MAX_IMAGES:
        raise RequestError(f"the request has {len(images)} images, more than {MAX_IMAGES}", "messages")
    if not messages or messages[-1].role != "user":
        raise RequestError("'messages' must end with a user message", "messages")
    try:  # marker counts and roles, before the request queues
        prompt.render(messages)
    except PmodError as e:
        raise RequestError(str(e), "messages") from None
    return ChatRequest(messages=messages, images=images, system="\n".join(system) if system else None,
                       max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed, stop=stop,
                       stream=stream, include_usage=include_usage)


def _parse_content(content, where: str, max_image_bytes: int) -> tuple[str, list]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f"{where} must be a string or a list of content parts", where)
    pieces, images = [], []
    for j, part in enumerate(content):
        pw = f"{where}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("text", "input_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise RequestError(f"{pw}.text must be a string", f"{pw}.text")
            pieces.append(text)
        elif kind in ("image_url", "input_image"):
            url = part.get("image_url")
            if isinstance(url, dict):
                url = url.get("url")
            images.append(image_source(url, f"{pw}.image_url", max_image_bytes))
            pieces.append(prompt.IMAGE)
        else:
            raise RequestError(f"{pw} must be a {{'type': 'text'}} or {{'type': 'image_url'}} part, "
                               f"got type {_short(kind)}", pw)
    return "\n".join(pieces), images


def image_source(url, where: str, max_bytes: int = MAX_BODY_BYTES):
    """A data: URL's bytes or a local file's absolute path; anything else is a RequestError."""
    if not isinstance(url, str) or not url:
        raise RequestError(f"{where} must be an object with a 'url' string", where)
    head = url[:16].lower()
    if head.startswith("data:"):
        meta, sep, data = url.partition(",")
        parts = meta[5:].lower().split(";")
        if not sep or "base64" not in parts[1:]:
            raise RequestError(f"{where}: a data URL must be base64 (data:image/png;base64,...)", where)
        if parts[0] and not parts[0].startswith("image/"):
            raise RequestError(f"{where}: data URL type {_short(parts[0])} is not an image", where)
        try:
            raw = base64.b64decode("".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"{where}: the data URL is not valid base64", where) from None
        if not raw:
            raise RequestError(f"{where}: the data URL holds no image bytes", where)
        return raw
    if head.startswith(("http://", "https://")):
        raise RequestError(f"{where}: remote image URLs are not fetched (the server makes no network "
                           "requests): send the image as a base64 data: URL or a local file path", where)
    if head.startswith("file:"):
        parsed = urllib.parse.urlparse(url)
        if parsed.netloc not in ("", "localhost"):
            raise RequestError(f"{where}: file URL host {_short(parsed.netloc)} is not local", where)
        path = urllib.parse.unquote(parsed.path)
    elif url.startswith("/"):
        path = url
    else:
        scheme = url.split(":", 1)[0] if ":" in url else ""
        raise RequestError(f"{where}: unsupported image URL{' scheme ' + repr(scheme) if scheme else ''}: "
                           "use data:image/...;base64,..., file:///abs/path or /abs/path", where)
    if not os.path.isabs(path):
        raise RequestError(f"{where}: image file paths must be absolute, got {_short(path)}", where)
    if not os.path.isfile(path):
        raise RequestError(f"{where}: image file {_short(path)} not found (or not a file)", where)
    size = os.path.getsize(path)
    if size > max_bytes:
        raise RequestError(f"{where}: image file {_short(path)} is {size} bytes, over the {max_bytes}-byte limit",
                           where)
    return path


# ================================================================== generation jobs
@dataclass(eq=False)
class _Job:
    request: ChatRequest
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


class ChatServer(ThreadingHTTPServer):
    """The HTTP server; ``session`` lives on the compute thread and is used only there."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, session, model_id: str, defaults: Defaults,
                 max_body: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE, log=None):
        self.session = session
        self.model_id = model_id
        self.defaults = defaults
        self.max_body = max_body
        self.max_queue = max_queue
        self.created = int(time.time())
        self.compute = _Compute.get()
        self.log_file = log  # None: sys.stderr at the time of writing
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._jobs: set[_Job] = set()
        self._log_lock = threading.Lock()
        self.closed = False
        self._served = False
        super().__init__(address, ChatHandler)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._served = True
        super().serve_forever(poll_interval)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{port}"

    # ---------------------------------------------------------------- jobs
    def submit(self, request: ChatRequest) -> _Job:
        job = _Job(request)
        with self._pending_lock:
            if self.closed:
                raise RequestError("the server is shutting down", status=503, type="server_error")
            if self._pending >= self.max_queue:
                raise RequestError(f"the server is busy ({self._pending} requests queued): retry later",
                                   status=503, type="server_error", code="server_busy")
            self._pending += 1
            self._jobs.add(job)
        self.compute.submit(lambda: self._run(job))
        return job

    def _run(self, job: _Job) -> None:
        try:
            if not job.cancelled.is_set():
                self._generate(job)
        finally:
            with self._pending_lock:
                self._pending -= 1
                self._jobs.discard(job)
            job.events.put(("end", None))

    def _generate(self, job: _Job) -> None:
        from .session import Reply

        r = job.request
        reply = Reply()
        try:
            sampler = Sampler(SamplerArgs(r.temp, r.top_p, r.seed))
            # The session matches the stop strings: it holds back a tail that could begin one and
            # ends the reply before the first match (reply.text is exactly the pieces yielded).
            pieces = self.session.complete(r.messages, r.images, system=r.system, max_tokens=r.max_tokens,
                                           sampler=sampler, stop=r.stop, reply=reply)
            try:
                for piece in pieces:
                    if job.cancelled.is_set():
                        return
                    job.events.put(("piece", piece))
            finally:
                close = getattr(pieces, "close", None)
                if close is not None:
                    close()
        except PmodError as e:
            job.events.put(("error", RequestError(str(e), "messages")))
            return
        except Exception as e:  # noqa: BLE001 - reported as a 500, the server keeps serving
            self.log(f"internal error:\n{traceback.format_exc().rstrip()}")
            job.events.put(("error", RequestError(f"internal error: {type(e).__name__}: {e}".split("\n")[0],
                                                  status=500, type="server_error")))
            return
        job.events.put(("done", reply))

    def call(self, fn: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """Run ``fn(session)`` on the compute thread, in turn with the requests (for tests, tools)."""
        return self.compute.call(lambda: fn(self.session), timeout)

    def close(self, wait_s: float = 10.0) -> None:
        """Stop serving, cancel queued and running generations, wait for the compute thread."""
        with self._pending_lock:
            self.closed = True
            for job in self._jobs:
                job.cancelled.set()
        if self._served:
            self.shutdown()  # returns at once if serve_forever has already ended
        self.server_close()
        try:
            self.compute.call(lambda: None, timeout=wait_s)
        except TimeoutError:
            pass

    # ---------------------------------------------------------------- logging
    def log(self, line: str) -> None:
        with self._log_lock:
            f = self.log_file or sys.stderr
            print(f"pmod server: {line}", file=f, flush=True)

    def handle_error(self, request, client_address) -> None:  # an exception escaped a handler
        self.log(f"error serving {client_address[0]}:\n{traceback.format_exc().rstrip()}")


class _ChatServer6(ChatServer):
    address_family = socket.AF_INET6


# ================================================================== HTTP handler
class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"
    server_version = "pmod"
    timeout = SOCKET_TIMEOUT_S
    _ids = itertools.count()

    # ---------------------------------------------------------------- plumbing
    def setup(self) -> None:
        super().setup()
        self._reset_log()

    def _reset_log(self) -> None:
        self._t0 = time.perf_counter()
        self._status = 0
        self._tokens = ""
        self._note = ""

    def log_request(self, code="-", size="-") -> None:  # our own line per request instead
        pass

    def log_message(self, format, *args) -> None:
        msg = format % args
        if "timed out" not in msg:  # idle keep-alive connections time out: not worth a line
            self.server.log(f"{self.address_string()} {msg}")

    def _log_line(self) -> None:
        dt = time.perf_counter() - self._t0
        parts = [self.command or "-", self.path.split("?")[0] if self.path else "-", str(self._status or "-")]
        if self._tokens:
            parts.append(self._tokens)
        parts.append(f"{dt:.3f}s")
        if self._note:
            parts.append(self._note)
        self.server.log(" ".join(parts))

    def handle_one_request(self) -> None:
        self._reset_log()
        super().handle_one_request()

    def handle_expect_100(self) -> bool:
        """Refuse an oversize body before the client sends it (curl's ``Expect: 100-continue``)."""
        length = self.headers.get("Content-Length")
        if length is not None and length.strip().isdigit() and int(length) > self.server.max_body:
            self.close_connection = True
            self._send_error(self._too_large(int(length)))
            self._log_line()
            return False
        return super().handle_expect_100()

    def _too_large(self, n: int) -> RequestError:
        return RequestError(f"the request body is {n} bytes, over the {self.server.max_body}-byte limit",
                            status=413, code="request_too_large")

    def _send_json(self, status: int, obj: dict) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: RequestError) -> None:
        self._note = err.message if len(err.message) <= 200 else err.message[:197] + "..."
        self._send_json(err.status, err.body())

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported: send Content-Length", status=411)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("the request needs a Content-Length header", status=411)
        if not length.strip().isdigit():
            self.close_connection = True
            raise RequestError(f"bad Content-Length {_short(length)}")
        n = int(length)
        if n > self.server.max_body:
            self.close_connection = True
            self._drain(n)
            raise self._too_large(n)
        data = self.rfile.read(n)
        if len(data) != n:
            self.close_connection = True
            raise RequestError(f"the request body ended after {len(data)} of {n} bytes")
        return data

    def _drain(self, n: int) -> None:
        """Read and drop a refused body (up to a bound) so the client gets to read our answer."""
        left = min(n, 8 * self.server.max_body)
        try:
            while left > 0:
                chunk = self.rfile.read(min(left, 1 << 20))
                if not chunk:
                    break
                left -= len(chunk)
        except OSError:
            pass

    def _client_gone(self) -> bool:
        """True when the client closed its connection (EOF readable without blocking)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _dispatch(self, handler) -> None:
        try:
            handler()
        except RequestError as e:
            try:
                self._send_error(e)
            except OSError:
                self.close_connection = True
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError) as e:
            self.close_connection = True
            self._note = f"client gone ({type(e).__name__})"
        except Exception as e:  # noqa: BLE001
            self.server.log(f"internal error in {self.command} {self.path}:\n{traceback.format_exc().rstrip()}")
            self.close_connection = True
            try:
                self._send_error(RequestError(f"internal error: {type(e).__name__}: {e}".split("\n")[0],
                                              status=500, type="server_error"))
            except OSError:
                pass
        self._log_line()

    # ---------------------------------------------------------------- routes
    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

    def _route(self) -> str:
        path = urllib.parse.urlsplit(self.path).path
        return path.rstrip("/") or "/"

    def _get(self) -> None:
        path = self._route()
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path.startswith("/v1/models/"):
            name = urllib.parse.unquote(path[len("/v1/models/"):])
            if name != self.server.model_id:
                raise RequestError(f"model {_short(name)} not found: this server serves {self.server.model_id!r}",
                                   "model", status=404, code="model_not_found")
            self._send_json(200, self._model_card())
        elif path == "/health":
            self._send_json(200, {"status": "ok"})
        elif path == "/v1/chat/completions":
            raise RequestError("use POST for /v1/chat/completions", status=405)
        else:
            raise RequestError(f"unknown path {_short(path)}", status=404, code="not_found")

    def _post(self) -> None:
        path = self._route()
        if path != "/v1/chat/completions":
            self.close_connection = True  # the body is not read
            if path in ("/v1/models", "/health"):
                raise RequestError(f"use GET for {path}", status=405)
            raise RequestError(f"unknown path {_short(path)}", status=404, code="not_found")
        raw = self._read_body()
        try:
            body = json.loads(raw, parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise RequestError(f"the request body is not valid JSON ({e})".split("\n")[0]) from None
        request = parse_chat_request(body, self.server.defaults, self.server.max_body)
        self._chat(request)

    def _model_card(self) -> dict:
        return {"id": self.server.model_id, "object": "model", "created": self.server.created, "owned_by": "pmod"}

    # ---------------------------------------------------------------- chat
    def _next_event(self, job: _Job):
        """The job's next event; cancels the job and raises if the client goes away meanwhile."""
        while True:
            now = time.monotonic()
            if now - self._checked > 0.25:  # also while events flow (a non-stream generation)
                self._checked = now
                if self._client_gone():
                    job.cancelled.set()
                    raise ConnectionAbortedError("client closed the connection")
            try:
                return job.events.get(timeout=0.25)
            except queue.Empty:
                pass

    def _chat(self, r: ChatRequest) -> None:
        job = self.server.submit(r)
        self._checked = time.monotonic()
        try:
            if r.stream:
                self._chat_stream(job)
            else:
                self._chat_once(job)
        finally:
            job.cancelled.set()  # no-op once it has finished; stops it if we leave early

    def _finish(self, reply) -> tuple[str, str, dict]:
        finish = "length" if reply.stats.finish_reason in ("length", "context") else "stop"
        s = reply.stats
        usage = {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens,
                 "total_tokens": s.prompt_tokens + s.generated_tokens}
        self._tokens = f"prompt={s.prompt_tokens} completion={s.generated_tokens} finish={finish}"
        return reply.text, finish, usage

    def _chat_once(self, job: _Job) -> None:
        while True:
            kind, value = self._next_event(job)
            if kind == "error":
                raise value
            if kind == "done":
                break
            if kind == "end":  # cancelled before it ran: the server is closing
                raise RequestError("the server is shutting down", status=503, type="server_error")
        text, finish, usage = self._finish(value)
        self._send_json(200, {
            "id": self._completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": self.server.model_id, "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage,
        })

    def _chat_stream(self, job: _Job) -> None:
        r = job.request
        first = self._next_event(job)  # errors before any token (bad image, prompt too long) are a 400
        if first[0] == "error":
            raise first[1]
        if first[0] == "end":  # cancelled before it ran: the server is closing
            raise RequestError("the server is shutting down", status=503, type="server_error")
        cid, created = self._completion_id(), int(time.time())

        def chunk(delta: dict, finish=None) -> dict:
            c = {"id": cid, "object": "chat.completion.chunk", "created": created,
                 "model": self.server.model_id, "system_fingerprint": None,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if r.include_usage:
                c["usage"] = None
            return c

        self._start_events()
        self._event(chunk({"role": "assistant", "content": ""}))
        event = first
        while True:
            kind, value = event
            if kind == "piece":
                self._event(chunk({"content": value}))
            elif kind == "done":
                _, finish, usage = self._finish(value)
                self._event(chunk({}, finish))
                if r.include_usage:
                    u = chunk({})
                    u["choices"], u["usage"] = [], usage
                    self._event(u)
                break
            elif kind == "error":  # after the headers: tell the client in the stream
                self._status = value.status
                self._note = value.message
                self._event(value.body())
                break
            else:
                break
            event = self._next_event(job)
        self._raw(b"data: [DONE]\n\n")
        self._end_events()

    def _completion_id(self) -> str:
        return f"chatcmpl-{uuid.uuid4().hex[:24]}"

    def _start_events(self) -> None:
        self._status = 200
        self._chunked = self.request_version != "HTTP/1.0"
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        if self._chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()

    def _event(self, obj: dict) -> None:
        self._raw(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")

    def _raw(self, data: bytes) -> None:
        if self._chunked:
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        self.wfile.write(data)
        self.wfile.flush()

    def _end_events(self) -> None:
        if self._chunked:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


# ================================================================== entry points
def model_id_of(model_dir) -> str:
    return Path(model_dir).resolve().name


def make_server(model_dir, host: str = DEFAULT_HOST, port: int = 0, backend: str = "mlx",
                dtype: str | None = None, *, max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
                seed: int | None = None, max_body: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE,
                session=None, log=None, start: bool = True, adapter_path=None, chat_template: bool = False,
                retention: float | None = None) -> tuple[ChatServer, threading.Thread | None]:
    """Open the model and bind ``host:port`` (0 picks a free port); serve in a daemon thread.

    Returns ``(httpd, thread)``; ``httpd.url`` is the base URL, ``httpd.close()`` stops it.
    ``session``: a factory ``() -> Session`` run on the compute thread instead of opening
    ``model_dir`` (the model is always created on that thread). ``start=False`` returns the
    server unstarted (thread None), for :func:`serve`.
    """
    defaults = Defaults(max_tokens, temp, top_p, seed)
    if not _is_int(max_tokens) or max_tokens < 1:
        raise PmodError(f"--max-tokens must be >= 1, got {max_tokens}")
    SamplerArgs(temp, top_p, seed)  # checks the defaults
    if seed is not None and seed < 0:
        raise PmodError(f"--seed must be >= 0, got {seed}")
    if not (_is_int(port) and 0 <= port <= 65535):
        raise PmodError(f"--port must be in 0..65535, got {port}")
    if not model_dir or not Path(model_dir).is_dir():
        raise PmodError(f"model directory {model_dir} not found: pass a pmod checkpoint directory")

    def open_it():
        if session is not None:
            return session()
        from .session import open_session

        kwargs = {"adapter_path": adapter_path} if adapter_path else {}
        return open_session(model_dir, backend=backend, dtype=dtype, chat_template=chat_template,
                            retention=retention, **kwargs)

    sess = _Compute.get().call(open_it)
    cls = _ChatServer6 if ":" in host else ChatServer
    try:
        httpd = cls((host, port), sess, model_id_of(model_dir), defaults, max_body=max_body,
                    max_queue=max_queue, log=log)
    except OSError as e:
        raise PmodError(f"cannot listen on {host}:{port} ({e.strerror or e}): pick another --port or --host") \
            from None
    if not start:
        return httpd, None
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                              name="pmod-server", daemon=True)
    thread.start()
    return httpd, thread


def serve(model_dir, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, backend: str = "mlx",
          dtype: str | None = None, **kwargs) -> None:
    """Serve until interrupted (Ctrl-C)."""
    httpd, _ = make_server(model_dir, host, port, backend, dtype, start=False, **kwargs)
    if host not in LOOPBACK:
        httpd.log(f"warning: listening on {host}, not loopback: anyone who can reach it can use the "
                  "model (no authentication)")
    httpd.log(f"serving {httpd.model_id} ({backend}) at {httpd.url}/v1 (Ctrl-C stops)")
    try:
        httpd.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        httpd.log("stopping")
    finally:
        httpd.close()


def run_server(args) -> None:
    """``pmod server``: args has ``model, host, port, backend, dtype`` (+ ``max_tokens, temp, top_p, seed``)."""
    serve(args.model, host=getattr(args, "host", DEFAULT_HOST), port=getattr(args, "port", DEFAULT_PORT),
          backend=getattr(args, "backend", "mlx"), dtype=getattr(args, "dtype", None),
          max_tokens=getattr(args, "max_tokens", 256), temp=getattr(args, "temp", 0.0),
          top_p=getattr(args, "top_p", 1.0), seed=getattr(args, "seed", None),
          adapter_path=getattr(args, "adapter_path", None), chat_template=getattr(args, "chat_template", False),
          retention=getattr(args, "retention", None))
