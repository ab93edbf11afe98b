"""The HTTP request handler: routes, request bodies, JSON replies and chat streams, one log line each.

Every request goes through :meth:`ChatHandler._dispatch`, which turns a :class:`RequestError`
into its error response, notes a client that went away, answers anything else with a 500 (the
traceback goes to the log), and then writes the request's log line:
``METHOD PATH STATUS [prompt=.. completion=.. finish=..] SECONDS [NOTE]``.
"""

from __future__ import annotations

import json
import queue
import select
import socket
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING

from pmod.app.serve.compute import Job
from pmod.app.serve.errors import RequestError, internal_error, short, shutting_down
from pmod.app.serve.openai import (
    ChatRequest, Chunks, completion, finish_and_usage, model_card, parse_chat_request, parse_json,
)
from pmod.app.serve.sse import EventStream

if TYPE_CHECKING:
    from pmod.app.serve.server import ChatServer

SOCKET_TIMEOUT_S = 120.0  # reading a request, writing a response, idle keep-alive
CHAT = "/v1/chat/completions"
MODELS = "/v1/models"
HEALTH = "/health"


def _not_found(path: str) -> RequestError:
    return RequestError(f"unknown path {short(path)}", status=404, code="not_found")


class ChatHandler(BaseHTTPRequestHandler):
    """One connection's requests (HTTP/1.1 keep-alive), served in turn on its own thread."""

    server: ChatServer
    protocol_version = "HTTP/1.1"
    server_version = "pmod"
    timeout = SOCKET_TIMEOUT_S

    # ---------------------------------------------------------------- the log line
    def setup(self) -> None:
        super().setup()
        self._reset_log()

    def handle_one_request(self) -> None:
        self._reset_log()
        super().handle_one_request()

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

    # ---------------------------------------------------------------- dispatch and routes
    def do_GET(self) -> None:
        self._dispatch(self._get)

    def do_POST(self) -> None:
        self._dispatch(self._post)

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
                self._send_error(internal_error(e))
            except OSError:
                pass
        self._log_line()

    def _route(self) -> str:
        path = urllib.parse.urlsplit(self.path).path
        return path.rstrip("/") or "/"

    def _get(self) -> None:
        path = self._route()
        if path == MODELS:
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path.startswith(MODELS + "/"):
            self._get_model(urllib.parse.unquote(path[len(MODELS + "/"):]))
        elif path == HEALTH:
            self._send_json(200, {"status": "ok"})
        elif path == CHAT:
            raise RequestError(f"use POST for {CHAT}", status=405)
        else:
            raise _not_found(path)

    def _get_model(self, name: str) -> None:
        if name != self.server.model_id:
            raise RequestError(f"model {short(name)} not found: this server serves {self.server.model_id!r}",
                               "model", status=404, code="model_not_found")
        self._send_json(200, self._model_card())

    def _model_card(self) -> dict:
        return model_card(self.server.model_id, self.server.created)

    def _post(self) -> None:
        path = self._route()
        if path != CHAT:
            self.close_connection = True  # the body is not read
            if path in (MODELS, HEALTH):
                raise RequestError(f"use GET for {path}", status=405)
            raise _not_found(path)
        body = parse_json(self._read_body())
        self._chat(parse_chat_request(body, self.server.defaults, self.server.max_body))

    # ---------------------------------------------------------------- request bodies
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

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported: send Content-Length", status=411)
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("the request needs a Content-Length header", status=411)
        if not length.strip().isdigit():
            self.close_connection = True
            raise RequestError(f"bad Content-Length {short(length)}")
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

    # ---------------------------------------------------------------- JSON replies
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

    # ---------------------------------------------------------------- chat
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

    def _next_event(self, job: Job):
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

    def _client_gone(self) -> bool:
        """True when the client closed its connection (EOF readable without blocking)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            if not readable:
                return False
            return self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _finish(self, reply) -> tuple[str, dict]:
        """The reply's finish reason and usage, noted for the log line."""
        s = reply.stats
        finish, usage = finish_and_usage(s)
        cached = f" cached={s.resumed_tokens}" if s.resumed_tokens else ""
        self._tokens = f"prompt={usage['prompt_tokens']}{cached} completion={s.generated_tokens} finish={finish}"
        return finish, usage

    def _chat_once(self, job: Job) -> None:
        while True:
            kind, value = self._next_event(job)
            if kind == "error":
                raise value
            if kind == "done":
                break
            if kind == "end":  # cancelled before it ran: the server is closing
                raise shutting_down()
        finish, usage = self._finish(value)
        self._send_json(200, completion(self.server.model_id, value.text, finish, usage))

    def _chat_stream(self, job: Job) -> None:
        event = self._next_event(job)  # errors before any token (bad image, prompt too long) are a 400
        if event[0] == "error":
            raise event[1]
        if event[0] == "end":  # cancelled before it ran: the server is closing
            raise shutting_down()
        chunks = Chunks(self.server.model_id, job.request.include_usage)
        self._status = 200
        events = EventStream(self)
        events.event(chunks.delta({"role": "assistant", "content": ""}))
        while True:
            kind, value = event
            if kind == "piece":
                events.event(chunks.delta({"content": value}))
            elif kind == "done":
                finish, usage = self._finish(value)
                events.event(chunks.delta({}, finish))
                if chunks.include_usage:
                    events.event(chunks.usage(usage))
                break
            elif kind == "error":  # after the headers: tell the client in the stream
                self._status = value.status
                self._note = value.message
                events.event(value.body())
                break
            else:
                break
            event = self._next_event(job)
        events.end()
