"""The HTTP server object: it holds the session, admits chat jobs to the compute thread, and logs."""

from __future__ import annotations

import queue
import socket
import sys
import threading
import time
import traceback
from http.server import ThreadingHTTPServer
from typing import Any, Callable

from pmod.app.serve.batching import Batcher
from pmod.app.serve.compute import Compute, Job, generate
from pmod.app.serve.errors import RequestError, shutting_down
from pmod.app.serve.handler import ChatHandler
from pmod.app.serve.openai import MAX_BODY_BYTES, ChatRequest, Defaults

MAX_QUEUE = 64  # requests waiting for or in generation; more get 503
DEFAULT_MAX_BATCH = 8  # requests decoded together (where the backend batches)


class ChatServer(ThreadingHTTPServer):
    """The HTTP server; ``session`` lives on the compute thread and is used only there."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, session, model_id: str, defaults: Defaults,
                 max_body: int = MAX_BODY_BYTES, max_queue: int = MAX_QUEUE, log=None,
                 max_batch: int = DEFAULT_MAX_BATCH):
        self.session = session
        self.max_batch = max_batch if session.engine.batches else 1
        self._waiting: queue.Queue[Job] = queue.Queue()  # jobs for the batcher (made on the compute thread)
        self._batcher: Batcher | None = None
        self._draining = False
        self.model_id = model_id
        self.defaults = defaults
        self.max_body = max_body
        self.max_queue = max_queue
        self.created = int(time.time())
        self.compute = Compute.get()
        self.log_file = log  # None: sys.stderr at the time of writing
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._jobs: set[Job] = set()
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
    def submit(self, request: ChatRequest) -> Job:
        job = Job(request)
        with self._pending_lock:
            if self.closed:
                raise shutting_down()
            if self._pending >= self.max_queue:
                raise RequestError(f"the server is busy ({self._pending} requests queued): retry later",
                                   status=503, type="server_error", code="server_busy")
            self._pending += 1
            self._jobs.add(job)
            if self.max_batch > 1:
                self._waiting.put(job)
                if not self._draining:
                    self._draining = True
                    self.compute.submit(self._drain)
                return job
        self.compute.submit(lambda: self._run(job))
        return job

    def _run(self, job: Job) -> None:
        try:
            if not job.cancelled.is_set():
                generate(self.session, job, self.log)
        finally:
            self._finished(job)

    def _drain(self) -> None:
        """On the compute thread: batch the waiting jobs until none is left."""
        if self._batcher is None:
            self._batcher = Batcher(self.session, self.max_batch, self._waiting, self._finished, self.log)
        while True:
            try:
                self._batcher.drain()
            finally:
                with self._pending_lock:
                    if self._waiting.empty() or self.closed:
                        self._draining = False
                        break

    def _finished(self, job: Job) -> None:
        with self._pending_lock:
            self._pending -= 1
            self._jobs.discard(job)
        job.events.put(("end", None))

    def describe(self) -> list[str]:
        """What this server does with its requests: batching and caches (logged at start-up)."""
        s, name = self.session, type(self.session.engine).__name__
        lines = [f"batching: up to {self.max_batch} requests decode together" if self.max_batch > 1 else
                 "requests run one at a time" + ("" if s.engine.batches else f" ({name} cannot batch)")]
        if s.prompt_cache is not None:
            lines.append(f"conversation cache: up to {s.prompt_cache.limit / 2**20:.0f} MiB of KV state")
        else:
            lines.append("conversation cache: off" + ("" if s.engine.resumes else f" ({name} cannot resume a saved context)"))
        lines.append(f"vision-feature cache: up to {s.vision_cache.limit / 2**20:.0f} MiB" if s.vision_cache is not None
                     else "vision-feature cache: off")
        return lines

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


class ChatServer6(ChatServer):
    address_family = socket.AF_INET6
