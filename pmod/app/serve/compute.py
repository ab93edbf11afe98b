"""The compute side of the server: the one thread that runs every model call, and a chat job run on it.

A job talks back to the HTTP thread that waits for it through ``Job.events``, a queue of
``(kind, value)`` pairs:

- ``("piece", str)``: the next piece of the reply's text;
- ``("done", Reply)``: the reply is complete (its text and stats);
- ``("error", RequestError)``: the request failed (a bad image, a prompt too long, an internal error);
- ``("end", None)``: always last, once the job has left the compute thread; with no ``done`` or
  ``error`` before it, the job was cancelled (the client left, or the server is closing).
"""

from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from pmod.app.generate import Sampler, SamplerArgs
from pmod.app.serve.errors import RequestError, internal_error
from pmod.app.serve.openai import ChatRequest
from pmod.errors import PmodError


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


class Compute:
    """One daemon thread, for the life of the process, that runs every model call in order.

    MLX keeps per-thread state, and a thread that used MLX and then exits can abort the
    process when it ends (seen with mlx 0.32 on Linux); so the model is opened and run on this
    one thread, which never exits, whichever thread serves the HTTP requests.
    """

    _instance: Compute | None = None
    _lock = threading.Lock()

    def __init__(self):
        self.tasks: queue.Queue[_Task] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="pmod-compute", daemon=True)
        self.thread.start()

    @classmethod
    def get(cls) -> Compute:
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


@dataclass(eq=False)
class Job:
    """One chat request on its way through the compute thread (events: see the module docstring)."""

    request: ChatRequest
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)


def generate(session, job: Job, log: Callable[[str], None]) -> None:
    """Run ``job`` on ``session`` (on the compute thread), putting its events; stop once it is cancelled."""
    from pmod.app.session import Reply

    r = job.request
    reply = Reply()
    try:
        sampler = Sampler(SamplerArgs(r.temp, r.top_p, r.seed))
        # The session matches the stop strings: it holds back a tail that could begin one and
        # ends the reply before the first match (reply.text is exactly the pieces yielded).
        pieces = session.complete(r.messages, r.images, system=r.system, max_tokens=r.max_tokens,
                                  sampler=sampler, stop=r.stop, reply=reply, ignore_eos=r.ignore_eos)
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
        log(f"internal error:\n{traceback.format_exc().rstrip()}")
        job.events.put(("error", internal_error(e)))
        return
    job.events.put(("done", reply))
